"""The project's own error: a message meant for the user, printed as one line."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user (a name, a file, a value). Entry points print it as one
    line on stderr and exit with status 2; library callers can catch it."""


def unknown_name(what: str, name: str, known: Iterable[str]) -> UserError:
    """An error for an unknown registry name that suggests the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {what} '{name}'{hint} (known: {', '.join(known)})")

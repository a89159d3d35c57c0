"""Ctrl-C while an entry script is still loading (torch takes seconds to import): one line,
``interrupted: no result was written``, and exit status 130, as during a run, instead of a
traceback through torch's import machinery.

The entry scripts (``attack/<name>.py``, ``defense/<name>.py``, ``defense/compare.py``) and
the packages behind ``python -m attack`` / ``python -m defense`` import this module first,
before torch; it imports nothing but the standard library. It sets a ``sys.excepthook``
that ends such a process when a KeyboardInterrupt reaches the top (``--debug`` keeps
Python's traceback). Once a run has started, utils.cli.entry handles Ctrl-C itself, so the
hook only sees an interrupt that came before (or after) it. In any other program (a
notebook, a script importing the packages) nothing is changed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType

ENTRY_FOLDERS = ("attack", "defense")
MESSAGE = "interrupted: no result was written"


def entry_script() -> bool:
    """Is this process an entry script of the project (or ``python -m attack|defense``)?"""
    if sys.argv and sys.argv[0] == "-m":  # python -m attack|defense, while the package is being located
        return True
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is not None and Path(path).resolve().parent.name in ENTRY_FOLDERS


def _hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt) and "--debug" not in sys.argv:
        try:
            print(str(value) if str(value).startswith("interrupted: ") else MESSAGE, file=sys.stderr)
            sys.stderr.flush()
        finally:
            os._exit(130)
    _previous(kind, value, tb)


_previous = sys.excepthook
if entry_script() and sys.excepthook is not _hook:
    sys.excepthook = _hook

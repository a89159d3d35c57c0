"""How entry points behave: bad input prints one line on stderr and exits with status 2;
Ctrl-C prints one line and exits with 130; ``--debug`` shows the traceback instead."""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from utils.errors import UserError


def entry(main: Callable[[list[str], dict[str, Any]], Any], argv: Sequence[str] | None,
          overrides: dict[str, Any]) -> Any:
    """Call ``main(argv, overrides)``. Called with neither argv nor keyword arguments, this
    is a command-line run: arguments come from ``sys.argv`` and errors end the process.
    Otherwise it is a Python call and errors propagate as UserError."""
    from_cli = argv is None and not overrides
    args = list(sys.argv[1:] if from_cli else (argv or []))
    if not from_cli:
        return main(args, overrides)
    debug = "--debug" in args
    try:
        return main(args, overrides)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: no result was written", file=sys.stderr)
        sys.exit(130)

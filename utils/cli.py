"""How entry points behave: bad input prints one line on stderr and exits with status 2;
Ctrl-C prints one line and exits with 130; ``--debug`` shows the traceback instead. A run
that fails or is interrupted after it saved a checkpoint keeps it, and its one line says
where the checkpoint is and how to go on (``--resume``)."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Sequence

from utils.errors import UserError
from utils.records import StagedFolder, checkpoint_epoch


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message is the one line to print."""


def entry(main: Callable[[list[str], dict[str, Any]], Any], argv: Sequence[str] | None,
          overrides: dict[str, Any]) -> Any:
    """Call ``main(argv, overrides)``. Called with neither argv nor keyword arguments, this
    is a command-line run: arguments come from ``sys.argv`` and errors end the process.
    Otherwise it is a Python call and errors propagate as UserError (and Ctrl-C as
    KeyboardInterrupt)."""
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
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(str(exc) if isinstance(exc, Interrupted) and str(exc) else "interrupted: no result was written",
              file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def guarded(out: StagedFolder) -> Iterator[None]:
    """The body of a staged run. When it fails or is interrupted, the staging folder is
    removed, unless it holds a checkpoint: then the folder is kept for ``--resume`` and
    the error's one line says where (a NaN loss keeps the last good checkpoint). The
    folder's lock is given back either way."""
    try:
        yield
    except BaseException as exc:
        epoch = checkpoint_epoch(out.checkpoint)
        if epoch is None:
            out.discard()
            raise
        out.release()
        where = f"the checkpoint of epoch {epoch} is kept in {out.partial}"
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted: {where}; run the same command with --resume to continue") from exc
        if isinstance(exc, UserError) and str(out.checkpoint) not in str(exc):
            raise UserError(f"{exc}; {where} (--resume continues from it)") from exc
        raise

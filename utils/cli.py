"""How entry points behave: bad input prints one line on stderr and exits with status 2;
Ctrl-C prints one line and exits with 130, SIGTERM (``kill``, a batch system's time
limit) the same line with 143; ``--debug`` shows the traceback instead. A run that fails
or is interrupted after it saved a checkpoint keeps it, and its one line says where the
checkpoint is and how to go on (``--resume``). A file system that refuses a write (full,
read-only, no permission) is one line naming the path and the reason, not a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from utils.errors import UserError
from utils.files import StagedFolder
from utils.records import checkpoint_epoch
from utils.runtime import Terminated, raise_terminated


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message is the one line to print."""


def entry(
    main: Callable[[list[str], dict[str, Any]], Any], argv: Sequence[str] | None, overrides: dict[str, Any]
) -> Any:
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
        with _sigterm_interrupts():
            return main(args, overrides)
    except UserError as exc:
        if debug:
            raise
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a write refused before the run's folder existed (a read-only record root)
        if debug or os_error(exc) is None:
            raise
        print("error: " + str(os_error(exc)), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(
            str(exc) if isinstance(exc, Interrupted) and str(exc) else "interrupted: no result was written",
            file=sys.stderr,
        )
        sys.exit(143 if _terminated(exc) else 130)


def python_call(
    main: Callable[[list[str], dict[str, Any]], Any], argv: Sequence[str] | None, overrides: dict[str, Any]
) -> Any:
    """The body of ``attack.run`` and ``defense.run``: :func:`entry` as a Python call,
    ``argv`` None meaning no arguments (never ``sys.argv``). Deprecated forward: called
    with nothing from the top level of the file Python runs as its script (a method file
    written before ``main``), it is that script's command line."""
    if argv is None and not overrides and called_as_script(3):
        return entry(main, None, {})
    return entry(main, [] if argv is None else argv, overrides)


def called_as_script(depth: int = 2) -> bool:
    """Is the code ``depth`` frames above this function the top level of the file Python
    runs as its script (``python defense/sau.py``, ``python -m defense.sau``)? Not a
    notebook, ``python -c`` or an imported module: those are Python calls, which never
    read ``sys.argv``."""
    frame = sys._getframe(depth)
    path = frame.f_globals.get("__file__")
    return (
        frame.f_globals.get("__name__") == "__main__"
        and frame.f_code.co_name == "<module>"
        and isinstance(path, str)
        and bool(sys.argv)
        and bool(sys.argv[0])
        and os.path.realpath(path) == os.path.realpath(sys.argv[0])
    )


def _terminated(exc: BaseException) -> bool:
    """Was ``exc`` (or what it was raised from) SIGTERM's Terminated?"""
    return isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) for the duration, so that a
    terminated run cleans up like an interrupted one: the staging folder is removed, or
    kept when it holds a checkpoint (and a checkpoint being written lands first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not in the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def os_error(exc: OSError) -> UserError | None:
    """The one line for an OSError of the file system (no space, read-only, no permission,
    a file where a folder should be): the path and the system's reason. None for an
    OSError that names no errno (not the file system's)."""
    if not exc.errno:
        return None
    path = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or exc.__class__.__name__
    return UserError(f"cannot write {path}: {reason}")


def overflow_error(exc: BaseException) -> UserError | None:
    """The one line for torch's float overflow (``value cannot be converted to type float
    without overflow``: a hyperparameter that is finite and within float32's range, but
    that a step multiplies beyond it, e.g. Adam's lr / (1 - beta_1^t)); else None."""
    if isinstance(exc, RuntimeError) and "without overflow" in str(exc):
        return UserError(
            "a value overflowed float32 inside torch during the run (value cannot be converted to "
            "type float without overflow): a hyperparameter is too large (a learning rate or a step "
            "size?)"
        )
    return None


@contextlib.contextmanager
def guarded(out: StagedFolder) -> Iterator[None]:
    """The body of a staged run. When it fails or is interrupted, the staging folder is
    removed (with any folder the run created for it), unless it holds a checkpoint: then
    the folder is kept for ``--resume`` and the error's one line says where (a NaN loss
    keeps the last good checkpoint). An OSError of the file system becomes a UserError
    naming the path (:func:`os_error`), and torch's float overflow one naming the likely
    cause (:func:`overflow_error`). The folder's lock is given back either way."""
    try:
        yield
    except BaseException as raised:
        exc = os_error(raised) if isinstance(raised, OSError) else overflow_error(raised)
        exc = raised if exc is None else exc
        epoch = checkpoint_epoch(out.checkpoint)
        if epoch is None:
            out.discard()
            if exc is raised and isinstance(exc, UserError) and str(out.checkpoint) in str(exc):  # unreadable
                raise UserError(
                    f"{exc}; it was removed with {out.partial}, so the next run starts from the beginning"
                ) from raised
            if exc is raised:
                raise
            raise exc from raised
        out.release()
        where = f"the checkpoint of epoch {epoch} is kept in {out.partial}"
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted: {where}; run the same command with --resume to continue") from exc
        if isinstance(exc, UserError) and (exc is not raised or str(out.checkpoint) not in str(exc)):
            raise UserError(f"{exc}; {where} (--resume continues from it)") from raised
        if exc is raised:
            raise
        raise exc from raised

"""Devices, seeds, mixed precision, logging, random states and Ctrl-C: the run-time
plumbing shared by every entry point."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from utils.errors import UserError

LOGGER_NAME = "saubench"
log = logging.getLogger(LOGGER_NAME)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cpu``, ``cuda`` and ``cuda:N``
    are taken as given but checked."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device '{spec}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{spec}' (use auto, cpu, cuda or cuda:N)")
    return device


def check_data_root(path: str | Path | None) -> None:
    """A ``--data_root`` the user named must exist; the default, ``./data``, may be
    created by a download."""
    if path is None or Path(path).is_dir() or Path(path).resolve() == Path("data").resolve():
        return
    what = "is not a folder" if Path(path).exists() else "does not exist"
    raise UserError(f"--data_root {path} {what} (create it, or leave --data_root out to use ./data)")


def check_record_root(path: str | Path) -> None:
    """A ``--record_root`` must be a folder or a place where one can be made: not a file,
    nor below one."""
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                what = "is a file" if place == path else f"is below {place}, which is a file"
                raise UserError(f"--record_root {path} {what}, not a folder")
            return


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Same seed and device: same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype used on ``device``: bfloat16 where the GPU supports it, else
    float16 (with loss scaling); None on the CPU, where runs stay in float32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes on CUDA; a no-op elsewhere."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# The factor a loss is multiplied by under float16 autocast before a gradient whose sign is
# used (or that is divided by it again), so that small gradients do not underflow to zero.
FLOAT16_SIGN_SCALE = 1024.0


def sign_scale(device: torch.device, enabled: bool = True) -> float:
    """:data:`FLOAT16_SIGN_SCALE` when autocast runs in float16 on ``device`` (and mixed
    precision is ``enabled``), else 1: the one place that says how a float16 loss is scaled
    before ``torch.autograd.grad`` (the sign-gradient searches of SAE, ANP and i-BAU)."""
    return FLOAT16_SIGN_SCALE if enabled and amp_dtype(device) == torch.float16 else 1.0


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """Loss scaler, active only when autocast runs in float16."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


@contextlib.contextmanager
def log_to(folder: Path | None, filename: str = "run.log", level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send the project's log records to the console (``level`` and up) and, when
    ``folder`` is given, to a file in it (everything, DEBUG included); handlers are removed
    again on exit so that runs in one process do not write into each other's logs."""
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = _Console(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level)
    handlers.append(console)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        file_handler = _RunLogFile(folder / filename, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file_handler.setLevel(logging.DEBUG)  # the file also keeps the resolved config
        handlers.append(file_handler)
    previous_level = log.level
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(previous_level)


class _Console(logging.StreamHandler):
    """The console handler: a line printed above the progress bars (tqdm.write) rather
    than through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (as logging's own handlers: never raise from a log call)
            self.handleError(record)


class _RunLogFile(logging.FileHandler):
    """The run's log file. A write the file system refuses (a full disk) drops the record
    from the file instead of printing logging's traceback: the console handler still shows
    it, and the run's own next write stops it with one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            super().flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold the project's log records back for the duration (work done before a run's
    folder and log exist): a run refused meanwhile prints its one error line only. Pass
    the list to :func:`replay` once the run's log is open."""
    held = _Held()
    previous_level, previous_propagate = log.level, log.propagate
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addHandler(held)
    try:
        yield held.records
    finally:
        log.removeHandler(held)
        log.setLevel(previous_level)
        log.propagate = previous_propagate


def replay(records: list[logging.LogRecord]) -> None:
    """Send held records (see :func:`held_logs`) to the handlers now attached."""
    for record in records:
        log.handle(record)


def tqdm_disable() -> bool | None:
    """tqdm's ``disable`` value: bars on a terminal, off when stderr is not one (None lets
    tqdm decide by the stream), under CI (``CI`` set, as CI services do) and with
    SAUBENCH_NO_PROGRESS=1."""
    if os.environ.get("SAUBENCH_NO_PROGRESS") == "1":
        return True
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return None


def progress(iterable: Any = None, *, desc: str, total: int | None = None, unit: str = "it", delay: float = 2.0) -> Any:
    """A tqdm bar on stderr that appears only after ``delay`` seconds (short loops stay
    quiet) and never where :func:`tqdm_disable` says so; it leaves no line behind."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        delay=delay,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=tqdm_disable(),
    )


# -- random states, for checkpoints ----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The global random states of Python, NumPy and torch (CPU and every CUDA device), as
    tensors and plain values only, so that a checkpoint holding them loads with
    ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# -- Ctrl-C and SIGTERM ------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command-line run (see utils.cli.entry): handled like Ctrl-C (the
    staging folder is removed or its checkpoint kept), but the process exits with 143."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler that raises :class:`Terminated`."""
    raise Terminated


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT), and SIGTERM where it is handled as an interrupt (a
    command-line run), for the duration, so that a checkpoint being written is finished
    and renamed into place; the interrupt is raised on exit. Outside the main thread
    (where no signal handler can be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not in the main interpreter
        yield
        return
    terminate = signal.getsignal(signal.SIGTERM)
    if terminate is raise_terminated:
        signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if terminate is raise_terminated:
            signal.signal(signal.SIGTERM, raise_terminated)
    if signal.SIGTERM in caught:
        raise Terminated
    if caught:
        raise KeyboardInterrupt

"""Devices, seeds, mixed precision and logging: the run-time plumbing shared by every
entry point."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Iterator

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
    except RuntimeError:
        raise UserError(f"unknown device '{spec}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{spec}' (use auto, cpu, cuda or cuda:N)")
    return device


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


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """Loss scaler, active only when autocast runs in float16."""
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


@contextlib.contextmanager
def log_to(folder: Path | None, filename: str = "run.log", level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send the project's log records to the console (``level`` and up) and, when
    ``folder`` is given, to a file in it (everything, DEBUG included); handlers are removed again on exit so that runs in one process do not
    write into each other's logs."""
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level)
    handlers.append(console)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(folder / filename, encoding="utf-8")
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


def tqdm_disable() -> bool | None:
    """tqdm's ``disable`` value: bars on a terminal, off in logs and CI (None lets tqdm
    decide by the stream), forced off with SAUBENCH_NO_PROGRESS=1."""
    return True if os.environ.get("SAUBENCH_NO_PROGRESS") == "1" else None

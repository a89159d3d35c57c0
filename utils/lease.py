"""Lease locks: the lock of a run's output folder (:class:`utils.files.StagedFolder`)
held with a heartbeat, so that a run killed with its machine does not block the folder
forever.

The lock file holds one line, ``<pid> <host>``, and its modification time is the
heartbeat: the run that holds it touches it every :func:`lease_seconds` / 4 seconds from
a daemon thread. Whether a lock still binds:

* held by a process of this host: while that process is alive (checked directly, at once);
* held by a process of another host (a cluster node sharing the record root): while its
  heartbeat is younger than the lease, :func:`lease_seconds` (120 s; the environment
  variable ``SAUBENCH_LEASE_SECONDS`` changes it); a lock whose lease expired is taken
  over, with a warning in the log that names the lock, its holder and the heartbeat's age;
* empty (a run that is creating it): for 10 s.

Hosts compare the heartbeat with their own clock: a cluster's clocks must agree to well
within the lease (NTP does that). A run stalled for longer than the lease (a machine
suspended) may lose its lock to another run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

log = logging.getLogger("saubench")

LEASE_ENV = "SAUBENCH_LEASE_SECONDS"
DEFAULT_LEASE = 120.0
STARTING = 10.0  # seconds an empty lock file (being created) binds


def lease_seconds() -> float:
    """How long a lock of another host binds after its last heartbeat."""
    text = os.environ.get(LEASE_ENV)
    try:
        value = float(text) if text else DEFAULT_LEASE
    except ValueError:
        raise UserError(f"{LEASE_ENV}={text!r}: expected a number of seconds") from None
    if not value > 0:
        raise UserError(f"{LEASE_ENV}={text!r}: expected a positive number of seconds")
    return value


def lock_of(final: Path) -> Path:
    """The lock of the output folder ``final``: ``<parent>/.<name>.lock``."""
    return Path(final).parent / f".{Path(final).name}.lock"


def me() -> str:
    """What this process writes into a lock: ``<pid> <host>``."""
    return f"{os.getpid()} {socket.gethostname()}"


@dataclass(frozen=True)
class LockState:
    """A lock file as read now: ``holder`` (who, when it still binds) or ``free`` (why it does not)."""

    holder: str | None = None
    free: str = ""  # why a lock that exists does not bind: "process N is gone", "lease expired ..."
    remote: bool = False  # held by another host (binds by its lease)


def inspect(lock: Path) -> LockState:
    """Who holds ``lock``, or why nobody does (no file: ``LockState()``)."""
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return LockState()  # given back meanwhile
    pid_text, _, host = text.strip().partition("\n")[0].partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:  # not written yet by a run starting now, or half-written by a killed one
        if age < STARTING:
            return LockState("a run that is starting")
        return LockState(free=f"left empty {age:.0f} s ago")
    if host != socket.gethostname():
        lease = lease_seconds()
        if age <= lease:
            return LockState(f"process {pid} on host {host}", remote=True)
        return LockState(
            free=f"the lease of process {pid} on host {host} expired (last heartbeat {age:.0f} s ago, "
            f"lease {lease:.0f} s)",
            remote=True,
        )
    if pid == os.getpid():
        return LockState(free="held by this process earlier")  # an earlier run of it that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return LockState(free=f"process {pid} is gone")
    except PermissionError:
        pass  # alive, another user's
    return LockState(f"process {pid}")


def holder(lock: Path) -> str | None:
    """Who holds ``lock`` while it binds; None for a free one (or no lock)."""
    return inspect(lock).holder


class LockHeld(UserError):
    """The folder is being written by a run whose lock still binds; ``lock``: the lock file."""

    def __init__(self, message: str, lock: Path):
        super().__init__(message)
        self.lock = lock


class Lease:
    """The lock file ``path`` held by this process, refreshed until :meth:`release`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stop: threading.Event | None = None
        self._content = ""

    @property
    def held(self) -> bool:
        return self._stop is not None

    def acquire(self, what: Path) -> None:
        """Take the lock for writing ``what`` (named in the errors), taking over a lock
        that no longer binds (a warning says whose and why)."""
        self._content = me() + "\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask
            except FileNotFoundError:  # a failing run removed the empty folder it had made, just now
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            except FileExistsError:
                state = inspect(self.path)
                if state.holder is not None:
                    later = (
                        f" (a lock whose heartbeat is older than {lease_seconds():.0f} s is taken over)"
                        if state.remote
                        else ""
                    )
                    raise LockHeld(
                        f"{what} is being written by another run ({state.holder}); wait for it to "
                        f"finish, or remove {self.path} if that run is gone{later}",
                        self.path,
                    ) from None
                if state.free and state.free != "held by this process earlier":
                    log.warning("taking over the lock %s: %s", self.path, state.free)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(self._content)
            self._start_heartbeat()
            return
        raise LockHeld(f"cannot take the lock {self.path}: other runs keep taking it", self.path)

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._beat,
            args=(self._stop, max(lease_seconds() / 4, 0.05)),
            name=f"lease {self.path.name}",
            daemon=True,
        )
        thread.start()

    def _beat(self, stop: threading.Event, every: float) -> None:
        while not stop.wait(every):
            try:
                if self.path.read_text() != self._content:
                    return  # taken over (this process stalled past its lease): never touch another run's lock
                os.utime(self.path)
            except OSError:
                return  # given back, or the folder is gone

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (nothing when not held)."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        try:
            if self.path.read_text() == self._content:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass


def wait_until_free(lock: Path, timeout: float | None = None, poll: float = 1.0) -> str | None:
    """Wait until ``lock`` no longer binds (its holder gone, its lease expired) or ``timeout``
    seconds (default: the lease and a little) have passed; returns the holder that
    still binds then, or None. A retried run calls this before it takes the lock of the
    attempt that was lost with its node."""
    deadline = time.monotonic() + (lease_seconds() + 2 * poll if timeout is None else timeout)
    while True:
        current = holder(lock)
        if current is None or time.monotonic() >= deadline:
            return current
        time.sleep(poll)

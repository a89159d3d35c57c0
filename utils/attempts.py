"""Attempts of one run: which try of a job this is, told by the run's own log.

An executor may run a job again (Ray, when the node running it was lost). Each
submission of a run carries a token; every attempt writes a first line into the run's
log (``compare/<name>/logs/<record>/<run>.log``, on the shared record root)::

    # attempt 1 of run 5c0f9e21a3b4d6e7: host node07, Ray node 8a41…, pid 12345

An attempt that finds lines of its own token there is a retry: it appends to the log
(the lost attempt's output stays above) and resumes from the checkpoint the lost attempt
left (:func:`retried_options`). A new submission (a new token) starts the log
afresh. The line also tells where a run is running (the tests read the pid and node).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from utils.lease import lock_of, wait_until_free
from utils.provenance import ray_node_id

HEADER = re.compile(r"^# attempt (\d+) of run (\w+): host (\S+), Ray node (\S+), pid (\d+)$")


def begin_attempt(log: Path, token: str) -> int:
    """The number of this attempt of the run submitted with ``token``: 1 + the attempts
    of that token already named in ``log``."""
    return 1 + sum(1 for earlier in attempts_in(log) if earlier["token"] == token)


def attempt_header(number: int, token: str) -> str:
    """The line an attempt writes first into its log."""
    return (
        f"# attempt {number} of run {token}: host {socket.gethostname()}, Ray node {ray_node_id() or '-'}, "
        f"pid {os.getpid()}"
    )


def attempts_in(log: Path) -> list[dict[str, str | int]]:
    """The attempts a log names, in order: number, token, host, node ('-': not on Ray), pid."""
    try:
        text = Path(log).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [
        {"number": int(m.group(1)), "token": m.group(2), "host": m.group(3), "node": m.group(4), "pid": int(m.group(5))}
        for line in text.splitlines()
        if (m := HEADER.match(line))
    ]


def retried_options(options: dict[str, Any], number: int, attempt: str, out: Any, folder: str | None) -> dict[str, Any]:
    """The options of attempt ``number`` of a run: a retry resumes from the checkpoint the
    lost attempt left, once that attempt's lock no longer binds (its process gone, or
    its lease expired); a line in the log says so."""
    out.write(attempt_header(number, attempt) + "\n")
    out.flush()  # where the run is, readable while it runs
    if number == 1:
        return options
    if folder is not None:
        lock = lock_of(Path(folder))
        holder = wait_until_free(lock)
        if holder is not None:
            out.write(f"# the lock {lock} still binds ({holder}); this attempt will stop on it\n")
    out.write("# a retry: resuming from the lost attempt's checkpoint, when it left one\n")
    out.flush()
    return {**options, "resume": True}

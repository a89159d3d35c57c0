"""The runs of a comparison and their execution: one :class:`Run` per attack (making a
record) or defense run (a record, a defense, a seed), run on an executor
(:mod:`bench.executors`) with its console output in a log, and the progress of the whole.
The planning (which runs exist, which are reused) is in :mod:`bench.compare`; the table
built from the summaries the runs write is in :mod:`bench.tables`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from bench.executors import DependencyFailed, Executor, Handle, JobFailed, Resources
from utils.errors import UserError
from utils.lease import LockHeld

# unavailable: not run because what it needs does not exist (e.g. no tuned recipe)
Status = Literal["todo", "done", "reused", "failed", "mismatch", "blocked", "unavailable"]


# -- runs ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Run:
    """One attack (making a record) or one defense run (a record, a defense, a seed)."""

    side: Literal["attack", "defense"]  # which harness runs it (a method's own kind is its class's)
    record: str
    method: str
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the harness's run
    folder: Path | None = None  # where its result lives
    log: Path | None = None  # the console output of the run, written by :func:`logged_call`
    status: Status = "todo"
    summary: dict[str, Any] | None = None
    message: str = ""
    depends_on: "Run | None" = None
    identity: str | None = None  # attack runs: the identity of the record in place, when it is usable
    legacy: bool = False  # attack runs: that record was written before records had identities
    dataset: str = ""  # attack runs: the record's dataset (which shipped recipes apply)
    resources: Resources | None = None  # what it asks the executor for (Ray); None: execute()'s default
    column: str = ""  # the table column it counts in: its record, or the grid's record name for all its seeds

    @property
    def group(self) -> str:
        """The table column: a record, or one attack's records over the seeds (``record_seeds``)."""
        return self.column or self.record

    @property
    def label(self) -> str:
        if self.side == "attack":
            return f"attack {self.method} -> {self.record}"
        return f"{self.method} on {self.record} (seed {self.seed})"

    @property
    def ok(self) -> bool:
        return self.status in ("done", "reused") and self.summary is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "record": self.record,
            "method": self.method,
            "seed": self.seed if self.side == "defense" or self.column else None,
            "status": self.status,
            "message": self.message,
            "folder": None if self.folder is None else str(self.folder),
            "log": None if self.log is None else str(self.log),
            "seconds": None if self.summary is None else self.summary.get("seconds"),
            "device": None if self.summary is None else self.summary.get("device"),
            **{key: None if self.summary is None else self.summary.get(key) for key in ("code", "host", "node")},
        }

    def log_note(self) -> str:
        """`` (log: path)`` for a failed run whose log exists; empty otherwise (a run
        lost before it started has none, and no path is shown that leads nowhere)."""
        if self.status == "failed" and self.log is not None and Path(self.log).is_file():
            return f" (log: {self.log})"
        return ""


class RunFailed(JobFailed):
    """A run raised: ``str`` is one line, ``log`` the file with its output and traceback."""

    @property
    def log(self) -> str | None:
        return self.args[1]


def reason_of(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}".rstrip(": ")
    if isinstance(exc, LockHeld):  # whole: the lock's full path is what the user needs
        return reason
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def logged_call(
    fn: Callable[..., Any],
    name: str,
    options: dict[str, Any],
    log: str | None,
    attempt: str | None = None,
    folder: str | None = None,
) -> Any:
    """``fn(name, **options)`` with its console output (stderr and stdout: the harness's
    log lines, warnings) written to ``log`` and inner progress bars off; a failure is
    raised as :class:`RunFailed` with one line and the log's path (the traceback is in
    the log). Runs in whichever process the executor chose.

    ``attempt`` (a token of this submission) and ``folder`` (the run's result folder):
    the log starts with a line naming the attempt, host, Ray node and process
    (:mod:`utils.attempts`); an executor that runs the job again (Ray, after a lost node)
    appends to the log, waits for the lost attempt's lock to stop binding
    (:mod:`utils.lease`) and resumes from its checkpoint (the harness's ``resume``)."""
    from utils.attempts import begin_attempt, retried_options

    previous = os.environ.get("SAUBENCH_NO_PROGRESS")
    os.environ["SAUBENCH_NO_PROGRESS"] = "1"
    with contextlib.ExitStack() as stack:
        out = None
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            number = begin_attempt(Path(log), attempt) if attempt is not None else 1
            out = stack.enter_context(open(log, "w" if number == 1 else "a", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stderr(out))
            stack.enter_context(contextlib.redirect_stdout(out))
            if attempt is not None:
                options = retried_options(options, number, attempt, out, folder)
        try:
            return fn(name, **options)
        except Exception as exc:
            if out is not None:
                traceback.print_exc(file=out)
            raise RunFailed(reason_of(exc), log) from None
        finally:
            if previous is None:
                os.environ.pop("SAUBENCH_NO_PROGRESS", None)
            else:
                os.environ["SAUBENCH_NO_PROGRESS"] = previous


def made_by(summary: dict[str, Any]) -> dict[str, str | None]:
    """What made a result, from its summary.json: code version (short), host, Ray node (short)."""
    from utils.provenance import describe

    code = summary.get("code")
    node = summary.get("node")
    return {
        "code": describe(code) if isinstance(code, dict) else None,
        "host": str(summary["host"]) if summary.get("host") else None,
        "node": str(node)[:12] if node else None,
    }


STALE = "stale: made on another version of the record"


def identity_problem(summary: dict[str, Any], identity: str | None, legacy: bool = False) -> str | None:
    """Why a summary (attack_summary.json, a defense's summary.json) cannot be reused for
    the record of identity ``identity``; None when it names that identity. ``legacy``: the
    record was written before records had identities; a summary that names none (as
    every summary of that time) is then accepted, one that names another is not."""
    have = summary.get("record_identity")
    if identity is not None and have == identity:
        return None
    if have is None and legacy:
        return None
    if have is None:
        return "it names no record identity (made before results named one), so it may be " + STALE
    return f"{STALE} ({str(have)[:12]}, the record in place is {str(identity)[:12]})"


# -- execution ---------------------------------------------------------------------------------------


def execute(
    runs: Sequence[Run],
    executor: Executor,
    functions: dict[str, Callable[..., Any]],
    resources: Resources | None = None,
    on_finish: Callable[[Run], None] | None = None,
) -> None:
    """Run every run whose status is ``todo`` on ``executor`` (``functions[run.side]``
    through :func:`logged_call`); a defense run whose record is being made waits for it.
    Each run ends ``done`` (summary set), ``failed`` or ``blocked`` (its attack failed);
    ``on_finish(run)`` is called as each one ends."""
    handles: dict[int, Run] = {}
    by_run: dict[int, Handle] = {}
    for run in sorted((r for r in runs if r.status == "todo"), key=lambda r: r.side != "attack"):
        deps = []
        if run.depends_on is not None and id(run.depends_on) in by_run:
            deps.append(by_run[id(run.depends_on)])
        handle = executor.submit(
            logged_call,
            (
                functions[run.side],
                run.method,
                run.options,
                None if run.log is None else str(run.log),
                secrets.token_hex(8),
                None if run.folder is None else str(run.folder),
            ),
            deps,
            run.resources or resources,
        )
        handles[handle.id] = run
        by_run[id(run)] = handle
    for handle, result, error in executor.as_completed(list(by_run.values())):
        run = handles[handle.id]
        if error is None:
            run.status, run.summary, run.message = "done", result, ""
        elif isinstance(error, DependencyFailed):
            dep = run.depends_on
            run.status = "blocked"
            run.message = f"attack record {dep.record} failed" if dep is not None else str(error)
        else:
            run.status = "failed"
            run.message = str(error) if isinstance(error, RunFailed) else reason_of(error)
        if on_finish is not None:
            on_finish(run)


class Progress:
    """The overall bar (runs done / total, elapsed, ETA) and one line per finished run."""

    def __init__(self, total: int, quiet: bool, write: Callable[[str], None]):
        from tqdm.auto import tqdm

        from utils.runtime import tqdm_disable

        self.total, self.count, self.start = total, 0, time.perf_counter()
        disable = True if quiet or total == 0 else tqdm_disable()
        self.bar = tqdm(total=total, desc="compare", unit="run", disable=disable, file=sys.stderr, dynamic_ncols=True)
        self.write = write

    def finished(self, run: Run) -> None:
        self.count += 1
        summary = run.summary or {}
        took = summary.get("seconds")
        detail = f"in {took:.1f} s" if run.status == "done" and isinstance(took, (int, float)) else run.message
        if run.status == "done" and summary.get("host"):  # where it ran: one short line per run, on the driver
            detail += f" on {summary['host']}" + (f", node {str(summary['node'])[:8]}" if summary.get("node") else "")
        line = f"[{self.count}/{self.total}] {run.label}: {run.status}" + (f" ({detail})" if detail else "")
        if run.log_note():
            line += f", log {run.log}"
        if self.bar.disable:
            self.write(line)
        else:
            self.bar.write(line, file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

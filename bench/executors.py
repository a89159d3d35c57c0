"""Executors: one small interface for running independent jobs, some of which wait for
others, in this process, in a pool of worker processes, or as Ray tasks.

    with make_executor("local", jobs=2) as ex:
        a = ex.submit(train, ("badnet",))
        b = ex.submit(purify, ("sau",), deps=[a])   # starts once ``a`` has finished
        for handle, result, error in ex.as_completed([a, b]):
            ...

``submit(fn, args, deps, resources) -> Handle`` and ``as_completed(handles)`` (or
``gather(handles)``) are the whole interface. A job whose dependency failed does not run:
it fails with :class:`DependencyFailed`. ``fn`` and ``args`` must be picklable for the
process pool and Ray (module-level functions, plain values).

* :class:`InlineExecutor`: this process, one job at a time, in submission order (``--jobs 1``).
* :class:`ProcessExecutor`: ``concurrent.futures.ProcessPoolExecutor`` (spawned workers);
  each worker sees one GPU (``CUDA_VISIBLE_DEVICES``) when GPUs are given. A dependent
  job is handed to the pool when its dependencies have finished.
* :class:`RayExecutor`: Ray tasks with ``num_cpus``/``num_gpus``/``memory`` from
  :class:`Resources`; dependencies are Ray object references passed as task arguments,
  so Ray starts a job when its own dependencies are done. A job lost with its worker or
  node is run again up to ``retries`` times (Ray's ``max_retries``; an exception the job
  raises is its result, never retried); ``runtime_env`` is the job's (Ray is an
  optional extra: ``pip install sau-bench[ray]``, or ``sau-bench[ray-default]`` for the
  dashboard and ``ray list``).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing as mp
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from utils.errors import UserError


@dataclass(frozen=True)
class Resources:
    """What one job asks for (used by Ray; the local pool gives each worker one GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None  # bytes (Ray's ``memory``: a scheduling request, not a limit)


class JobFailed(Exception):
    """A job's failure as one line (``str``) and one detail; picklable, so that it comes
    back from worker processes and Ray tasks as it was raised."""

    def __init__(self, message: str, detail: Any = None):
        super().__init__(message, detail)

    def __str__(self) -> str:
        return str(self.args[0])


class DependencyFailed(JobFailed):
    """A job did not run because a job it depends on failed (``cause``: that job's error)."""

    @property
    def cause(self) -> BaseException | None:
        return self.args[1]


@dataclass(eq=False)
class Handle:
    """A submitted job. ``ref`` is the backend's own object (a Future, a Ray ObjectRef)."""

    id: int
    fn: Callable[..., Any]
    args: tuple
    deps: tuple["Handle", ...] = ()
    resources: Resources = field(default_factory=Resources)
    ref: Any = None


Completed = tuple[Handle, Any, BaseException | None]


class Executor(ABC):
    """Runs jobs; see the module docstring."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    def submit(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        deps: Iterable[Handle] = (),
        resources: Resources | None = None,
    ) -> Handle:
        handle = Handle(next(self._ids), fn, tuple(args), tuple(deps), resources or Resources())
        self._submit(handle)
        return handle

    @abstractmethod
    def _submit(self, handle: Handle) -> None: ...

    @abstractmethod
    def as_completed(self, handles: Iterable[Handle]) -> Iterator[Completed]:
        """(handle, result, None) or (handle, None, error) for each handle, as they finish."""

    def gather(self, handles: Sequence[Handle]) -> list[Any]:
        """The results in the order of ``handles``; a failed job gives its exception."""
        out: dict[int, Any] = {}
        for handle, result, error in self.as_completed(handles):
            out[handle.id] = error if error is not None else result
        return [out[h.id] for h in handles]

    def close(self, cancel: bool = False) -> None:
        """Release workers; ``cancel`` drops jobs that have not started."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)


def _dependency_error(error: BaseException) -> DependencyFailed:
    return DependencyFailed(f"a job it depends on failed ({error})", error)


# -- this process -----------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each job in this process when its result is asked for, in submission order."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[Handle] = []
        self._done: dict[int, tuple[Any, BaseException | None]] = {}

    def _submit(self, handle: Handle) -> None:
        self._pending.append(handle)

    def _run(self, handle: Handle) -> tuple[Any, BaseException | None]:
        if handle.id in self._done:
            return self._done[handle.id]
        for dep in handle.deps:
            _, error = self._run(dep)
            if error is not None:
                self._done[handle.id] = (None, _dependency_error(error))
                return self._done[handle.id]
        try:
            outcome: tuple[Any, BaseException | None] = (handle.fn(*handle.args), None)
        except Exception as exc:  # a job's failure is its result; Ctrl-C is not caught
            outcome = (None, exc)
        self._done[handle.id] = outcome
        if handle in self._pending:
            self._pending.remove(handle)
        return outcome

    def as_completed(self, handles: Iterable[Handle]) -> Iterator[Completed]:
        for handle in sorted(handles, key=lambda h: h.id):
            result, error = self._run(handle)
            yield handle, result, error


# -- worker processes on this machine ----------------------------------------------------------


def _pin_gpu(queue: Any) -> None:
    """Pool initializer: this worker sees one GPU."""
    gpu = queue.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


class ProcessExecutor(Executor):
    """``jobs`` spawned worker processes. With ``gpus`` (device indices), worker k sees
    only ``gpus[k % len(gpus)]``. A job with dependencies goes to the pool once they
    have finished (checked whenever a job finishes, while results are being collected)."""

    def __init__(self, jobs: int, gpus: Sequence[int] = ()):
        super().__init__()
        if jobs < 1:
            raise UserError(f"--jobs must be >= 1, got {jobs}")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for k in range(jobs):
            queue.put(gpus[k % len(gpus)] if gpus else None)
        self._pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_pin_gpu, initargs=(queue,))
        self._waiting: list[Handle] = []

    def _submit(self, handle: Handle) -> None:
        handle.ref = cf.Future()
        self._waiting.append(handle)
        self._release()

    def _release(self) -> None:
        """Hand every waiting job whose dependencies are done to the pool."""
        for handle in list(self._waiting):
            if not all(dep.ref.done() for dep in handle.deps):
                continue
            self._waiting.remove(handle)
            failed = next((dep for dep in handle.deps if dep.ref.exception() is not None), None)
            if failed is not None:
                handle.ref.set_exception(_dependency_error(failed.ref.exception()))
                continue
            inner = self._pool.submit(handle.fn, *handle.args)
            inner.add_done_callback(lambda f, outer=handle.ref: _copy_future(f, outer))

    def as_completed(self, handles: Iterable[Handle]) -> Iterator[Completed]:
        remaining = {h.id: h for h in handles}
        while remaining:
            self._release()
            done, _ = cf.wait([h.ref for h in remaining.values()], timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for handle in sorted((h for h in remaining.values() if h.ref in done), key=lambda h: h.id):
                del remaining[handle.id]
                error = handle.ref.exception()
                yield handle, None if error is not None else handle.ref.result(), error

    def close(self, cancel: bool = False) -> None:
        for handle in self._waiting:
            handle.ref.cancel()
        self._waiting.clear()
        self._pool.shutdown(wait=True, cancel_futures=cancel)


def _copy_future(inner: cf.Future, outer: cf.Future) -> None:
    if inner.cancelled():
        outer.cancel()
    elif inner.exception() is not None:
        outer.set_exception(inner.exception())
    else:
        outer.set_result(inner.result())


# -- Ray ----------------------------------------------------------------------------------------------


def _ray_call(fn: Callable[..., Any], args: tuple, *deps: Any) -> Any:
    """The Ray task: ``deps`` are the dependencies' results, passed only so that Ray waits for them."""
    return fn(*args)


class RayExecutor(Executor):
    """Jobs as Ray tasks on the cluster at ``address`` (None: a local instance with
    ``num_cpus`` CPUs, started here and shut down by :meth:`close`; an instance already
    started in this process is used as it is). ``retries``: runs of a job lost with its
    worker or node; ``runtime_env``: Ray's, for the whole job (given to ``ray.init``: a
    local working_dir is shipped only at the job level; utils.cluster.runtime_env)."""

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        retries: int = 1,
        runtime_env: dict[str, Any] | None = None,
    ):
        super().__init__()
        if retries < 0:
            raise UserError(f"--retries must be >= 0, got {retries}")
        self.retries, self.runtime_env = retries, runtime_env
        try:
            import ray
        except ImportError:
            raise UserError(
                "--executor ray needs Ray: pip install 'sau-bench[ray]' (or 'sau-bench[ray-default]' for "
                "the dashboard and ray list)"
            ) from None
        self._ray = ray
        self._owns = not ray.is_initialized()
        if runtime_env is not None and not self._owns:
            raise UserError(
                "a Ray runtime_env (--ray_code working_dir) is set when connecting to Ray, but Ray is "
                "already initialized in this process"
            )
        if self._owns:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "runtime_env": runtime_env}
            if address is None:
                kwargs["num_cpus"] = num_cpus
            try:
                # "local": a new instance, never a cluster that `ray start` left running on this host
                ray.init(address=address or "local", **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(
                    f"cannot start or reach Ray at {address or 'a local instance'}: {str(exc).splitlines()[0]}"
                ) from None
        self._task = ray.remote(_ray_call)

    def cluster_gpus(self) -> float:
        return float(self._ray.cluster_resources().get("GPU", 0))

    def _submit(self, handle: Handle) -> None:
        res = handle.resources
        options: dict[str, Any] = {
            "num_cpus": res.cpus,
            "num_gpus": res.gpus,
            "max_retries": self.retries,
            "retry_exceptions": False,
        }
        if res.memory is not None:
            options["memory"] = res.memory
        handle.ref = self._task.options(**options).remote(handle.fn, handle.args, *(dep.ref for dep in handle.deps))

    def on_every_node(
        self, fn: Callable[..., Any], args: Sequence[Any] = (), timeout: float = 300.0
    ) -> list[tuple[str, Any]]:
        """``fn(*args)`` once on every live node (pinned to it, asking for no CPU), as
        (node id, result); a node that does not answer within ``timeout`` seconds, or
        fails, is one line."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._ray
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        refs = {}
        for node in nodes:
            options: dict[str, Any] = {
                "num_cpus": 0,
                "max_retries": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
            }
            refs[node] = self._task.options(**options).remote(fn, tuple(args))
        out = []
        for node, ref in refs.items():
            try:
                out.append((node, ray.get(ref, timeout=timeout)))
            except ray.exceptions.GetTimeoutError:
                raise UserError(
                    f"node {node[:12]} did not answer the check within {timeout:.0f} s (is it "
                    "overloaded, or unable to start a worker?)"
                ) from None
            except ray.exceptions.RayError as exc:
                text = str(getattr(exc, "cause", None) or exc).strip().splitlines()
                raise UserError(
                    f"node {node[:12]} failed the check: {text[-1] if text else type(exc).__name__}"
                ) from None
        return out

    def _outcome(self, handle: Handle) -> tuple[Any, BaseException | None]:
        ray = self._ray
        try:
            return ray.get(handle.ref), None
        except ray.exceptions.RayTaskError as exc:
            for dep in handle.deps:  # Ray fails a task whose argument failed, without running it
                try:
                    ray.get(dep.ref, timeout=0)
                except ray.exceptions.RayError as dep_exc:
                    cause = getattr(dep_exc, "cause", None) or dep_exc
                    return None, _dependency_error(cause)
            return None, getattr(exc, "cause", None) or exc
        except ray.exceptions.RayError as exc:  # a worker died (after its retries), a task was cancelled
            tries = f" (tried {self.retries + 1} times)" if self.retries else ""
            return None, RuntimeError(f"Ray: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{tries}")

    def as_completed(self, handles: Iterable[Handle]) -> Iterator[Completed]:
        remaining = {h.ref: h for h in handles}
        while remaining:
            ready, _ = self._ray.wait(list(remaining), num_returns=1)
            for ref in ready:
                handle = remaining.pop(ref)
                result, error = self._outcome(handle)
                yield handle, result, error

    def close(self, cancel: bool = False) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def make_executor(
    kind: str = "local",
    *,
    jobs: int = 1,
    gpus: Sequence[int] = (),
    ray_address: str | None = None,
    num_cpus: int | None = None,
    retries: int = 1,
    runtime_env: dict[str, Any] | None = None,
) -> Executor:
    """``local`` with ``jobs`` 1: in this process; ``local`` with more: a process pool;
    ``ray``: Ray tasks (``retries``, ``runtime_env``: see :class:`RayExecutor`)."""
    if kind == "ray":
        return RayExecutor(ray_address, num_cpus, retries, runtime_env)
    if kind != "local":
        raise UserError(f"unknown executor '{kind}' (use local or ray)")
    return InlineExecutor() if jobs == 1 else ProcessExecutor(jobs, gpus)

"""Run the jobs of a batch: in this process (one worker), on a local process pool, or as
Ray tasks; the same result lines and resume rules whichever runs them."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import InvalidArgumentError
from ..options import EXECUTORS
from .jobs import Job, run_job
from .manifest import check_jobs, jobs_from

__all__ = ["EXECUTORS", "run"]


Line = dict[str, Any]


def run(
    jobs: Iterable[Job | Mapping[str, Any]],
    *,
    executor: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    on_result: Callable[[Line], object] | None = None,
    progress: bool = False,
) -> list[Line]:
    """Run ``jobs`` (:class:`Job` or manifest-style mappings, paths relative to the
    current folder); returns one result line per job, in job order.

    A line is ``{"job", "output", "status", "seconds", "bytes", "sha256"}``; status is
    ``done`` (built), ``skipped`` (complete and verified from a previous run) or
    ``failed`` (with ``error``); a failing job never stops the others. ``on_result`` is
    called with each line as its job ends. ``executor="local"`` runs ``workers``
    processes (default: one per CPU; 1 runs in this process); ``executor="ray"`` submits
    Ray tasks to the cluster at ``ray_address`` (default: a Ray already initialized in
    this process, else a new local instance of ``workers`` CPUs). ``progress`` shows one
    bar for the run on stderr.
    """
    jobs = _jobs(jobs)
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"unknown executor {executor!r}; expected local or ray")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}")
    if ray_address is not None and executor != "ray":
        raise InvalidArgumentError("ray_address is only for executor='ray'")
    results: list[Line | None] = [None] * len(jobs)
    with _bar(len(jobs), progress) as tick:

        def emit(line: Line) -> None:
            results[line["job"]] = line
            if on_result is not None:
                on_result(line)
            tick(line)

        if executor == "ray":
            _run_ray(jobs, workers, ray_address, emit)
        else:
            _run_local(jobs, workers or usable_cpus(), emit)
    return [r for r in results if r is not None]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or ``taskset``'s
    limit), not every CPU of the host: the default number of workers."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call (macOS, Windows)
        return os.cpu_count() or 1


def _jobs(jobs: Iterable[Job | Mapping[str, Any]]) -> list[Job]:
    items = list(jobs)
    specs = [j for j in items if not isinstance(j, Job)]
    if specs:
        made = iter(jobs_from({"jobs": specs}))
        items = [j if isinstance(j, Job) else next(made) for j in items]
    check_jobs(items)
    return items


class _bar:
    """One tqdm bar over the jobs (a no-op without ``progress``); shows the failures."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.failed = total, show, 0

    def __enter__(self) -> Callable[[Line], None]:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total,
            unit="job",
            desc="batch",
            disable=None if self.show else True,
            file=sys.stderr,
        )
        return self.tick

    def tick(self, line: Line) -> None:
        if line["status"] == "failed":
            self.failed += 1
            self.bar.set_postfix(failed=self.failed)
        self.bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def _crashed(job: Job, index: int, e: BaseException) -> Line:
    """The line of a job whose worker died (the job's own errors come back as lines)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return {"job": index, "output": job.output, "status": "failed", "error": text, "seconds": None}


def _run_local(jobs: list[Job], workers: int, emit: Callable[[Line], None]) -> None:
    """Run the jobs on ``workers`` processes. A worker killed (out of memory, SIGKILL)
    breaks the whole pool: the jobs it left unfinished run again in a fresh pool, and
    if that one breaks too, one process each, so only a job that kills its own worker
    fails (a rerun skips a job whose output was complete and verified)."""
    if workers == 1:
        for i, job in enumerate(jobs):
            emit(run_job(job, i))
        return
    left, broke = _pool_round(jobs, list(range(len(jobs))), workers, emit)
    if left:
        left, broke = _pool_round(jobs, left, workers, emit)
    for i in left:
        still, broke_alone = _pool_round(jobs, [i], 1, emit)
        if still:
            emit(_crashed(jobs[i], i, broke_alone or broke))


def _pool_round(
    jobs: list[Job], todo: list[int], workers: int, emit: Callable[[Line], None]
) -> tuple[list[int], BaseException | None]:
    """Run the jobs ``todo`` on a fresh pool; returns those a broken pool left without a
    line, and the error that broke it. Ctrl-C cancels the queued jobs (only those
    already running finish) instead of waiting for the whole queue."""
    if not todo:
        return [], None
    # spawn: workers start clean (no copy of this process's threads or locks)
    ctx = multiprocessing.get_context("spawn")
    left: list[int] = []
    broke: BaseException | None = None
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
        futures = {pool.submit(run_job, jobs[i], i): i for i in todo}
        try:
            for fut in as_completed(futures):
                try:
                    emit(fut.result())
                except BrokenProcessPool as e:  # a worker was killed (e.g. out of memory)
                    left.append(futures[fut])
                    broke = e
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return sorted(left), broke


def _connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Connect to (or start) the Ray that runs the jobs; True when this call did."""
    if ray.is_initialized():
        if address is not None:  # it would run the jobs on the cluster it is connected to
            raise InvalidArgumentError(
                "Ray is already initialized in this process, connected to its own cluster: "
                "leave ray_address out to use it, or call ray.shutdown() first"
            )
        return False
    options = dict(address=address, log_to_driver=False, include_dashboard=False)
    new_instance = address is None and "RAY_ADDRESS" not in os.environ
    _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    try:
        try:
            ray.init(num_cpus=workers if new_instance else None, **options)  # a cluster has its own
        except ValueError as e:
            if "existing cluster" not in str(e):
                raise
            ray.init(**options)  # `ray start` ran on this node: ray.init joins its cluster
    except ValueError as e:  # e.g. "Invalid address format"
        where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        raise InvalidArgumentError(f"cannot start or reach Ray at {where!r}: {e}") from None
    return True


#: Seconds to wait for a cluster's head to answer before ray.init is asked to join it.
CONNECT_TIMEOUT = 5.0


def _check_reachable(address: str | None) -> None:
    """Refuse a cluster address nothing answers at: ray.init would retry it for minutes,
    printing a warning every few seconds. ``auto``/``local`` (and no address) are Ray's
    to resolve; a malformed address is left to Ray's own error."""
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r}: {why} (within {CONNECT_TIMEOUT:g} s)"
        ) from None


def _run_ray(
    jobs: list[Job], workers: int | None, address: str | None, emit: Callable[[Line], None]
) -> None:
    try:
        import ray
    except ImportError:
        raise InvalidArgumentError(
            "executor='ray' needs Ray: pip install 'robustpatch[ray]'"
        ) from None
    started = _connect(ray, address, workers)
    try:
        task = ray.remote(num_cpus=1)(run_job)
        pending = {task.remote(job, i): i for i, job in enumerate(jobs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                emit(ray.get(ready[0]))
            except ray.exceptions.RayError as e:  # the task's worker or node died
                emit(_crashed(jobs[i], i, e))
    finally:
        if started:
            ray.shutdown()

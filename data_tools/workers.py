"""Worker processes for ``prepare``: an ordered, bounded parallel map, and progress.

Why not ``multiprocessing.Pool.imap``: it submits every task at once and queues results
without bound, so a slow writer lets a fast pool fill memory with a corpus' worth of
tokens. :func:`ordered_map` keeps at most ``2 x workers`` tasks in flight and yields
results in task order, which is what makes the output independent of the worker count.
Workers are started with ``spawn``: the parent may already run ``tokenizers``' Rayon
threads (training), which ``fork`` would copy in a broken state.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .corpus import DataError
from .encode import init_worker

#: What a job's stop request arrives as (SLURM's scancel / time limit, ``--signal=USR1``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def resolve_workers(workers: int | None) -> int:
    """``None`` -> every core this process may use."""
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers < 1:
        raise DataError(f"workers={workers}: must be at least 1", option="workers")
    return workers


def ordered_map(fn: Callable[..., Any], tasks: list[tuple], workers: int) -> Iterator[Any]:
    """``fn(*task)`` for each task, in order; inline when one worker (or task) suffices."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(*task)
        return
    context = multiprocessing.get_context("spawn")
    count = min(workers, len(tasks))
    start_resource_tracker()
    with ProcessPoolExecutor(
        count, mp_context=context, initializer=_init_bound_worker, initargs=(os.getpid(),)
    ) as pool:
        pending: deque[Future] = deque()
        queue = iter(tasks)

        def submit(task: tuple) -> None:
            # The pool starts its workers inside submit (spawn: on demand): see
            # _stop_signals_blocked.
            with _stop_signals_blocked():
                pending.append(pool.submit(fn, *task))

        try:
            for task in queue:
                submit(task)
                if len(pending) >= 2 * count:
                    break
            while pending:
                result = pending.popleft().result()
                task = next(queue, None)
                if task is not None:
                    submit(task)
                yield result
        finally:
            for future in pending:
                future.cancel()
            _kill_workers_of_a_broken_pool(pool)


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """The stop signals blocked in this thread meanwhile (POSIX; elsewhere nothing is done).

    A worker starts with its parent's signal mask, so one started meanwhile holds a stop
    signal sent to the whole job (``scancel``) pending until its initializer ignores it
    (which discards it). Without this, a signal that came while the worker was still
    importing killed it, before :func:`_init_bound_worker` ran: the pool broke, and its
    shutdown then hung on the other worker (see :func:`_kill_workers_of_a_broken_pool`).
    This process gets a signal that came meanwhile once the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _kill_workers_of_a_broken_pool(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the live workers of ``pool`` if one of its workers died (the pool is broken).

    Why: a broken pool's shutdown terminates the other workers with SIGTERM and joins them
    without a timeout (CPython's ``_ExecutorManagerThread.terminate_broken``), but ours ignore
    SIGTERM (:func:`_init_bound_worker`), so the shutdown, and the run, waited for good. The
    executor keeps both facts in private attributes (``_broken``, ``_processes``); read with
    defaults, so another Python version at worst leaves the old behaviour."""
    if not getattr(pool, "_broken", False):
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.kill()


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (once per process) with SIGUSR1 blocked in it.

    The pool's semaphores are registered with that helper process. It ignores SIGINT and
    SIGTERM but not SIGUSR1, which SLURM sends to every process of a job (``--signal=USR1``,
    before a time limit or a preemption): the tracker died of it, and the stop that followed
    printed its warning and a ``KeyError`` traceback per semaphore. A signal blocked in the
    starting thread stays blocked in the child (the tracker unblocks only SIGINT and SIGTERM,
    which it ignores); here, only for the start (:func:`_stop_signals_blocked`, as for the
    pool's workers), so this process's own handler sees SIGUSR1 as before."""
    from multiprocessing import resource_tracker

    with _stop_signals_blocked():
        resource_tracker.ensure_running()


def _init_bound_worker(parent: int) -> None:
    """A pool worker's initializer: :func:`init_worker`, ignore the stop signals, and die with
    ``parent`` (its pid).

    The stop signals (SIGTERM, SIGUSR1) are the parent's to act on: SLURM (scancel, a time
    limit) signals every process of the job step, and a worker ended by one broke the pool,
    so the trainer crashed with ``BrokenProcessPool`` instead of stopping between two blocks
    (exit 75). The parent ends its workers when it stops (:func:`ordered_map` shuts the pool
    down: the blocks not started are cancelled, those running are finished).

    Why: a pool worker never notices its parent's death (each worker holds both ends of the
    task queue's pipe, so its read never sees end-of-file): after a ``kill -9`` of a
    preparing process, or an OOM kill, its workers slept on as orphans for good. The kernel
    SIGKILLs this worker when its parent dies (prctl PR_SET_PDEATHSIG, Linux; elsewhere
    nothing is done). Strictly, when the parent's thread that started it ends: the thread
    that runs :func:`ordered_map`, which shuts the pool down before it returns.
    """
    for sig in STOP_SIGNALS:  # first: a signal pending since the start is discarded
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by the parent while this one started
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    init_worker()
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


class _Bar:
    def __init__(self, progress: Progress):
        self.progress = progress

    def track(self, items: Iterable[Any], description: str, total: int) -> Iterator[Any]:
        """Yields ``items``, advancing the bar by one per item (a block)."""
        task = self.progress.add_task(description, total=total)
        for item in items:
            yield item
            self.progress.advance(task)
        self.progress.update(task, completed=total)


@contextmanager
def progress_bar(console: Console, *, enabled: bool) -> Iterator[_Bar]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    ) as progress:
        yield _Bar(progress)

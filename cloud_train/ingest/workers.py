"""The gate's threads: a small pool, and task lists that the pool and the calling thread
work through together.

Every task is a function of its inputs alone and results come back by position, so what
the gate decides does not depend on which thread ran what, or when.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ThreadPool(ThreadPoolExecutor):
    """A thread pool that says how many workers it has."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.workers = workers


class InlinePool:
    """The one-worker path: each task runs at once, in the calling thread."""

    workers = 1

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as err:  # handed to whoever asks for the result, as a pool does
            fut.set_exception(err)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


Pool = ThreadPool | InlinePool


def make_pool(workers: int | None) -> Pool:
    """Threads for the per-image decoding and the screens, one per usable core (at most 4)
    unless ``workers`` says; one worker runs everything in the calling thread."""
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), 4))
    return InlinePool() if workers == 1 else ThreadPool(workers)


class Tasks:
    """Functions started in the order they were added, by whichever thread is free
    (``run``); ``result(i)`` waits for the i-th. A task may wait for the result of an
    earlier one: by then every earlier task has been started by some thread, so the wait
    always ends."""

    def __init__(self) -> None:
        self._fns: list[Callable[[], Any]] = []
        self._results: list[Any] = []
        self._errors: list[BaseException | None] = []
        self._done: list[threading.Event] = []
        self._next = itertools.count()  # next() on it is atomic: each index is taken once

    def add(self, fn: Callable[[], Any]) -> int:
        """Queue ``fn`` (before ``run``); returns its index for ``result``."""
        self._fns.append(fn)
        self._results.append(None)
        self._errors.append(None)
        self._done.append(threading.Event())
        return len(self._fns) - 1

    def run(self, pool: Pool) -> None:
        """Run every task on the calling thread and all but one of the pool's workers (as
        many threads as the pool has); returns when all have finished. Longest first is
        best, as tasks start in order."""
        helpers = [pool.submit(self._work) for _ in range(pool.workers - 1)]
        self._work()
        for helper in helpers:
            helper.result()

    def _work(self) -> None:
        while (i := next(self._next)) < len(self._fns):
            try:
                self._results[i] = self._fns[i]()
            except BaseException as err:  # raised again to whoever asks for this result
                self._errors[i] = err
            finally:
                self._done[i].set()

    def result(self, i: int) -> Any:
        self._done[i].wait()
        err = self._errors[i]
        if err is not None:
            raise err
        return self._results[i]

"""The gate's task lists: every task runs once, results by position, on any pool."""

from __future__ import annotations

import threading

import pytest

from cloud_train.ingest.workers import InlinePool, Tasks, make_pool


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_every_task_runs_once_and_a_task_may_wait_for_an_earlier_one(workers):
    pool = make_pool(workers)
    try:
        tasks = Tasks()
        ran: list[int] = []
        threads: set[str] = set()

        def square(k: int) -> int:
            ran.append(k)
            threads.add(threading.current_thread().name)
            return k * k

        first = [tasks.add(lambda k=k: square(k)) for k in range(20)]
        total = tasks.add(lambda: sum(tasks.result(i) for i in first))
        tasks.run(pool)
        assert sorted(ran) == list(range(20))
        assert [tasks.result(i) for i in first] == [k * k for k in range(20)]
        assert tasks.result(total) == sum(k * k for k in range(20))
        assert len(threads) <= workers  # the caller and all but one of the pool's workers
    finally:
        pool.shutdown()


def test_a_failing_task_raises_where_its_result_is_asked_and_the_rest_still_run():
    pool = make_pool(2)
    try:
        tasks = Tasks()
        bad = tasks.add(lambda: 1 / 0)
        good = [tasks.add(lambda k=k: k) for k in range(5)]
        tasks.run(pool)
        with pytest.raises(ZeroDivisionError):
            tasks.result(bad)
        assert [tasks.result(i) for i in good] == list(range(5))
    finally:
        pool.shutdown()


def test_one_worker_runs_everything_in_the_calling_thread():
    pool = make_pool(1)
    assert isinstance(pool, InlinePool) and pool.workers == 1
    tasks = Tasks()
    where = tasks.add(lambda: threading.current_thread())
    tasks.run(pool)
    assert tasks.result(where) is threading.current_thread()
    big = make_pool(64)
    assert big.workers == 4  # at most four threads
    big.shutdown()

"""The worker pool that runs blocking calls (plugins, DNS) off the event loop."""

import threading
from typing import Any, Callable, List, Optional

from conftest import DEADLINE

import websockify_min


class ImmediateLoop:
    """Runs what the pool hands back at once, in the worker's thread."""

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        callback()


def make_pool(size: int) -> Any:
    return websockify_min._WorkerPool(ImmediateLoop(), size)  # type: ignore[arg-type]


def quick_job_waits_for_slow_one(pool: Any) -> bool:
    """Submit a job that blocks, then a quick one; whether the quick one had to wait."""
    release = threading.Event()
    quick_done = threading.Event()
    try:
        pool.submit(lambda: release.wait(DEADLINE), lambda result, error: None)
        pool.submit(lambda: None, lambda result, error: quick_done.set())
        return not quick_done.wait(DEADLINE)
    finally:
        release.set()
        pool.close()


def test_a_quick_job_never_waits_behind_a_slow_one_while_a_thread_may_start() -> None:
    # Fresh pools: the first thread is still starting as the second job comes.
    for _ in range(200):
        assert not quick_job_waits_for_slow_one(make_pool(8))


def test_with_every_thread_busy_jobs_wait_and_all_run() -> None:
    pool = make_pool(1)
    release = threading.Event()
    finished: List[int] = []
    all_done = threading.Event()

    def record(number: int) -> Callable[[Any, Optional[Exception]], None]:
        def done(result: Any, error: Optional[Exception]) -> None:
            finished.append(number)
            if len(finished) == 3:
                all_done.set()

        return done

    try:
        pool.submit(lambda: release.wait(DEADLINE), record(0))
        pool.submit(lambda: None, record(1))
        pool.submit(lambda: None, record(2))
        assert not all_done.wait(0.2) and finished == []  # one thread, held by the first job
        release.set()
        assert all_done.wait(DEADLINE)
        assert finished == [0, 1, 2]
    finally:
        pool.close()


def test_an_exception_reaches_the_callback() -> None:
    pool = make_pool(1)
    errors: List[Optional[Exception]] = []
    done = threading.Event()

    def fail() -> None:
        raise ValueError("no such token")

    def collect(result: Any, error: Optional[Exception]) -> None:
        errors.append(error)
        done.set()

    try:
        pool.submit(fail, collect)
        assert done.wait(DEADLINE)
        assert isinstance(errors[0], ValueError)
    finally:
        pool.close()

"""data.pool.map_in_processes: results in input order from a real forkserver pool, a lazy input read only as far
as the window, and a worker's exception named by its item."""
import itertools
import os
import time

import pytest

from data.pool import WINDOW_PER_WORKER, WorkerError, map_in_processes


def _slow_square(x):
    time.sleep(0.3 if x == 0 else 0.0)  # the first item finishes last
    return x * x, os.getpid()


def _reciprocal(x):
    return 1 / x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_the_input_order(workers):
    out = list(map_in_processes(_slow_square, range(6), workers))
    assert [square for square, _ in out] == [0, 1, 4, 9, 16, 25]
    pids = {pid for _, pid in out}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_exception_names_its_item_and_stops(workers):
    results = map_in_processes(_reciprocal, [4, 2, 0, 1], workers, name=lambda x: f"item {x}", desc="invert")
    assert next(results) == 0.25 and next(results) == 0.5
    with pytest.raises(WorkerError, match=r"^invert: item 0: ZeroDivisionError: division by zero$") as err:
        next(results)
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_a_lazy_input_is_read_only_a_window_ahead():
    taken = []

    def items():
        for i in itertools.count(1):
            taken.append(i)
            yield i
    results = map_in_processes(_reciprocal, items(), 2, total=1000)
    assert next(results) == 1.0
    assert taken == list(range(1, WINDOW_PER_WORKER * 2 + 1))
    results.close()  # stops the pool

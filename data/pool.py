"""The process pool of the data commands (data.corpus.prepare decodes audio, data.codes encodes whole shards):
results in input order, a bounded window of work in flight, a progress bar, and an error that names its item."""
from __future__ import annotations

import collections
import multiprocessing
import sys
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")

WINDOW_PER_WORKER = 4
"""Items handed to the pool ahead of the one whose result is awaited, per worker: enough to keep every worker
busy while an earlier item is slow, few enough that a lazy input (data.corpus.prepare reads dataset audio into its
items) is not read whole into the pool's queue, as Pool.imap would."""


class WorkerError(RuntimeError):
    """`fn` raised on an item: the message names the item and the error; `__cause__` is the error itself."""


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)  # the pool already uses the cores; nested threads only contend


def map_in_processes(fn: Callable[[Item], Result], items: Iterable[Item], workers: int, *,
                     total: Optional[int] = None, name: Callable[[Item], str] = str, desc: str = "",
                     unit: str = "item", progress: bool = False, preload: Sequence[str] = ()) -> Iterator[Result]:
    """fn(item) for each item, yielded in the order of `items`, computed by `workers` processes.

    `items` may be lazy: each is taken only when the pool can start on it, at most WINDOW_PER_WORKER * workers
    ahead of the result being yielded. With one worker or one item (`total`, else len(items)) everything runs in
    this process, one item at a time. An exception of `fn` (not KeyboardInterrupt) becomes a WorkerError saying
    "DESC: NAME: TYPE: MESSAGE", NAME being name(item); the pool is stopped. `fn` must be picklable (a module's
    function); `preload` names modules the forkserver imports once for all workers. `desc`, `unit` and
    `progress` describe the tqdm bar on stderr, one step per result.
    """
    if total is None:
        total = len(items)  # type: ignore[arg-type]  # a lazy input gives total
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress) as bar:
        if workers <= 1 or total <= 1:
            for item in items:
                try:
                    result = fn(item)
                except Exception as exc:
                    raise _failed(desc, name, item, exc) from exc
                bar.update(1)
                yield result
            return
        # forkserver: a fork of a process that already ran torch (e.g. under pytest) can hang in OpenMP.
        ctx = multiprocessing.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
        with ctx.Pool(min(workers, total), initializer=_init_worker) as pool:
            window: collections.deque = collections.deque()

            def oldest() -> Result:
                item, pending = window.popleft()
                try:
                    result = pending.get()
                except Exception as exc:
                    raise _failed(desc, name, item, exc) from exc
                bar.update(1)
                return result

            for item in items:
                window.append((item, pool.apply_async(fn, (item,))))
                if len(window) >= WINDOW_PER_WORKER * workers:
                    yield oldest()
            while window:
                yield oldest()


def _failed(desc: str, name: Callable, item, exc: Exception) -> WorkerError:
    return WorkerError(f"{desc + ': ' if desc else ''}{name(item)}: {type(exc).__name__}: {exc}")

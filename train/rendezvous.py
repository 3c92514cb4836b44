"""Long one-off work on rank 0 (building the initial model, converting a checkpoint) while the other ranks
wait by polling files, not in a collective: a barrier would fail after the collective timeout (600 s),
and this work can take an hour for the 8B model.

Rank 0 runs the work, which makes a DONE marker appear last and atomically (a file written inside a
folder before the folder is renamed into place, or a rename of its own). If the work raises, rank 0 writes
a FAILED marker with the error before re-raising, so the waiting ranks stop with that error, not a timeout.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from data.files import atomic_write

DEFAULT_TIMEOUT_S = 4 * 3600.0
"""How long a rank waits for rank 0's work before giving up: generous, an 8B model on a slow filesystem."""


class RankZeroFailed(RuntimeError):
    """Rank 0's work raised; the message carries its error (from the FAILED marker)."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_for_file(done: Path, failed: Path, rank: int, what: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                  poll_s: float = 2.0, progress_s: float = 60.0,
                  log: Callable[[str], None] = _stderr) -> None:
    """Returns once `done` exists; raises RankZeroFailed when `failed` appears (with its text), TimeoutError
    after timeout_s. Uses no collective, so no process-group timeout applies while it waits."""
    start = last_report = time.monotonic()
    while True:
        if done.exists():
            return
        if failed.is_file():
            raise RankZeroFailed(f"rank {rank}: rank 0 failed {what} ({failed}):\n"
                                 f"{failed.read_text(encoding='utf-8')}")
        now = time.monotonic()
        if now - start >= timeout_s:
            raise TimeoutError(f"rank {rank}: waited {now - start:.0f} s for rank 0 to finish {what}, but {done} "
                               f"did not appear (timeout_s={timeout_s:.0f}); is rank 0 still running?")
        if now - last_report >= progress_s:
            log(f"rank {rank}: waiting for rank 0 to finish {what} ({now - start:.0f} s of at most "
                f"{timeout_s:.0f} s)")
            last_report = now
        time.sleep(min(poll_s, max(0.0, timeout_s - (now - start))))


def run_once_on_rank0(done: Path, work: Callable[[], None], rank: int, what: str, failed: Optional[Path] = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 2.0, progress_s: float = 60.0,
                      log: Callable[[str], None] = _stderr) -> None:
    """Rank 0 runs work() unless `done` already exists (a resume reuses it); every other rank waits for `done`.

    work must make `done` appear as its last act, atomically. failed (default: `done` + ".FAILED", beside
    it) is where rank 0 writes its error if work raises. Collective only at the start, where every rank
    arrives at once: one barrier, so no rank can read a FAILED marker an earlier attempt left before rank 0
    has removed it."""
    done, failed = Path(done), Path(failed) if failed is not None else Path(f"{done}.FAILED")
    todo = not done.exists()
    if rank == 0 and todo:
        failed.unlink(missing_ok=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not todo:
        return
    if rank != 0:
        wait_for_file(done, failed, rank, what, timeout_s, poll_s, progress_s, log)
        return
    started = time.monotonic()
    try:
        work()
        if not done.exists():
            raise RuntimeError(f"{what} returned without writing its DONE marker {done}")
    except BaseException as e:  # also KeyboardInterrupt/SystemExit: the other ranks must not wait 4 h
        failed.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(failed, f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise
    log(f"rank 0: {what} took {time.monotonic() - started:.0f} s")

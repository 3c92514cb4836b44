"""Preemption: a scheduler's signal (Slurm `--signal=USR1@120`, SIGTERM) ends the run cleanly.

The handler only sets a flag; the loop finishes the current step, every rank agrees to stop at the same
step (through the all-reduce each step makes anyway, train.loop), a checkpoint is written and the process exits with PREEMPTED_EXIT_CODE so
the sbatch script knows to requeue.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import List, Optional

# EX_TEMPFAIL of sysexits.h: "temporary failure, retry later" -- distinct from crashes (1) and signals.
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


# Set by the launcher: the file a preempted rank 0 writes, so the launcher knows its ranks' exit 75 was a
# checkpointed preemption even when the signal reached a rank and not the launcher (torchrun itself exits 1).
MARKER_ENV = "STEPAUDIO_PREEMPT_MARKER"


def mark_preempted() -> None:
    """Each node's first rank, after the preemption checkpoint is complete: tells its launcher to exit 75."""
    marker = os.environ.get(MARKER_ENV)
    if marker and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(marker).write_text("preempted\n")


class PreemptionFlag:
    def __init__(self, signal_names: List[str]):
        self.received: Optional[str] = None
        for name in signal_names:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

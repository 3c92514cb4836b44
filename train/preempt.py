"""Preemption: a scheduler's signal (Slurm `--signal=USR1@120`, SIGTERM) ends the run cleanly.

The handler only sets a flag; the loop finishes the current step, every rank agrees to stop at the same
step (one tiny all-reduce), a checkpoint is written and the process exits with PREEMPTED_EXIT_CODE so
the sbatch script knows to requeue.
"""
from __future__ import annotations

import signal
from typing import List, Optional

import torch
import torch.distributed as dist

# EX_TEMPFAIL of sysexits.h: "temporary failure, retry later" -- distinct from crashes (1) and signals.
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class PreemptionFlag:
    def __init__(self, signal_names: List[str]):
        self.received: Optional[str] = None
        for name in signal_names:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def any_rank_received(self) -> bool:
        """True on every rank as soon as one rank got a signal (collective: all ranks must call it)."""
        # NCCL reduces only GPU tensors; gloo only CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

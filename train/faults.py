"""Fault injection for the failure tests: `STEPAUDIO_FAULT=what:step:rank` makes one rank misbehave.

what = kill (SIGKILL itself after the step), kill_in_save (SIGKILL itself while writing the checkpoint
of that step, after its engine files), hang (sleep forever after the step), usr1 (send itself SIGUSR1 after
the step, as Slurm does before a time limit: that rank alone is signalled). Unset in real runs.
"""
from __future__ import annotations

import os
import signal
import time


def maybe_fault(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("STEPAUDIO_FAULT")
    if not spec:
        return
    what, at_step, at_rank = spec.split(":")
    if (int(at_step), int(at_rank)) != (step, rank):
        return
    if what == "kill" and point == "step" or what == "kill_in_save" and point == "save":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "usr1" and point == "step":
        os.kill(os.getpid(), signal.SIGUSR1)
    if what == "hang" and point == "step":
        while True:
            time.sleep(1)

"""Fault injection for the failure tests and the fault drill (train.drill): `STEPAUDIO_FAULT=what:step:rank`
makes one rank misbehave at step `step`. Unset in real runs.

what = kill (SIGKILL itself after the step), kill_in_save (SIGKILL itself while writing the checkpoint
of that step, after its engine files), hang (sleep forever after the step), usr1 (send itself SIGUSR1 after
the step, as Slurm does before a time limit: that rank alone is signalled).

kill_job* SIGKILL the whole job at once, as a kill -9 of the command or the OOM killer does: the launcher
($STEPAUDIO_LAUNCHER_PID; else torchrun; else the process itself), whose torchrun and ranks die with it
(train.lifeline). kill_job: after the step. The others are armed after the step and fire at the next:
kill_job_in_backward: backward pass (the next step's, mid-step); kill_job_in_write: torch.save of this
rank (its first file of the step's checkpoint), half of the file written; kill_job_in_export: weights
file of the export (rank 0; after the run's last step), half of it written.

STEPAUDIO_FAULT_AFTER=PATH: nothing fires before PATH exists, e.g. a curriculum stage's DONE marker for a fault
in the next stage, whose steps count from 1 again.
"""
from __future__ import annotations

import io
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
    after = os.environ.get("STEPAUDIO_FAULT_AFTER")
    if after and not os.path.exists(after):
        return
    if what == "kill" and point == "step" or what == "kill_in_save" and point == "save":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "usr1" and point == "step":
        os.kill(os.getpid(), signal.SIGUSR1)
    if what == "hang" and point == "step":
        while True:
            time.sleep(1)
    if point == "step" and what.startswith("kill_job"):
        {"kill_job": _kill_job, "kill_job_in_backward": _arm_backward, "kill_job_in_write": _arm_torch_save,
         "kill_job_in_export": _arm_export}[what]()


def _kill_job() -> None:
    from train.lifeline import LAUNCHER_PID_ENV

    # Not started by torchrun: this process is the whole job (its parent may be a shell or pytest).
    top = os.environ.get(LAUNCHER_PID_ENV) or (os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid())
    os.kill(int(top), signal.SIGKILL)
    while True:  # until the lifeline takes this rank down: nothing more of this rank's runs
        time.sleep(1)


def _write_half_then_kill(data: bytes, path) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    _kill_job()


def _arm_backward() -> None:
    import torch

    # Tensor.backward and DeepSpeed's backward both end in torch.autograd.backward.
    torch.autograd.backward = lambda *args, **kwargs: _kill_job()


def _arm_torch_save() -> None:
    import torch

    save = torch.save

    def cut_save(obj, f, *args, **kwargs) -> None:
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        _write_half_then_kill(buffer.getvalue(), f)

    torch.save = cut_save


def _arm_export() -> None:
    import safetensors.torch

    def cut_save_file(tensors, filename, metadata=None) -> None:
        _write_half_then_kill(safetensors.torch.save(tensors, metadata=metadata), filename)

    safetensors.torch.save_file = cut_save_file

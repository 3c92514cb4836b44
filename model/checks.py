"""Input checks that cost no host-device sync on an accelerator (the model's forward runs them every step)."""
from __future__ import annotations

from typing import Callable

import torch


def check(ok: torch.Tensor, message: Callable[[], str]) -> None:
    """Raises ValueError(message()) when the boolean tensor `ok` is False. On an accelerator the test is
    queued on the device instead (a device-side assert, no host sync): wrong input still stops the run,
    with a less precise message (the CPU path and the engine's host-side checks give the precise one)."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message())
    else:
        torch._assert_async(ok, "StepAudio2ForCausalLM input check failed (run on CPU for the message)")

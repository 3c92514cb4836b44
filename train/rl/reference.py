"""The frozen reference policy of the KL term (GRPO, PPO) and of DPO.

Held as a frozen copy of the starting policy (train.engine.FrozenModel: partitioned under ZeRO-3, optionally
offloaded to CPU), or with LoRA as the policy itself with its adapters disabled (no second copy). A LoRA
run that tunes an existing adapter further (lora.adapter_init) must not use the disabled-adapter base as
its reference (TRL #3194: spurious KL): auto then builds a frozen copy with that adapter loaded.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict

import torch

from train.config import TrainConfig
from train.engine import Engine, FrozenModel
from train.lora import adapters_disabled


def reference_mode(cfg: TrainConfig) -> str:
    """copy or adapters_off: what rl.reference=auto means for this run."""
    mode = cfg.rl.reference
    if mode != "auto":
        return mode
    if cfg.lora.enabled and not getattr(cfg.lora, "adapter_init", None):
        return "adapters_off"
    return "copy"


class Reference:
    """log-probabilities of a batch's labelled tokens under the reference policy."""

    def __init__(self, cfg: TrainConfig, engine: Engine, build_model, mode: str):
        self.cfg, self.engine, self.mode = cfg, engine, mode
        self.frozen = None
        if mode == "copy":
            self.frozen = FrozenModel(build_model(), cfg, engine.device, offload=cfg.rl.reference_offload)
        elif mode != "adapters_off":
            raise ValueError(f"rl.reference={mode!r}: expected copy or adapters_off here")

    @torch.no_grad()
    def logprobs(self, batch: Dict[str, Any], temperature: float = 1.0) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen.forward(batch, token_logprobs=True, temperature=temperature).token_logprobs
        module = self.engine.module
        was_training = module.training
        module.eval()  # the reference has no dropout (LoRA dropout would otherwise act on the base)
        try:
            with adapters_disabled(module):
                return self.engine.forward(batch, token_logprobs=True, temperature=temperature).token_logprobs
        finally:
            module.train(was_training)

    def module(self):
        return self.frozen.module if self.frozen is not None else None

    def close(self) -> None:
        if self.frozen is not None:
            self.frozen.close()
            self.frozen = None


def gathered(holder: Any):
    """inference_model for an Engine or a FrozenModel: a context whose value is the whole module, with no
    collective inside (ZeRO-3: gathered once); ZeRO 0-2 models are given as they are."""
    from train.engine import inference_model

    if getattr(holder, "ds", None) is None:
        return nullcontext(holder.module)
    return inference_model(holder, view=False)

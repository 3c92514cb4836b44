"""The one seam to DeepSpeed: process group, engine construction, step, save, load and weight gathering.

Nothing else in the project imports deepspeed; the step loop talks to `Engine`.
"""
from __future__ import annotations

import math
import os
import socket
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch

from train.config import PARAM_GROUPS, TrainConfig, deepspeed_config


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Joins (or, for a plain `python -m train`, creates) the process group; returns (rank, world_size).

    A collective waiting longer than timeout_s for a peer fails instead of hanging the job."""
    import deepspeed
    from datetime import timedelta

    if "RANK" not in os.environ:
        # A single process started without a launcher: give it a one-rank group of its own.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = deepspeed.get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_init_context(cfg: TrainConfig):
    """Under ZeRO-3 a large model is built already partitioned, never whole on one rank."""
    if cfg.engine.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg))


def gathered_for_write(params):
    """Makes ZeRO-3 partitioned parameters whole on every rank; rank 0's writes are kept (see load_stepfun)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to lr * min_lr_ratio over decay_steps (default max_steps)."""
    warmup = cfg.optim.warmup_steps
    total = cfg.optim.decay_steps or cfg.max_steps
    floor = cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """AdamW groups of the trainable parameters; groups not listed in model.trainable are frozen.

    With LoRA, what trains was decided when the adapters were applied (train.lora): the base is frozen."""
    trainable_prefixes = tuple(p for g in cfg.model.trainable for p in PARAM_GROUPS[g])
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if cfg.lora.enabled:
            if not param.requires_grad:
                continue
        elif not name.startswith(trainable_prefixes) or name == "encoder.positional_embedding.weight":
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        # Norm weights and biases are 1-D; decaying them only hurts.
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Engine:
    """A DeepSpeed engine around the model, with our optimizer and schedule."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        import deepspeed

        self.cfg = cfg
        groups = [g for g in param_groups(model, cfg) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        factor = lr_lambda(cfg)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=deepspeed_config(cfg),
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def forward(self, batch: Dict[str, Any]):
        dtype = torch.bfloat16 if self.cfg.engine.precision == "bf16" else torch.float32
        mels = batch.get("mels")
        return self.ds(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            mels=None if mels is None else mels.to(dtype),
            mel_lengths=batch.get("mel_lengths"),
        )

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward on one micro-batch; DeepSpeed applies the optimizer at accumulation boundaries."""
        self.ds.backward(loss)
        self.ds.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, folder: str, tag: str, client_state: Dict[str, Any]) -> None:
        # A LoRA checkpoint holds the adapters and their optimizer state only; the base is re-read on load.
        self.ds.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False,
                                exclude_frozen_parameters=self.cfg.lora.enabled)

    def load(self, folder: str, tag: str) -> Dict[str, Any]:
        # Non-strict only for LoRA, whose checkpoint lacks the frozen base by design.
        path, client_state = self.ds.load_checkpoint(folder, tag=tag, load_module_strict=not self.cfg.lora.enabled)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}/{tag}")
        return client_state or {}

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """All weights on rank 0 (None elsewhere); every rank must call it (ZeRO-3 gathers)."""
        if self.cfg.engine.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.ds.module.state_dict()
        if torch.distributed.get_rank() != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in state.items()}

"""The one seam to DeepSpeed: process group, engine construction, step, save, load and weight gathering.

Nothing else in the project imports deepspeed; the step loop talks to `Engine`.
"""
from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch

from train.config import PARAM_GROUPS, TrainConfig, deepspeed_config
from train.schedule import Schedule


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


def param_group_name(name: str) -> str:
    """The PARAM_GROUPS group a parameter belongs to, by its StepFun name ("other" for none)."""
    for group, prefixes in PARAM_GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """AdamW groups of the trainable parameters, one per (group, decay or not), lr = optim.lr x multiplier.

    Groups not in model.trainable are frozen (requires_grad False) and left out. With LoRA, what trains
    was decided when the adapters were applied (train.lora): the base is frozen. Each group carries its
    "name" (e.g. "adapter.decay") and "base_lr" (the peak; Engine.set_lr_factor scales it)."""
    trainable_prefixes = tuple(p for g in cfg.model.trainable for p in PARAM_GROUPS[g])
    by_key: Dict[tuple, List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if cfg.lora.enabled:
            if not param.requires_grad:
                continue
        elif not name.startswith(trainable_prefixes) or name == "encoder.positional_embedding.weight":
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        # Norm weights and biases are 1-D; decaying them only hurts. (ds_shape: a ZeRO-3 parameter is
        # built partitioned, its local tensor empty and 1-D.)
        matrix = len(getattr(param, "ds_shape", param.shape)) >= 2
        by_key.setdefault((param_group_name(name), matrix), []).append(param)
    groups = []
    for (group, decay), params in by_key.items():
        lr = cfg.optim.lr * cfg.lr_multipliers.get(group, 1.0)
        groups.append({"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0, "lr": lr,
                       "base_lr": lr, "name": f"{group}.{'decay' if decay else 'no_decay'}"})
    return groups


class Engine:
    """A DeepSpeed engine around the model, with our optimizer; the loop sets the lr factor of each step."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        import deepspeed

        self.cfg = cfg
        groups = param_groups(model, cfg)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        # No DeepSpeed scheduler: the lr of a step is a function of (step, tokens) the checkpoint holds
        # (train.schedule), set before each step, so a resume needs no scheduler state.
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                              config=deepspeed_config(cfg))
        self._base_lrs = [g["base_lr"] for g in groups]
        self._group_names = [g["name"].split(".")[0] for g in groups]
        self._factor = 1.0
        self.set_lr_factor(Schedule.from_config(cfg).factor(0, 0))

    def set_lr_factor(self, factor: float) -> None:
        """Every group's lr becomes its peak (optim.lr x multiplier) times factor."""
        self._factor = factor
        # By position: DeepSpeed's ZeRO wrappers keep the groups in order but may drop extra keys on load.
        for group, base_lr in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base_lr * factor

    def group_lrs(self) -> Dict[str, float]:
        """The current lr of each parameter group (encoder, adapter, ...) that trains."""
        return {name: g["lr"] for name, g in zip(self._group_names, self.optimizer.param_groups)}

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
            position_ids=batch.get("position_ids"),
            # Packed rows (data.batching) attend within their own sample only.
            **({"segment_ids": batch["segment_ids"]} if batch.get("segment_ids") is not None else {}),
        )

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward on one micro-batch; DeepSpeed applies the optimizer at accumulation boundaries."""
        self.ds.backward(loss)
        self.ds.step()

    def lr(self) -> float:
        """optim.lr times the current factor (a group's own lr is this times its multiplier)."""
        return self.cfg.optim.lr * self._factor

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, folder: str, tag: str, client_state: Dict[str, Any]) -> None:
        # A LoRA checkpoint holds the adapters and their optimizer state only; the base is re-read on load.
        self.ds.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False,
                                exclude_frozen_parameters=self.cfg.lora.enabled)

    def load(self, folder: str, tag: str, universal: bool = False) -> Dict[str, Any]:
        """universal: the folder is DeepSpeed's universal form (any number of ranks; see train.checkpoint)."""
        self.ds._config.load_universal_checkpoint = universal
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

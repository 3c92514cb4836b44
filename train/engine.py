"""The one seam to DeepSpeed for training: process group, the DeepSpeed JSON (generated from the config tree),
engine construction, step, save, load and weight gathering. The step loop, the RL algorithms and evaluation
talk to `Engine` / `FrozenModel`; model/ and data/ never import deepspeed. Outside the loop two tools do:
train.export (reads a checkpoint's ZeRO shards through DeepSpeed's zero_to_fp32) and train.gpu_check (the
accelerator's name and version); train.checkpoint runs DeepSpeed's universal-checkpoint converter as a
subprocess when the world size changes.
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import gc
import logging
import os
import socket
import sys
from contextlib import nullcontext
from typing import Any, Dict, List, NoReturn, Optional

import torch

from train.config import PARAM_GROUPS, TrainConfig
from train.schedule import Schedule


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Joins (or, for a plain `python -m train`, creates) the process group; returns (rank, world_size).

    A collective waiting longer than timeout_s for a peer fails instead of hanging the job."""
    import deepspeed
    from datetime import timedelta

    from launch.checks import require_cuda_if_expected

    if "RANK" not in os.environ:
        # A single process started without a launcher: give it a one-rank group of its own.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if os.environ.get("STEPAUDIO_DEVICE", "").lower() == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # on purpose on CPU, even where CUDA works
    # A job that should have GPUs and cannot use them stops here, not after hours of training on CPU.
    require_cuda_if_expected()
    if torch.cuda.is_available() and deepspeed.get_accelerator().device_name() == "cuda":
        # Before any CUDA work: otherwise every rank's NCCL communicator and allocations land on GPU 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = deepspeed.get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    atexit.register(_leave_group_at_exit)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shutdown_distributed() -> None:
    """Leaves the process group once every rank is done (the end of a successful run).

    A process that exits with its group still up may abort in the C++ teardown ("terminate called without an
    active exception", SIGABRT, about one exit in twenty on CPU with gloo): the backend's threads are destroyed
    while still joinable, and a job that finished its work reports a failure. The barrier keeps a rank from
    closing its connections while a peer still reads from them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Ends a process that joined a process group, with `code`: shutdown_distributed() after success, stdio
    and logging flushed, then os._exit, which skips the interpreter's C++ teardown. With DeepSpeed and gloo
    loaded that teardown can still abort after destroy_process_group ("terminate called without an active
    exception", SIGABRT; 1 in ~20 two-rank CPU runs here), turning a finished job into a failed one. Every
    file the process wrote must be closed before (run() closes its logs and sinks; torch.save closes its)."""
    if code == 0:
        shutdown_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave_group_at_exit() -> None:
    """The fallback for an exit that skipped shutdown_distributed (an error): the group is torn down before
    the interpreter's own teardown, with no collective (a failed peer may never answer one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The DeepSpeed JSON, generated from the config tree; engine.deepspeed keys are merged over it."""
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        # Our AdamW and schedule are passed in as client objects; DeepSpeed must accept them under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our metrics sink reports; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.engine.zero_stage == 3:
        # Export needs the full weights gathered on rank 0.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return _deep_merge(ds, cfg.engine.deepspeed)


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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


def gathered_for_read(params):
    """Makes ZeRO-3 partitioned parameters whole on every rank for reading; they are partitioned again on exit
    with nothing written back."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


SCORE_HEAD_PREFIX = "score."


def param_group_name(name: str) -> str:
    """The PARAM_GROUPS group a parameter belongs to, by its StepFun name ("score" for a score model's
    head, "other" for none)."""
    if name.startswith(SCORE_HEAD_PREFIX):
        return "score"
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
        if name.startswith(SCORE_HEAD_PREFIX):
            pass  # a score model's head (reward model, critic) always trains, LoRA or not
        elif cfg.lora.enabled:
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


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


# Batch tensors the model takes, and host-side facts passed as they are (data.loading.batching's batch dict).
_TENSOR_INPUTS = ("input_ids", "attention_mask", "labels", "mels", "mel_lengths", "position_ids", "segment_ids",
                  "cu_seq_lens")
_HOST_INPUTS = ("num_loss_tokens", "max_length")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy on `device` that does not block the host: from pinned memory when the copy goes to a GPU."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def model_inputs(batch: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """The model's keyword arguments for a loader batch: every tensor on `device` (mels in `dtype`, cast
    before the copy so bf16 moves half the bytes), counts the collate already knows passed as ints."""
    inputs: Dict[str, Any] = {}
    for key in _TENSOR_INPUTS:
        tensor = batch.get(key)
        if tensor is None:
            continue
        inputs[key] = to_device(tensor.to(dtype) if key == "mels" else tensor, device)
    for key in _HOST_INPUTS:
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    if "segment_ids" not in inputs:  # only packed rows need the varlen layout
        inputs.pop("cu_seq_lens", None), inputs.pop("max_length", None)
    return inputs


def _forward_inputs(batch: Dict[str, Any], device: torch.device, dtype: torch.dtype,
                    cfg: TrainConfig) -> Dict[str, Any]:
    # (No chunk count is exchanged under ZeRO-3: the loss calls lm_head once per forward whatever a rank's
    # label count, model.fused_loss, so every rank gathers it the same number of times.)
    return model_inputs(batch, device, dtype)


class Engine:
    """A DeepSpeed engine around the model, with our optimizer; the loop sets the lr factor of each step.

    An RL run holds several: the policy's, and PPO's critic's (lr: its own peak learning rate instead of
    optim.lr); frozen models (reference, reward model) are FrozenModel instead."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, lr: Optional[float] = None):
        import deepspeed

        if lr is not None:
            cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
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

    def close(self) -> None:
        """Frees the engine (ZeRO hooks, optimizer state, buffers): the next curriculum stage then starts
        from the same device memory. The Engine is unusable afterwards."""
        ds = self.__dict__.pop("ds", None)
        if ds is None:
            return
        ds.destroy()
        self.optimizer = None
        del ds
        # DeepSpeed's engine holds itself in cycles (its hooks on the module, its own lambdas): only a
        # collection frees it, and with it the optimizer state. The caller must hold no output of a step
        # (its backward hooks hold the engine too).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.cfg)

    def forward(self, batch: Dict[str, Any], **kwargs: Any):
        """The model's output on a loader batch (data.loading.batching), moved to this engine's device first:
        DeepSpeed does not move inputs. kwargs go to the model as they are (token_logprobs, temperature)."""
        return self.ds(**_forward_inputs(batch, self.device, self.compute_dtype, self.cfg), **kwargs)

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


class FrozenModel:
    """A model that only runs forwards inside training steps: RL's reference policy and reward models.

    Under ZeRO-3 it is a DeepSpeed engine without an optimizer, its parameters partitioned like the
    policy's (and with offload=True kept in CPU memory, fetched layer by layer); every rank must then make
    the same forwards, as with the policy. Under ZeRO 0-2 it is the plain module on the device, in the
    compute dtype. Either way it is in eval mode and nothing of it requires grad; forward runs without grad."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, offload: bool = False):
        self.cfg, self.device = cfg, device
        model.requires_grad_(False)
        model.eval()
        if cfg.engine.zero_stage == 3:
            import deepspeed

            config = deepspeed_config(cfg)
            if offload:
                config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
            self.ds, _, _, _ = deepspeed.initialize(model=model, config=config)
            self.ds.eval()
            self._module = None
        else:
            self.ds = None
            self._module = model.to(device=device, dtype=compute_dtype(cfg))

    @property
    def module(self) -> torch.nn.Module:
        return self._module if self.ds is None else self.ds.module

    @torch.no_grad()
    def forward(self, batch: Dict[str, Any], **kwargs: Any):
        """The model's output on a batch dict (as Engine.forward), without grad."""
        inputs = _forward_inputs(batch, self.device, compute_dtype(self.cfg), self.cfg)
        return (self._module if self.ds is None else self.ds)(**inputs, **kwargs)

    def close(self) -> None:
        ds = self.__dict__.pop("ds", None)
        self._module = None
        if ds is not None:
            ds.destroy()
            del ds
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- inference under ZeRO-3

def inference_model(engine, view: bool = True):
    """A context whose value is the engine's module, ready for forwards that involve no DeepSpeed
    collective: `with inference_model(engine) as model: generate(model, ...)`. `engine`: an Engine or a
    DeepSpeed engine.

    Under ZeRO-3 every parameter is gathered once on entry (the whole model on every rank, in its training
    dtype). The bare model is then given as a plain view of the gathered tensors (plain_view; `view=False`
    skips it); a wrapped one (peft) has DeepSpeed's ZeRO-3 module hooks taken off instead. Either way no
    forward inside gathers, releases or re-partitions anything: the ranks may run different numbers of forwards (fewer samples, shorter answers)
    and simply finish at different times. On exit the parameters are partitioned again and the hooks put
    back (DeepSpeed re-records its prefetch trace in the next training steps). Entering and leaving are
    collectives, so every rank must use the context. Forwards only: no backward inside. ZeRO 0-2 keep whole
    parameters on every rank anyway: the module is given as it is.
    """
    ds = getattr(engine, "ds", engine)
    if not ds.zero_optimization_partition_weights():
        return nullcontext(ds.module)
    if view and type(ds.module).__name__ == "StepAudio2ForCausalLM":
        return _GatheredPlainView(ds)
    return _GatheredWithoutHooks(ds)


class _GatheredPlainView:
    """inference_model under ZeRO-3 for the bare model: a second module object of the same class whose
    parameters and buffers are the gathered tensors themselves (shared storage: no copy, no extra memory),
    with none of DeepSpeed's hooks. The engine's own module is left untouched, so nothing is re-registered
    on exit, and decoding pays none of the per-forward walks over every module that DeepSpeed's remaining
    engine hooks make (a tenth of the time per generated token of a small model on CPU)."""

    def __init__(self, ds):
        self.ds, self.module, self.gathered = ds, ds.module, None

    def __enter__(self) -> torch.nn.Module:
        import deepspeed

        _release_fetched(self.ds)
        self.gathered = deepspeed.zero.GatheredParameters(list(self.module.parameters()))
        self.gathered.__enter__()
        try:
            return plain_view(self.module)
        except BaseException:
            self.gathered.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> bool:
        self.gathered.__exit__(*exc)  # partitions every parameter again (no broadcast: nothing changed)
        return False


def _release_fetched(ds) -> None:
    """Let go of what the last step left fetched, in flight or marked in use (ZeRO-3), before a gather.
    The optimizer's own call, not the engine's: the engine's also runs gc.collect() and empties the CUDA
    cache, 0.4-0.9 s per rollout on CPU (train.rl.bench), for nothing here."""
    optimizer = getattr(ds, "optimizer", None)
    if hasattr(optimizer, "empty_partition_cache"):
        optimizer.empty_partition_cache()


def plain_view(module: torch.nn.Module) -> torch.nn.Module:
    """A module of module's class, built on the meta device, whose parameters and buffers are module's own
    tensors (shared, not copied), frozen and in eval mode. `module` must hold whole tensors (e.g. gathered)."""
    with torch.device("meta"):
        view = type(module)(module.config, attention=module.attention_implementation)
    for kind, items in (("_parameters", module.named_parameters()), ("_buffers", module.named_buffers())):
        for name, tensor in items:
            owner_name, _, leaf = name.rpartition(".")
            owner = view.get_submodule(owner_name)
            if leaf not in getattr(owner, kind):
                raise ValueError(f"plain_view: {name} has no place in a fresh {type(module).__name__}")
            getattr(owner, kind)[leaf] = (torch.nn.Parameter(tensor.data, requires_grad=False)
                                          if kind == "_parameters" else tensor)
    left = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"plain_view: {len(left)} tensors were not filled, e.g. {left[:3]}")
    return view.eval()


class _GatheredWithoutHooks:
    """inference_model under ZeRO-3 (DeepSpeed 0.19: DeepSpeedZeRoOffload owns the module hooks)."""

    def __init__(self, ds):
        self.ds, self.module = ds, ds.module
        # The ZeRO-3 optimizer keeps the hooks in its parameter_offload; an engine without an optimizer
        # makes the DeepSpeedZeRoOffload its optimizer.
        self.offload = getattr(ds.optimizer, "parameter_offload", ds.optimizer)
        self.gathered = None

    def __enter__(self) -> torch.nn.Module:
        import deepspeed

        # Let go of what the last step left fetched, in flight or marked in use, then gather everything.
        _release_fetched(self.ds)
        self.gathered = deepspeed.zero.GatheredParameters(list(self.module.parameters()))
        self.gathered.__enter__()
        # All three kinds fire on every forward: the root's pre-hook (reset_step, which compares the recorded
        # module order across ranks: a collective) and each submodule's fetch/release and backward hooks.
        for hook in self.offload.forward_hooks + self.offload.backward_hooks + [self.offload.fwd_pre_hook]:
            hook.remove()
        self.offload.forward_hooks, self.offload.backward_hooks = [], []
        return self.module

    def __exit__(self, *exc) -> bool:
        try:
            self.gathered.__exit__(*exc)  # partitions every parameter again (no broadcast: nothing changed)
        finally:
            offload = self.offload
            # In DeepSpeed's order: the root's reset_step pre-hook runs before the root's fetch hook.
            offload.fwd_pre_hook = self.module.register_forward_pre_hook(
                lambda module, *args: offload.get_param_coordinator().reset_step())
            # Counting from the root's own id gives every submodule the ds_id it had before.
            offload._register_deepspeed_module(self.module, count=[self.module.ds_id])
        return False

"""The training run: build everything from the config, resume, loop over steps, checkpoint, export.

One run is one stage of a curriculum (train.curriculum drives several); its position is (step, tokens),
and its budget is max_steps and/or max_tokens.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from data.loading.loader import build_loader
from data.tasks.pieces import IGNORE_INDEX
from data.text_tokenizer import load_tokenizer, special_ids
from model.checkpoint import load_stepfun, save_stepfun
from model.config import padded_vocab_size, preset_config
from model.attention import VARLEN_KERNELS
from model.lalm import StepAudio2ForCausalLM, resolve_attention
from train import evaluate as evaluation
from train.algorithm import Algorithm, StepResult, TaskLosses
from train.checkpoint import Checkpointer, seed_host_generators
from train.config import InitPartsConfig, TrainConfig
from train.engine import (Engine, compute_dtype, gathered_for_read, gathered_for_write, inference_model,
                          init_distributed, model_init_context, to_device)
from train.faults import maybe_fault
from train.flops import device_peak_flops, mfu, step_flops, training_passes
from train.lora import apply_lora, audio_rows, load_adapter, save_adapter
from train.metrics import make_sink
from train.preempt import PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag, mark_preempted
from train.recipe import to_yaml
from train.run_folder import drop_steps_after, process_start_time, remove_stale_temporaries
from train.schedule import Schedule
from train.watchdog import Watchdog


def build_model(cfg: TrainConfig, tok, score: bool = False, init_from: Optional[str] = None,
                frozen: bool = False) -> StepAudio2ForCausalLM:
    """The model a run trains: the policy (a causal LM, LoRA-wrapped with lora.enabled), or with score=True a
    score model (model.score: reward model, critic) from `init_from` (default: the run's starting folder);
    frozen=True for one that never trains (a reward model used as a reward): no LoRA adapters on it."""
    ids = special_ids(tok)
    if score:
        return _build_score_model(cfg, tok, init_from or cfg.model.init_from or cfg.lora.init_from, frozen)
    # "auto" becomes a concrete kernel for the precision the model will compute in (logged there).
    attention = resolve_attention(cfg.model.attention, compute_dtype(cfg))
    # A LoRA run's frozen base is re-read from lora.init_from on every start, resumes included.
    key = "lora.init_from" if cfg.lora.enabled else "model.init_from"
    init_from = cfg.lora.init_from if cfg.lora.enabled else cfg.model.init_from
    if init_from:
        # Under ZeRO-3 the model is built partitioned and filled tensor by tensor: never whole on a rank.
        partitioned = cfg.engine.zero_stage == 3
        model = load_stepfun(init_from, build_context=model_init_context(cfg) if partitioned else None,
                             gather=gathered_for_write if partitioned else None,
                             gradient_checkpointing=cfg.model.gradient_checkpointing,
                             attention=attention)
        if model.config.audio_patch_token_id != ids.audio_patch:
            raise ValueError(
                f"{key} {init_from} expects <audio_patch> id "
                f"{model.config.audio_patch_token_id}, the tokenizer {cfg.data.tokenizer} has {ids.audio_patch}")
        if model.config.vocab_size < len(tok):
            raise ValueError(f"{key} {init_from} has {model.config.vocab_size} vocabulary rows, fewer than the "
                             f"tokenizer {cfg.data.tokenizer} ({len(tok)} tokens)")
        if cfg.lora.enabled:
            _apply_lora(model, cfg, ids, partitioned)
        return model
    vocab_size = cfg.model.vocab_size or padded_vocab_size(len(tok))
    if vocab_size < len(tok):
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    config = preset_config(cfg.model.preset, vocab_size=vocab_size, audio_patch_token_id=ids.audio_patch)
    with model_init_context(cfg):
        return StepAudio2ForCausalLM(config, gradient_checkpointing=cfg.model.gradient_checkpointing,
                                     attention=attention)


def _build_score_model(cfg: TrainConfig, tok, init_from: Optional[str], frozen: bool = False):
    from model.score import load_score_model

    if not init_from:
        raise ValueError("a score model (reward model, critic) starts from a model folder: set model.init_from "
                         "(or rl.critic_init)")
    attention = resolve_attention(cfg.model.attention, compute_dtype(cfg))
    partitioned = cfg.engine.zero_stage == 3
    model = load_score_model(init_from, build_context=model_init_context(cfg) if partitioned else None,
                             gather=gathered_for_write if partitioned else None,
                             gradient_checkpointing=cfg.model.gradient_checkpointing, attention=attention)
    if model.config.vocab_size < len(tok):
        raise ValueError(f"{init_from} has {model.config.vocab_size} vocabulary rows, fewer than the tokenizer "
                         f"{cfg.data.tokenizer} ({len(tok)} tokens)")
    if cfg.lora.enabled and not frozen:
        _apply_lora(model, cfg, special_ids(tok), partitioned, adapter_init=False)
    return model


def _apply_lora(model: torch.nn.Module, cfg: TrainConfig, ids, partitioned: bool, adapter_init: bool = True) -> None:
    """LoRA (and lora.adapter_init's weights) into a built model. On a ZeRO-3 partitioned base only the
    tensors peft reads are made whole meanwhile: the embedding and lm_head rows the trainable audio rows start
    from (with lora.train_audio_rows; peft's own ZeRO-3 path assumes CUDA and HF's DeepSpeed config). The
    adapters themselves are built whole and small; DeepSpeed partitions them with the engine."""
    rows = audio_rows(ids.first_audio_code, ids.num_audio_codes)
    heads = (model.model.embed_tokens, getattr(model, "lm_head", None))  # a score model has no lm_head
    read = [m.weight for m in heads if m is not None] if partitioned and cfg.lora.train_audio_rows else []
    with gathered_for_read(read) if read else nullcontext():
        apply_lora(model, cfg.lora, rows)
    if adapter_init and cfg.lora.adapter_init:
        load_adapter(model, cfg.lora.adapter_init)


def init_parts_once(cfg: TrainConfig, tok, rank: int) -> TrainConfig:
    """With model.init_parts: rank 0 builds the model from the Qwen2.5 and Qwen2-Audio folders and writes it
    to RUN_DIR/init once (the vocabulary grows there, and only there); returns cfg starting from that folder.

    A resume, or a later start of the same run, finds RUN_DIR/init/DONE and reuses it: the grown rows are
    drawn once, and every rank then loads the folder like any init_from (partitioned under ZeRO-3).
    The other ranks wait by polling for DONE (train.rendezvous): for the 8B model this takes longer than
    a collective may wait. If rank 0 fails, RUN_DIR/init.FAILED holds its error and every rank stops."""
    from model.init_parts import init_from_parts
    from train.rendezvous import run_once_on_rank0

    parts = cfg.model.init_parts
    folder = Path(cfg.run_dir) / "init"

    def build() -> None:
        model = init_from_parts(parts.qwen, parts.audio_encoder, tok, seed=cfg.seed)
        tmp = folder.with_name("init.tmp")
        save_stepfun(model.state_dict(), model.config, tmp, tokenizer=tok)
        (tmp / "DONE").write_text(json.dumps({"qwen": parts.qwen, "audio_encoder": parts.audio_encoder}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # a folder, not one file (data.files): DONE appears with it, complete

    run_once_on_rank0(folder / "DONE", build, rank, "building the initial model from parts",
                      failed=folder.with_name("init.FAILED"))
    model_cfg = dataclasses.replace(cfg.model, init_from=str(folder), init_parts=InitPartsConfig())
    return dataclasses.replace(cfg, model=model_cfg)


def run_eval(cfg: TrainConfig, engine: Engine, tok, ids, dtype: torch.dtype, rank: int, world_size: int,
             beat: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """{"metric", "value", "num_samples", "examples"} of eval.metric on eval.shards, the same on every rank.

    A collective: each rank evaluates its share of the samples in batches on the engine's device, with the
    model gathered once (inference_model: under ZeRO-3 no forward gathers again, so ranks with less to do
    finish first), calling `beat` after each batch; the per-sample results are then gathered."""
    with inference_model(engine) as model:
        return evaluation.run_eval(cfg.eval.metric, model, tok, ids, cfg.eval.shards, cfg.data.asr_instruction,
                                   cfg.eval.max_samples, cfg.eval.max_new_tokens, dtype, device=engine.device,
                                   rank=rank, world_size=world_size, batch_size=cfg.eval.batch_size,
                                   beat=beat, speaker_model=cfg.eval.speaker_model, vocoder=cfg.eval.vocoder)


def eval_details(result: Dict[str, Any]) -> Dict[str, float]:
    """The numbers an evaluation reports beside its value, flat: code_accuracy's nll, paralinguistic's
    micro_accuracy, unmatched and <attribute>_accuracy, speaker_similarity's reference and chance levels."""
    out = {k: float(v) for k, v in result.items() if k not in ("value", "num_samples")
           and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, figures in (result.get("attributes") or {}).items():
        out[f"{name}_accuracy"] = float(figures["accuracy"])
    return out


@dataclass
class RunState:
    """The run's position, saved in train_state.json: the schedule and the budget are functions of it."""
    step: int = 0
    tokens: int = 0
    """Real decoder tokens trained on, summed over ranks."""
    wall_s: float = 0.0
    """Wall time of every attempt so far (the ones before a resume, and this one)."""
    eval_start: Optional[float] = None


def budget_left(cfg: TrainConfig, state: RunState) -> bool:
    """True while neither max_steps nor max_tokens is reached (tokens: summed over ranks)."""
    steps_left = cfg.max_steps is None or state.step < cfg.max_steps
    return steps_left and (cfg.max_tokens is None or state.tokens < cfg.max_tokens)


def mixture_names(cfg: TrainConfig) -> Tuple[str, ...]:
    """The datasets a run logs loss/<name> and tokens/<name> of: a mixture's (data.datasets, two or more);
    none for a single dataset, whose loss is `loss`."""
    names = tuple(ds.name for ds in cfg.data.datasets)
    return names if len(names) > 1 else ()


def task_losses(batch: Dict[str, Any], token_losses_BT: torch.Tensor, names: Tuple[str, ...]) -> TaskLosses:
    """One micro-batch's TaskLosses from the model's per-token losses (token_losses=True): each position goes
    to its sample's dataset (batch "sample_index" and "datasets"), padding to one bin more, dropped. No host-
    device sync: the dataset of each position is made on the host and copied without blocking."""
    order = {name: i for i, name in enumerate(names)}
    # sample_index -1 (padding) picks the last entry: the dropped bin.
    dataset_of_sample = torch.tensor([order[name] for name in batch["datasets"]] + [len(names)])
    dataset_BT = dataset_of_sample[batch["sample_index"]]
    # Counted like num_loss_tokens: position 0 predicts nothing (its token loss is 0 too).
    labelled = dataset_BT[:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    tokens = torch.bincount(labelled, minlength=len(names) + 1)[:len(names)].tolist()
    device = token_losses_BT.device
    sums = torch.zeros(len(names) + 1, dtype=torch.float32, device=device).index_add_(
        0, to_device(dataset_BT.reshape(-1), device), token_losses_BT.detach().float().reshape(-1))
    return TaskLosses(names, sums[:len(names)], tokens)


def global_count(local: int, device: torch.device) -> int:
    """The sum of a host-side count over all ranks (a small collective every rank must make)."""
    t = torch.tensor([float(local)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


class SFTStep(Algorithm):
    """Supervised next-token loss: engine.grad_accum_steps micro-batches from the loader per step.

    The step's loss is the mean over every label token of the step, on all ranks and all micro-batches
    together (not a mean of per-rank or per-micro-batch means, which weighs a token of a short batch more:
    the gradient-accumulation bug transformers fixed in 2024). The step's micro-batches are drawn first, their
    label counts (known on the host from the collate) summed over ranks in one small collective, and each
    micro-batch's summed cross-entropy is scaled by world x grad_accum / that total, which DeepSpeed's mean
    over ranks and its division by grad_accum turn back into exactly 1 / total. In a mixture the model also
    returns each label token's loss, summed per dataset on the device (StepResult.task_losses)."""

    def __init__(self, cfg: TrainConfig, engine: Engine, loader, key_log=None, count_flops=None):
        self.cfg, self.engine, self.loader, self.key_log = cfg, engine, loader, key_log
        self.batches = iter(loader)
        self.count_flops = count_flops  # batch -> model FLOPs (train.flops.step_flops), or None
        self.task_names = mixture_names(cfg)

    def step(self, step: int) -> StepResult:
        gas = self.cfg.engine.grad_accum_steps
        world = dist.get_world_size()
        # (draws nothing from the global RNG: data.loading.loader seeds its workers itself)
        t0 = time.perf_counter()
        batches = [next(self.batches) for _ in range(gas)]
        data_wait_s = time.perf_counter() - t0
        if self.key_log is not None:
            for batch in batches:
                self.key_log.write(json.dumps({"step": step, "keys": batch["keys"],
                                               "epochs": batch.get("epochs")}) + "\n")
            self.key_log.flush()
        total = global_count(sum(_label_count(b) for b in batches), self.engine.device)
        loss_sum, tokens, audio_s, out, tasks = None, 0, 0.0, None, None
        forward_kwargs = {"token_losses": True} if self.task_names else {}
        for batch in batches:
            out = self.engine.forward(batch, **forward_kwargs)
            if self.task_names:
                part = task_losses(batch, out.token_losses, self.task_names)
                tasks = part if tasks is None else tasks + part
            # out.loss is this micro-batch's mean over its own labels: back to a sum, then over the step's.
            summed = out.loss * _label_count(batch)
            self.engine.backward_and_step(summed * (world * gas / max(total, 1)))
            # Summed on the device: reading a loss here would stall the host every micro-batch.
            loss = summed.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            audio_s += float(batch["num_audio_s"])
            tokens += batch["num_tokens"]  # counted by the collate, on the host
        # (out, holding DeepSpeed's backward hooks and through them the engine, dies here.)
        del out
        computed = sum(b["input_ids"].numel() for b in batches)
        budget = sum(b.get("budget_tokens") or 0 for b in batches)
        flops = sum(self.count_flops(b) for b in batches) if self.count_flops is not None else 0.0
        # Logged as this rank's share x world: the loop's mean over ranks is then the step's global mean.
        metrics = {"loss": loss_sum * (world / max(total, 1)), "padding": 1.0 - tokens / computed}
        if budget:  # tokens / packed batching: the share of the token budget real tokens fill
            metrics["budget_fill"] = tokens / budget
        return StepResult(tokens, metrics, audio_s, data_wait_s, flops, tasks)

    def close(self) -> None:
        if self.key_log is not None:
            self.key_log.close()


def _label_count(batch: Dict[str, Any]) -> int:
    count = batch.get("num_loss_tokens")
    return int((batch["labels"][:, 1:] != -100).sum()) if count is None else int(count)


class _Window:
    """Sums since the last log line: each metric over steps, audio seconds; tokens and time at its start."""

    def __init__(self, state: RunState):
        self.sums: Dict[str, Any] = {}
        self.counts: Dict[str, int] = {}  # steps that reported each metric (e.g. none during a critic warm-up)
        self.steps, self.audio_s, self.data_wait_s, self.flops = 0, 0.0, 0.0, 0.0
        self.tokens0, self.t0 = state.tokens, time.perf_counter()
        self.task_losses: Optional[TaskLosses] = None

    def add(self, result: StepResult) -> None:
        if result.task_losses is not None:
            self.task_losses = result.task_losses if self.task_losses is None else self.task_losses + result.task_losses
        for name, value in result.metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1
        self.audio_s += result.audio_s
        self.data_wait_s += result.data_wait_s
        self.flops += result.flops


def _sum_over_ranks(values: Dict[str, Any], device: torch.device) -> Dict[str, float]:
    # On the engine's device: NCCL reduces only accelerator tensors. One stacked tensor: one collective.
    if not values:
        return {}
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _log_window(sink, engine, algorithm: Algorithm, window: _Window, state: RunState, world_size: int,
                named: set, peak: Optional[float] = None) -> None:
    """One metrics line for the window (means over its steps and the ranks); skipped samples not named
    before (this rank's, "SHARD:KEY (reason)") go to the log as messages, once each (`named`)."""
    elapsed = time.perf_counter() - window.t0
    # The window's metrics stayed on the device (no sync per step); this is where they are read.
    means = {name: value / window.counts[name] for name, value in window.sums.items()}
    tasks = window.task_losses
    names = tasks.names if tasks is not None else ()
    # Per-dataset sums ride in the same collective (every rank has every name: a fixed set from the config).
    task_sums = {**{f"__loss/{n}": tasks.loss_sums[i] for i, n in enumerate(names)},
                 **{f"__tokens/{n}": float(tasks.tokens[i]) for i, n in enumerate(names)}}
    totals = _sum_over_ranks({**means, "__audio_s": window.audio_s, "__wait_s": window.data_wait_s,
                              "__flops": window.flops, **task_sums}, engine.device)
    audio_s, wait_s, flops = totals.pop("__audio_s"), totals.pop("__wait_s"), totals.pop("__flops")
    task_sums = {key: totals.pop(key) for key in task_sums}
    metrics = {name: value / world_size for name, value in totals.items()}
    # The window's mean over every label token of a dataset, all ranks and micro-batches (none if it had none).
    task_tokens = {n: round(task_sums[f"__tokens/{n}"]) for n in names}
    metrics.update({f"loss/{n}": task_sums[f"__loss/{n}"] / task_tokens[n] for n in names if task_tokens[n]})
    metrics.update({f"tokens/{n}": task_tokens[n] for n in names})
    tokens_per_s = (state.tokens - window.tokens0) / elapsed
    if flops > 0:
        metrics.update(flops_per_token=flops / max(state.tokens - window.tokens0, 1),
                       tflops_per_s=flops / elapsed / 1e12, tflops_per_s_per_device=flops / elapsed / world_size / 1e12)
        if peak is not None:
            metrics["mfu"] = mfu(flops / elapsed / world_size, peak)
    skips = algorithm.skip_stats()
    sink.log(state.step, {**metrics, "lr": engine.lr(), "grad_norm": engine.grad_norm(),
                          "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                          "tokens_per_s_per_device": tokens_per_s / world_size, "audio_s_per_s": audio_s / elapsed,
                          "data_stall": wait_s / world_size / elapsed,
                          "skipped_samples": sum(skips["skipped"].values()),
                          **{f"skipped/{reason}": n for reason, n in sorted(skips["skipped"].items())},
                          **{f"lr/{group}": lr for group, lr in engine.group_lrs().items()}})
    for name in skips["skipped_keys"]:
        if name not in named:
            named.add(name)
            sink.message(f"skipped sample {name}")
    head = next(iter(metrics), None)
    shown = f"{head} {metrics[head]:.3f} " if head is not None else ""
    shown_tasks = " ".join(f"{n} {metrics[f'loss/{n}']:.3f}" for n in names if f"loss/{n}" in metrics)
    shown += f"({shown_tasks}) " if shown_tasks else ""
    shown_mfu = f" MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
    sink.advance(state.step, f"{shown}lr {engine.lr():.2e} {tokens_per_s:.0f} tok/s{shown_mfu}")


def _open_key_log(cfg: TrainConfig, rank: int, world_size: int, step: int):
    """RUN_DIR/sample_keys/rank_N.jsonl opened for appending (metrics.sample_keys), else None.

    Training begins at step: lines of later steps (a killed attempt's, after its last checkpoint, or before
    any checkpoint when step is 0) go, as this run repeats those steps."""
    if not cfg.metrics.sample_keys:
        return None
    folder = Path(cfg.run_dir) / "sample_keys"
    folder.mkdir(parents=True, exist_ok=True)
    logs = [folder / f"rank_{rank}.jsonl"]
    if rank == 0:  # also the files of ranks that a resume on fewer ranks no longer has
        logs += [p for p in folder.glob("rank_*.jsonl") if p.stem[5:].isdigit() and int(p.stem[5:]) >= world_size]
    for log in logs:
        drop_steps_after(log, step)
    return open(folder / f"rank_{rank}.jsonl", "a", encoding="utf-8")


def make_algorithm(cfg: TrainConfig, engine: Engine, loader, ctx: Dict[str, Any]) -> Algorithm:
    """The step of cfg.kind around the loop's engine (the policy; for reward_model the score model)."""
    if cfg.kind == "sft":
        return SFTStep(cfg, engine, loader, ctx.get("key_log"), ctx.get("count_flops"))
    from train.rl import build_algorithm

    return build_algorithm(cfg, engine, loader, ctx)


def run(cfg: TrainConfig) -> Dict[str, Any]:
    t_start = time.perf_counter()
    rank, world_size = init_distributed(timeout_s=cfg.resilience.collective_timeout_s)
    preempt = PreemptionFlag(cfg.resilience.preempt_signals)
    torch.manual_seed(cfg.seed)  # the same on every rank: the initial weights must match
    seed_host_generators(cfg.seed, rank)
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = special_ids(tok)
    config_yaml = to_yaml(cfg)
    sink = make_sink(cfg.metrics, cfg.run_dir, rank, run_config=asdict(cfg))
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(config_yaml, encoding="utf-8")
        # Before this attempt writes a temporary: what killed attempts left half-written goes.
        for line in remove_stale_temporaries(cfg.run_dir, started=process_start_time()):
            sink.message(line)

    model_cfg = init_parts_once(cfg, tok, rank) if cfg.model.init_parts.qwen else cfg
    engine = Engine(build_model(model_cfg, tok, score=cfg.kind == "reward_model"), cfg)
    # (No reference to the module is kept here: DeepSpeed's hooks on it hold the engine, and whatever holds
    # the module until run() returns keeps the engine's optimizer state alive past Engine.close.)
    kernel = next(m.attention_implementation for m in engine.module.modules()
                  if isinstance(m, StepAudio2ForCausalLM))  # inside peft too
    sink.message(f"device {engine.device}, {cfg.engine.precision}, ZeRO-{cfg.engine.zero_stage}, decoder attention "
                 f"{kernel} (model.attention={cfg.model.attention}), kind {cfg.kind}")
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    # Model FLOPs per batch for tflops_per_s and MFU (train.flops): trained parts count 6 per parameter and
    # token, frozen ones a gradient crosses 4, forward-only ones 2; attention per sample where the kernel
    # isolates packed samples.
    model_config = next(m.config for m in engine.module.modules() if isinstance(m, StepAudio2ForCausalLM))
    flops_args = dict(varlen=kernel in VARLEN_KERNELS, passes=training_passes(cfg.model.trainable, cfg.lora),
                      lm_head=cfg.kind != "reward_model")
    peak = device_peak_flops(engine.device, dtype)
    if peak is None:
        sink.message(f"MFU is not logged: no peak FLOP/s known for {engine.device} (train.flops.GPU_PEAKS)")
    loader = build_loader(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed)
    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint, rank, world_size, log=sink.message)
    state = RunState()
    resume = ckpt.resume_point()
    ctx = {"tok": tok, "ids": ids, "rank": rank, "world_size": world_size, "sink": sink,
           "build_model": lambda c=model_cfg, **kw: build_model(c, tok, **kw), "resume": resume}
    ctx["key_log"] = _open_key_log(cfg, rank, world_size, resume_step(ckpt, resume))
    ctx["count_flops"] = lambda batch: step_flops(model_config, batch, **flops_args)
    algorithm = make_algorithm(cfg, engine, loader, ctx)
    if resume is not None:
        saved, data_state = ckpt.load(engine, *resume, others=algorithm.engines())
        state = RunState(**{k: saved[k] for k in asdict(state) if k in saved})
        algorithm.load_state_dict(data_state)
        sink.message(f"resumed from {resume[0] / resume[1]} at step {state.step}")
    sink.begin(state.step)
    metric = cfg.eval.metric
    t_start -= state.wall_s  # wall time counts every attempt: the ones before a resume, and this one
    generic_eval = bool(cfg.eval.shards) and cfg.kind != "reward_model"

    def evaluate(tag: str) -> Optional[float]:
        try:
            own = algorithm.evaluate(tag)
            result = run_eval(cfg, engine, tok, ids, dtype, rank, world_size, beat=watchdog.beat) \
                if generic_eval else None
        except BaseException:
            watchdog.stop()  # the run ends here (e.g. eval.shards without samples): leave no timer armed
            raise
        if own:
            sink.log(state.step, {f"eval/{k}_{tag}": v for k, v in own.items()})
            sink.message(f"[eval {tag} @ step {state.step}] " + ", ".join(f"{k} {v:.4g}" for k, v in own.items()))
        if result is None:
            return next(iter(own.values()), None) if own else None
        value, examples = result["value"], result["examples"]
        sink.log(state.step, {f"eval/{metric}_{tag}": value, "eval/num_samples": result["num_samples"],
                              **{f"eval/{metric}_{k}_{tag}": v for k, v in eval_details(result).items()}})
        shown = f"{100 * value:.1f}%" if metric == "wer" else f"{value:.4g}"
        example = f"; e.g. ref: {examples[0]['ref']!r} hyp: {examples[0]['hyp']!r}" if examples else ""
        sink.message(f"[eval {tag} @ step {state.step}] {metric.upper()} {shown} on {result['num_samples']} "
                     f"held-out samples{example}")
        return value

    def save() -> None:
        state.wall_s = time.perf_counter() - t_start
        ckpt.save(engine, state.step, algorithm.state_dict(), config_yaml, extra=asdict(state),
                  others=algorithm.engines())

    results: Dict[str, Any] = {"start_step": state.step}
    has_eval = generic_eval or bool(cfg.rl.eval_pairs and cfg.kind in ("dpo", "reward_model"))
    # Running from here to the end evaluation: each evaluated batch beats it, as each step does.
    watchdog = Watchdog(cfg.run_dir, rank, cfg.resilience.watchdog_s)
    watchdog.beat()
    if has_eval and cfg.eval.at_start and state.step == 0:
        state.eval_start = evaluate("start")

    schedule = Schedule.from_config(cfg)
    sink.start(state.step, cfg.max_steps)
    window = _Window(state)
    named_skips: set = set()
    result = None
    engine.module.train()
    watchdog.beat()
    while budget_left(cfg, state):
        factor = schedule.factor(state.step, state.tokens)
        engine.set_lr_factor(factor)
        for other in algorithm.engines().values():
            other.set_lr_factor(factor)
        result = algorithm.step(state.step + 1)
        window.add(result)
        state.step += 1
        step = state.step
        maybe_fault("step", step, rank)
        # The one host-device sync of a step: every rank's tokens (the budget, the schedule) and whether any
        # rank was signalled to stop (all ranks must stop at the same step).
        totals = _sum_over_ranks({"tokens": result.tokens, "signalled": float(preempt.received is not None)},
                                 engine.device)
        state.tokens += int(totals["tokens"])
        finished = not budget_left(cfg, state)
        sink.advance(step)
        if step % cfg.metrics.log_every == 0 or finished:
            _log_window(sink, engine, algorithm, window, state, world_size, named_skips, peak)
            window = _Window(state)
        if has_eval and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not finished:
            evaluate(f"step{step}")
        preempted = totals["signalled"] > 0 and not finished  # at the end, just finish
        if preempted or finished or cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            save()
        if preempted:
            watchdog.stop()
            sink.message(f"preempted ({preempt.received or 'signal on another rank'}): checkpoint at step {step} "
                         f"written, exiting with {PREEMPTED_EXIT_CODE} to be requeued")
            sink.close()
            mark_preempted()
            raise Preempted()
        watchdog.beat()
    sink.advance(state.step)

    results.update(metric=metric, eval_start=state.eval_start, eval_end=None)
    if has_eval and cfg.eval.at_end:
        results["eval_end"] = evaluate("end")
    watchdog.stop()
    for tag in ("start", "end"):
        if results[f"eval_{tag}"] is not None:
            results[f"{metric}_{tag}"] = results[f"eval_{tag}"]
    if cfg.checkpoint.export:
        results.update(_export(cfg, engine, tok, rank, sink))
    algorithm.close()
    for other in algorithm.engines().values():
        other.close()
    # The last step's result holds device tensors whose graph holds DeepSpeed's hooks, and the algorithm its
    # engines: let go of both before the engine closes.
    result = algorithm = None
    engine.close()  # before the next stage builds its own
    results.update(final_step=state.step, tokens=state.tokens, wall_s=time.perf_counter() - t_start)
    sink.log(state.step, {"done": True, **{k: v for k, v in results.items()
                                           if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    sink.close()
    return results


def resume_step(ckpt: Checkpointer, resume) -> int:
    """The step a resume starts from (0 for a fresh run), read before the engines load it."""
    if resume is None:
        return 0
    return int(json.loads((resume[0] / resume[1] / "train_state.json").read_text(encoding="utf-8"))["step"])


def _export(cfg: TrainConfig, engine: Engine, tok, rank: int, sink) -> Dict[str, Any]:
    """The final weights: a peft adapter for LoRA, else RUN_DIR/export in StepFun's layout (collective)."""
    state = engine.full_state_dict()
    out: Dict[str, Any] = {}
    if rank == 0 and cfg.lora.enabled:
        adapter_dir = save_adapter(engine.module, state, Path(cfg.run_dir) / "adapter")
        sink.message(f"wrote the peft adapter to {adapter_dir} (merge: python -m train.merge_lora)")
        out["adapter_dir"] = str(adapter_dir)
    elif rank == 0:
        export_dir = Path(cfg.run_dir) / "export"
        # config.json must name the dtype the tensors are stored in (bf16 training exports bf16).
        stored = next(t.dtype for t in state.values() if t.is_floating_point())
        config = dataclasses.replace(engine.module.config, torch_dtype=str(stored).removeprefix("torch."))
        if cfg.kind == "reward_model":
            from model.score import score_config

            config = score_config(config)
        save_stepfun(state, config, str(export_dir), tokenizer=tok)
        sink.message(f"exported StepFun-layout weights to {export_dir}")
        out["export_dir"] = str(export_dir)
    dist.barrier()
    return out

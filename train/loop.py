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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

from data.loader import build_loader
from data.tokenizer import load_tokenizer, special_ids
from model.checkpoint import load_stepfun, save_stepfun
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM, resolve_attention
from train import evaluate as evaluation
from train.checkpoint import Checkpointer, seed_host_generators
from train.config import InitPartsConfig, TrainConfig, to_yaml
from train.engine import (Engine, compute_dtype, gathered_for_write, inference_model, init_distributed,
                          model_init_context)
from train.faults import maybe_fault
from train.lora import apply_lora, audio_rows, save_adapter
from train.metrics import make_sink
from train.preempt import PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag, mark_preempted
from train.run_folder import drop_steps_after, process_start_time, remove_stale_temporaries
from train.schedule import Schedule
from train.watchdog import Watchdog


def build_model(cfg: TrainConfig, tok) -> StepAudio2ForCausalLM:
    ids = special_ids(tok)
    # "auto" becomes a concrete kernel for the precision the model will compute in (logged there).
    attention = resolve_attention(cfg.model.attention, compute_dtype(cfg))
    # A LoRA run's frozen base is re-read from lora.init_from on every start, resumes included.
    key = "lora.init_from" if cfg.lora.enabled else "model.init_from"
    init_from = cfg.lora.init_from if cfg.lora.enabled else cfg.model.init_from
    if init_from:
        # Under ZeRO-3 the model is built partitioned and filled tensor by tensor: never whole on a rank.
        # Not yet for LoRA: peft's trainable audio rows index the embedding, which is empty when partitioned.
        partitioned = cfg.engine.zero_stage == 3 and not cfg.lora.enabled
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
            apply_lora(model, cfg.lora, audio_rows(ids.first_audio_code, ids.num_audio_codes))
        return model
    vocab_size = cfg.model.vocab_size or -(-len(tok) // 64) * 64
    if vocab_size < len(tok):
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    config = preset_config(cfg.model.preset, vocab_size=vocab_size, audio_patch_token_id=ids.audio_patch)
    with model_init_context(cfg):
        return StepAudio2ForCausalLM(config, gradient_checkpointing=cfg.model.gradient_checkpointing,
                                     attention=attention)


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
        os.replace(tmp, folder)  # DONE appears with the folder, complete

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
                                   beat=beat)


def budget_left(cfg: TrainConfig, state: Dict[str, Any]) -> bool:
    """True while neither max_steps nor max_tokens is reached (tokens: summed over ranks)."""
    steps_left = cfg.max_steps is None or state["step"] < cfg.max_steps
    return steps_left and (cfg.max_tokens is None or state["tokens"] < cfg.max_tokens)


def _new_window(state: Dict[str, Any]) -> Dict[str, float]:
    """Sums since the last log line: loss, audio seconds, micro-batches; tokens and time at its start."""
    return {"loss": None, "audio_s": 0.0, "micro": 0, "tokens0": state["tokens"], "t0": time.perf_counter()}


def _sum_over_ranks(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    # On the engine's device: NCCL reduces only accelerator tensors.
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _log_window(sink, engine, loader, window, state, world_size: int) -> None:
    elapsed = time.perf_counter() - window["t0"]
    # The window's losses stayed on the device (no sync per micro-batch); this is where they are read.
    totals = _sum_over_ranks({"loss": float(window["loss"]) / window["micro"], "audio_s": window["audio_s"]},
                             engine.device)
    loss, tokens_per_s = totals["loss"] / world_size, (state["tokens"] - window["tokens0"]) / elapsed
    skipped = sum(loader.stats()["skipped"].values())
    sink.log(state["step"], {"loss": loss, "lr": engine.lr(), "grad_norm": engine.grad_norm(),
                             "tokens": state["tokens"], "tokens_per_s": tokens_per_s,
                             "audio_s_per_s": totals["audio_s"] / elapsed, "skipped_samples": skipped,
                             **{f"lr/{group}": lr for group, lr in engine.group_lrs().items()}})
    sink.advance(state["step"], f"loss {loss:.3f} lr {engine.lr():.2e} {tokens_per_s:.0f} tok/s")


def _open_key_log(cfg: TrainConfig, rank: int, world_size: int, step: int):
    """RUN_DIR/sample_keys/rank_N.jsonl opened for appending (metrics.sample_keys), else None.

    Training begins at step: lines of later steps (a killed attempt's, after its last checkpoint) go, as this
    run repeats those steps."""
    if not cfg.metrics.sample_keys:
        return None
    folder = Path(cfg.run_dir) / "sample_keys"
    folder.mkdir(parents=True, exist_ok=True)
    if step > 0:
        logs = [folder / f"rank_{rank}.jsonl"]
        if rank == 0:  # also the files of ranks that a resume on fewer ranks no longer has
            logs += [p for p in folder.glob("rank_*.jsonl") if p.stem[5:].isdigit() and int(p.stem[5:]) >= world_size]
        for log in logs:
            drop_steps_after(log, step)
    return open(folder / f"rank_{rank}.jsonl", "a", encoding="utf-8")


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
    engine = Engine(build_model(model_cfg, tok), cfg)
    # (No reference to the module is kept here: DeepSpeed's hooks on it hold the engine, and whatever holds
    # the module until run() returns keeps the engine's optimizer state alive past Engine.close.)
    kernel = next(m.attention_implementation for m in engine.module.modules()
                  if isinstance(m, StepAudio2ForCausalLM))  # inside peft too
    sink.message(f"device {engine.device}, {cfg.engine.precision}, ZeRO-{cfg.engine.zero_stage}, decoder attention "
                 f"{kernel} (model.attention={cfg.model.attention})")
    loader = build_loader(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed)
    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint, rank, world_size, log=sink.message)
    # The run's position, saved in train_state.json: the schedule and the budget are functions of it.
    state: Dict[str, Any] = {"step": 0, "tokens": 0, "wall_s": 0.0, "eval_start": None}
    resume = ckpt.resume_point()
    if resume is not None:
        saved, loader_state = ckpt.load(engine, *resume)
        state.update({k: saved[k] for k in state if k in saved})
        loader.load_state_dict(loader_state)  # every rank's state: the loader picks (or re-splits) its own
        sink.message(f"resumed from {resume[0] / resume[1]} at step {state['step']}")
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    metric = cfg.eval.metric
    t_start -= state["wall_s"]  # wall time counts every attempt: the ones before a resume, and this one

    def evaluate(tag: str) -> float:
        try:
            result = run_eval(cfg, engine, tok, ids, dtype, rank, world_size, beat=watchdog.beat)
        except BaseException:
            watchdog.stop()  # the run ends here (e.g. eval.shards without samples): leave no timer armed
            raise
        value, examples = result["value"], result["examples"]
        sink.log(state["step"], {f"eval/{metric}_{tag}": value, "eval/num_samples": result["num_samples"]})
        shown = f"{100 * value:.1f}%" if metric == "wer" else f"{value:.4g}"
        example = f"; e.g. ref: {examples[0]['ref']!r} hyp: {examples[0]['hyp']!r}" if examples else ""
        sink.message(f"[eval {tag} @ step {state['step']}] {metric.upper()} {shown} on {result['num_samples']} "
                     f"held-out samples{example}")
        return value

    def save() -> None:
        state["wall_s"] = time.perf_counter() - t_start
        ckpt.save(engine, state["step"], loader.state_dict(), config_yaml, extra=dict(state))

    results: Dict[str, Any] = {"start_step": state["step"]}
    # Running from here to the end evaluation: each evaluated batch beats it, as each step does.
    watchdog = Watchdog(cfg.run_dir, rank, cfg.resilience.watchdog_s)
    watchdog.beat()
    if cfg.eval.shards and cfg.eval.at_start and state["step"] == 0:
        state["eval_start"] = evaluate("start")

    batches = iter(loader)
    key_log = _open_key_log(cfg, rank, world_size, state["step"])
    schedule = Schedule.from_config(cfg)
    sink.start(state["step"], cfg.max_steps)
    window = _new_window(state)
    engine.module.train()
    watchdog.beat()
    out = None
    while budget_left(cfg, state):
        engine.set_lr_factor(schedule.factor(state["step"], state["tokens"]))
        step_tokens = 0
        for _ in range(cfg.engine.grad_accum_steps):
            batch = next(batches)  # (draws nothing from the global RNG: data.loader seeds its workers itself)
            if key_log is not None:
                key_log.write(json.dumps({"step": state["step"] + 1, "keys": batch["keys"],
                                          "epochs": batch.get("epochs")}) + "\n")
                key_log.flush()
            out = engine.forward(batch)
            engine.backward_and_step(out.loss)
            # Summed on the device: reading a loss here would stall the host every micro-batch.
            loss = out.loss.detach().float()
            window["loss"] = loss if window["loss"] is None else window["loss"] + loss
            window["audio_s"] += float(batch["num_audio_s"])
            window["micro"] += 1
            step_tokens += batch["num_tokens"]  # counted by the collate, on the host
        state["step"] += 1
        step = state["step"]
        maybe_fault("step", step, rank)
        # The one host-device sync of a step: every rank's tokens (the budget, the schedule) and whether any
        # rank was signalled to stop (all ranks must stop at the same step).
        totals = _sum_over_ranks({"tokens": step_tokens, "signalled": float(preempt.received is not None)},
                                 engine.device)
        state["tokens"] += int(totals["tokens"])
        finished = not budget_left(cfg, state)
        sink.advance(step)
        if step % cfg.metrics.log_every == 0 or finished:
            _log_window(sink, engine, loader, window, state, world_size)
            window = _new_window(state)
        if cfg.eval.shards and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not finished:
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
    sink.advance(state["step"])

    results.update(metric=metric, eval_start=state["eval_start"], eval_end=None)
    if cfg.eval.shards and cfg.eval.at_end:
        results["eval_end"] = evaluate("end")
    watchdog.stop()
    for tag in ("start", "end"):
        if results[f"eval_{tag}"] is not None:
            results[f"{metric}_{tag}"] = results[f"eval_{tag}"]
    if cfg.checkpoint.export:
        results.update(_export(cfg, engine, tok, rank, sink))
    # The last step's output holds DeepSpeed's backward hooks, which hold the engine: let go of it first.
    del out
    engine.close()  # before the next stage builds its own
    results.update(final_step=state["step"], tokens=state["tokens"], wall_s=time.perf_counter() - t_start)
    sink.log(state["step"], {"done": True, **{k: v for k, v in results.items()
                                              if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    sink.close()
    return results


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
        save_stepfun(state, config, str(export_dir), tokenizer=tok)
        sink.message(f"exported StepFun-layout weights to {export_dir}")
        out["export_dir"] = str(export_dir)
    dist.barrier()
    return out

"""The training run: build everything from the config, resume, loop over steps, checkpoint, export."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist

from data.loader import build_loader
from data.tokenizer import load_tokenizer, special_ids
from model.checkpoint import load_stepfun, save_stepfun
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from train.checkpoint import Checkpointer
from train.config import TrainConfig, to_yaml
from train.engine import Engine, gathered_for_write, init_distributed, model_init_context
from train.evaluate import evaluate_asr
from train.faults import maybe_fault
from train.lora import apply_lora, audio_rows, save_adapter
from train.metrics import make_sink
from train.preempt import PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag
from train.watchdog import Watchdog


def build_model(cfg: TrainConfig, tok) -> StepAudio2ForCausalLM:
    ids = special_ids(tok)
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
                             attention=cfg.model.attention)
        if model.config.audio_patch_token_id != ids.audio_patch:
            raise ValueError(
                f"{key} {init_from} expects <audio_patch> id "
                f"{model.config.audio_patch_token_id}, the tokenizer {cfg.data.tokenizer} has {ids.audio_patch}")
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora, audio_rows(ids.first_audio_code, ids.num_audio_codes))
        return model
    vocab_size = cfg.model.vocab_size or -(-len(tok) // 64) * 64
    if vocab_size < len(tok):
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    config = preset_config(cfg.model.preset, vocab_size=vocab_size, audio_patch_token_id=ids.audio_patch)
    with model_init_context(cfg):
        return StepAudio2ForCausalLM(config, gradient_checkpointing=cfg.model.gradient_checkpointing,
                                     attention=cfg.model.attention)


def _new_window() -> Dict[str, float]:
    """Sums since the last log line: loss, decoder tokens, audio seconds, micro-batches, start time."""
    return {"loss": 0.0, "tokens": 0, "audio_s": 0.0, "micro": 0, "t0": time.perf_counter()}


def _sum_over_ranks(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    # On the engine's device: NCCL reduces only accelerator tensors.
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def run(cfg: TrainConfig) -> Dict[str, Any]:
    rank, world_size = init_distributed(timeout_s=cfg.resilience.collective_timeout_s)
    preempt = PreemptionFlag(cfg.resilience.preempt_signals)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = special_ids(tok)
    config_yaml = to_yaml(cfg)
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(config_yaml, encoding="utf-8")
    sink = make_sink(cfg.metrics, cfg.run_dir, rank, run_config=asdict(cfg))

    model = build_model(cfg, tok)
    engine = Engine(model, cfg)
    loader = build_loader(cfg.data, rank=rank, world_size=world_size, seed=cfg.seed)
    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint, rank, world_size)
    step = 0
    resume = ckpt.resume_point()
    if resume is not None:
        step, loader_state = ckpt.load(engine, *resume)
        loader.load_state_dict(loader_state)
        sink.message(f"resumed from {resume[0] / resume[1]} at step {step}")
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32

    def evaluate(tag: str) -> Dict[str, Any]:
        result = evaluate_asr(engine.module, tok, ids, cfg.eval.shards, cfg.data.asr_instruction,
                              cfg.eval.max_samples, cfg.eval.max_new_tokens, dtype)
        sink.log(step, {f"eval/wer_{tag}": result["wer"], "eval/num_samples": result["num_samples"]})
        sink.message(f"[eval {tag} @ step {step}] WER {100 * result['wer']:.1f}% on {result['num_samples']} "
                     f"held-out samples; e.g. ref: {result['examples'][0]['ref']!r} "
                     f"hyp: {result['examples'][0]['hyp']!r}")
        return result

    results: Dict[str, Any] = {"start_step": step}
    if cfg.eval.shards and cfg.eval.at_start and step == 0:
        results["wer_start"] = evaluate("start")["wer"]

    batches = iter(loader)
    sink.start(step, cfg.max_steps)
    window = _new_window()
    engine.module.train()
    watchdog = Watchdog(cfg.run_dir, rank, cfg.resilience.watchdog_s)
    watchdog.beat()
    while step < cfg.max_steps:
        for _ in range(cfg.engine.grad_accum_steps):
            batch = next(batches)
            out = engine.forward(batch)
            engine.backward_and_step(out.loss)
            loss_value = out.loss.item()  # one device sync per micro-batch
            window["loss"] += loss_value
            window["tokens"] += int(batch["attention_mask"].sum())
            window["audio_s"] += float(batch["num_audio_s"])
            window["micro"] += 1
        step += 1
        maybe_fault("step", step, rank)
        sink.advance(step, f"loss {loss_value:.3f}")
        if step % cfg.metrics.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window["t0"]
            totals = _sum_over_ranks({"loss": window["loss"] / window["micro"], "tokens": window["tokens"],
                                      "audio_s": window["audio_s"]}, engine.device)
            loss = totals["loss"] / world_size
            skipped = sum(loader.stats()["skipped"].values())
            sink.log(step, {"loss": loss, "lr": engine.lr(), "grad_norm": engine.grad_norm(),
                            "tokens_per_s": totals["tokens"] / elapsed, "audio_s_per_s": totals["audio_s"] / elapsed,
                            "skipped_samples": skipped})
            sink.advance(step, f"loss {loss:.3f} lr {engine.lr():.2e} {totals['tokens'] / elapsed:.0f} tok/s")
            window = _new_window()
        if cfg.eval.shards and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.max_steps:
            evaluate(f"step{step}")
        preempted = preempt.any_rank_received() and step < cfg.max_steps  # at the end, just finish
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if preempted or periodic or step == cfg.max_steps:
            ckpt.save(engine, step, loader.state_dict(), config_yaml)
        if preempted:
            watchdog.stop()
            sink.message(f"preempted ({preempt.received or 'signal on another rank'}): checkpoint at step {step} "
                         f"written, exiting with {PREEMPTED_EXIT_CODE} to be requeued")
            sink.close()
            raise Preempted()
        watchdog.beat()
    watchdog.stop()
    sink.advance(step)

    if cfg.eval.shards and cfg.eval.at_end:
        results["wer_end"] = evaluate("end")["wer"]
    if cfg.checkpoint.export:
        state = engine.full_state_dict()
        if rank == 0 and cfg.lora.enabled:
            adapter_dir = save_adapter(engine.module, state, Path(cfg.run_dir) / "adapter")
            sink.message(f"wrote the peft adapter to {adapter_dir} (merge: python -m train.merge_lora)")
            results["adapter_dir"] = str(adapter_dir)
        elif rank == 0:
            export_dir = Path(cfg.run_dir) / "export"
            # config.json must name the dtype the tensors are stored in (bf16 training exports bf16).
            stored = next(t.dtype for t in state.values() if t.is_floating_point())
            config = dataclasses.replace(engine.module.config, torch_dtype=str(stored).removeprefix("torch."))
            save_stepfun(state, config, str(export_dir), tokenizer=tok)
            sink.message(f"exported StepFun-layout weights to {export_dir}")
            results["export_dir"] = str(export_dir)
        dist.barrier()
    results["final_step"] = step
    sink.log(step, {"done": True, **{k: v for k, v in results.items() if isinstance(v, (int, float))}})
    sink.close()
    return results

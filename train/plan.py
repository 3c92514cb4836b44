"""`python -m train.plan RECIPE [--gpus N] [--gpu h100] [--mfu 0.4] [--json] [key=value ...]`: what a recipe
costs before it runs. Per stage of its curriculum (or the run, without stages): optimizer steps, decoder tokens,
training FLOPs, GPU-hours at the given MFU of the GPU's dense peak, days on N GPUs, and model-state memory per
GPU (train.memory's formulas); then the total.

Tokens: the stage's max_tokens; else max_steps x tokens per step, where a step holds GPUs x
engine.grad_accum_steps micro-batches of data.max_tokens (tokens, packed batching) or data.batch_size x
data.max_seq_len (fixed; x 2 for the pairs of dpo and reward_model): full micro-batches, so an upper bound.
GRPO and PPO (max_steps only): max_steps x GPUs x data.batch_size x rl.num_generations x (rl.max_new_tokens +
--prompt-tokens), every answer at its longest.

FLOPs = tokens x FLOPs per token (train.flops.flops_per_token at --seq-len, default data.max_seq_len: the
attention of a full row, an upper bound for rows of shorter samples under a variable-length kernel), with the
stage's trained groups (model.trainable, LoRA): a frozen decoder costs 4 instead of 6 FLOPs per parameter.
  sft            the policy's training.
  reward_model   a score model's training (no output layer).
  dpo            the policy's training + the reference's forward.
  grpo, ppo      per token: the rollout's forward, the old log-probabilities' forward, the reference's forward
                 (rl.kl_coef > 0), each reward model's forward, rl.epochs x the policy's training; PPO adds the
                 critic's forward (values) and rl.epochs x its training. Decoding is memory-bound: the GPU-hours
                 of these stages at the same MFU are optimistic.
  audio          --audio-share S (default 0: not counted): the share of decoder tokens that are input-audio
                 rows (12.5 per second of audio), each second costing encoder_flops_per_audio_second.
GPU-hours = FLOPs / (peak x MFU) / 3600; days = GPU-hours / GPUs / 24.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from model.config import StepAudio2Config, preset_config
from train import memory
from train.config import PARAM_GROUPS, TrainConfig
from train.recipe import ConfigError, load_config, stage_config
from train.flops import (GPU_KEYS, encoder_flops_per_audio_second, flops_per_token, forward_passes,
                         gpu_peak_flops, training_passes)

AUDIO_TOKENS_PER_S = 12.5
DEFAULT_PROMPT_TOKENS = 512
PAIR_KINDS = ("dpo", "reward_model")
ROLLOUT_KINDS = ("grpo", "ppo")


def model_config(cfg: TrainConfig) -> StepAudio2Config:
    """The shape a run trains: model.init_from's config.json when that folder is here, else model.preset with
    model.vocab_size (None: the preset's vocabulary)."""
    source = cfg.model.init_from or cfg.lora.init_from
    if source and (Path(source) / "config.json").is_file():
        return StepAudio2Config.from_dict(json.loads((Path(source) / "config.json").read_text(encoding="utf-8")))
    return preset_config(cfg.model.preset, vocab_size=cfg.model.vocab_size)


@functools.lru_cache(maxsize=4)
def _group_counts(config_json: str, lora_r: int, lora_targets: Tuple[str, ...], lora_adapter: bool) -> Dict[str, int]:
    """Parameters per PARAM_GROUPS group of the model (built on the meta device: no memory), its total, and
    the LoRA parameters train.memory.lora_param_count gives."""
    from model.lalm import StepAudio2ForCausalLM
    from train.config import LoraConfig

    with torch.device("meta"):
        model = StepAudio2ForCausalLM(StepAudio2Config.from_dict(json.loads(config_json)))
    counts = {group: 0 for group in PARAM_GROUPS}
    for name, p in model.named_parameters():
        for group, prefixes in PARAM_GROUPS.items():
            if name.startswith(prefixes):
                counts[group] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(enabled=True, r=lora_r, target_modules=list(lora_targets), adapter=lora_adapter)
    counts["lora"] = memory.lora_param_count(model, lora)
    return counts


def _zero_offload(cfg: TrainConfig) -> bool:
    """Whether engine.deepspeed moves the optimizer (and parameters) to CPU memory."""
    zero = cfg.engine.deepspeed.get("zero_optimization", {}) or {}
    return any((zero.get(k) or {}).get("device", "none") not in ("none", None)
               for k in ("offload_optimizer", "offload_param"))


def _state_bytes(params: int, trainable: int, stage: int, offload: bool, gpus: int) -> Dict[str, float]:
    """Model-state bytes per GPU: train.memory.model_state_bytes for ZeRO 2 and 3; its byte counts for 0 and 1
    (ZeRO-1 splits only the optimizer state)."""
    if stage in (2, 3):
        return memory.model_state_bytes(params, trainable, stage, offload, gpus)
    weights, grads = memory.WEIGHT_BYTES * params, memory.GRAD_BYTES * trainable
    optim = memory.OPTIMIZER_BYTES * trainable / (gpus if stage == 1 else 1)
    return {"gpu": float(weights + grads + (0 if offload else optim)), "cpu": float(optim if offload else 0)}


def stage_memory(cfg: TrainConfig, config: StepAudio2Config, gpus: int) -> Dict[str, Any]:
    """{"gpu_gib", "cpu_gib", "models": {role: (params, trainable)}}: model states per GPU of every model the
    stage holds (policy; reference, critic, reward models for RL kinds), bf16 mixed precision as train.memory
    counts it, activations excluded."""
    lora = cfg.lora
    counts = _group_counts(json.dumps(config.to_dict()), lora.r, tuple(lora.target_modules), lora.adapter)
    if lora.enabled:
        trained = counts["lora"]
        params = counts["total"] + trained
    else:
        trained = sum(counts[g] for g in cfg.model.trainable)
        params = counts["total"]
    head = config.hidden_size + 1  # a score model's head (model.score): hidden -> 1 with a bias
    score_params = params - counts["lm_head"] + head
    score_trained = trained - (0 if lora.enabled else counts["lm_head"] * ("lm_head" in cfg.model.trainable)) + head
    rl, kind = cfg.rl, cfg.kind
    models: Dict[str, Tuple[int, int]] = {}
    if kind == "reward_model":
        models["reward_model"] = (score_params, score_trained)
    else:
        models["policy"] = (params, trained)
    shared_reference = lora.enabled and rl.reference in ("auto", "adapters_off") and not lora.adapter_init
    wants_reference = (kind in ROLLOUT_KINDS and rl.kl_coef > 0) or (kind == "dpo" and not rl.precompute_reference)
    if wants_reference and not shared_reference and rl.reference != "none":
        models["reference"] = (params, 0)
    if kind == "ppo":
        models["critic"] = (score_params, score_trained)
    if kind in ROLLOUT_KINDS:
        for i, _ in enumerate(r for r in rl.rewards if r.model):
            models[f"reward_model_{i}"] = (score_params, 0)
    gpu = cpu = 0.0
    offload = _zero_offload(cfg)
    for role, (p, t) in models.items():
        moved = offload or (role == "reference" and rl.reference_offload and cfg.engine.zero_stage == 3)
        b = _state_bytes(p, t, cfg.engine.zero_stage, moved, gpus)
        gpu, cpu = gpu + b["gpu"], cpu + b["cpu"]
    return {"gpu_gib": gpu / memory.GIB, "cpu_gib": cpu / memory.GIB, "models": models}


def stage_tokens(cfg: TrainConfig, gpus: int, prompt_tokens: int) -> Dict[str, Any]:
    """{"steps", "tokens", "tokens_per_step", "seq_len"} of a run (formulas in the module doc)."""
    data = cfg.data
    if cfg.kind in ROLLOUT_KINDS:
        if cfg.max_steps is None:
            raise ConfigError(f"kind={cfg.kind}: planning needs max_steps (rollout tokens are not budgeted)")
        seq_len = prompt_tokens + cfg.rl.max_new_tokens
        per_step = gpus * data.batch_size * cfg.rl.num_generations * seq_len
        return {"steps": cfg.max_steps, "tokens": cfg.max_steps * per_step, "tokens_per_step": per_step,
                "seq_len": seq_len}
    if data.batching in ("tokens", "packed"):
        per_step = gpus * cfg.engine.grad_accum_steps * data.max_tokens
    else:
        rows = data.batch_size * (2 if cfg.kind in PAIR_KINDS else 1)
        per_step = gpus * cfg.engine.grad_accum_steps * rows * data.max_seq_len
    by_steps = None if cfg.max_steps is None else cfg.max_steps * per_step
    tokens = min(t for t in (cfg.max_tokens, by_steps) if t is not None)
    steps = cfg.max_steps if tokens == by_steps else math.ceil(tokens / per_step)
    return {"steps": steps, "tokens": tokens, "tokens_per_step": per_step, "seq_len": data.max_seq_len}


def stage_flops_per_token(cfg: TrainConfig, config: StepAudio2Config, seq_len: int) -> float:
    """Training FLOPs per decoder token of the stage's kind (module doc)."""
    passes, forward = training_passes(cfg.model.trainable, cfg.lora), forward_passes()
    train = flops_per_token(config, seq_len, passes)
    if cfg.kind == "sft":
        return train
    if cfg.kind == "reward_model":
        return flops_per_token(config, seq_len, passes, lm_head=False)
    if cfg.kind == "dpo":
        return train + flops_per_token(config, seq_len, forward)
    rl = cfg.rl
    fwd, score_fwd = flops_per_token(config, seq_len, forward), flops_per_token(config, seq_len, forward, lm_head=False)
    total = 2 * fwd + rl.epochs * train  # rollout, old log-probabilities, updates
    total += fwd if rl.kl_coef > 0 else 0.0
    total += score_fwd * sum(1 for r in rl.rewards if r.model)
    if cfg.kind == "ppo":
        total += score_fwd + rl.epochs * flops_per_token(config, seq_len, passes, lm_head=False)
    return total


def plan_run(cfg: TrainConfig, gpus: int = 8, gpu: str = "h100", mfu: float = 0.4, seq_len: Optional[int] = None,
             prompt_tokens: int = DEFAULT_PROMPT_TOKENS, audio_share: float = 0.0) -> Dict[str, Any]:
    """The plan of a loaded recipe (its stages, or those cfg.run_stages names): {"gpus", "gpu", "mfu",
    "prompt_tokens", "audio_share", "stages": [one dict per stage], "total"}."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: expected an integer >= 1")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: expected a share in (0, 1]")
    if not 0 <= audio_share <= 1:
        raise ValueError(f"audio_share={audio_share}: expected a share in [0, 1]")
    # stages=[a,b] on the command line plans those stages alone
    chosen = [i for i, s in enumerate(cfg.stages) if not cfg.run_stages or s.name in cfg.run_stages]
    configs = [stage_config(cfg, i) for i in chosen] if cfg.stages else [cfg]
    names = [cfg.stages[i].name for i in chosen] if cfg.stages else [Path(cfg.run_dir).name]
    rows = []
    for name, scfg in zip(names, configs):
        dtype = torch.bfloat16 if scfg.engine.precision == "bf16" else torch.float32
        peak = gpu_peak_flops(gpu, dtype)
        if peak is None:
            raise ValueError(f"--gpu {gpu!r}: no {dtype} peak in train.flops.GPU_PEAKS (known: {', '.join(GPU_KEYS)})")
        config = model_config(scfg)
        tokens = stage_tokens(scfg, gpus, prompt_tokens)
        length = seq_len or tokens["seq_len"]
        per_token = stage_flops_per_token(scfg, config, length)
        flops = tokens["tokens"] * per_token
        audio_s = tokens["tokens"] * audio_share / AUDIO_TOKENS_PER_S
        if audio_s:
            flops += audio_s * encoder_flops_per_audio_second(config, passes=training_passes(scfg.model.trainable,
                                                                                             scfg.lora))
        gpu_hours = flops / (peak * mfu) / 3600
        mem = stage_memory(scfg, config, gpus)
        rows.append({"name": name, "kind": scfg.kind, **tokens, "attention_len": length, "flops_per_token": per_token,
                     "audio_s": audio_s, "flops": flops, "peak_flops": peak, "gpu_hours": gpu_hours,
                     "days": gpu_hours / gpus / 24, "zero_stage": scfg.engine.zero_stage,
                     "gpu_gib": mem["gpu_gib"], "cpu_gib": mem["cpu_gib"], "models": sorted(mem["models"])})
    total = {k: sum(r[k] for r in rows) for k in ("tokens", "flops", "gpu_hours", "days")}
    return {"gpus": gpus, "gpu": gpu, "mfu": mfu, "prompt_tokens": prompt_tokens, "audio_share": audio_share,
            "stages": rows, "total": total}


def _count(value: float) -> str:
    """Token counts as 100.0 B, 8.39 M, ..."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:,.0f}"


def _figure(value: float) -> str:
    """Thousands separated from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown(plan: Dict[str, Any]) -> str:
    gpus = plan["gpus"]
    lines = [f"| stage | kind | steps | tokens | tokens/step | attention len | GFLOP/token | FLOPs | GPU-hours | "
             f"days on {gpus} GPUs | ZeRO | GPU GiB | models |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in plan["stages"]:
        lines.append(f"| {r['name']} | {r['kind']} | {r['steps']:,} | {_count(r['tokens'])} | "
                     f"{_count(r['tokens_per_step'])} | "
                     f"{r['attention_len']:,} | {r['flops_per_token'] / 1e9:.2f} | {r['flops']:.3g} | "
                     f"{_figure(r['gpu_hours'])} | {_figure(r['days'])} | {r['zero_stage']} | {r['gpu_gib']:.1f} | "
                     f"{', '.join(r['models'])} |")
    t = plan["total"]
    lines.append(f"| total | | | {_count(t['tokens'])} | | | | {t['flops']:.3g} | {_figure(t['gpu_hours'])} | "
                 f"{_figure(t['days'])} | | | |")
    peak = plan["stages"][0]["peak_flops"] if plan["stages"] else 0
    audio = (f"input audio: {plan['audio_share']:.0%} of decoder tokens, encoder counted" if plan["audio_share"]
             else "encoder not counted (--audio-share)")
    lines += ["", f"{plan['gpu']}: {peak / 1e12:,.0f} TFLOP/s dense peak at MFU {plan['mfu']:.0%}; RL answers "
              f"{plan['prompt_tokens']} prompt tokens + rl.max_new_tokens; {audio}.",
              "GPU GiB: model states per GPU (bf16 weights and gradients, fp32 master + Adam), activations, "
              "buffers and the CUDA context on top (see python -m train.memory)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe YAML (a curriculum: every stage)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for python -m train")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    parser.add_argument("--gpu", default="h100", help=f"GPU model: {', '.join(GPU_KEYS)} (default h100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to expect (default 0.4)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="attention length per sample (default: data.max_seq_len, RL: prompt + answer)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"RL prompt length in tokens (default {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--audio-share", type=float, default=0.0,
                        help="share of decoder tokens that are input audio (default 0: encoder not counted)")
    parser.add_argument("--json", action="store_true", help="also print the plan as one JSON object, last")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        plan = plan_run(cfg, args.gpus, args.gpu, args.mfu, args.seq_len, args.prompt_tokens, args.audio_share)
    except ValueError as e:  # ConfigError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(plan))
    if args.json:
        print(json.dumps({"recipe": args.recipe, **plan}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

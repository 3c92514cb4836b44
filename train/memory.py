"""`python -m train.memory [--json]`: per-GPU memory of full fine-tuning and LoRA of the mini shape under
ZeRO-2/3, with and without CPU offload, and of the RL runs that hold several models (PPO: policy, reference,
critic, reward model; GRPO and DPO: policy, reference), from parameter counts of models built on the meta
device.

Counts: P = every parameter of the model (for LoRA: the frozen base plus the adapters); T = the trainable
ones: full fine-tuning trains everything but the encoder (as the paper's stages do), LoRA trains
r * (in + out) parameters per targeted decoder linear layer (A: r x in, B: out x r).

Bytes (bf16 mixed precision): weights 2 B each, gradients 2 B per trainable parameter, optimizer
12 B per trainable parameter (fp32 master copy + Adam m and v). With N = GPUs in the job:

    ZeRO-2            GPU = 2P + (2T + 12T) / N                CPU = 0
    ZeRO-2 + offload  GPU = 2P + 2T / N                        CPU = 12T / N
    ZeRO-3            GPU = (2P + 2T + 12T) / N                CPU = 0
    ZeRO-3 + offload  GPU = 2T / N                             CPU = (2P + 12T) / N

RL: the critic and the reward model are score models (model.score: the backbone without lm_head, plus a
hidden -> 1 head); the critic trains like the policy (everything but the encoder, or LoRA adapters, and
its head always), with optimizer state of its own. Frozen models (reference, reward model) hold weights
only, by the same formulas with T = 0: whole on every GPU under ZeRO-2 (FrozenModel keeps the plain module),
2P/N under ZeRO-3, and in CPU memory with their parameters offloaded (rl.reference_offload for the
reference alone; DeepSpeed's offload_param in engine.deepspeed for every model). With LoRA the reference is
the policy with its adapters disabled (no second copy), unless lora.adapter_init tunes an existing adapter
further: then it is a frozen copy holding that adapter.

CPU figures are per GPU; a node needs 8 times that. Excluded: activations (they depend on the batch's
tokens and on gradient checkpointing), DeepSpeed's communication buckets and prefetch buffers, the CUDA
context and allocator fragmentation; and under ZeRO-3 the whole parameters of the module being computed,
gathered for the moment (at most the largest module, printed below the table). Budget a margin on top.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from model.score import StepAudio2ForScore
from train.config import LoraConfig

GPUS_PER_NODE = 8
NODE_COUNTS = (1, 8)
WEIGHT_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12
GIB = 2**30
# RL: the models each algorithm holds, by role (DPO's reference: see rl_markdown).
RL_ALGORITHMS = {"ppo": ("policy", "reference", "critic", "reward_model"), "grpo, dpo": ("policy", "reference")}
# How each method holds the reference (train.rl.reference).
RL_METHODS = {"full": "copy", "lora": "adapters off", "lora + adapter_init": "copy, with the adapter"}
# (ZeRO stage, what lives in CPU memory): nothing, the reference's parameters (rl.reference_offload), or
# every model's parameters and the optimizer states (offload_param and offload_optimizer in engine.deepspeed).
RL_VARIANTS = ((2, "no"), (3, "no"), (3, "reference"), (3, "all"))
RL_OFFLOAD_NAMES = {"no": "no", "reference": "reference params", "all": "optimizer + params"}


def build_meta_model(preset: str = "mini", score: bool = False) -> StepAudio2ForCausalLM:
    """The model with shapes but no storage: counting its parameters costs no memory. score: the score model
    (critic, reward model) instead of the causal LM."""
    with torch.device("meta"):
        return (StepAudio2ForScore if score else StepAudio2ForCausalLM)(preset_config(preset))


def lora_param_count(model: torch.nn.Module, cfg: LoraConfig) -> int:
    """Parameters LoRA adds: r * (in + out) for each decoder linear layer named in cfg.target_modules."""
    pattern = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(cfg.target_modules) + r")$")
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            total += cfg.r * (module.in_features + module.out_features)
    if cfg.adapter:
        for name in ("adapter.linear1", "adapter.linear2"):
            module = model.get_submodule(name)
            total += cfg.r * (module.in_features + module.out_features)
    return total


def count_params(model: torch.nn.Module, lora: Optional[LoraConfig] = None) -> Dict[str, int]:
    """{"total", "encoder", "full_trainable", "lora", "largest_module", "lm_head", "score_head"} parameter
    counts (lora: LoRA parameters added; lm_head is 0 for a score model, score_head 0 for the causal LM)."""
    total = sum(p.numel() for p in model.parameters())

    def under(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    encoder = under("encoder.")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "encoder": encoder, "full_trainable": total - encoder,
            "lora": lora_param_count(model, lora or LoraConfig()), "largest_module": largest,
            "lm_head": under("lm_head."), "score_head": under("score.")}


def model_state_bytes(params: int, trainable: int, stage: int, offload: bool, num_gpus: int) -> Dict[str, float]:
    """{"gpu", "cpu"} bytes per GPU of weights, gradients and optimizer state (formulas in the module doc)."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage {stage}: expected 2 or 3")
    weights, grads, optim = WEIGHT_BYTES * params, GRAD_BYTES * trainable, OPTIMIZER_BYTES * trainable
    if stage == 2:
        gpu = weights + (grads + (0 if offload else optim)) / num_gpus
        cpu = optim / num_gpus if offload else 0.0
    else:
        gpu = (grads + (0 if offload else weights + optim)) / num_gpus
        cpu = (weights + optim) / num_gpus if offload else 0.0
    return {"gpu": float(gpu), "cpu": float(cpu)}


def memory_table(counts: Dict[str, int]) -> List[Dict[str, Any]]:
    """One row per (method, nodes, stage, offload), sizes in GiB."""
    methods = {"full": (counts["total"], counts["full_trainable"]),
               "lora": (counts["total"] + counts["lora"], counts["lora"])}
    rows = []
    for method, (params, trainable) in methods.items():
        for nodes in NODE_COUNTS:
            for stage in (2, 3):
                for offload in (False, True):
                    num_gpus = nodes * GPUS_PER_NODE
                    b = model_state_bytes(params, trainable, stage, offload, num_gpus)
                    rows.append({"method": method, "nodes": nodes, "gpus": num_gpus, "zero_stage": stage,
                                 "offload": offload, "params": params, "trainable": trainable,
                                 "gpu_gib": b["gpu"] / GIB, "cpu_gib_per_node": b["cpu"] * GPUS_PER_NODE / GIB})
    return rows


def markdown(rows: List[Dict[str, Any]], counts: Dict[str, int]) -> str:
    lines = ["| method | nodes x GPUs | ZeRO | CPU offload | trainable params | GPU GiB (per GPU) | CPU GiB (per node) |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        offload = "optimizer + params" if r["offload"] and r["zero_stage"] == 3 else (
            "optimizer" if r["offload"] else "no")
        lines.append(f"| {r['method']} | {r['nodes']} x {GPUS_PER_NODE} | {r['zero_stage']} | {offload} | "
                     f"{r['trainable']:,} | {r['gpu_gib']:.2f} | {r['cpu_gib_per_node']:.1f} |")
    lines += ["", f"Mini shape: {counts['total']:,} parameters ({counts['encoder']:,} in the encoder, frozen in "
              f"full fine-tuning); LoRA r=16 on the decoder linears adds {counts['lora']:,}.",
              "Model states only (bf16 weights and gradients, fp32 master + Adam m, v): activations, buffers "
              "and the CUDA context come on top; under ZeRO-3 add the largest module gathered for its "
              f"computation ({counts['largest_module']:,} parameters, "
              f"{WEIGHT_BYTES * counts['largest_module'] / GIB:.2f} GiB)."]
    return "\n".join(lines)


def rl_models(method: str, lm: Dict[str, int], score: Dict[str, int]) -> Dict[str, Tuple[int, int]]:
    """role -> (params, trainable) of every model a PPO run of `method` holds (GRPO and DPO hold the first
    two); trainable 0 = frozen. No reference entry when it is the policy with its adapters disabled."""
    if method == "full":
        return {"policy": (lm["total"], lm["full_trainable"]), "reference": (lm["total"], 0),
                "critic": (score["total"], score["full_trainable"]), "reward_model": (score["total"], 0)}
    if method not in RL_METHODS:
        raise ValueError(f"RL method {method!r}: expected one of {sorted(RL_METHODS)}")
    lora_lm, lora_score = lm["total"] + lm["lora"], score["total"] + score["lora"]
    # The critic's head trains beside its adapters; the reward model is frozen and gets none
    # (train.loop.build_model(score=True, frozen=True)).
    models = {"policy": (lora_lm, lm["lora"]), "critic": (lora_score, score["lora"] + score["score_head"]),
              "reward_model": (score["total"], 0)}
    if method == "lora + adapter_init":
        models["reference"] = (lora_lm, 0)
    return {role: models[role] for role in RL_ALGORITHMS["ppo"] if role in models}


def rl_table(lm: Dict[str, int], score: Dict[str, int]) -> List[Dict[str, Any]]:
    """One row per (algorithm, method, stage, offload, nodes): each model's share ("models") and their sum,
    sizes in GiB. rollout_gib: what a GRPO/PPO rollout adds while it decodes (ZeRO-3 gathers the whole
    policy on every GPU; under ZeRO-2 it is whole anyway)."""
    rows = []
    for algorithm, roles in RL_ALGORITHMS.items():
        for method, reference in RL_METHODS.items():
            models = {role: v for role, v in rl_models(method, lm, score).items() if role in roles}
            for stage, offload in RL_VARIANTS:
                if offload == "reference" and "reference" not in models:
                    continue
                for nodes in NODE_COUNTS:
                    num_gpus = nodes * GPUS_PER_NODE
                    parts = {}
                    for role, (params, trainable) in models.items():
                        moved = offload == "all" or offload == "reference" and role == "reference"
                        b = model_state_bytes(params, trainable, stage, moved, num_gpus)
                        parts[role] = {"params": params, "trainable": trainable, "gpu_gib": b["gpu"] / GIB,
                                       "cpu_gib_per_node": b["cpu"] * GPUS_PER_NODE / GIB}
                    rows.append({"algorithm": algorithm, "method": method, "reference": reference, "nodes": nodes,
                                 "gpus": num_gpus, "zero_stage": stage, "offload": offload, "models": parts,
                                 "gpu_gib": sum(p["gpu_gib"] for p in parts.values()),
                                 "cpu_gib_per_node": sum(p["cpu_gib_per_node"] for p in parts.values()),
                                 "rollout_gib": WEIGHT_BYTES * models["policy"][0] / GIB if stage == 3 else 0.0})
    return rows


def rl_markdown(rows: List[Dict[str, Any]], lm: Dict[str, int], score: Dict[str, int]) -> str:
    heads = " | ".join(f"GPU GiB {n} x {GPUS_PER_NODE} | CPU GiB per node {n} x {GPUS_PER_NODE}" for n in NODE_COUNTS)
    lines = [f"| algorithm | method | reference | ZeRO | CPU offload | {heads} |",
             "|---|---|---|---|---|" + "---:|---:|" * len(NODE_COUNTS)]
    by_setting: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault((r["algorithm"], r["method"], r["zero_stage"], r["offload"]), []).append(r)
    for (algorithm, method, stage, offload), same in by_setting.items():
        cells = " | ".join(f"{r['gpu_gib']:.2f} | {r['cpu_gib_per_node']:.1f}" for r in same)
        lines.append(f"| {algorithm} | {method} | {same[0]['reference']} | {stage} | {RL_OFFLOAD_NAMES[offload]} | "
                     f"{cells} |")
    lines += ["", "PPO holds policy, reference, critic and reward model; GRPO and DPO policy and reference (DPO only "
              "with rl.precompute_reference=false: by default it computes the reference's log-probabilities in one "
              "pass and frees it before the first step, leaving the policy alone, as in the table above).",
              f"Critic and reward model: score models of {score['total']:,} parameters (the LM's "
              f"{lm['total']:,} less lm_head's {lm['lm_head']:,}, plus the head's {score['score_head']:,}); the "
              f"critic trains {score['full_trainable']:,} in full fine-tuning, {score['lora'] + score['score_head']:,} "
              "with LoRA (adapters and head); a reward model is frozen, without adapters.",
              "A GRPO or PPO rollout under ZeRO-3 gathers the whole policy on every GPU while it decodes: add "
              f"{WEIGHT_BYTES * lm['total'] / GIB:.2f} GiB (LoRA {WEIGHT_BYTES * (lm['total'] + lm['lora']) / GIB:.2f})"
              " for that time, and the KV cache."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini", help="model preset to count (default: mini)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object, last")
    args = parser.parse_args(argv)
    lora = LoraConfig(r=args.lora_r)
    counts = count_params(build_meta_model(args.preset), lora)
    score_counts = count_params(build_meta_model(args.preset, score=True), lora)
    rows, rl_rows = memory_table(counts), rl_table(counts, score_counts)
    print(markdown(rows, counts))
    print()
    print(rl_markdown(rl_rows, counts, score_counts))
    if args.json:
        print(json.dumps({"preset": args.preset, "lora_r": args.lora_r, "counts": counts,
                          "score_counts": score_counts, "rows": rows, "rl_rows": rl_rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m train.memory [--json]`: per-GPU memory of full fine-tuning and LoRA of the mini shape under
ZeRO-2/3, with and without CPU offload, from parameter counts of the model built on the meta device.

Counts: P = every parameter of the model (for LoRA: the frozen base plus the adapters); T = the trainable
ones: full fine-tuning trains everything but the encoder (as the paper's stages do), LoRA trains
r * (in + out) parameters per targeted decoder linear layer (A: r x in, B: out x r).

Bytes (bf16 mixed precision): weights 2 B each, gradients 2 B per trainable parameter, optimizer
12 B per trainable parameter (fp32 master copy + Adam m and v). With N = GPUs in the job:

    ZeRO-2            GPU = 2P + (2T + 12T) / N                CPU = 0
    ZeRO-2 + offload  GPU = 2P + 2T / N                        CPU = 12T / N
    ZeRO-3            GPU = (2P + 2T + 12T) / N                CPU = 0
    ZeRO-3 + offload  GPU = 2T / N                             CPU = (2P + 12T) / N

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
from typing import Any, Dict, List, Optional

import torch

from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from train.config import LoraConfig

GPUS_PER_NODE = 8
NODE_COUNTS = (1, 8)
WEIGHT_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12
GIB = 2**30


def build_meta_model(preset: str = "mini") -> StepAudio2ForCausalLM:
    """The model with shapes but no storage: counting its parameters costs no memory."""
    with torch.device("meta"):
        return StepAudio2ForCausalLM(preset_config(preset))


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
    """{"total", "encoder", "full_trainable", "lora"} parameter counts (lora: LoRA parameters added)."""
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "encoder": encoder, "full_trainable": total - encoder,
            "lora": lora_param_count(model, lora or LoraConfig()), "largest_module": largest}


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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini", help="model preset to count (default: mini)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object, last")
    args = parser.parse_args(argv)
    counts = count_params(build_meta_model(args.preset), LoraConfig(r=args.lora_r))
    rows = memory_table(counts)
    print(markdown(rows, counts))
    if args.json:
        print(json.dumps({"preset": args.preset, "lora_r": args.lora_r, "counts": counts, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

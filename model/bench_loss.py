"""`python -m model.bench_loss [--json]`: peak memory and time of the model's fused loss against full logits.

Each path (forward + backward through a random lm_head) runs in a fresh subprocess. Peak memory is that
process's ru_maxrss (its resident high-water mark) after the path, minus ru_maxrss after the inputs were
built (directly in their dtype, so no larger temporary raises the mark first) and touched: the extra memory
the loss needed at its worst moment, as the OS saw it (so allocator caching and freed-but-mapped pages
count, as they would in training). The floor is the output layer's weight gradient, which any path must
hold; the JSON keys chunked_* are the model's path (model.fused_loss through chunked_loss).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from model.lalm import IGNORE_INDEX, StepAudio2ForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_path(path: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, threads: int) -> dict:
    """Time and peak extra memory of one loss path, in this process (call it in a fresh one)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    holder = nn.Module()
    holder.lm_head = nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    with torch.no_grad():
        holder.lm_head.weight.normal_(std=0.02, generator=gen)
    hidden_BTH = torch.randn(1, tokens + 1, hidden, generator=gen).to(dtype).requires_grad_(True)
    labels_BT = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    labels_BT[0, 0] = IGNORE_INDEX  # position t predicts t + 1: exactly `tokens` labelled rows
    before = _max_rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    if path == "chunked":  # the model's loss (it needs only self.lm_head)
        loss, _ = StepAudio2ForCausalLM.chunked_loss(holder, hidden_BTH, labels_BT)
    else:
        logits = holder.lm_head(hidden_BTH[:, :-1]).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), labels_BT[:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX)
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"peak_bytes": _max_rss_bytes() - before, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "loss": loss.item(), "grad_sum": float(holder.lm_head.weight.grad.float().abs().sum())}


def _in_subprocess(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "model.bench_loss", "--_path", path, "--tokens", str(args.tokens), "--vocab",
           str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {path} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.bench_loss", description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--tokens", type=int, default=4096, help="labelled tokens")
    parser.add_argument("--vocab", type=int, default=158720, help="output vocabulary (the mini's)")
    parser.add_argument("--hidden", type=int, default=3584, help="hidden size (the mini's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="lm_head and hidden dtype")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--_path", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._path:
        print(json.dumps(run_path(args._path, args.tokens, args.vocab, args.hidden, DTYPES[args.dtype], args.threads)))
        return
    results = {path: _in_subprocess(path, args) for path in ("chunked", "naive")}
    fp32_logits = args.tokens * args.vocab * 4
    floor = args.vocab * args.hidden * DTYPES[args.dtype].itemsize
    print(f"loss over {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, {args.dtype} weights, "
          f"{args.threads} threads, forward + backward (full fp32 logits would be {fp32_logits / 2**30:.2f} GiB; "
          f"the floor, lm_head's weight gradient, is {floor / 2**30:.2f} GiB)")
    naive_s = results["naive"]["seconds"]
    for path, r in results.items():
        label = "fused" if path == "chunked" else path
        print(f"  {label:8s} peak +{r['peak_bytes'] / 2**30:6.2f} GiB ({r['peak_bytes'] / floor:5.2f}x the floor)  "
              f"{r['seconds']:7.2f} s ({r['seconds'] / naive_s:5.2f}x naive; CPU time "
              f"{r['cpu_seconds'] / results['naive']['cpu_seconds']:5.2f}x)  loss {r['loss']:.4f}")
    if args.json:
        print(json.dumps({"chunked_peak_bytes": results["chunked"]["peak_bytes"],
                          "naive_peak_bytes": results["naive"]["peak_bytes"],
                          "chunked_s": results["chunked"]["seconds"], "naive_s": naive_s, "floor_bytes": floor}))


if __name__ == "__main__":
    main()

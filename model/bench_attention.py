"""`python -m model.bench_attention [--json]`: packed rows under the dense block-diagonal mask ("sdpa") against
the per-sample kernel ("varlen_sdpa"), on this machine's CPU threads.

Rows come from data.loading.batching's packer (max_seq_len 512, 4 rows a batch) fed samples of 30-150 tokens, and the
model is the demo preset (hidden 256, 4 heads, 2 key/value heads, 4 layers). Two figures per kernel: one
attention call per packed row (the decoder layer's q/k/v shapes), and a whole training forward + backward
of the decoder per batch (real tokens/s). Timings interleave the kernels and report medians (and the
fastest run, what an idle machine would show).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from data.loading.batching import Batcher
from model.attention import VARLEN_SDPA, varlen_sdpa_forward
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM, packed_attention

KERNELS = ("sdpa", VARLEN_SDPA)
_PAD = 0


def packed_batches(count: int, seed: int, max_seq_len: int = 512, rows: int = 4, vocab: int = 1000,
                   shortest: int = 30, longest: int = 150) -> List[Dict[str, Any]]:
    """`count` full packed batches of text samples with lengths uniform in [shortest, longest]."""
    rng = random.Random(seed)
    batcher = Batcher("packed", _PAD, max_tokens=rows * max_seq_len, max_seq_len=max_seq_len, buffer_size=64)
    batches: List[Dict[str, Any]] = []
    uid = 0
    while len(batches) < count:
        ids = [rng.randrange(1, vocab - 1) for _ in range(rng.randint(shortest, longest))]
        batches += batcher.add({"uid": uid, "key": f"s{uid}", "input_ids": ids, "labels": ids, "mels": [],
                                "num_audio_s": 0.0})
        uid += 1
    return batches[:count]


class _Layer(torch.nn.Module):
    """What the attention functions read off a decoder attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _attention_call(kernel: str, batch: Dict[str, Any], heads: int, kv_heads: int, head_dim: int,
                    gen: torch.Generator) -> Callable[[bool], None]:
    """One decoder layer's attention over `batch`, as the model runs it with `kernel` (mask building included)."""
    B, T = batch["input_ids"].shape
    q = torch.randn(B, T, heads, head_dim, generator=gen).transpose(1, 2)
    k = torch.randn(B, T, kv_heads, head_dim, generator=gen).transpose(1, 2)
    v = torch.randn(B, T, kv_heads, head_dim, generator=gen).transpose(1, 2)
    layer = _Layer(heads // kv_heads)

    def run(backward: bool) -> torch.Tensor:
        qkv = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        mask, kwargs = packed_attention(batch["segment_ids"], kernel, torch.float32, batch["cu_seq_lens"],
                                        batch["max_length"])
        if kernel == VARLEN_SDPA:
            out = varlen_sdpa_forward(layer, *qkv, None, **kwargs)[0]
        else:
            out = sdpa_attention_forward(layer, *qkv, mask)[0]
        if backward:
            out.sum().backward()
        return out.detach()
    return run


def _model_step(model: StepAudio2ForCausalLM, batch: Dict[str, Any]) -> Callable[[bool], None]:
    inputs = {key: batch[key] for key in ("input_ids", "labels", "segment_ids", "cu_seq_lens", "max_length",
                                          "num_loss_tokens")}

    def run(backward: bool) -> None:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        if backward:
            loss.backward()
    return run


def _time_ms(fn: Callable[[], Any], out: List[float]) -> None:
    start = time.perf_counter()
    fn()
    out.append(1000.0 * (time.perf_counter() - start))


def measure(num_batches: int = 6, repeats: int = 5, seed: int = 0, preset: str = "demo") -> Dict[str, Any]:
    batches = packed_batches(num_batches, seed)
    text = preset_config(preset).text_config
    heads, kv_heads = int(text["num_attention_heads"]), int(text["num_key_value_heads"])
    head_dim = int(text["hidden_size"]) // heads
    torch.manual_seed(seed)
    models = {kernel: StepAudio2ForCausalLM(preset_config(preset, vocab_size=1000), attention=kernel).train()
              for kernel in KERNELS}
    models[VARLEN_SDPA].load_state_dict(models["sdpa"].state_dict())
    times = {kernel: {"attention_fwd": [], "attention_fwd_bwd": [], "decoder_fwd_bwd": []} for kernel in KERNELS}
    max_diff = 0.0
    for batch in batches:
        calls = {kernel: _attention_call(kernel, batch, heads, kv_heads, head_dim,
                                         torch.Generator().manual_seed(seed)) for kernel in KERNELS}
        with torch.no_grad():
            max_diff = max(max_diff, float((calls["sdpa"](False) - calls[VARLEN_SDPA](False)).abs().max()))
        steps = {kernel: _model_step(models[kernel], batch) for kernel in KERNELS}
        for kernel in KERNELS:  # warm up each kernel on this batch's shapes
            steps[kernel](True)
        for _ in range(repeats):
            for kernel in KERNELS:
                with torch.no_grad():
                    _time_ms(lambda: calls[kernel](False), times[kernel]["attention_fwd"])
                _time_ms(lambda: calls[kernel](True), times[kernel]["attention_fwd_bwd"])
                _time_ms(lambda: steps[kernel](True), times[kernel]["decoder_fwd_bwd"])
    rows = sum(b["input_ids"].shape[0] for b in batches) / len(batches)
    real_tokens = statistics.mean(b["num_tokens"] for b in batches)
    report: Dict[str, Any] = {"threads": torch.get_num_threads(), "batches": num_batches, "repeats": repeats,
                              "rows_per_batch": rows, "row_length": statistics.mean(b["input_ids"].shape[1]
                                                                                    for b in batches),
                              "samples_per_row": statistics.mean(b["num_samples"] / b["input_ids"].shape[0]
                                                                 for b in batches),
                              "real_tokens_per_batch": real_tokens, "max_abs_diff": max_diff}
    for kernel in KERNELS:
        med = {name: statistics.median(values) for name, values in times[kernel].items()}
        best = {name: min(values) for name, values in times[kernel].items()}
        report[kernel] = {"attention_fwd_ms_per_row": med["attention_fwd"] / rows,
                          "attention_fwd_bwd_ms_per_row": med["attention_fwd_bwd"] / rows,
                          "decoder_fwd_bwd_ms_per_batch": med["decoder_fwd_bwd"],
                          "decoder_tokens_per_s": real_tokens / med["decoder_fwd_bwd"] * 1000.0,
                          "fastest_attention_fwd_bwd_ms_per_row": best["attention_fwd_bwd"] / rows,
                          "fastest_decoder_fwd_bwd_ms_per_batch": best["decoder_fwd_bwd"]}
    for name in ("attention_fwd_ms_per_row", "attention_fwd_bwd_ms_per_row"):
        report[f"speedup_{name.replace('_ms_per_row', '')}"] = report["sdpa"][name] / report[VARLEN_SDPA][name]
    report["speedup_decoder"] = (report[VARLEN_SDPA]["decoder_tokens_per_s"] / report["sdpa"]["decoder_tokens_per_s"])
    return report


def print_report(r: Dict[str, Any]) -> None:
    print(f"model.bench_attention: {r['batches']} packed batches x {r['repeats']} repeats, {r['threads']} thread(s); "
          f"{r['rows_per_batch']:.0f} rows of {r['row_length']:.0f} positions, {r['samples_per_row']:.1f} samples "
          f"and {r['real_tokens_per_batch'] / r['rows_per_batch']:.0f} real tokens a row")
    for kernel in KERNELS:
        k = r[kernel]
        print(f"  {kernel:12s} attention per row: forward {k['attention_fwd_ms_per_row']:7.2f} ms, forward + backward "
              f"{k['attention_fwd_bwd_ms_per_row']:7.2f} ms (fastest {k['fastest_attention_fwd_bwd_ms_per_row']:.2f}); "
              f"decoder training step {k['decoder_fwd_bwd_ms_per_batch']:7.1f} ms a batch (fastest "
              f"{k['fastest_decoder_fwd_bwd_ms_per_batch']:.1f}; {k['decoder_tokens_per_s']:.0f} real tokens/s)")
    print(f"  varlen_sdpa speedup: attention forward {r['speedup_attention_fwd']:.2f}x, forward + backward "
          f"{r['speedup_attention_fwd_bwd']:.2f}x, decoder step {r['speedup_decoder']:.2f}x; outputs differ by "
          f"at most {r['max_abs_diff']:.1e}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.bench_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last line")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batches", type=int, default=6, help="packed batches measured")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each batch and kernel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: expected an integer >= 1")
    if args.threads < 0:
        parser.error(f"--threads={args.threads}: expected an integer >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure(args.batches, args.repeats, args.seed)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m train.rl.bench [--json]`: rollout decoding speed, side by side with the slow ways RL could decode.

(a) One process: batched greedy decoding with the KV cache (model.generate.generate) against recomputing the
whole prefix every step (a forward over prompt + answer so far, the logits of its last position only).
Both must produce the same tokens; the run fails if they do not.
(b) ZeRO-3 on two gloo ranks (torchrun, CPU): sample_answers, which gathers the policy's parameters once per
rollout (train.engine.inference_model), against generate() driven through the DeepSpeed engine itself, whose
ZeRO-3 hooks fetch and release every module's parameters on every forward, i.e. on every token.

The model is the preset's random initialisation (seed 0) in fp32; prompts are random text tokens, all of one
length (no padding), without audio. There are no stop tokens: every row decodes exactly its new tokens, so
both ranks make the same number of forwards (the per-forward path's collectives must match).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from data.text_tokenizer import SpecialIds
from model.config import StepAudio2Config, preset_config
from model.generate import generate
from model.lalm import StepAudio2ForCausalLM

GOAL_KV_SPEEDUP = 5.0  # at 256 new tokens
GOAL_GATHERED_SPEEDUP = 3.0
ZERO3_RANKS = 2
WARMUP_TOKENS = 2


def build_model(preset: str, seed: int = 0) -> StepAudio2ForCausalLM:
    torch.manual_seed(seed)
    return StepAudio2ForCausalLM(preset_config(preset)).eval()


def random_prompts(config: StepAudio2Config, num_prompts: int, prompt_len: int, seed: int) -> torch.Tensor:
    """[num_prompts, prompt_len] token ids below <audio_patch> (which would need audio) and the vocabulary."""
    high = min(config.vocab_size, config.audio_patch_token_id)
    return torch.randint(0, high, (num_prompts, prompt_len), generator=torch.Generator().manual_seed(seed))


def never_stopping_ids(config: StepAudio2Config) -> SpecialIds:
    """Special ids for sample_answers whose stop tokens (<|EOT|>, <|endoftext|>) lie outside the vocabulary:
    no answer stops, every row decodes exactly max_new_tokens. (No padding either: the prompts are of one length.)"""
    never = config.vocab_size
    return SpecialIds(end_of_text=never, bot=never, eot=never, audio_start=never, audio_end=never,
                      audio_patch=config.audio_patch_token_id, tts_pad=never, tts_start=never, tts_end=never,
                      first_audio_code=never, num_audio_codes=0, audio_pad=never)


@torch.no_grad()
def decode_without_cache(model: StepAudio2ForCausalLM, input_ids: torch.Tensor,
                         max_new_tokens: int) -> List[List[int]]:
    """Greedy decoding that runs the decoder over the whole prompt + answer so far at every step (no KV cache):
    the baseline the cache is measured against. Prompts [B, T] of one length; <audio_patch> is never picked,
    as in generate."""
    ids_BT = input_ids
    patch_id = model.config.audio_patch_token_id
    for _ in range(max_new_tokens):
        hidden_BTH, _ = model.decode(ids_BT)
        logits_BV = model.lm_head(hidden_BTH[:, -1])
        logits_BV[:, patch_id] = float("-inf")
        ids_BT = torch.cat([ids_BT, logits_BV.argmax(dim=-1, keepdim=True)], dim=1)
    return ids_BT[:, input_ids.shape[1]:].cpu().tolist()


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def first_difference(a: List[List[int]], b: List[List[int]]) -> Optional[str]:
    """Where two decodes part (row and step), or None when they are equal."""
    for row, (x, y) in enumerate(zip(a, b)):
        step = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None)
        if step is not None or len(x) != len(y):
            return f"row {row}, step {step if step is not None else min(len(x), len(y))}"
    return None if len(a) == len(b) else f"{len(a)} rows against {len(b)}"


# ---------------------------------------------------------------------------------------- (a) KV cache

def measure_kv(args: argparse.Namespace, model: StepAudio2ForCausalLM, device: torch.device) -> Dict[str, Any]:
    prompts_BT = random_prompts(model.config, args.prompts, args.prompt_len, args.seed).to(device)
    mask_BT = torch.ones_like(prompts_BT)
    generate(model, prompts_BT, mask_BT, max_new_tokens=WARMUP_TOKENS)
    decode_without_cache(model, prompts_BT, WARMUP_TOKENS)
    cached, kv_s = _timed(generate, model, prompts_BT, mask_BT, max_new_tokens=args.new_tokens)
    recomputed, nokv_s = _timed(decode_without_cache, model, prompts_BT, args.new_tokens)
    tokens = args.prompts * args.new_tokens
    assert all(len(row) == args.new_tokens for row in cached + recomputed), "a row stopped early"
    kv, nokv = tokens / kv_s, tokens / nokv_s
    return {"kv_tokens_per_s": kv, "nokv_tokens_per_s": nokv, "kv_s": kv_s, "nokv_s": nokv_s,
            "kv_speedup": kv / nokv, "same_tokens": cached == recomputed,
            "first_difference": first_difference(cached, recomputed)}


# ------------------------------------------------------------------------------------- (b) ZeRO-3 ranks

class _ThroughEngine:
    """The DeepSpeed engine as generate()'s model: every forward goes through its ZeRO-3 hooks. `config` is the
    module's (generate reads <audio_patch>'s id there, so both paths exclude it alike)."""

    def __init__(self, ds):
        self.ds, self.config = ds, ds.module.config

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)


class _Tok:
    def decode(self, ids: List[int]) -> str:
        return " ".join(map(str, ids))


def zero3_worker(args: argparse.Namespace) -> None:
    """One rank of (b) (under torchrun): both decoding paths on the same ZeRO-3 engine; rank 0 writes the
    per-rank figures to args.out."""
    from model.checkpoint import load_stepfun
    from train.config import TrainConfig
    from train.engine import Engine, gathered_for_write, init_distributed, model_init_context, shutdown_distributed
    from train.rl.rollout import sample_answers

    rank, world = init_distributed()
    torch.set_num_threads(1)
    cfg = TrainConfig()
    cfg.engine.zero_stage = 3
    cfg.data.batch_size = args.prompts
    engine = Engine(load_stepfun(args.model_dir, build_context=model_init_context(cfg), gather=gathered_for_write),
                    cfg)
    config = engine.module.config
    ids = never_stopping_ids(config)
    # Each rank answers prompts of its own, as in a rollout.
    prompts_BT = random_prompts(config, args.prompts, args.prompt_len, args.seed + 1 + rank)
    prompts = [{"key": f"r{rank}p{i}", "meta": {}, "input_ids": row, "mels": [], "num_audio_s": 0.0}
               for i, row in enumerate(prompts_BT.tolist())]
    through = _ThroughEngine(engine.ds)

    def gathered_once(new_tokens: int) -> List[List[int]]:
        rollout = sample_answers(engine, prompts, ids, _Tok(), num_generations=1, max_new_tokens=new_tokens,
                                 temperature=0.0, top_p=1.0, generator=None)
        return [s.answer_ids for s in rollout.samples]

    def per_forward(new_tokens: int) -> List[List[int]]:
        inputs_BT = prompts_BT.to(engine.device)
        return generate(through, inputs_BT, torch.ones_like(inputs_BT), max_new_tokens=new_tokens)

    engine.ds.eval()
    gathered_once(WARMUP_TOKENS)
    per_forward(WARMUP_TOKENS)
    once, once_s = _timed(gathered_once, args.zero3_new_tokens)
    each, each_s = _timed(per_forward, args.zero3_new_tokens)
    assert all(len(row) == args.zero3_new_tokens for row in once + each), "a row stopped early"
    mine = {"rank": rank, "tokens": sum(len(a) for a in once), "gathered_s": once_s, "pertoken_s": each_s,
            "same_tokens": once == each, "first_difference": first_difference(once, each)}
    ranks: List[Dict[str, Any]] = [{} for _ in range(world)]
    torch.distributed.all_gather_object(ranks, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": ranks}))
    engine.close()
    shutdown_distributed()


def measure_zero3(args: argparse.Namespace, model: StepAudio2ForCausalLM) -> Dict[str, Any]:
    """Runs (b) under torchrun on ZERO3_RANKS CPU ranks, with `model`'s weights; tokens/s summed over ranks."""
    from model.checkpoint import save_stepfun

    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        save_stepfun(model.state_dict(), model.config, Path(tmp) / "model")
        out = Path(tmp) / "zero3.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ZERO3_RANKS),
               "-m", "train.rl.bench", "--zero3-worker", "--model-dir", str(Path(tmp) / "model"), "--out", str(out),
               "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len),
               "--zero3-new-tokens", str(args.zero3_new_tokens), "--seed", str(args.seed)]
        env = {**os.environ, "STEPAUDIO_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: the ZeRO-3 ranks failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        ranks = json.loads(out.read_text())["ranks"]
    gathered = sum(r["tokens"] / r["gathered_s"] for r in ranks)
    pertoken = sum(r["tokens"] / r["pertoken_s"] for r in ranks)
    return {"zero3_gathered_tokens_per_s": gathered, "zero3_pertoken_tokens_per_s": pertoken,
            "zero3_speedup": gathered / pertoken, "zero3_same_tokens": all(r["same_tokens"] for r in ranks),
            "zero3_ranks": ranks}


# ---------------------------------------------------------------------------------------------- report

def _device() -> torch.device:
    if torch.cuda.is_available() and os.environ.get("STEPAUDIO_DEVICE", "").lower() != "cpu":
        return torch.device("cuda")
    return torch.device("cpu")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = _device()
    model = build_model(args.preset)
    report: Dict[str, Any] = {"preset": args.preset, "prompts": args.prompts, "prompt_len": args.prompt_len,
                              "new_tokens": args.new_tokens, "zero3_new_tokens": args.zero3_new_tokens,
                              "threads": args.threads, "device": str(device), "zero3_ranks_count": ZERO3_RANKS}
    report.update(measure_kv(args, model.to(device), device))
    report["goals"] = {"kv_speedup": report["kv_speedup"] >= GOAL_KV_SPEEDUP}
    if not args.skip_zero3:
        report.update(measure_zero3(args, model.cpu()))
        report["goals"]["zero3_speedup"] = report["zero3_speedup"] >= GOAL_GATHERED_SPEEDUP
    return report


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_report(r: Dict[str, Any]) -> None:
    rows = r["prompts"]
    print(f"train.rl.bench: preset {r['preset']} (random weights, fp32), {rows} prompts of {r['prompt_len']} "
          f"tokens, greedy, no stop tokens")
    print("| decoding | new tokens | tokens/s | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    kv_goal = f">= {GOAL_KV_SPEEDUP:.0f}x at 256 new tokens: {_verdict(r['goals']['kv_speedup'])}"
    print(f"| KV cache, one process ({r['device']}, {r['threads']} thread(s)) | {r['new_tokens']} | "
          f"{r['kv_tokens_per_s']:.1f} | {r['kv_speedup']:.1f}x | {kv_goal} |")
    print(f"| prefix recomputed every step | {r['new_tokens']} | {r['nokv_tokens_per_s']:.1f} | 1x | |")
    if "zero3_speedup" in r:
        z3_goal = f">= {GOAL_GATHERED_SPEEDUP:.0f}x: {_verdict(r['goals']['zero3_speedup'])}"
        print(f"| ZeRO-3, {ZERO3_RANKS} gloo ranks: gathered once per rollout | {r['zero3_new_tokens']} | "
              f"{r['zero3_gathered_tokens_per_s']:.1f} | {r['zero3_speedup']:.1f}x | {z3_goal} |")
        print(f"| ZeRO-3, {ZERO3_RANKS} gloo ranks: gathered per forward (every token) | {r['zero3_new_tokens']} | "
              f"{r['zero3_pertoken_tokens_per_s']:.1f} | 1x | |")
    print(f"KV cache and recomputation decode the same tokens: {r['same_tokens']}"
          + ("" if r["same_tokens"] else f" (they part at {r['first_difference']})"))
    if "zero3_same_tokens" in r:
        print(f"ZeRO-3 gathered once and per forward decode the same tokens on every rank: {r['zero3_same_tokens']}")
        print("ZeRO-3 tokens/s are summed over the ranks (each decodes its own prompts, one CPU thread each).")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.rl.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last line")
    parser.add_argument("--preset", default="demo", help="model preset (random weights; default demo)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens each row decodes in (a)")
    parser.add_argument("--zero3-new-tokens", type=int, default=None,
                        help="tokens each row decodes in (b) (default: --new-tokens)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts decoded together (per rank in (b))")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of (a) (each rank of (b) has one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--skip-zero3", action="store_true", help="measure (a) only")
    parser.add_argument("--zero3-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zero3_new_tokens is None:
        args.zero3_new_tokens = args.new_tokens
    for name in ("new_tokens", "zero3_new_tokens", "prompts", "prompt_len", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    try:
        preset_config(args.preset)
    except ValueError as error:
        parser.error(str(error))
    if args.zero3_worker:
        zero3_worker(args)
        return 0
    report = run(args)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    if not report["same_tokens"]:
        print(f"error: the KV-cache and recomputed decodes differ ({report['first_difference']})", file=sys.stderr)
        return 1
    if not report.get("zero3_same_tokens", True):
        print("error: ZeRO-3's two decoding paths produced different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from train.engine import exit_process

    exit_process(main())  # not sys.exit: see train.engine.exit_process

"""`python -m train.gpu_check [--json]`: what a first run on a GPU machine must show, in about ten minutes.

Parts, in order; the first failure stops the check (`--keep-going` runs the rest and reports every one):
  environment  CUDA, driver, bf16, flash-attention's compiled kernel, DeepSpeed's accelerator and NCCL
  kernels      the demo preset in bf16: a batch of each batching mode (fixed, tokens, packed) and a text-only
               batch through forward and backward under sdpa, eager and flash-attention; packed logits
               against each sample alone; fp32 with model.attention=auto does not pick flash
  syncs        one training step through the engine under torch.cuda.set_sync_debug_mode("warn"): the
               host-device syncs, by where they come from (this project's own code must cause none)
  train        `train.loop.run` in this process, three stages back to back (ASR with WER, TTS with
               code accuracy, translation with BLEU evaluation), GPU memory back to its baseline after each
  rl           GRPO and PPO (`train.loop.run`, ZeRO-2) from a saved demo-size model on the ASR prompts with a
               text reward: KV-cache rollouts on the device in the training dtype, the reference, the
               critic; the first step's ratio 1 and KL 0, finite losses, an export, GPU memory back to its
               baseline after each
  ranks        with 2+ GPUs: ZeRO-2 and ZeRO-3 on two ranks through `python -m launch` with packed batches,
               gradient checkpointing, evaluation at the start, checkpoint, SIGUSR1 to one rank (exit 75),
               resume, export
  perf         a mini-width model cut to a few layers, the 158,720-token vocabulary, packed 16k rows under
               ZeRO-3: tokens/s, MFU, peak memory, ms per generated token

Data: `python -m train.gpu_check prepare DIR` speaks a small espeak-ng corpus into DIR (any machine with
espeak-ng); `--data DIR` points the check at it (default: prepared under --out when espeak-ng is here).
Without a GPU the check says so and exits 0; `--device cpu` runs the parts that mean something on a CPU
(the test suite does).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("environment", "kernels", "syncs", "train", "rl", "ranks", "perf")
# Dense bf16 peak of the GPUs MFU is reported against (vendor datasheets, SXM parts), TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0}
TASKS = ("asr", "tts", "s2tt")


class CheckFailed(RuntimeError):
    pass


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


# ------------------------------------------------------------------------------------------------ data

def prepare_data(out: Path, num_train: int = 32, num_heldout: int = 8) -> Path:
    """A small espeak-ng corpus (ASR, TTS with k-means codes, English->German translation), its tokenizer and
    shards under `out` (reused when out/DONE exists)."""
    if (out / "DONE").is_file():
        return out
    if shutil.which("espeak-ng") is None:
        raise CheckFailed("preparing the check's data needs espeak-ng (apt-get install espeak-ng); or prepare it "
                          "elsewhere with `python -m train.gpu_check prepare DIR` and pass --data DIR")
    py = sys.executable

    def cli(*args: str) -> None:
        proc = subprocess.run([py, "-m", *args], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckFailed(f"python -m {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")

    corpus = out / "corpus"
    cli("data.tools.demo", str(corpus), "--num-train", str(num_train), "--num-heldout", str(num_heldout),
        "--tasks", ",".join(TASKS))
    cli("data.text_tokenizer", "build", "--manifest", str(corpus / "texts.jsonl"), "--out", str(out / "tokenizer"),
        "--vocab-size", "1024", "--num-audio-codes", "256")
    for task in TASKS:
        for split in ("train", "heldout"):
            cli("data.corpus.prepare", "manifest", str(corpus / task / f"{split}.jsonl"), str(out / task / split),
                "--shard-size", "100", "--workers", "1", "--no-progress")
    cli("data.codes", "fit", str(out / "tts" / "train"), "--num-codes", "256", "--out", str(out / "kmeans.pt"),
        "--no-progress")
    cli("data.codes", str(out / "tts" / "train"), str(out / "tts" / "heldout"), "--tokenizer",
        f"kmeans:{out / 'kmeans.pt'}", "--no-progress")
    shutil.rmtree(corpus / "wav", ignore_errors=True)  # the shards hold the audio; keep the folder small
    (out / "DONE").write_text("ok\n")
    return out


def data_config(data: Path, batching: str, tasks=TASKS, **extra):
    from data.loading.loader import DataConfig, DatasetConfig

    datasets = [DatasetConfig(name=t, shards=[str(data / t / "train")], task=t) for t in tasks]
    return DataConfig(datasets=datasets, tokenizer=str(data / "tokenizer"), batching=batching, batch_size=4,
                      max_tokens=2048, max_seq_len=512, num_workers=0, shuffle_buffer=16, batch_buffer=32,
                      **extra)


def first_batch(cfg) -> Dict[str, Any]:
    from data.loading.loader import build_loader

    return next(iter(build_loader(cfg, rank=0, world_size=1, seed=0)))


# ---------------------------------------------------------------------------------------------- report

class Report:
    def __init__(self, keep_going: bool, as_json: bool):
        self.keep_going, self.as_json = keep_going, as_json
        self.parts: Dict[str, Dict[str, Any]] = {}

    def say(self, text: str) -> None:
        print(text, file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def run(self, name: str, fn: Callable[[], Dict[str, Any]]) -> None:
        self.say(f"[gpu_check] {name} ...")
        t0 = time.perf_counter()
        try:
            figures = fn()
        except Exception as e:  # a failed part is reported with its cause; --keep-going goes on
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
            if not isinstance(e, CheckFailed):
                entry["traceback"] = traceback.format_exc()[-4000:]
            self.parts[name] = entry
            self.say(f"[gpu_check] {name} FAILED: {entry['error']}")
            if "traceback" in entry:
                self.say(entry["traceback"])
            if not self.keep_going:
                raise SystemExit(self.finish())
            return
        self.parts[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **figures}
        shown = {k: v for k, v in figures.items() if not isinstance(v, (dict, list)) or len(str(v)) < 400}
        self.say(f"[gpu_check] {name} ok ({self.parts[name]['seconds']} s): {json.dumps(shown, default=str)}")

    def skip(self, name: str, why: str) -> None:
        self.parts[name] = {"ok": True, "skipped": why}
        self.say(f"[gpu_check] {name} skipped: {why}")

    def finish(self) -> int:
        failed = [n for n, p in self.parts.items() if not p["ok"]]
        if self.as_json:
            print(json.dumps({"ok": not failed, "failed": failed, "parts": self.parts}, default=str))
        self.say(f"[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}")
        return 1 if failed else 0


# ----------------------------------------------------------------------------------------- environment

def check_environment(device: torch.device, require_flash: bool) -> Dict[str, Any]:
    import deepspeed

    from launch.checks import nvidia_driver_version
    from model.lalm import flash_attention_status

    accelerator = deepspeed.get_accelerator()
    figures: Dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                               "deepspeed": deepspeed.__version__, "accelerator": accelerator.device_name(),
                               "backend": accelerator.communication_backend_name()}
    flash_ok, flash_why = flash_attention_status()
    figures["flash_attention"] = flash_why
    if device.type != "cuda":
        return figures
    figures.update(driver=nvidia_driver_version(), gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    require(figures["bf16"], f"{figures['gpu']} has no bf16 support")
    require(figures["accelerator"] == "cuda" and figures["backend"] == "nccl",
            f"DeepSpeed picked accelerator {figures['accelerator']!r} / backend {figures['backend']!r}, "
            "expected cuda / nccl")
    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    require(bool(torch.isfinite(x @ x).all()), "a bf16 matmul gave non-finite values")
    require(flash_ok or not require_flash, f"flash-attention is not usable: {flash_why} (pass --allow-no-flash to "
                                           "check the rest without it)")
    return figures


# --------------------------------------------------------------------------------------------- kernels

def _tiny_model(tok, ids, preset: str, attention: str, device, dtype, state=None):
    from model.config import padded_vocab_size, preset_config
    from model.lalm import StepAudio2ForCausalLM

    config = preset_config(preset, vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(config, attention=attention)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def _chunk_patches(model, mel_lengths: torch.Tensor) -> List[int]:
    from model.encoder import encoder_lengths

    return model.adapter.output_lengths(encoder_lengths(mel_lengths)[1]).tolist()


def packed_vs_alone(model, batch: Dict[str, Any], device, dtype, patch_id: int) -> float:
    """Largest |logit difference| between each sample of a packed batch's rows and the same sample alone,
    relative to the largest |logit| of the sample alone."""
    from train.engine import model_inputs

    inputs = model_inputs(batch, device, dtype)
    inputs.pop("labels"), inputs.pop("num_loss_tokens", None)
    with torch.no_grad():
        packed_RTV = model(**inputs).logits.float()
    patches = _chunk_patches(model, batch["mel_lengths"]) if batch["mels"] is not None else []
    chunk, worst = 0, 0.0
    for r, (row_ids, row_segments) in enumerate(zip(batch["input_ids"], batch["segment_ids"])):
        for segment in row_segments.unique().tolist():
            if segment == 0:
                continue
            positions = (row_segments == segment).nonzero().view(-1)
            sample_ids = row_ids[positions]
            need, mels = int((sample_ids == patch_id).sum()), []
            while need > 0:
                mels.append(batch["mels"][chunk, :, :int(batch["mel_lengths"][chunk])])
                need -= patches[chunk]
                chunk += 1
            require(need == 0, f"packed row {r} segment {segment}: audio chunks do not add up to its patch rows")
            alone = {"input_ids": sample_ids[None]}
            if mels:
                from data.loading.batching import pad_mels

                alone["mels"], alone["mel_lengths"] = pad_mels(mels)
            with torch.no_grad():
                alone_TV = model(**model_inputs(alone, device, dtype)).logits[0].float()
            diff = (alone_TV - packed_RTV[r, positions.to(device)]).abs().max() / alone_TV.abs().max().clamp(min=1)
            worst = max(worst, float(diff))
    return worst


def check_kernels(data: Path, device: torch.device, dtype: torch.dtype, preset: str = "demo") -> Dict[str, Any]:
    from data.text_tokenizer import load_tokenizer, special_ids
    from model.lalm import flash_attention_status, resolve_attention
    from train.engine import model_inputs

    tok = load_tokenizer(str(data / "tokenizer"))
    ids = special_ids(tok)
    batches = {mode: first_batch(data_config(data, mode)) for mode in ("fixed", "tokens", "packed")}
    batches["text_only"] = first_batch(data_config(data, "fixed", tasks=("tts",)))
    require(batches["text_only"]["mels"] is None, "the TTS batch holds input audio: not a text-only batch")
    kernels = ["sdpa", "varlen_sdpa", "eager"] + (["flash_attention_2"] if flash_attention_status()[0] and
                                   dtype in (torch.bfloat16, torch.float16) else [])
    figures: Dict[str, Any] = {"kernels": kernels, "dtype": str(dtype), "losses": {}, "packed_vs_alone": {}}
    base = _tiny_model(tok, ids, preset, "sdpa", "cpu", torch.float32).state_dict()
    for kernel in kernels:
        model = _tiny_model(tok, ids, preset, kernel, device, dtype, base).train()
        for mode, batch in batches.items():
            model.zero_grad(set_to_none=True)
            out = model(**model_inputs(batch, device, dtype))
            out.loss.backward()
            loss = float(out.loss.detach())
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            require(torch.isfinite(out.loss).item() and all(bool(torch.isfinite(g).all()) for g in grads),
                    f"{kernel} {mode}: non-finite loss or gradient (loss {loss})")
            # Every parameter takes part (ZeRO-3 relies on it): the text-only batch through the dummy audio term.
            require(len(grads) == sum(1 for p in model.parameters() if p.requires_grad),
                    f"{kernel} {mode}: {sum(1 for p in model.parameters() if p.requires_grad) - len(grads)} "
                    "trainable parameters got no gradient")
            figures["losses"][f"{kernel}/{mode}"] = round(loss, 4)
        model.eval()
        figures["packed_vs_alone"][kernel] = packed_vs_alone(model, batches["packed"], device, dtype, ids.audio_patch)
        del model
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    for key, value in figures["packed_vs_alone"].items():
        require(value <= tolerance, f"{key}: packed logits differ from each sample alone by {value:.3g} of the "
                                    f"logit scale (tolerance {tolerance})")
    for mode in batches:
        losses = [figures["losses"][f"{k}/{mode}"] for k in kernels]
        spread = (max(losses) - min(losses)) / max(abs(losses[0]), 1e-6)
        require(spread <= 10 * tolerance, f"{mode}: the kernels' losses disagree: {dict(zip(kernels, losses))}")
    require(resolve_attention("auto", torch.float32) == "varlen_sdpa", "model.attention=auto picked flash in fp32")
    figures["auto_fp32"] = resolve_attention("auto", torch.float32)
    figures["auto_bf16"] = resolve_attention("auto", torch.bfloat16)
    figures["padding"] = {mode: round(1 - b["num_tokens"] / b["input_ids"].numel(), 3) for mode, b in batches.items()}
    return figures


# ----------------------------------------------------------------------------------------------- syncs

@contextlib.contextmanager
def recorded_syncs(sites: List[str]):
    """Appends, for every host-device sync CUDA reports, where it came from: the innermost frame of this
    project (data/, model/, train/), else of the library that asked for it."""
    def where() -> str:
        # The innermost frame outside torch asked for the sync: this project's own code, or a library's.
        for frame in reversed(traceback.extract_stack()[:-2]):
            name = frame.filename
            if "/torch/" in name or name.endswith(("warnings.py", "contextlib.py")):
                continue
            path = Path(name).resolve()
            if path.name == "gpu_check.py":  # switching the debug mode itself
                continue
            if REPO in path.parents and path.parts[len(REPO.parts)] in ("data", "model", "train"):
                return f"ours {path.relative_to(REPO)}:{frame.lineno} {frame.name}"
            for lib in ("deepspeed", "transformers", "peft"):
                if f"/{lib}/" in name:
                    return f"{lib} {name.split(f'/{lib}/')[1]}:{frame.lineno} {frame.name}"
            return f"other {name}:{frame.lineno} {frame.name}"
        return "torch"

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites.append(where())

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _engine_config(data: Path, run_dir: Path, **overrides):
    from train.recipe import load_config

    items = {"run_dir": str(run_dir), "model.preset": "demo", "engine.precision": "bf16",
             "data.tokenizer": str(data / "tokenizer"), "data.num_workers": 0, "metrics.progress": False,
             "data.datasets": "[" + ",".join(f"{{name: {t}, shards: [{data / t / 'train'}], task: {t}}}"
                                             for t in TASKS) + "]",
             "data.batching": "packed", "data.max_seq_len": 512, "data.max_tokens": 2048, **overrides}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def check_syncs(data: Path, out: Path, device: torch.device, stages=(0, 1, 2, 3)) -> Dict[str, Any]:
    """Host-device syncs of one bf16 training step (packed batch) under each ZeRO stage, by where they come
    from. This project's own code must cause none; DeepSpeed's are reported (they differ by stage)."""
    from data.loading.loader import build_loader
    from data.text_tokenizer import load_tokenizer
    from train.engine import Engine, init_distributed
    from train.loop import build_model

    init_distributed()
    figures: Dict[str, Any] = {}
    ours_anywhere: Dict[str, int] = {}
    for stage in stages:
        cfg = _engine_config(data, out / "syncs", **{"engine.zero_stage": stage})
        tok = load_tokenizer(cfg.data.tokenizer)
        engine = Engine(build_model(cfg, tok), cfg)
        batches = iter(build_loader(cfg.data, rank=0, world_size=1, seed=0))
        for _ in range(2):  # warm-up: allocator, kernels' first launch, DeepSpeed's lazy state and trace
            engine.backward_and_step(engine.forward(next(batches)).loss)
        batch = next(batches)
        sites: List[str] = []
        with recorded_syncs(sites):
            loss = engine.forward(batch).loss
            forward_syncs = len(sites)
            engine.backward_and_step(loss)
        torch.cuda.synchronize()
        del loss  # its backward hooks hold the engine
        engine.close()
        counts: Dict[str, int] = {}
        for site in sites:
            counts[site] = counts.get(site, 0) + 1
        ours = {k: v for k, v in counts.items() if k.startswith("ours")}
        ours_anywhere.update(ours)
        figures[f"zero{stage}"] = {"syncs_per_step": len(sites), "in_forward": forward_syncs,
                                   "ours": sum(ours.values()),
                                   "top_sites": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:4])}
    require(not ours_anywhere, f"this project's code syncs with the host in a training step: {ours_anywhere}; "
                               f"all: {figures}")
    return figures


# ----------------------------------------------------------------------------------------------- train

def memory_after_run(name: str, baseline: int) -> Dict[str, float]:
    """After an in-process run on the GPU: the memory it left above `baseline` (at most 64 MiB, or the next run
    starts with less) and its peak; the peak counter is reset for the next run."""
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() - baseline
    figures = {"memory_left_mib": round(left / 2**20, 1),
               "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    torch.cuda.reset_peak_memory_stats()
    require(left <= 64 * 2**20, f"{name}: {left / 2**20:.0f} MiB of GPU memory still held after the run "
                                "(the next run would start with less)")
    return figures


def check_train(data: Path, out: Path, device: torch.device, steps: int = 20) -> Dict[str, Any]:
    """Three runs of train.loop.run back to back in this process, as a curriculum runs its stages."""
    from train.loop import run

    stages = [("asr", "wer", {"data.datasets": "[]", "data.shards": f"[{data / 'asr' / 'train'}]",
                              "data.task": "asr", "data.batching": "fixed", "data.batch_size": 8}),
              ("tts", "code_accuracy", {"data.datasets": "[]", "data.shards": f"[{data / 'tts' / 'train'}]",
                                        "data.task": "tts", "data.batching": "tokens"}),
              ("s2tt", "bleu", {"data.datasets": "[]", "data.shards": f"[{data / 's2tt' / 'train'}]",
                                "data.task": "s2tt"})]
    figures: Dict[str, Any] = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        figures["memory_baseline_mib"] = round(baseline / 2**20, 1)
    for name, metric, overrides in stages:
        run_dir = out / "train" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = _engine_config(data, run_dir, max_steps=steps, **overrides, **{
            "eval.shards": f"[{data / name / 'heldout'}]", "eval.metric": metric, "eval.max_samples": 8,
            "eval.max_new_tokens": 32, "checkpoint.every_steps": 0, "metrics.log_every": 10,
            "optim.lr": "1e-3", "optim.warmup_steps": 5,
            **({} if cuda else {"engine.precision": "fp32"})})
        t0 = time.perf_counter()
        result = run(cfg)
        figures[name] = {"metric": metric, "start": result.get("eval_start"), "end": result.get("eval_end"),
                         "seconds": round(time.perf_counter() - t0, 1)}
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in logged if "loss" in x]
        require(len(losses) >= 2 and losses[-1] < losses[0], f"{name}: the loss did not fall: {losses}")
        figures[name]["loss"] = [round(losses[0], 3), round(losses[-1], 3)]
        require((run_dir / "export" / "config.json").is_file(), f"{name}: no export in {run_dir / 'export'}")
        if cuda:
            figures[name].update(memory_after_run(name, baseline))
    return figures


# ---------------------------------------------------------------------------------------------------- rl

def check_rl(data: Path, out: Path, device: torch.device, steps: int = 4, preset: str = "demo") -> Dict[str, Any]:
    """GRPO, then PPO with its critic, in this process from one saved model: RL has its own device path
    (batched KV-cache sampling with a device generator, the reference's and the critic's engines)."""
    from data.text_tokenizer import load_tokenizer, special_ids
    from model.checkpoint import save_stepfun
    from model.config import padded_vocab_size, preset_config
    from model.lalm import StepAudio2ForCausalLM
    from train.loop import run

    tok = load_tokenizer(str(data / "tokenizer"))
    ids = special_ids(tok)
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    base = out / "rl" / "base"
    shutil.rmtree(base, ignore_errors=True)
    save_stepfun(StepAudio2ForCausalLM(config).state_dict(), config, base, tokenizer=tok)
    # The answer's text against the transcript (1 - tanh(3 x WER)): a random model's answers differ a little,
    # which is all GRPO's group-normalised advantages need to give the policy a gradient.
    reward = '[{name: words, function: "train.rl.rule_rewards:text_match", args: {field: text}}]'
    kinds = {"grpo": {"rl.num_generations": 4, "data.batch_size": 2},
             "ppo": {"rl.num_generations": 1, "data.batch_size": 4, "rl.critic_warmup_steps": 1}}
    cuda = device.type == "cuda"
    figures: Dict[str, Any] = {}
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    for kind, extra in kinds.items():
        run_dir = out / "rl" / kind
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = _engine_config(data, run_dir, kind=kind, max_steps=steps, **extra, **{
            "model.init_from": str(base), "data.datasets": "[]", "data.shards": f"[{data / 'asr' / 'train'}]",
            "data.task": "asr", "data.batching": "fixed", "rl.max_new_tokens": 24, "rl.rewards": reward,
            "rl.kl_coef": 0.05,
            "engine.zero_stage": 2, "eval.shards": "[]", "checkpoint.every_steps": 0, "metrics.log_every": 1,
            "optim.lr": "1e-4", "optim.warmup_steps": 0, **({} if cuda else {"engine.precision": "fp32"})})
        t0 = time.perf_counter()
        run(cfg)
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [x for x in logged if "policy_loss" in x or "value_loss" in x]
        require(len(rows) == steps, f"{kind}: {len(rows)} logged steps of {steps}")
        first = next(x for x in rows if "ratio" in x)  # PPO's critic warm-up steps train no policy
        # The rollout's log-probabilities and the first update's come from the same weights: the ratio is
        # 1 and the KL to the reference 0, up to the dtype's reduction order.
        tolerance = 1e-2 if cuda else 1e-5
        require(abs(first["ratio"] - 1.0) <= tolerance and abs(first["kl"]) <= tolerance,
                f"{kind}: first update's ratio {first['ratio']} and KL {first['kl']}: expected 1 and 0")
        values = [v for x in rows for k, v in x.items() if k in ("policy_loss", "value_loss", "kl", "reward")]
        require(all(v == v and abs(v) != float("inf") for v in values), f"{kind}: a loss or reward is not finite")
        require((run_dir / "export" / "config.json").is_file(), f"{kind}: no export in {run_dir / 'export'}")
        figures[kind] = {"seconds": round(time.perf_counter() - t0, 1), "first_ratio": first["ratio"],
                         "first_kl": first["kl"], "reward": [round(rows[0]["reward"], 4), round(rows[-1]["reward"], 4)],
                         "generation_tokens_per_s": round(rows[-1]["generation_tokens_per_s"], 1)}
        if cuda:
            figures[kind].update(memory_after_run(kind, baseline))
    return figures


# ----------------------------------------------------------------------------------------------- ranks

# What a run in this process (train, rl) leaves in os.environ for its one-rank group; a launcher's ranks must
# not inherit it (the port is still this process's).
_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _launch(args: List[str], env: Dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def check_ranks(data: Path, out: Path, ranks: int, steps: int = 8, timeout_s: float = 300) -> Dict[str, Any]:
    """ZeRO-2 and ZeRO-3 on `ranks` processes: SIGUSR1 to one rank mid-run (checkpoint, exit 75), resume to
    the end, export; the resumed run's final loss must equal an uninterrupted run's."""
    recipe = out / "ranks.yaml"
    recipe.write_text(
        "model: {preset: demo, gradient_checkpointing: [encoder, decoder]}\n"
        f"data:\n  tokenizer: {data / 'tokenizer'}\n  batching: packed\n  max_seq_len: 512\n  max_tokens: 2048\n"
        "  num_workers: 1\n  datasets:\n" + "".join(f"    - {{name: {t}, shards: [{data / t / 'train'}], task: {t}}}\n"
                                                  for t in TASKS)
        + f"eval: {{shards: [{data / 'asr' / 'heldout'}], metric: wer, max_samples: 8, max_new_tokens: 24, "
          "at_end: false}\nmetrics: {log_every: 1, progress: false}\ncheckpoint: {every_steps: 0}\n")
    figures: Dict[str, Any] = {}
    for stage in (2, 3):
        precision = "bf16" if torch.cuda.is_available() else "fp32"
        common = [f"engine.zero_stage={stage}", f"engine.precision={precision}", f"max_steps={steps}"]
        env = {**{k: v for k, v in os.environ.items() if k not in _GROUP_ENV}, "OMP_NUM_THREADS": "1",
               "WANDB_MODE": "offline"}
        whole, cut = out / f"zero{stage}_whole", out / f"zero{stage}_cut"
        for d in (whole, cut):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        proc = _launch(["--gpus-per-node", str(ranks), str(recipe), f"run_dir={whole}", *common], env, timeout_s)
        require(proc.returncode == 0, f"ZeRO-{stage} run exited {proc.returncode}: {proc.stderr[-3000:]}")
        at = steps // 2
        proc = _launch(["--gpus-per-node", str(ranks), str(recipe), f"run_dir={cut}", *common],
                       {**env, "STEPAUDIO_FAULT": f"usr1:{at}:{ranks - 1}"}, timeout_s)
        require(proc.returncode == 75, f"ZeRO-{stage}: SIGUSR1 to rank {ranks - 1} at step {at}: exit "
                                       f"{proc.returncode}, expected 75: {proc.stderr[-3000:]}")
        proc = _launch(["--gpus-per-node", str(ranks), str(recipe), f"run_dir={cut}", *common], env, timeout_s)
        require(proc.returncode == 0, f"ZeRO-{stage} resume exited {proc.returncode}: {proc.stderr[-3000:]}")

        def final_loss(run_dir: Path) -> float:
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            return [x["loss"] for x in lines if "loss" in x and x.get("step") == steps][-1]

        whole_loss, cut_loss = final_loss(whole), final_loss(cut)
        require((cut / "export" / "config.json").is_file(), f"ZeRO-{stage}: the resumed run wrote no export")
        require(abs(whole_loss - cut_loss) <= 1e-3 * max(abs(whole_loss), 1.0),
                f"ZeRO-{stage}: the interrupted-and-resumed run ends at loss {cut_loss}, the whole run at {whole_loss}")
        figures[f"zero{stage}"] = {"final_loss": whole_loss, "resumed_final_loss": cut_loss,
                                   "seconds": round(time.perf_counter() - t0, 1)}
    return figures


# ------------------------------------------------------------------------------------------------ perf

def probe_config(layers: int, preset: str = "mini", vocab_size: int = 158720):
    """A preset's widths (the mini's: hidden 3584, 28 heads / 4 key-value heads, MLP 18944; encoder 1280 wide)
    with `layers` decoder and encoder layers and the release's vocabulary."""
    from model.config import preset_config

    config = preset_config(preset, vocab_size=vocab_size, audio_patch_token_id=vocab_size - 1)
    config.text_config["num_hidden_layers"] = layers
    config.audio_encoder_config.n_audio_layer = layers
    return config


def model_flops_per_step(model, segment_lengths: List[int], mel_frames: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward; recomputation not counted) of one packed batch:
    2 per matmul weight per token, attention scores and values within each segment (causal: half), encoder
    and adapter weights per 25 Hz frame. Counts ZeRO-3 partitioned parameters by their full shape."""
    def numel(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    def matrix(p) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    named = list(model.named_parameters())
    decoder = sum(numel(p) for n, p in named if matrix(p) and n.startswith(("model.layers", "lm_head")))
    encoder = sum(numel(p) for n, p in named if matrix(p) and n.startswith(("encoder", "adapter"))
                  and "positional" not in n)
    cfg = model.config.text_config
    attention = sum(2 * 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * n * n / 2 for n in segment_lengths)
    return 3 * (2 * decoder * sum(segment_lengths) + attention + 2 * encoder * (mel_frames // 2))


def check_perf(data: Path, out: Path, device: torch.device, layers: int = 4, preset: str = "mini",
               vocab_size: int = 158720, row_tokens: int = 16384, steps: int = 4) -> Dict[str, Any]:
    """Training throughput of one packed row of row_tokens under ZeRO-3 (bf16 on a GPU), and KV-cache decoding
    speed with the parameters gathered once (train.engine.inference_model), on a preset cut to `layers`."""
    from data.loading.batching import packed_cu_seq_lens
    from model.generate import generate
    from model.lalm import StepAudio2ForCausalLM, resolve_attention
    from train.engine import Engine, inference_model, init_distributed, model_init_context

    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    cfg = _engine_config(data, out / "perf", **{"engine.zero_stage": 3, "engine.precision": precision,
                                                "model.gradient_checkpointing": "[encoder,decoder]"})
    init_distributed()
    config = probe_config(layers, preset, vocab_size)
    attention = resolve_attention("auto", torch.bfloat16 if cuda else torch.float32)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with model_init_context(cfg):
        model = StepAudio2ForCausalLM(config, gradient_checkpointing=True, attention=attention)
    engine = Engine(model, cfg)
    g = torch.Generator().manual_seed(0)
    # One row of row_tokens: segments of 512-3072 tokens, every fourth opening with 30 s of audio (375 rows).
    lengths: List[int] = []
    while sum(lengths) < row_tokens:
        lengths.append(min(int(torch.randint(512, 3072, (1,), generator=g)), row_tokens - sum(lengths)))
    patch = config.audio_patch_token_id
    ids = torch.randint(0, min(150000, patch), (1, row_tokens), generator=g)
    mels, start = [], 0
    for i, n in enumerate(lengths):
        if i % 4 == 0 and n > 400:
            ids[0, start + 2:start + 2 + 375] = patch
            mels.append(torch.randn(128, 3000, generator=g))
        start += n
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    labels = ids.masked_fill(ids == patch, -100)
    cu_seq_lens, max_length = packed_cu_seq_lens(segments)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "segment_ids": segments,
             "mels": torch.stack(mels) if mels else None, "mel_lengths": torch.full((len(mels),), 3000),
             "num_loss_tokens": int((labels[:, 1:] != -100).sum()), "cu_seq_lens": cu_seq_lens,
             "max_length": max_length}
    flops = model_flops_per_step(model, lengths, 3000 * len(mels))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        engine.backward_and_step(engine.forward(batch).loss)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = engine.forward(batch).loss
        engine.backward_and_step(loss)
    loss = loss.detach()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    figures: Dict[str, Any] = {"preset": preset, "attention": attention, "layers": layers,
                               "params_b": round(params / 1e9, 3), "row_tokens": row_tokens, "segments": len(lengths),
                               "audio_chunks": len(mels), "loss": round(float(loss), 3), "step_s": round(step_s, 3),
                               "tokens_per_s": round(row_tokens / step_s), "tflops": round(flops / step_s / 1e12, 1)}
    require(bool(torch.isfinite(loss)), f"perf probe: non-finite loss {float(loss)}")
    if cuda:
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        figures["mfu"] = None if peak is None else round(flops / step_s / 1e12 / peak, 3)

    def decode_ms_per_token(model) -> float:
        """Milliseconds per generated token after the prompt (a 33-token run minus a 1-token one), warmed up."""
        generate(model, prompt, max_new_tokens=33)  # warm-up: kernels, and the allocator's blocks for the cache
        timings = {}
        for new_tokens in (1, 33):
            sync()
            t0 = time.perf_counter()
            generate(model, prompt, max_new_tokens=new_tokens)
            sync()
            timings[new_tokens] = time.perf_counter() - t0
        figures.setdefault("prefill_ms_batch4", round(1000 * timings[1], 1))
        return round(1000 * (timings[33] - timings[1]) / 32, 2)

    prompt = torch.randint(0, min(150000, patch), (4, 512), generator=g).to(device)
    with inference_model(engine) as module:  # the plain view of the gathered parameters
        figures["ms_per_generated_token_batch4"] = decode_ms_per_token(module.eval())
    with inference_model(engine, view=False) as module:  # the path a peft-wrapped model takes: hooks off
        module.eval()  # no dropout, and transformers keeps the KV cache only outside training mode
        figures["hooks_off_ms_per_generated_token_batch4"] = decode_ms_per_token(module)
        module.train()
    engine.close()
    if cuda:  # the same decoding on a plain model (no DeepSpeed anywhere): what the gathered path should match
        with torch.device(device):
            plain = StepAudio2ForCausalLM(config, attention=attention).to(torch.bfloat16).eval()
        figures["plain_ms_per_generated_token_batch4"] = decode_ms_per_token(plain)
        del plain
    return figures


# ------------------------------------------------------------------------------------------------ main

def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        parser = argparse.ArgumentParser(prog="python -m train.gpu_check prepare")
        parser.add_argument("out", help="folder for the check's corpus, tokenizer and shards")
        args = parser.parse_args(argv[1:])
        print(prepare_data(Path(args.out)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m train.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every part's figures")
    parser.add_argument("--data", default=None, help="folder from `python -m train.gpu_check prepare`")
    parser.add_argument("--out", default="runs/gpu_check", help="scratch folder for runs")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all; "
                                                      "on CPU all but syncs and perf)")
    parser.add_argument("--keep-going", action="store_true", help="run every part even after a failure")
    parser.add_argument("--allow-no-flash", action="store_true",
                        help="do not fail when flash-attention is not installed (its checks are then skipped)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the parts that mean something without a GPU (tests)")
    parser.add_argument("--perf-layers", type=int, default=4, help="decoder and encoder layers of the perf probe")
    parser.add_argument("--perf-preset", default="mini", help="widths of the perf probe (tests: demo)")
    parser.add_argument("--perf-vocab", type=int, default=158720)
    parser.add_argument("--perf-tokens", type=int, default=16384, help="tokens in the perf probe's packed row")
    args = parser.parse_args(argv)
    explicit = args.parts is not None
    parts = [p for p in (args.parts or ",".join(PARTS)).split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}: expected a subset of {list(PARTS)}")
    report = Report(args.keep_going, args.json)
    if args.device == "cuda" and not torch.cuda.is_available():
        report.say("[gpu_check] no CUDA GPU on this machine: nothing to check here (run it on a GPU machine; "
                   "`--device cpu` runs the CPU-capable parts)")
        if args.json:
            print(json.dumps({"ok": True, "skipped": "no CUDA GPU"}))
        return 0
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else None
    if data is None and any(p != "environment" for p in parts):
        data = prepare_data(out / "data")
    os.environ.setdefault("WANDB_MODE", "offline")
    steps = {"environment": lambda: check_environment(device, not args.allow_no_flash),
             "kernels": lambda: check_kernels(data, device, dtype),
             "syncs": lambda: check_syncs(data, out, device),
             "train": lambda: check_train(data, out, device),
             "rl": lambda: check_rl(data, out, device),
             "ranks": lambda: check_ranks(data, out, 2),
             "perf": lambda: check_perf(data, out, device, layers=args.perf_layers, preset=args.perf_preset,
                                        vocab_size=args.perf_vocab, row_tokens=args.perf_tokens)}
    for part in parts:
        if part == "syncs" and device.type != "cuda":
            report.skip(part, "sync debug mode needs CUDA")
        elif part == "perf" and device.type != "cuda" and not explicit:
            report.skip(part, "a throughput probe means nothing on CPU")
        elif part == "ranks" and device.type == "cuda" and torch.cuda.device_count() < 2:
            report.skip(part, f"{torch.cuda.device_count()} GPU on this machine; two ranks need two")
        else:
            report.run(part, steps[part])
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())

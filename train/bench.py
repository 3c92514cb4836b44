"""`python -m train.bench [--json]`: real decoder tokens/s of our training loop against transformers' Trainer and a
bare PyTorch loop, side by side on the same model, samples, optimizer and real tokens per step, on CPU (gloo).

Contenders, each a fresh process (torchrun, `--world` ranks) with the same threads per rank:
- ours: `python -m train recipes/demo/asr.yaml` with overrides: the demo mixture stage (ASR + TTS + S2TT, packed
  rows) through DeepSpeed; tokens/s from its metrics.jsonl;
- hf, hf_grouped: transformers' Trainer with its DeepSpeed integration on the same model class and initial weights,
  over the same samples rendered one per row, padded to the longest in the batch (random order), or with
  train_sampling_strategy="group_by_length" (the former `group_by_length=True`); its per-device batch size is
  chosen so that its real tokens per step match ours on average;
- bare: a plain loop (torch.optim.AdamW, backward, clip, step; DDP on two ranks) over our packed batches, built
  before the clock starts.
Each contender runs --steps optimizer steps; the first --warmup are not timed. Rounds are interleaved (the order
rotates) and each figure is the median over the rounds.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo/asr.yaml"
TASKS = ("asr", "tts", "s2tt")
CONTENDERS = ("ours", "hf", "hf_grouped", "bare")
LABELS = {"ours": "ours: python -m train, packed, DeepSpeed", "hf": "HF Trainer + DeepSpeed, padded",
          "hf_grouped": "HF Trainer + DeepSpeed, grouped by length", "bare": "bare PyTorch loop, our packed batches"}
CONTENDER_KEYS = {"ours": "ours", "hf": "hf_trainer", "hf_grouped": "hf_grouped", "bare": "bare"}  # JSON prefixes
GOAL_VS_HF = 1.5
GOAL_VS_HF_GROUPED = 1.1
GOAL_VS_BARE = 0.95  # ours within 5% of bare
_DATA_VERSION = 1
_MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "mels", "mel_lengths")


# ---------------------------------------------------------------------------------------------- data

def _layout(folder: Path) -> Dict[str, Any]:
    return {"shards": {t: folder / "shards" / t / "train" for t in TASKS}, "tokenizer": folder / "tokenizer",
            "kmeans": folder / "kmeans.pt"}


def _complete(paths: Dict[str, Any]) -> bool:
    from data.codes.encode import read_tokenizer_record

    if not all((p / "index.json").is_file() for p in paths["shards"].values()):
        return False
    codes = read_tokenizer_record(str(paths["shards"]["tts"]))  # the TTS answers' audio codes, all written
    return (paths["tokenizer"] / "tokenizer.json").is_file() and codes is not None and codes.get("complete", True)


def ensure_data(folder: str, num_samples: int, seed: int = 0) -> Dict[str, Any]:
    """The demo mixture's training shards (asr, tts with k-means codes, s2tt) and tokenizers under `folder`, laid
    out as `make demo-data` lays out runs/demo (which is used as it is). A folder this function built for another
    --num-samples or seed is rebuilt; espeak's wavs are reused."""
    from data.tools.demo import make_demo
    from data.corpus.prepare import prepare_manifest
    from data.codes.encode import fit_tokenizer, tokenize_shards
    from data.text_tokenizer import build_text_tokenizer, extend_tokenizer

    root = Path(folder).resolve()
    paths = _layout(root)
    marker = root / "bench_data.json"
    want = {"version": _DATA_VERSION, "num_samples": num_samples, "seed": seed}
    if _complete(paths) and (not marker.is_file() or json.loads(marker.read_text()) == want):
        return paths
    if root.is_dir() and any(root.iterdir()) and not marker.is_file() and not (root / "corpus").is_dir():
        # Not ours to overwrite (e.g. a half-made runs/demo): say so instead of writing another corpus into it.
        raise ValueError(f"--data {folder}: holds neither the demo mixture's shards (shards/{{asr,tts,s2tt}}/train "
                         "with k-means codes, tokenizer/, kmeans.pt, as `make demo-data` writes them) nor data this "
                         "bench built; name an empty or new folder to build it there")
    marker.unlink(missing_ok=True)
    corpus = root / "corpus"
    make_demo(str(corpus), num_train=num_samples, num_heldout=1, seed=seed, tasks=TASKS,
              num_task_train={"tts": num_samples, "s2tt": num_samples})
    # The demo's sizes (make demo-data): a 1024-token text vocabulary and 256 k-means audio codes.
    texts = [json.loads(line)["text"] for line in (corpus / "texts.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = extend_tokenizer(build_text_tokenizer(texts, 1024), 256)
    tok.save_pretrained(str(paths["tokenizer"]))
    for task, out in paths["shards"].items():
        shutil.rmtree(out, ignore_errors=True)
        prepare_manifest(str(corpus / task / "train.jsonl"), str(out), shard_size=100, workers=1, progress=False)
    fit_tokenizer([str(paths["shards"]["tts"])], 256, str(paths["kmeans"]), seed=seed, progress=False)
    tokenize_shards([str(paths["shards"]["tts"])], f"kmeans:{paths['kmeans']}", workers=1, progress=False)
    marker.write_text(json.dumps(want))
    return paths


def train_overrides(args: argparse.Namespace, paths: Dict[str, Any], run_dir: str) -> List[str]:
    """recipes/demo/asr.yaml turned into the demo curriculum's mixture stage: the same packed batches, the encoder
    frozen; a constant lr (the schedule costs nothing and the contenders then share it exactly)."""
    datasets = ", ".join(f"{{name: {t}, shards: [{paths['shards'][t]}], task: {t}, weight: 1.0}}" for t in TASKS)
    return [f"run_dir={run_dir}", f"seed={args.seed}", f"max_steps={args.steps}", f"model.preset={args.preset}",
            f"model.attention={args.attention}", "model.trainable=[adapter,embeddings,decoder,lm_head]",
            "data.shards=[]", f"data.datasets=[{datasets}]",
            f"data.tokenizer={paths['tokenizer']}", f"data.audio_tokenizer=kmeans:{paths['kmeans']}",
            "data.batching=packed", f"data.max_seq_len={args.max_seq_len}", f"data.max_tokens={args.max_tokens}",
            "data.num_workers=1", f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.schedule=constant",
            f"engine.zero_stage={args.zero_stage}", "engine.precision=fp32", "eval.shards=[]",
            "checkpoint.every_steps=0", "checkpoint.export=false", f"metrics.log_every={args.warmup}",
            "metrics.progress=false", "metrics.sample_keys=true"]


def _one_sample(batch: Dict[str, Any]) -> Dict[str, Any]:
    """The rendered sample of a one-row batch (data.batching=fixed, batch_size=1), as collate takes it."""
    lengths = batch["mel_lengths"].tolist()
    mels = [batch["mels"][i, :, :n].clone() for i, n in enumerate(lengths)]
    return {"key": batch["keys"][0], "uid": tuple(batch["uids"][0]), "input_ids": batch["input_ids"][0].tolist(),
            "labels": batch["labels"][0].tolist(), "mels": mels, "num_audio_s": float(batch["num_audio_s"])}


def prepare_inputs(cfg, world: int, steps: int, work: Path) -> Dict[str, Any]:
    """Each rank's packed batches for `steps` steps, exactly as ours will draw them (written for bare), and every
    sample in them rendered alone (written for HF): the same samples, found by uid in the same sample stream."""
    import dataclasses

    from data.loading.loader import build_loader

    packed_by_rank, samples = [], []
    for rank in range(world):
        # One worker or none: the same (rank, worker) slot, so the same stream as ours with num_workers=1.
        loader = build_loader(dataclasses.replace(cfg.data, num_workers=0), rank, world, cfg.seed)
        packed = [next(loader) for _ in range(steps)]
        torch.save(packed, work / f"packed_rank{rank}.pt")
        packed_by_rank.append(packed)
        wanted = {tuple(u) for batch in packed for u in batch["uids"]}
        single = build_loader(dataclasses.replace(cfg.data, num_workers=0, batching="fixed", batch_size=1),
                              rank, world, cfg.seed)
        found: Dict[tuple, Dict[str, Any]] = {}
        for _ in range(len(wanted) + 20 * cfg.data.batch_buffer):
            sample = _one_sample(next(single))
            if sample["uid"] in wanted:
                found[sample["uid"]] = sample
                if len(found) == len(wanted):
                    break
        if len(found) != len(wanted):
            raise RuntimeError(f"rank {rank}: {len(wanted) - len(found)} samples of the packed batches were not in "
                               "the same stream read one by one")
        samples += [found[tuple(u)] for batch in packed for u in batch["uids"]]
    torch.save(samples, work / "samples.pt")
    batches = [b for packed in packed_by_rank for b in packed]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    computed = sum(b["input_ids"].numel() for b in batches)
    return {"keys": [[b["keys"] for b in packed] for packed in packed_by_rank], "num_samples": len(samples),
            "real_tokens_per_step": real / len(batches), "padding": 1.0 - real / computed,
            "budget_fill": real / (len(batches) * cfg.data.max_tokens),
            "mean_sample_tokens": sum(len(s["input_ids"]) for s in samples) / len(samples)}


# ---------------------------------------------------------------------------------------------- contenders

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(threads: int) -> Dict[str, str]:
    return {**os.environ, "STEPAUDIO_DEVICE": "cpu", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


class CPUMeter:
    """CPU seconds (user + system, all threads) of a process and all its descendants, sampled with the wall clock
    (time.time()) every `every_s` in a thread. On a machine that other jobs share, how many cores a contender got
    varies from minute to minute; tokens per CPU-second do not depend on it."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import threading

        import psutil  # installed with accelerate and DeepSpeed

        self.root, self.every_s = psutil.Process(pid), every_s
        self.samples: List[tuple] = []
        self._last: Dict[int, float] = {}  # a process that ended keeps the CPU it used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    self._last[proc.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.samples.append((time.time(), sum(self._last.values())))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_s(self, t0: float, t1: float) -> float:
        """CPU seconds used between wall-clock times t0 and t1 (interpolated between samples)."""
        import numpy as np

        times, cpu = zip(*self.samples)
        return float(np.interp(t1, times, cpu) - np.interp(t0, times, cpu))


def _launch(world: int, module_args: List[str], threads: int, log: Path, timeout_s: float) -> tuple:
    """Runs `python -m MODULE ARGS` on `world` ranks (torchrun; one rank: the process alone, with the variables
    torchrun would set); returns its wall time and its CPUMeter."""
    env = _env(threads)
    if world == 1:
        cmd = [sys.executable, "-m", *module_args]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", *module_args]
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        meter = CPUMeter(proc.pid)
        try:
            returncode = proc.wait(timeout=timeout_s)
        finally:
            meter.stop()
            if proc.poll() is None:
                proc.kill()
    if returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {returncode}; its log ends:\n{tail}")
    return time.perf_counter() - start, meter


def _timed(tokens: float, t0: float, t1: float, meter: CPUMeter, wall_s: float) -> Dict[str, float]:
    """Figures of the timed window [t0, t1] (wall clock) in which `tokens` real tokens were trained on."""
    cpu_s = meter.cpu_s(t0, t1)
    return {"tokens_per_s": tokens / (t1 - t0), "tokens_per_cpu_s": tokens / cpu_s, "cores_used": cpu_s / (t1 - t0),
            "wall_s": wall_s}


def run_ours(setup: Dict[str, Any], run_dir: Path, expected_keys: List[List[List[str]]]) -> Dict[str, Any]:
    """`python -m train` on `world` ranks; tokens/s between the log line at the end of the warm-up and the last."""
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [o if not o.startswith("run_dir=") else f"run_dir={run_dir}" for o in setup["overrides"]]
    wall_s, meter = _launch(setup["world"], ["train", RECIPE, *overrides], setup["threads"],
                            run_dir.with_suffix(".log"), setup["timeout_s"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "tokens_per_s" in r]
    start = next(r for r in logged if r["step"] == setup["warmup"])
    end = logged[-1]
    assert end["step"] == setup["steps"], (end, setup["steps"])
    for rank, keys in enumerate(expected_keys):  # the batches bare and HF were given are the ones ours drew
        lines = (run_dir / "sample_keys" / f"rank_{rank}.jsonl").read_text().splitlines()
        if [json.loads(line)["keys"] for line in lines] != keys:
            raise RuntimeError(f"rank {rank} of ours trained on other samples than the bench prepared")
    timed = [r for r in logged if r["step"] > setup["warmup"]]
    steps = [r["step"] - p["step"] for p, r in zip([start] + timed, timed)]
    loss = sum(r["loss"] * n for r, n in zip(timed, steps)) / sum(steps)
    # The share of its time ours' ranks waited for the loader (the loop's data_stall), over the timed window.
    spans = [r["time"] - p["time"] for p, r in zip([start] + timed, timed)]
    stall = sum(r.get("data_stall", 0.0) * t for r, t in zip(timed, spans)) / sum(spans)
    shutil.rmtree(run_dir, ignore_errors=True)  # its end checkpoint: ~12 bytes per parameter
    return {**_timed(end["tokens"] - start["tokens"], start["time"], end["time"], meter, wall_s), "loss": loss,
            "data_stall": stall}


def run_worker(setup: Dict[str, Any], name: str, out: Path) -> Dict[str, Any]:
    wall_s, meter = _launch(setup["world"], ["train.bench", "--worker", name, "--setup", str(setup["path"]),
                                             "--out", str(out)], setup["threads"], out.with_suffix(".log"),
                            setup["timeout_s"])
    result = json.loads(out.read_text())
    return {**result, **_timed(result["timed_tokens"], *result["window"], meter, wall_s)}


def _summed_over_ranks(values: List[float]) -> List[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _result(setup: Dict[str, Any], times: List[float], real: List[int], computed: List[int],
            losses: List[float]) -> Dict[str, Any]:
    """The timed window (wall clock at the end of the last warm-up step and of the last step, rank 0's) and the real
    tokens trained on in it (summed over ranks), padding over all steps, mean loss over the timed steps."""
    steps, warmup = setup["steps"], setup["warmup"]
    assert len(times) == len(real) == len(computed) == len(losses) == steps, (len(times), len(real), steps)
    real_all, computed_all = _summed_over_ranks(real), _summed_over_ranks(computed)
    loss = sum(_summed_over_ranks(losses)[warmup:]) / (setup["world"] * (steps - warmup))
    return {"window": [times[warmup - 1], times[-1]], "timed_tokens": sum(real_all[warmup:]),
            "padding": 1.0 - sum(real_all) / sum(computed_all),
            "real_tokens_per_step": sum(real_all) / (steps * setup["world"]), "loss": loss}


def _build(setup: Dict[str, Any]):
    """The config (the same recipe and overrides as ours) and the model with ours' initial weights and frozen
    groups."""
    from data.text_tokenizer import load_tokenizer
    from train.recipe import load_config
    from train.engine import param_groups
    from train.loop import build_model

    torch.set_num_threads(setup["threads"])
    cfg = load_config(RECIPE, setup["overrides"])
    torch.manual_seed(cfg.seed)  # as train.loop.run does before building the model
    model = build_model(cfg, load_tokenizer(cfg.data.tokenizer))
    return cfg, model, param_groups(model, cfg)  # param_groups also freezes what model.trainable leaves out


def bare_worker(setup: Dict[str, Any]) -> Dict[str, Any]:
    import torch.distributed as dist

    from train.engine import model_inputs

    world, rank = setup["world"], int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)  # an exit with the group up may abort (train.engine)
    cfg, model, groups = _build(setup)
    batches = torch.load(Path(setup["work"]) / f"packed_rank{rank}.pt", weights_only=True)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    params = [p for g in groups for p in g["params"]]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net.train()
    times, losses = [], []
    for batch in batches:
        loss = net(**model_inputs(batch, torch.device("cpu"), torch.float32)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        times.append(time.time())  # the clock of ours' metrics.jsonl and of the CPU meter
    real = [int(b["attention_mask"].sum()) for b in batches]
    return _result(setup, times, real, [b["input_ids"].numel() for b in batches], [float(x) for x in losses])


class TrainerModel(torch.nn.Module):
    """What Trainer trains: our model, its forward returning the output (with .loss) and counting each batch's
    real and computed decoder tokens."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.real_tokens: List[int] = []
        self.computed_tokens: List[int] = []
        self.losses: List[torch.Tensor] = []

    def forward(self, input_ids, attention_mask, labels, mels=None, mel_lengths=None):
        self.real_tokens.append(int(attention_mask.sum()))
        self.computed_tokens.append(input_ids.numel())
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, mels=mels,
                         mel_lengths=mel_lengths)
        self.losses.append(out.loss.detach())
        return out


def hf_worker(setup: Dict[str, Any], strategy: str) -> Dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from data.loading.batching import collate
    from data.text_tokenizer import load_tokenizer, special_ids

    cfg, model, _ = _build(setup)
    pad_id = special_ids(load_tokenizer(cfg.data.tokenizer)).end_of_text
    samples = torch.load(Path(setup["work"]) / "samples.pt", weights_only=True)
    wrapped = TrainerModel(model)
    times: List[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.time())

    def pad_to_longest(rows):
        batch = collate(rows, pad_id)  # one sample per row, padded to the longest, labels -100 on padding
        return {k: batch[k] for k in _MODEL_INPUTS}

    # The JSON ours generates (train.engine.deepspeed_config), the batch sizes left to Trainer ("auto").
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
          "gradient_clipping": cfg.optim.grad_clip, "zero_optimization": {"stage": cfg.engine.zero_stage},
          "bf16": {"enabled": False}, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    args = TrainingArguments(
        output_dir=str(Path(setup["work"]) / f"hf-{strategy}"), deepspeed=ds, max_steps=setup["steps"],
        per_device_train_batch_size=setup["hf_batch_size"], train_sampling_strategy=strategy,
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip, optim="adamw_torch", seed=cfg.seed, ddp_backend="gloo",
        report_to=[], save_strategy="no", logging_steps=setup["steps"], disable_tqdm=True,
        remove_unused_columns=False)
    trainer = Trainer(model=wrapped, args=args, train_dataset=samples, data_collator=pad_to_longest,
                      callbacks=[StepTimes()])
    trainer.train()
    result = _result(setup, times, wrapped.real_tokens, wrapped.computed_tokens, [float(x) for x in wrapped.losses])
    return {**result, "engine": type(trainer.model_wrapped).__name__}  # DeepSpeedEngine: the integration ran


# ---------------------------------------------------------------------------------------------- the bench

def run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    from train.recipe import load_config

    torch.set_num_threads(1)  # this process only prepares data; the contenders get the cores
    t0 = time.perf_counter()
    paths = ensure_data(args.data, args.num_samples, args.seed)
    t1 = time.perf_counter()
    overrides = train_overrides(args, paths, str(work / "ours"))
    cfg = load_config(RECIPE, overrides)
    inputs = prepare_inputs(cfg, args.world, args.steps, work)
    print(f"train.bench: data {t1 - t0:.1f} s, batches and samples {time.perf_counter() - t1:.1f} s",
          file=sys.stderr, flush=True)
    hf_batch_size = max(1, round(inputs["real_tokens_per_step"] / inputs["mean_sample_tokens"]))
    setup = {"path": str(work / "setup.json"), "work": str(work), "overrides": overrides, "world": args.world,
             "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "hf_batch_size": hf_batch_size,
             "timeout_s": args.timeout_s}
    # group_by_length sorts by length within megabatches of this many batches (transformers' rule): the
    # dataset (ours' samples) is small, which weakens its grouping compared with a large dataset's 50.
    setup["hf_megabatch"] = min(inputs["num_samples"] // (4 * hf_batch_size), 50) or 1
    Path(setup["path"]).write_text(json.dumps(setup))
    contenders = [c for c in CONTENDERS if c in args.contenders]
    runs: Dict[str, List[Dict[str, Any]]] = {c: [] for c in contenders}
    for i in range(args.repeats):
        order = contenders[i % len(contenders):] + contenders[:i % len(contenders)]  # each goes first in turn
        for name in order:
            if name == "ours":
                runs[name].append(run_ours(setup, work / f"ours-{i}", inputs["keys"]))
            else:
                runs[name].append(run_worker(setup, name, work / f"{name}-{i}.json"))
            last = runs[name][-1]
            print(f"train.bench: round {i + 1}/{args.repeats}: {name}: {last['tokens_per_s']:.0f} tok/s, "
                  f"{last['tokens_per_cpu_s']:.0f} tok/CPU-s, {last['cores_used']:.2f} cores used "
                  f"({last['wall_s']:.1f} s in all)", file=sys.stderr, flush=True)
    return report(args, setup, inputs, runs)


def _median(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    return statistics.median(r[key] for r in runs) if runs else None


def report(args: argparse.Namespace, setup: Dict[str, Any], inputs: Dict[str, Any],
           runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """The JSON object: medians over the rounds, ratios, goals and the settings."""
    tps = {name: _median(r, "tokens_per_s") for name, r in runs.items()}
    cpu = {name: _median(r, "tokens_per_cpu_s") for name, r in runs.items()}
    ours, hf, grouped, bare = (tps.get(c) for c in CONTENDERS)
    ours_c, hf_c, grouped_c, bare_c = (cpu.get(c) for c in CONTENDERS)

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    out = {"ours_tokens_per_s": ours, "hf_trainer_tokens_per_s": hf, "hf_grouped_tokens_per_s": grouped,
           "bare_tokens_per_s": bare, "ours_padding": inputs["padding"],
           "hf_padding": _median(runs.get("hf", []), "padding"),
           "hf_grouped_padding": _median(runs.get("hf_grouped", []), "padding"),
           "ours_vs_hf": ratio(ours, hf), "ours_vs_hf_grouped": ratio(ours, grouped), "ours_vs_bare": ratio(ours, bare),
           "ours_budget_fill": inputs["budget_fill"], "ours_real_tokens_per_step": inputs["real_tokens_per_step"],
           "hf_real_tokens_per_step": _median(runs.get("hf", []), "real_tokens_per_step"),
           "hf_batch_size": setup["hf_batch_size"], "mean_sample_tokens": inputs["mean_sample_tokens"],
           "ours_data_stall": _median(runs.get("ours", []), "data_stall"),
           "ours_loss": _median(runs.get("ours", []), "loss"), "bare_loss": _median(runs.get("bare", []), "loss"),
           "ours_tokens_per_cpu_s": ours_c, "hf_trainer_tokens_per_cpu_s": hf_c,
           "hf_grouped_tokens_per_cpu_s": grouped_c, "bare_tokens_per_cpu_s": bare_c,
           "ours_vs_hf_cpu": ratio(ours_c, hf_c), "ours_vs_hf_grouped_cpu": ratio(ours_c, grouped_c),
           "ours_vs_bare_cpu": ratio(ours_c, bare_c),
           # The least disturbed round of each (timeit's rule): on a shared machine the median still moves with
           # the load; the best round approaches what the contender does on a quiet machine.
           "best_tokens_per_s": {CONTENDER_KEYS[n]: max(r["tokens_per_s"] for r in rs) for n, rs in runs.items()},
           "runs": {name: [{k: r[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "cores_used", "wall_s")}
                           for r in rs] for name, rs in runs.items()},
           "settings": {"preset": args.preset, "world": args.world, "threads_per_rank": args.threads,
                        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                        "zero_stage": args.zero_stage, "attention": args.attention, "precision": "fp32",
                        "lr": args.lr, "max_seq_len": args.max_seq_len, "max_tokens": args.max_tokens,
                        "hf_megabatch": setup["hf_megabatch"], "seed": args.seed, "samples": inputs["num_samples"],
                        "data": str(args.data), "device": "cpu",
                        "hf_engine": next((r["engine"] for name in ("hf", "hf_grouped") for r in runs.get(name, [])),
                                          None)}}
    out["goals"] = {"vs_hf": None if out["ours_vs_hf"] is None else out["ours_vs_hf"] >= GOAL_VS_HF,
                    "vs_hf_grouped": None if out["ours_vs_hf_grouped"] is None
                    else out["ours_vs_hf_grouped"] >= GOAL_VS_HF_GROUPED,
                    "vs_bare": None if out["ours_vs_bare"] is None else out["ours_vs_bare"] >= GOAL_VS_BARE}
    return out


def print_report(r: Dict[str, Any]) -> None:
    s = r["settings"]
    hf_tokens = "not run" if r["hf_real_tokens_per_step"] is None else f"{r['hf_real_tokens_per_step']:.0f}"
    print(f"train.bench: {s['preset']} model, {s['world']} rank(s) x {s['threads_per_rank']} thread(s), CPU, "
          f"ZeRO-{s['zero_stage']} fp32, AdamW lr {s['lr']:g}; {s['steps']} steps, the first {s['warmup']} not "
          f"timed; median of {s['repeats']} interleaved round(s)")
    print(f"  the same {s['samples']} samples of the asr+tts+s2tt mixture ({s['data']}); real decoder tokens per "
          f"step per rank: ours {r['ours_real_tokens_per_step']:.0f} (rows of {s['max_seq_len']}, budget "
          f"{s['max_tokens']}: {100 * r['ours_budget_fill']:.0f}% filled), HF {hf_tokens} (batch size "
          f"{r['hf_batch_size']}; samples average {r['mean_sample_tokens']:.0f} tokens)")
    pads = {"ours": r["ours_padding"], "hf": r["hf_padding"], "hf_grouped": r["hf_grouped_padding"],
            "bare": r["ours_padding"]}
    print(f"  {'':<45} {'tok/s':>7} {'tok/CPU-s':>9} {'padding':>8}   rounds: tok/s (cores used)")
    for name in CONTENDERS:
        runs = r["runs"].get(name)
        if not runs:
            continue
        key = CONTENDER_KEYS[name]
        each = " ".join(f"{x['tokens_per_s']:.0f} ({x['cores_used']:.1f})" for x in runs)
        pad = "" if pads[name] is None else f"{100 * pads[name]:.1f}%"
        print(f"  {LABELS[name]:<45} {r[key + '_tokens_per_s']:7.0f} {r[key + '_tokens_per_cpu_s']:9.0f} "
              f"{pad:>8}   {each}")
    goals = [("HF padded", "ours_vs_hf", GOAL_VS_HF, "vs_hf"),
             ("HF grouped", "ours_vs_hf_grouped", GOAL_VS_HF_GROUPED, "vs_hf_grouped"),
             ("bare", "ours_vs_bare", GOAL_VS_BARE, "vs_bare")]
    best = r["best_tokens_per_s"]
    if "ours" in best and len(best) > 1:
        print("  best rounds: " + ", ".join(f"ours / {label} {best['ours'] / best[k]:.2f}x"
                                            for label, k in (("HF padded", "hf_trainer"), ("HF grouped", "hf_grouped"),
                                                             ("bare", "bare")) if k in best))
    for label, key, goal, g in goals:
        if r[key] is not None:
            print(f"  ours / {label}: {r[key]:.2f}x in tokens/s (goal >= {goal:g}x: "
                  f"{'met' if r['goals'][g] else 'NOT met'}), {r[key + '_cpu']:.2f}x in tokens per CPU-second")
    if r["ours_data_stall"] is not None:
        print(f"  ours waited for its loader {100 * r['ours_data_stall']:.1f}% of the timed time (its data_stall)")
    if r["ours_loss"] is not None and r["bare_loss"] is not None:
        print(f"  mean loss over the timed steps: ours {r['ours_loss']:.4f}, bare {r['bare_loss']:.4f} (the same "
              "batches from the same initial weights)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last line")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per contender and round")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    parser.add_argument("--world", type=int, default=1, help="gloo ranks (torchrun) per contender")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per rank, the same for every contender (default: cores / world)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each figure is their median")
    parser.add_argument("--preset", default="demo", help="model preset (tiny, demo)")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2),
                        help="DeepSpeed ZeRO stage of ours and HF")
    parser.add_argument("--attention", default="auto",
                        help="model.attention of every contender (auto, varlen_sdpa, sdpa, eager, flash_attention_2)")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of every contender")
    parser.add_argument("--max-seq-len", type=int, default=512, help="ours: packed row length")
    parser.add_argument("--max-tokens", type=int, default=2048, help="ours: decoder tokens per micro-batch")
    parser.add_argument("--data", default="runs/bench/data",
                        help="folder of the mixture's shards (built there if missing; runs/demo is used as it is)")
    parser.add_argument("--num-samples", type=int, default=100, help="training samples per task when building")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder, removed)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit per contender run")
    parser.add_argument("--worker", choices=("hf", "hf_grouped", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        setup = json.loads(Path(args.setup).read_text())
        result = bare_worker(setup) if args.worker == "bare" else \
            hf_worker(setup, "random" if args.worker == "hf" else "group_by_length")
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0
    for name in ("steps", "world", "repeats", "num_samples", "max_seq_len", "max_tokens", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    if args.warmup >= args.steps:
        parser.error(f"--warmup={args.warmup}: expected fewer than --steps={args.steps}")
    unknown = sorted(set(args.contenders.split(",")) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; expected names from {list(CONTENDERS)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    args.threads = args.threads or max(1, cores // args.world)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = run(args, Path(args.work).resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            result = run(args, Path(tmp))
    result["command"] = "python -m train.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print_report(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

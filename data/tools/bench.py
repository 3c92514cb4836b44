"""`python -m data.tools.bench`: our shard loader (packed batches) against a naive per-file baseline on the same
espeak mixture; prints audio seconds per second per worker, the packing efficiency of both and how full our
batches fill their token budget.

Baseline: one 16 kHz WAV file per sample, soundfile, transformers' WhisperFeatureExtractor per sample,
the same templates and tokenizer, batches of 16 padded to the longest; one process.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import soundfile as sf
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data.audio import decode_audio
from data.loading.batching import budget_fill, collate, collate_packed, packing_efficiency
from data.tools.demo import VOICES, make_sentences, speak
from data.features import SAMPLE_RATE, log_mel, split_chunks
from data.loading.loader import DataConfig, build_loader
from data.corpus.prepare import prepare_manifest
from data.shards import shard_paths
from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.speech import PARA_CAPTION_SYSTEM, PARA_QA_SYSTEM, PARA_QUESTIONS
from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids

GOAL_RT_PER_WORKER = 500.0
GOAL_SPEEDUP = 3.0
GOAL_PACKING = 0.97
BASELINE_BATCH_SIZE = 16
# The demo-like mixture: tasks by weight, and utterances of 1-4 template sentences (about 2.5-11 s).
TASK_WEIGHTS = {"asr": 10, "asr_chat": 4, "para_caption": 3, "para_qa": 3}
SENTENCES_WEIGHTS = {1: 4, 2: 3, 3: 2, 4: 1}
_MIXTURE_VERSION = 1


# ---------------------------------------------------------------------------------------------- data

def _records(num_samples: int, seed: int) -> List[Dict[str, Any]]:
    rng = random.Random(seed)
    counts = rng.choices(list(SENTENCES_WEIGHTS), list(SENTENCES_WEIGHTS.values()), k=num_samples)
    sentences = iter(make_sentences(sum(counts), seed))
    records = []
    for i, count in enumerate(counts):
        voice, wpm = VOICES[i % len(VOICES)], rng.randrange(140, 200)
        records.append({
            "id": f"bench-{i:06d}", "audio": f"wav/{i:06d}.wav",
            "text": ", ".join(next(sentences) for _ in range(count)), "speaker": voice, "language": "en",
            "gender": "female" if "+f" in voice else "male",
            "wpm": wpm, "speed": "slow" if wpm < 160 else "fast" if wpm > 180 else "normal",
            "task": rng.choices(list(TASK_WEIGHTS), list(TASK_WEIGHTS.values()))[0]})
    return records


def build_mixture(out_dir: str, num_samples: int, seed: int = 0, workers: int = 2) -> Dict[str, str]:
    """Speak, tokenize and shard the mixture under out_dir, and write the baseline's WAV per sample.

    A folder already holding the same mixture (same size, seed, version) is reused as it is."""
    paths = {name: os.path.join(out_dir, name) for name in ("corpus", "tokenizer", "shards", "baseline")}
    marker = os.path.join(out_dir, "mixture.json")
    want = {"version": _MIXTURE_VERSION, "num_samples": num_samples, "seed": seed}
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == want:
                return paths
    records = _records(num_samples, seed)
    os.makedirs(os.path.join(paths["corpus"], "wav"), exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each thread waits on one espeak process
        list(pool.map(lambda r: speak(r["text"], r["speaker"], os.path.join(paths["corpus"], r["audio"]),
                                      r["wpm"]), records))
    manifest = os.path.join(paths["corpus"], "mixture.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    prompts = [DEFAULT_ASR_INSTRUCTION, PARA_CAPTION_SYSTEM, PARA_QA_SYSTEM, *PARA_QUESTIONS.values()]
    tok = build_text_tokenizer([r["text"] for r in records] + prompts, vocab_size=512)
    extend_tokenizer(tok, 16).save_pretrained(paths["tokenizer"])
    prepare_manifest(manifest, paths["shards"], shard_size=100, workers=workers, progress=False)
    _write_baseline(paths["shards"], paths["baseline"])
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(want, f)
    return paths


def _write_baseline(shards_dir: str, out_dir: str) -> None:
    """One 16-bit WAV per sample, holding exactly the shards' samples, and a JSONL of (key, wav, meta)."""
    os.makedirs(os.path.join(out_dir, "wav"), exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as index:
        for path in shard_paths(shards_dir):
            for raw in _read_tar(path):
                pcm, rate = sf.read(io.BytesIO(raw["flac"]), dtype="int16")
                wav = os.path.join(out_dir, "wav", raw["__key__"] + ".wav")
                sf.write(wav, pcm, rate, subtype="PCM_16")
                index.write(json.dumps({"key": raw["__key__"], "wav": wav, "meta": json.loads(raw["json"])}) + "\n")


# ---------------------------------------------------------------------------------------------- runs

def run_ours(paths: Dict[str, str], num_samples: int, workers: int, max_seq_len: int, rows: int,
             buffer: int) -> Dict[str, Any]:
    """Shards -> build_loader(batching="packed") -> batches, until `num_samples` samples came out."""
    cfg = DataConfig(shards=[paths["shards"]], tokenizer=paths["tokenizer"], num_workers=workers,
                     batching="packed", max_seq_len=max_seq_len, max_tokens=rows * max_seq_len,
                     batch_buffer=buffer)
    start = time.perf_counter()
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    first = next(loader)
    warm = time.perf_counter()
    batches, seen, audio_s = [first], len(first["keys"]), 0.0
    while seen < num_samples + len(first["keys"]):
        batch = next(loader)
        batches.append(batch)
        seen += len(batch["keys"])
        audio_s += batch["num_audio_s"]
    wall_s = time.perf_counter() - warm
    del loader  # stops the worker processes
    return {"rt_per_worker": audio_s / wall_s / max(workers, 1), "startup_s": warm - start, "wall_s": wall_s,
            "audio_s": audio_s, "samples": seen - len(first["keys"]), "batches": len(batches) - 1,
            "packing_efficiency": packing_efficiency(batches[1:]), "budget_fill": budget_fill(batches[1:])}


def run_baseline(paths: Dict[str, str], num_samples: int, padding: str) -> Dict[str, Any]:
    """One process: per sample soundfile.read + WhisperFeatureExtractor + template; padded batches of 16."""
    from transformers import WhisperFeatureExtractor

    with open(os.path.join(paths["baseline"], "samples.jsonl"), encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    tok = load_tokenizer(paths["tokenizer"])
    ids = special_ids(tok)
    extractor = WhisperFeatureExtractor(feature_size=128)
    options = RenderOptions(DEFAULT_ASR_INSTRUCTION)
    batches, pending, audio_s = [], [], 0.0
    start = time.perf_counter()
    for i in range(num_samples):
        entry = entries[i % len(entries)]
        wave, rate = sf.read(entry["wav"], dtype="float32")
        features = extractor(wave, sampling_rate=rate, padding=padding, return_attention_mask=True,
                             return_tensors="pt")
        frames = int(features["attention_mask"].sum())
        task = TASKS[entry["meta"].get("task", "asr")]
        sample = Sample(entry["key"], entry["meta"], {m: [frames] for m in task.audio(entry["meta"])})
        rendered = task.render(sample, tok, ids, options)
        pending.append({"key": entry["key"], "input_ids": rendered.input_ids, "labels": rendered.labels,
                        "mels": [features["input_features"][0]], "num_audio_s": len(wave) / rate})
        audio_s += len(wave) / rate
        if len(pending) == BASELINE_BATCH_SIZE or i == num_samples - 1:
            batches.append(collate(pending, ids.end_of_text))
            pending = []
    wall_s = time.perf_counter() - start
    return {"rt_per_worker": audio_s / wall_s, "wall_s": wall_s, "audio_s": audio_s, "samples": num_samples,
            "batches": len(batches), "packing_efficiency": packing_efficiency(batches)}


def _read_tar(path: str) -> List[Dict[str, Any]]:
    """The raw samples ({"__key__", "flac", "json", ...} bytes) of one shard."""
    with open(path, "rb") as f:
        return list(group_by_keys({**m, "__url__": path} for m in tar_file_iterator(f)))


def profile_stages(paths: Dict[str, str], num_samples: int) -> Dict[str, float]:
    """Milliseconds per audio second of each stage of our per-sample work, in this process."""
    tok = load_tokenizer(paths["tokenizer"])
    ids = special_ids(tok)
    options = RenderOptions(DEFAULT_ASR_INSTRUCTION)
    spent = collections.Counter()

    def timed(stage, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        spent[stage] += time.perf_counter() - start
        return out

    raws: List[Dict[str, Any]] = []
    for path in shard_paths(paths["shards"]):
        if len(raws) >= num_samples:
            break
        raws += timed("read_tar", _read_tar, path)
    audio_s, samples = 0.0, []
    for raw in raws:
        wave_T, _ = timed("decode_flac", decode_audio, raw["flac"])
        mels = timed("log_mel", lambda w: [log_mel(chunk) for chunk in split_chunks(w)], wave_T)
        meta = timed("parse_json", json.loads, raw["json"])
        task = TASKS[meta.get("task", "asr")]
        sample = Sample(raw["__key__"], meta, {m: [x.shape[1] for x in mels] for m in task.audio(meta)})
        rendered = timed("render", task.render, sample, tok, ids, options)
        audio_s += len(wave_T) / SAMPLE_RATE
        samples.append({"key": raw["__key__"], "input_ids": rendered.input_ids, "labels": rendered.labels,
                        "mels": mels, "num_audio_s": 0.0})
    for i in range(0, len(samples), 8):
        timed("collate", collate_packed, [samples[i:i + 8]], ids.end_of_text)
    return {stage: 1000.0 * s / audio_s for stage, s in spent.items()}


# ---------------------------------------------------------------------------------------------- report

def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(1)  # one core per worker on both sides
    if args.data:
        paths = build_mixture(args.data, args.samples, args.seed)
        return _measure(paths, args)
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        return _measure(build_mixture(tmp, args.samples, args.seed), args)


def _measure(paths: Dict[str, str], args: argparse.Namespace) -> Dict[str, Any]:
    measured = args.samples * args.epochs
    ours = run_ours(paths, measured, args.workers, args.max_seq_len, args.rows, args.buffer)
    baseline = run_baseline(paths, measured, args.baseline_padding)
    stages = profile_stages(paths, min(args.samples, 200))
    return {
        "ours_rt_per_worker": ours["rt_per_worker"], "baseline_rt_per_worker": baseline["rt_per_worker"],
        "speedup": ours["rt_per_worker"] / baseline["rt_per_worker"],
        "packing_efficiency": ours["packing_efficiency"], "budget_fill": ours["budget_fill"],
        "baseline_packing_efficiency": baseline["packing_efficiency"],
        "ours_startup_s": ours["startup_s"], "workers": args.workers, "samples": measured,
        "audio_hours": ours["audio_s"] / 3600, "baseline_padding": args.baseline_padding,
        "ours": ours, "baseline": baseline, "profile_ms_per_audio_s": stages,
        "goals": {"rt_per_worker": ours["rt_per_worker"] >= GOAL_RT_PER_WORKER,
                  "speedup": ours["rt_per_worker"] >= GOAL_SPEEDUP * baseline["rt_per_worker"],
                  "packing_efficiency": ours["packing_efficiency"] >= GOAL_PACKING},
    }


def print_report(r: Dict[str, Any]) -> None:
    ours, base, goals = r["ours"], r["baseline"], r["goals"]
    print(f"data.tools.bench: {r['samples']} samples ({r['audio_hours'] * 60:.1f} audio min) per side, "
          f"our loader with {r['workers']} worker(s), the baseline in one process")
    print(f"  ours      {ours['rt_per_worker']:8.1f}x real time per worker  ({ours['audio_s']:.0f} s audio in "
          f"{ours['wall_s']:.2f} s warm; the first batch, after {r['ours_startup_s']:.2f} s of start-up, "
          "not counted)")
    print(f"  baseline  {base['rt_per_worker']:8.1f}x real time per worker  ({base['audio_s']:.0f} s audio in "
          f"{base['wall_s']:.2f} s; WhisperFeatureExtractor padding={r['baseline_padding']})")
    print(f"  speedup   {r['speedup']:8.2f}x")
    print(f"  packing efficiency (real / computed tokens): ours {r['packing_efficiency']:.3f} "
          f"({ours['batches']} packed batches), baseline {r['baseline_packing_efficiency']:.3f} "
          f"({base['batches']} padded batches of {BASELINE_BATCH_SIZE})")
    print(f"  our token budget filled (real tokens / rows x max_seq_len): {r['budget_fill']:.3f}")
    print("  our per-sample work, ms per audio second (one process): " + ", ".join(
        f"{stage} {ms:.3f}" for stage, ms in r["profile_ms_per_audio_s"].items()))
    print(f"  goal >= {GOAL_RT_PER_WORKER:.0f}x per worker: {_verdict(goals['rt_per_worker'])}; "
          f">= {GOAL_SPEEDUP:.0f}x the baseline: {_verdict(goals['speedup'])}; "
          f"packing >= {GOAL_PACKING}: {_verdict(goals['packing_efficiency'])}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last line")
    parser.add_argument("--samples", type=int, default=400, help="utterances in the mixture")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the mixture each side measures")
    parser.add_argument("--workers", type=int, default=1, help="our loader's worker processes")
    parser.add_argument("--data", default=None, help="folder to build the mixture in, or reuse it from "
                        "(default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per batch")
    parser.add_argument("--buffer", type=int, default=64, help="samples the packer holds to fill rows")
    parser.add_argument("--baseline-padding", choices=("max_length", "longest"), default="max_length",
                        help="WhisperFeatureExtractor padding: its default pads every clip to 30 s, as Whisper "
                             "and Qwen2-Audio do; 'longest' keeps each clip's own length")
    args = parser.parse_args(argv)
    for name in ("samples", "epochs", "workers", "max_seq_len", "rows", "buffer"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    report = run(args)
    print_report(report)
    if args.json:
        print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

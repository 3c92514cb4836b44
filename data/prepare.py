"""Corpus -> WebDataset shards + index.json: `python -m data.prepare manifest MANIFEST.jsonl OUT_DIR`.

Bad lines are rejected with a reason in index.json, never fatal; only a corpus with no usable line is.
Audio is decoded in a process pool but shards are written in manifest order, so output is reproducible.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from data.audio import AudioError, encode_flac, read_audio
from data.features import SAMPLE_RATE
from data.shards import INDEX_FORMAT, INDEX_NAME, ShardWriter, is_valid_key, sanitize_key, write_index


class PrepareError(ValueError):
    """The corpus as a whole cannot be prepared (unreadable manifest, no usable line)."""


@dataclass
class Reject:
    line: int
    audio: Optional[str]
    reason: str
    kind: str  # the reason without its details, for the summary line


@dataclass
class Candidate:
    line: int
    key: str
    record: dict
    audio_path: str  # resolved against the manifest's folder


def _sample_key(record: dict, line: int) -> str:
    given = record.get("id")
    if isinstance(given, int) and not isinstance(given, bool):
        given = str(given)
    if is_valid_key(given):
        return given
    stem = os.path.splitext(os.path.basename(record["audio"]))[0]
    return sanitize_key(f"{stem}-{line:08d}")


def read_manifest(manifest: str) -> tuple[list[Candidate], list[Reject]]:
    """Parse a JSONL manifest: the lines worth decoding, and the lines rejected already."""
    try:
        with open(manifest, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrepareError(f"cannot read manifest {manifest!r}: {exc}") from None
    base_dir = os.path.dirname(os.path.abspath(manifest))
    candidates, rejects = [], []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            rejects.append(Reject(line_no, None, f"invalid JSON: {exc}", "invalid JSON"))
            continue
        if not isinstance(record, dict):
            rejects.append(Reject(line_no, None, f"invalid JSON: expected an object, got "
                                  f"{type(record).__name__}", "invalid JSON"))
            continue
        audio = record.get("audio")
        problem = next((f"missing field {name!r}" for name in ("audio", "text") if name not in record), None)
        problem = problem or next((f"field {name!r} must be a string, got {type(record[name]).__name__}"
                                   for name in ("audio", "text") if not isinstance(record[name], str)), None)
        if problem:
            kind = "missing field" if problem.startswith("missing") else "wrong type"
            rejects.append(Reject(line_no, audio if isinstance(audio, str) else None, problem, kind))
            continue
        path = os.path.join(base_dir, os.path.expanduser(audio))
        candidates.append(Candidate(line_no, _sample_key(record, line_no), record, path))
    return candidates, rejects


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)  # the pool already uses the cores; nested threads only contend


def _load(path: str) -> tuple:
    """("ok", flac bytes, num_samples) or ("error", reason, kind); runs in a worker process."""
    try:
        wave_T = read_audio(path)
    except AudioError as exc:
        return "error", str(exc), exc.reason.split(" (")[0]
    return "ok", encode_flac(wave_T), len(wave_T)


def _decoded(paths: list[str], workers: int):
    if workers <= 1 or len(paths) <= 1:
        yield from map(_load, paths)
        return
    # forkserver: a fork of a process that already ran torch (e.g. under pytest) can hang in OpenMP.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data.audio"])
    with ctx.Pool(min(workers, len(paths)), initializer=_init_worker) as pool:
        yield from pool.imap(_load, paths, chunksize=4)


def _remove_stale_shards(out_dir: str, keep: set[str]) -> None:
    for name in os.listdir(out_dir):
        if re.fullmatch(r"shard-\d{6}\.tar", name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def prepare_manifest(manifest: str, out_dir: str, shard_size: int = 1000, workers: int = 2,
                     progress: bool = True) -> dict:
    """Write the shards and index.json for a JSONL manifest; returns the index."""
    candidates, rejects = read_manifest(manifest)
    os.makedirs(out_dir, exist_ok=True)
    # A folder whose index is gone is visibly unfinished; readers never see old index + new shards.
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        os.remove(os.path.join(out_dir, INDEX_NAME))
    first_line_of: dict[str, int] = {}
    results = _decoded([c.audio_path for c in candidates], workers)
    with ShardWriter(out_dir, shard_size) as writer:
        for cand, result in tqdm(zip(candidates, results), total=len(candidates), desc="prepare",
                                 unit="utt", file=sys.stderr, disable=not progress):
            audio = cand.record["audio"]
            if result[0] == "error":
                rejects.append(Reject(cand.line, audio, result[1], result[2]))
                continue
            if cand.key in first_line_of:
                rejects.append(Reject(cand.line, audio, f"duplicate key {cand.key!r} (first used on line "
                                      f"{first_line_of[cand.key]})", "duplicate key"))
                continue
            first_line_of[cand.key] = cand.line
            _, flac, num_samples = result
            duration_s = num_samples / SAMPLE_RATE
            meta = {k: v for k, v in cand.record.items() if k != "audio"}
            meta.update(duration_s=duration_s, num_samples=num_samples, sample_rate=SAMPLE_RATE,
                        source=audio)
            writer.write(cand.key, {"flac": flac, "json": json.dumps(meta, ensure_ascii=False).encode()},
                         duration_s)
    shards = writer.shards
    rejects.sort(key=lambda r: r.line)
    if not shards:
        first = "; ".join(f"line {r.line}: {r.reason}" for r in rejects[:3]) or "the file has no lines"
        raise PrepareError(f"manifest {manifest!r} has no usable line ({len(rejects)} rejected); "
                           f"first reasons: {first}")
    _remove_stale_shards(out_dir, {s["name"] for s in shards})
    index = {
        "format": INDEX_FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "total_duration_s": round(sum(s["duration_s"] for s in shards), 6),
        "shards": shards,
        "rejects": [{"line": r.line, "audio": r.audio, "reason": r.reason} for r in rejects],
        "source": manifest,
        "created_by": "data.prepare",
    }
    write_index(out_dir, index)
    kinds = collections.Counter(r.kind for r in rejects)
    detail = f" ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})" if kinds else ""
    print(f"data.prepare: {index['num_samples']} samples, {index['total_duration_s']:.1f} s "
          f"({index['total_duration_s'] / 3600:.2f} h) in "
          f"{len(shards)} shards -> {out_dir}; {len(rejects)} rejected{detail}", file=sys.stderr)
    return index


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    p = formats.add_parser("manifest", help="JSONL lines of {'audio': path, 'text': str, ...}")
    p.add_argument("manifest", help="JSONL file; relative audio paths resolve against its folder")
    p.add_argument("out_dir", help="folder for shard-*.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be at least 1, got {args.shard_size}")
    try:
        prepare_manifest(args.manifest, args.out_dir, args.shard_size, args.workers,
                         progress=not args.no_progress)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

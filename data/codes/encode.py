"""Audio codes into shards: `python -m data.codes SHARDS... --tokenizer kmeans:F.pt|s3:F.onnx [--out DIR]`,
and fitting a k-means tokenizer: `python -m data.codes fit SHARDS... --num-codes 256 --out F.pt`.

Each audio member gains its codes beside it: `codes.npy` for `flac`, `target.codes.npy` for `target.flac`,
`turn2.codes.npy` for a conversation's `turn2.flac`, `chosen.codes.npy` for a preference's `chosen.flac`.
Shards are rewritten whole, in a process pool, one per job; tokenize_state.json records each finished
shard with the tokenizer hash and its checksum, so a killed run resumes shard by shard. A sample whose audio cannot
be decoded is dropped from its shard and listed in the index's rejects, with the counts reduced.
tokenizer.json beside index.json says which tokenizer made the codes and whether all shards have them.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from data.audio import AudioError, read_audio_bytes
from data.codes.tokenizers import AudioTokenizer, KMeansTokenizer, fit_kmeans, load_audio_tokenizer, pooled_mel_NM
from data.files import atomic_write
from data.pool import WorkerError, map_in_processes
from data.shards import (INDEX_FORMAT, INDEX_NAME, file_sha256, local_shard_paths, read_index, read_samples,
                         tar_writer, write_index, write_sample)
from data.corpus.stats import categories

STATE_NAME = "tokenize_state.json"
TOKENIZER_NAME = "tokenizer.json"

__all__ = ["tokenize_shards", "fit_tokenizer", "read_tokenizer_record", "main"]


def codes_member_of(member: str) -> Optional[str]:
    """The codes member written from an audio member: "flac" -> "codes.npy", "target.flac" ->
    "target.codes.npy", "turn2.flac" (a conversation's turn) -> "turn2.codes.npy", a ".wav" likewise;
    None for a member that is not audio."""
    for suffix in ("flac", "wav"):
        if member == suffix or member.endswith("." + suffix):
            return member[:-len(suffix)] + "codes.npy"
    return None


def _npy(codes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ one shard

_WORKER_TOKENIZER: Dict[str, AudioTokenizer] = {}


def _tokenizer(spec: str) -> AudioTokenizer:
    if spec not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[spec] = load_audio_tokenizer(spec)
    return _WORKER_TOKENIZER[spec]


def _sample_codes(tok: AudioTokenizer, where: str, members: Dict[str, bytes]) -> Dict[str, bytes]:
    """{codes member: .npy bytes} of every audio member; AudioError if any audio is unusable."""
    out = {}
    for member, data in members.items():
        codes_member = codes_member_of(member)
        if codes_member is not None and codes_member not in out:  # of "x.flac" and "x.wav", the first
            out[codes_member] = _npy(tok.encode(read_audio_bytes(data, f"{where}.{member}")))
    return out


def _tokenize_shard(job: tuple) -> dict:
    """Write `in_path` with codes added to `tmp_path`; returns the shard's stats, rejects and dropped samples.
    The caller renames `tmp_path` to the shard's name once its state records the result (see _tokenize_folder)."""
    in_path, tmp_path, spec = job
    tok = _tokenizer(spec) if isinstance(spec, str) else spec
    name = os.path.basename(in_path)
    num_samples, duration_s, rejects, dropped = 0, 0.0, [], []
    with open(tmp_path, "wb") as f, tar_writer(f) as tar:
        for key, members in read_samples(in_path):
            try:
                meta = json.loads(members["json"]) if "json" in members else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = {}
            sample_s = meta.get("duration_s", 0.0) if isinstance(meta, dict) else 0.0
            try:
                codes = _sample_codes(tok, f"{name}:{key}", members)
            except AudioError as exc:
                rejects.append({"shard": name, "key": key, "reason": str(exc), "kind": exc.reason.split(" (")[0]})
                dropped.append([meta if isinstance(meta, dict) else {}, sample_s])
                continue
            # Codes of an earlier tokenizer are replaced.
            write_sample(tar, key, {ext: data for ext, data in members.items() if not ext.endswith("codes.npy")})
            write_sample(tar, key, codes)
            num_samples += 1
            duration_s += sample_s
    return {"name": name, "num_samples": num_samples, "duration_s": round(duration_s, 6),
            "sha256": file_sha256(tmp_path), "rejects": rejects, "dropped": dropped}


# --------------------------------------------------------------------------------------- one folder

def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value) -> None:
    atomic_write(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def read_tokenizer_record(folder: str) -> Optional[dict]:
    """The folder's tokenizer.json ({name, hash, num_codes, frame_rate_hz, complete, ...}) or None."""
    path = os.path.join(folder, TOKENIZER_NAME)
    if not os.path.isfile(path):
        return None
    record = _read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
        raise ValueError(f"{path} is not an audio tokenizer record: expected JSON with a 'hash' "
                         "(written by `python -m data.codes`)")
    return record


def _discount(counts: dict, meta: dict, duration_s: float) -> None:
    """Take one dropped sample out of an index's counts ({dim: {value: {samples, hours}}})."""
    for dim, value in categories(meta).items():
        entry = counts.get(dim, {}).get(value)
        if entry is not None:
            entry["samples"] -= 1
            entry["hours"] = round(entry["hours"] - duration_s / 3600, 6)
            if entry["samples"] <= 0:
                del counts[dim][value]


def _build_index(base: Optional[dict], names: List[str], done: Dict[str, dict]) -> dict:
    """`base` (the input's index, or a bare one) with tokenized shards' entries, rejects and counts."""
    index = json.loads(json.dumps(base)) if base else {
        "format": INDEX_FORMAT, "shards": [{"name": n, "num_samples": 0, "duration_s": 0.0, "sha256": ""}
                                           for n in names], "rejects": [], "created_by": "data.codes"}
    for i, shard in enumerate(index["shards"]):
        if shard["name"] in done:
            index["shards"][i] = {k: done[shard["name"]][k] for k in ("name", "num_samples", "duration_s", "sha256")}
    for name in sorted(done):
        index["rejects"] = index.get("rejects", []) + done[name]["rejects"]
        for meta, duration_s in done[name]["dropped"]:
            if "counts" in index:
                _discount(index["counts"], meta, duration_s)
    index["num_samples"] = sum(s["num_samples"] for s in index["shards"])
    index["total_duration_s"] = round(sum(s["duration_s"] for s in index["shards"]), 6)
    return index


def _tokenize_folder(in_dir: str, names: List[str], out_dir: str, tok: AudioTokenizer, spec,
                     workers: int, progress: bool) -> dict:
    """Tokenize shards `names` of `in_dir` into `out_dir` (the same folder: in place); returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    in_place = os.path.realpath(in_dir) == os.path.realpath(out_dir)
    has_index = os.path.isfile(os.path.join(in_dir, INDEX_NAME))
    state_path = os.path.join(out_dir, STATE_NAME)
    state = _read_json(state_path)
    if not isinstance(state, dict) or state.get("tokenizer") != tok.hash() or state.get("input") != in_dir:
        # The index as it was before any shard changed: a resumed in-place run must count from it.
        state = {"tokenizer": tok.hash(), "input": in_dir, "shards": {},
                 "base_index": read_index(in_dir) if has_index else None}
        _write_json(state_path, state)
    all_names = [s["name"] for s in state["base_index"]["shards"]] if has_index else sorted(
        set(names) | set(state["shards"]))
    record = {**tok.record(), "spec": spec if isinstance(spec, str) else tok.name}
    if in_place:  # from the first rewritten shard on, old codes may no longer be what tokenizer.json says
        _write_json(os.path.join(out_dir, TOKENIZER_NAME), {**record, "complete": False})

    def finished(name: str) -> bool:
        entry = state["shards"].get(name)
        out_path = os.path.join(out_dir, name)
        if entry is None or not os.path.isfile(out_path):
            return False
        if not in_place and file_sha256(os.path.join(in_dir, name)) != entry["input_sha256"]:
            return False
        return file_sha256(out_path) == entry["sha256"]

    todo = [n for n in names if not finished(n)]
    jobs = [(os.path.join(in_dir, n), os.path.join(out_dir, n + ".tokenize.tmp"), spec) for n in todo]
    input_sha = {n: file_sha256(os.path.join(in_dir, n)) for n in todo} if not in_place else {}
    results = map_in_processes(_tokenize_shard, jobs, workers, name=lambda job: job[0],
                               desc=f"tokenize {os.path.basename(out_dir)}", unit="shard", progress=progress)
    for result in results:
        name = result["name"]
        # The state names the new checksum before the rename: a kill between them redoes this shard. (So the
        # worker's file is renamed here, after the state, rather than by data.files.atomic_path in the worker.)
        state["shards"][name] = {**result, "input_sha256": input_sha.get(name, "")}
        _write_json(state_path, state)
        os.replace(os.path.join(out_dir, name + ".tokenize.tmp"), os.path.join(out_dir, name))
    done = {n: state["shards"][n] for n in all_names if n in state["shards"]}
    complete = all(n in done for n in all_names)
    index = _build_index(state["base_index"], all_names, done)
    if in_place and has_index or complete:
        # Out of place, an index is written only once it lists shards that all exist.
        write_index(out_dir, index)
    _write_json(os.path.join(out_dir, TOKENIZER_NAME), {**record, "complete": complete})
    rejects = sum(len(done[n]["rejects"]) for n in done)
    print(f"data.codes: {out_dir}: {len(todo)} shards tokenized, {len(names) - len(todo)} already done, "
          f"{len(done)}/{len(all_names)} complete; {rejects} samples dropped (undecodable audio)", file=sys.stderr)
    return {"out_dir": out_dir, "tokenized": todo, "skipped": [n for n in names if n not in todo],
            "complete": complete, "rejects": rejects, "index": index}


def tokenize_shards(specs: List[str], tokenizer: str, out_dir: Optional[str] = None, workers: int = 2,
                    progress: bool = True, audio_tokenizer: Optional[AudioTokenizer] = None) -> List[dict]:
    """Add codes from `tokenizer` ("kmeans:F.pt" / "s3:F.onnx") to the shards named by `specs`.

    Shards are grouped by folder; each folder is rewritten in place unless `out_dir` is given (then
    all shards must come from one folder). `audio_tokenizer` injects an already built tokenizer (it
    then runs in this process only). Returns one summary per folder.
    """
    paths = local_shard_paths(list(specs), "data.codes", "writes next to its shards")
    tok = audio_tokenizer or load_audio_tokenizer(tokenizer)  # fail here, not in a worker
    spec = tokenizer if audio_tokenizer is None else audio_tokenizer
    folders: Dict[str, List[str]] = {}
    for path in paths:
        folders.setdefault(os.path.dirname(os.path.abspath(path)), []).append(os.path.basename(path))
    if out_dir is not None and len(folders) > 1:
        raise ValueError(f"--out {out_dir!r} takes the shards of one dataset folder; the shards named come from "
                         f"{len(folders)}: {sorted(folders)}")
    return [_tokenize_folder(folder, names, os.path.abspath(out_dir) if out_dir else folder, tok, spec,
                             workers if audio_tokenizer is None else 1, progress)
            for folder, names in folders.items()]


# ----------------------------------------------------------------------------------------------- fit

def fit_tokenizer(specs: List[str], num_codes: int, out: str, seed: int = 0, iterations: int = 30,
                  max_frames: int = 200_000, progress: bool = True) -> KMeansTokenizer:
    """Fit a k-means tokenizer on every audio member of the shards (a sample's main audio and each
    conversation turn's, in file order, the first `max_frames` 25 Hz frames) and save it to `out`.

    Every member counts because the codes must cover all the speech they will encode: a codec fitted on one
    voice at its default pitch maps a high-pitched answer onto low-pitched codes (the pitch is lost)."""
    feats, total, bad = [], 0, 0
    paths = local_shard_paths(list(specs), "data.codes fit")
    with tqdm(total=max_frames, desc="read frames", unit="frame", file=sys.stderr, disable=not progress) as bar:
        for path in paths:
            for key, members in read_samples(path):
                for ext, data in members.items():
                    if ext.rpartition(".")[2] not in ("flac", "wav") or total >= max_frames:
                        continue
                    try:
                        rows_NM = pooled_mel_NM(read_audio_bytes(data, f"{path}:{key}.{ext}"))[:max_frames - total]
                    except AudioError:
                        bad += 1
                        continue
                    feats.append(rows_NM)
                    total += rows_NM.shape[0]
                    bar.update(rows_NM.shape[0])
                if total >= max_frames:
                    break
            if total >= max_frames:
                break
    if not feats:
        raise ValueError(f"shards {specs!r} hold no decodable audio to fit a tokenizer on ({bad} undecodable)")
    features_NM = torch.cat(feats)
    with tqdm(total=iterations, desc="k-means", unit="iter", file=sys.stderr, disable=not progress) as bar:
        def report(it: int, inertia: float) -> None:
            bar.update(1)
            bar.set_postfix(mse=f"{inertia:.4f}")
        centroids_KM = fit_kmeans(features_NM, num_codes, seed, iterations, report)
    tok = KMeansTokenizer(centroids_KM, {"seed": seed, "iterations": iterations, "num_frames": total})
    tok.save(out)
    print(f"data.codes fit: {num_codes} codes from {total} frames ({total / tok.frame_rate_hz:.0f} s of audio, "
          f"{bad} undecodable members) -> {out}; hash {tok.hash()[:16]}", file=sys.stderr)
    return tok


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m data.codes"
    if argv[:1] == ["fit"]:
        parser = argparse.ArgumentParser(prog=f"{prog} fit", description="Fit a k-means audio tokenizer on shards.")
        parser.add_argument("shards", nargs="+", help="dataset folders, tar paths, globs or brace patterns")
        parser.add_argument("--num-codes", type=int, default=256, help="number of centroids (codes)")
        parser.add_argument("--out", required=True, help="file to write, e.g. kmeans256.pt")
        parser.add_argument("--seed", type=int, default=0, help="seed of the k-means++ initialisation")
        parser.add_argument("--iterations", type=int, default=30, help="at most this many Lloyd iterations")
        parser.add_argument("--max-frames", type=int, default=200_000, help="25 Hz frames read from the shards")
        parser.add_argument("--no-progress", action="store_true")
        args = parser.parse_args(argv[1:])
        run: Callable[[], object] = lambda: fit_tokenizer(args.shards, args.num_codes, args.out, args.seed,
                                                          args.iterations, args.max_frames, not args.no_progress)
    else:
        parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
        parser.add_argument("shards", nargs="+", help="dataset folders, tar paths, globs or brace patterns")
        parser.add_argument("--tokenizer", required=True, help="kmeans:FILE.pt or s3:FILE.onnx")
        parser.add_argument("--out", default=None, help="folder for the new shards (default: rewrite in place)")
        parser.add_argument("--workers", type=int, default=2, help="shards tokenized at once, one process each")
        parser.add_argument("--no-progress", action="store_true")
        args = parser.parse_args(argv)
        run = lambda: tokenize_shards(args.shards, args.tokenizer, args.out, args.workers, not args.no_progress)
    try:
        run()
    except (ValueError, WorkerError) as exc:
        if isinstance(exc, WorkerError) and not isinstance(exc.__cause__, ValueError):
            raise  # not bad input but a fault: its traceback helps
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

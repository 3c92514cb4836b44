"""Corpus -> WebDataset shards + index.json: `python -m data.corpus.prepare {manifest,kaldi,csv,folder,hf,s2st,
conversations,preferences} ... OUT_DIR`.

Bad samples are rejected with a reason in index.json, never fatal; only a corpus with no usable sample
is. Audio is decoded in a process pool but shards are written in corpus order, so output is
reproducible. prepare_state.json records each finished shard (checksum, which candidates it covers), so
a killed run resumes shard by shard and a re-run with unchanged inputs writes nothing.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys
from typing import List, Optional, Tuple

from data.audio import AudioError, encode_flac, read_audio, read_audio_bytes
from data.corpus.conversations import read_conversations
from data.features import SAMPLE_RATE
from data.files import atomic_write
from data.corpus.formats import (CSV_DELIMITERS, Blob, Candidate, Corpus, PrepareError, Reject, describe, read_csv,
                          read_folder, read_hf, read_hf_pairs, read_kaldi, read_manifest)
from data.pool import map_in_processes
from data.corpus.preferences import read_preferences
from data.shards import INDEX_FORMAT, INDEX_NAME, ShardWriter, file_sha256, write_index
from data.corpus.stats import Counts

STATE_NAME = "prepare_state.json"
# Bump when the bytes written for the same input change, so old shards are not taken for current ones.
PREPARE_VERSION = 1
_SHARD_FILE_RE = re.compile(r"shard-\d{6}\.tar(\.tmp)?")

__all__ = ["PrepareError", "prepare", "prepare_conversations", "prepare_manifest", "prepare_preferences", "main"]


# -------------------------------------------------------------------------------------- decoding

def _read(item):
    """An AudioRef resolved for a worker, a path or (bytes, name), as 16 kHz mono [T]."""
    if isinstance(item, str):
        return read_audio(item)
    if not item[0]:
        raise AudioError(item[1], "no audio (neither bytes nor a path)")
    return read_audio_bytes(*item)


def _load_members(job: list) -> tuple:
    """("ok", {member: (flac, num_samples)}) or ("error", reason, kind) for [(member, audio, source)]."""
    out = {}
    for member, audio, source in job:
        try:
            wave_T = _read(audio)
        except AudioError as exc:
            return "error", f"{member} ({source}): {exc}", exc.reason.split(" (")[0]
        out[member] = (encode_flac(wave_T), len(wave_T))
    return "ok", out


def _load(job) -> tuple:
    """("ok", flac, num_samples, target flac or None, target num_samples) or ("error", reason, kind);
    a sample of named members (a list job) gives _load_members' result."""
    if isinstance(job, list):
        return _load_members(job)
    audio, target = job
    try:
        wave_T = _read(audio)
    except AudioError as exc:
        return "error", str(exc), exc.reason.split(" (")[0]
    if target is None:
        return "ok", encode_flac(wave_T), len(wave_T), None, 0
    try:
        target_T = _read(target)
    except AudioError as exc:
        return "error", f"target audio: {exc}", "target " + exc.reason.split(" (")[0]
    return "ok", encode_flac(wave_T), len(wave_T), encode_flac(target_T), len(target_T)


def _job(cand: Candidate) -> tuple:
    """What a worker needs, picklable; dataset audio is read here, in this process, in corpus order."""
    def resolve(ref, source):
        if not isinstance(ref, Blob):
            return ref
        data = ref.read()  # bytes, a path, or "" for a cell with neither
        if data and isinstance(data, str):
            return data
        where = describe(cand.where)
        return data or b"", source if source == where else f"{source} ({where})"
    if cand.members is not None:
        return [(member, resolve(ref, source), source) for member, (source, ref) in cand.members.items()]
    return (resolve(cand.audio, cand.source),
            None if cand.target is None else resolve(cand.target, cand.target_source))


def _job_name(job) -> str:
    """The audio a job decodes, for an error message: its path or source name (a sample of members: each)."""
    def audio(ref) -> str:
        return ref if isinstance(ref, str) else str(ref[1])
    if isinstance(job, list):
        return ", ".join(f"{member} ({source})" for member, _, source in job)
    return audio(job[0]) + ("" if job[1] is None else f" (target {audio(job[1])})")


# ----------------------------------------------------------------------------------- resume state

def _identity(ref) -> str:
    if ref is None or isinstance(ref, Blob):
        return "" if ref is None else ref.identity
    try:
        stat = os.stat(ref)
        return f"{ref}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        return f"{ref}:missing"


def _fingerprint(corpus: Corpus, candidates: List[Candidate], shard_size: int) -> str:
    """Changes whenever the shards could come out different: options, records, audio files' size/mtime."""
    digest = hashlib.sha256(json.dumps([PREPARE_VERSION, shard_size, corpus.kind, corpus.identity]).encode())
    for cand in candidates:
        digest.update(json.dumps([cand.key, cand.record, cand.source, _identity(cand.audio),
                                  cand.target_source, _identity(cand.target)], ensure_ascii=False).encode())
        if cand.members is not None:
            digest.update(json.dumps([[m, s, _identity(ref)] for m, (s, ref) in cand.members.items()]).encode())
    return digest.hexdigest()


def _load_state(out_dir: str, fingerprint: str) -> dict:
    """The previous run's progress if it prepared the same inputs the same way, else a fresh start."""
    fresh = {"version": PREPARE_VERSION, "inputs": fingerprint, "shards": [], "rejects": [], "processed": 0}
    state = _read_json(os.path.join(out_dir, STATE_NAME))
    return state if isinstance(state, dict) and state.get("inputs") == fingerprint else fresh


def _save_state(out_dir: str, state: dict) -> None:
    path = os.path.join(out_dir, STATE_NAME)
    atomic_write(path, json.dumps(state, ensure_ascii=False))


def _read_json(path: str):
    """The JSON in `path`, or None where there is no such file or it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _dedupe(candidates: List[Candidate]) -> Tuple[List[Candidate], List[Reject]]:
    """Keys decide here, before decoding, so which sample keeps a key never depends on a resume."""
    first: dict = {}
    kept, rejects = [], []
    for cand in candidates:
        if cand.key in first:
            rejects.append(Reject(cand.order, cand.where, cand.source, f"duplicate key {cand.key!r} (first "
                                  f"used on {describe(first[cand.key])})", "duplicate key"))
        else:
            first[cand.key] = cand.where
            kept.append(cand)
    return kept, rejects


# ---------------------------------------------------------------------------------------- writing

def _sample_of_members(cand: Candidate, decoded: dict) -> Tuple[dict, dict, float]:
    """A conversation: one FLAC per audio turn; duration_s is their total (what the loader's limit
    counts), "audio_members" each one's source and length."""
    num_samples = sum(n for _, n in decoded.values())
    meta = {**cand.record, "duration_s": num_samples / SAMPLE_RATE, "num_samples": num_samples,
            "sample_rate": SAMPLE_RATE,
            "audio_members": {m: {"source": cand.members[m][0], "num_samples": n, "duration_s": n / SAMPLE_RATE}
                              for m, (_, n) in decoded.items()}}
    members = {m: flac for m, (flac, _) in decoded.items()}
    members["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return meta, members, meta["duration_s"]


def _sample(cand: Candidate, result: tuple) -> Tuple[dict, dict, float]:
    """(metadata, members, duration_s) of one decoded sample: members are its FLAC(s) and .json."""
    if cand.members is not None:
        return _sample_of_members(cand, result[1])
    _, flac, num_samples, target_flac, target_num_samples = result
    duration_s = num_samples / SAMPLE_RATE
    meta = {**cand.record, "duration_s": duration_s, "num_samples": num_samples, "sample_rate": SAMPLE_RATE,
            "source": cand.source}
    members = {"flac": flac}
    if target_flac is not None:
        meta.update(target_duration_s=target_num_samples / SAMPLE_RATE, target_num_samples=target_num_samples,
                    target_source=cand.target_source)
        members["target.flac"] = target_flac
    members["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return meta, members, duration_s


def _record_shard(state: dict, out_dir: str, shard_index: int, entry: dict) -> None:
    """A new shard goes into the state at once (a kill after this keeps it); a rewritten one must
    come out as the previous run wrote it."""
    if shard_index < len(state["shards"]):
        if entry["sha256"] != state["shards"][shard_index]["sha256"]:
            raise PrepareError(f"{os.path.join(out_dir, entry['name'])} came out different from the previous "
                               f"run although its inputs look unchanged; delete "
                               f"{os.path.join(out_dir, STATE_NAME)} to prepare from scratch")
        return
    state["shards"].append(entry)
    state["processed"] = entry["end"]
    _save_state(out_dir, state)


def _write_segments(candidates: List[Candidate], segments: List[tuple], out_dir: str, shard_size: int,
                    workers: int, state: dict, progress: bool) -> int:
    """Write the shards of each (shard index, first candidate, end candidate) segment; returns how many.
    A segment whose shard the state records already is a lost shard rewritten; the last segment may be
    the unwritten rest, one shard after another."""
    total = sum(end - start for _, start, end in segments)
    jobs = (_job(candidates[pos]) for _, start, end in segments for pos in range(start, end))
    # Decoded in a process pool, in corpus order; dataset audio is read here, into each job, as the pool takes it.
    results = map_in_processes(_load, jobs, workers, total=total, name=_job_name, desc="prepare", unit="utt",
                               progress=progress, preload=["data.audio"])
    written = 0
    for shard_index, start, end in segments:
        is_redo = shard_index < len(state["shards"])
        shard_start, counts, num_done = start, Counts(), 0
        with ShardWriter(out_dir, shard_size, first_index=shard_index) as writer:
            for pos in range(start, end):
                result, cand = next(results), candidates[pos]
                if result[0] == "error":
                    if not is_redo:  # a rewritten shard's rejects are in the state already
                        state["rejects"].append({"pos": pos, "order": cand.order, "where": cand.where,
                                                 "audio": cand.source, "reason": result[1],
                                                 "kind": result[2]})
                    continue
                meta, members, duration_s = _sample(cand, result)
                counts.add(meta, duration_s)
                finished = writer.write(cand.key, members, duration_s)
                if finished is not None:
                    entry = {**finished, "start": shard_start, "end": pos + 1, "counts": counts.state()}
                    _record_shard(state, out_dir, shard_index + num_done, entry)
                    shard_start, counts, num_done = pos + 1, Counts(), num_done + 1
        if len(writer.shards) > num_done:  # the last, partial shard, closed on leaving the block
            entry = {**writer.shards[-1], "start": shard_start, "end": end, "counts": counts.state()}
            _record_shard(state, out_dir, shard_index + num_done, entry)
        if is_redo and len(writer.shards) != 1:
            raise PrepareError(f"shard {shard_index} of {out_dir} could not be rewritten as before; "
                               f"delete {os.path.join(out_dir, STATE_NAME)} to prepare from scratch")
        written += len(writer.shards)
        if not is_redo and state["processed"] != end:
            state["processed"] = end  # the rejects after the last shard are done too
            _save_state(out_dir, state)
    return written


def _build_index(corpus: Corpus, state: dict, early_rejects: List[Reject]) -> Tuple[dict, List[Reject]]:
    """index.json from the state's shards and rejects plus the rejects found before decoding."""
    shards = [{k: s[k] for k in ("name", "num_samples", "duration_s", "sha256")} for s in state["shards"]]
    counts = Counts()
    for shard in state["shards"]:
        counts.merge(Counts(shard["counts"]))
    rejects = early_rejects + [Reject(r["order"], r["where"], r["audio"], r["reason"], r["kind"])
                               for r in state["rejects"]]
    rejects.sort(key=lambda r: r.order)
    return {
        "format": INDEX_FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "total_duration_s": round(sum(s["duration_s"] for s in shards), 6),
        "shards": shards,
        "rejects": [r.to_json() for r in rejects],
        "source": corpus.source,
        "input_format": corpus.kind,
        "counts": counts.to_json(),
        "created_by": "data.corpus.prepare",
    }, rejects


def prepare(corpus: Corpus, out_dir: str, shard_size: int = 1000, workers: int = 2,
            progress: bool = True) -> dict:
    """Write the shards and index.json of a corpus read by data.corpus.formats; returns the index.

    Shards a previous run of the same inputs and shard size left intact are kept; only missing or
    damaged shards and the unwritten rest are written.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 sample, got {shard_size}")
    candidates, duplicates = _dedupe(corpus.candidates)
    early_rejects = corpus.rejects + duplicates
    os.makedirs(out_dir, exist_ok=True)
    state = _load_state(out_dir, _fingerprint(corpus, candidates, shard_size))
    lost = [i for i, shard in enumerate(state["shards"])
            if not os.path.isfile(os.path.join(out_dir, shard["name"]))
            or file_sha256(os.path.join(out_dir, shard["name"])) != shard["sha256"]]
    segments = [(i, state["shards"][i]["start"], state["shards"][i]["end"]) for i in lost]
    if state["processed"] < len(candidates):
        state["rejects"] = [r for r in state["rejects"] if r["pos"] < state["processed"]]
        segments.append((len(state["shards"]), state["processed"], len(candidates)))
    index_path = os.path.join(out_dir, INDEX_NAME)
    written = 0
    if segments:
        # A folder whose index is gone is visibly unfinished; readers never see old index + new shards.
        if os.path.exists(index_path):
            os.remove(index_path)
        if not state["shards"]:
            _save_state(out_dir, state)  # a fresh start: the old state must not outlive its shards
        written = _write_segments(candidates, segments, out_dir, shard_size, workers, state, progress)
    index, rejects = _build_index(corpus, state, early_rejects)
    if not index["shards"]:
        first = "; ".join(f"{describe(r.where)}: {r.reason}" for r in rejects[:3]) or "it is empty"
        raise PrepareError(f"{corpus.kind} {corpus.source!r} has no usable {corpus.unit} ({len(rejects)} "
                           f"rejected); first reasons: {first}")
    keep = {s["name"] for s in index["shards"]}
    for name in os.listdir(out_dir):
        if _SHARD_FILE_RE.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    unchanged = _read_json(index_path) == index
    if not unchanged:
        write_index(out_dir, index)
    if written == 0 and unchanged:
        print(f"data.corpus.prepare: {out_dir} is up to date ({len(index['shards'])} shards); nothing written",
              file=sys.stderr)
    elif written < len(index["shards"]):
        print(f"data.corpus.prepare: kept {len(index['shards']) - written} shards of the previous run, wrote "
              f"{written}", file=sys.stderr)
    kinds = collections.Counter(r.kind for r in rejects)
    detail = f" ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})" if kinds else ""
    print(f"data.corpus.prepare: {index['num_samples']} samples, {index['total_duration_s']:.1f} s "
          f"({index['total_duration_s'] / 3600:.2f} h) in {len(index['shards'])} shards -> {out_dir}; "
          f"{len(rejects)} rejected{detail}", file=sys.stderr)
    return index


def prepare_manifest(manifest: str, out_dir: str, shard_size: int = 1000, workers: int = 2,
                     progress: bool = True) -> dict:
    """Write the shards and index.json for a JSONL manifest; returns the index."""
    return prepare(read_manifest(manifest), out_dir, shard_size, workers, progress)


def prepare_conversations(path: str, out_dir: str, shard_size: int = 1000, workers: int = 2,
                          progress: bool = True) -> dict:
    """Write the shards and index.json for a JSONL file of conversations (data.corpus.conversations)."""
    return prepare(read_conversations(path), out_dir, shard_size, workers, progress)


def prepare_preferences(path: str, out_dir: str, shard_size: int = 1000, workers: int = 2,
                        progress: bool = True) -> dict:
    """Write the shards and index.json for a JSONL file of preference pairs (data.corpus.preferences)."""
    return prepare(read_preferences(path), out_dir, shard_size, workers, progress)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.corpus.prepare", description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    p_manifest = formats.add_parser("manifest", help="JSONL lines of {'audio': path, 'text': str, ...}, or "
                                    "{'text': str, 'task': 'text'} (plain text, no audio)")
    p_manifest.add_argument("manifest", help="JSONL file; relative audio paths resolve against its folder")
    p_kaldi = formats.add_parser("kaldi", help="Kaldi data folder: wav.scp, text, optional utt2spk, utt2lang")
    p_kaldi.add_argument("data_dir", help="folder holding wav.scp and text")
    p_kaldi.add_argument("--root", default=None, help="folder that relative wav.scp paths resolve against "
                                                      "(default: the current directory, as in Kaldi)")
    p_csv = formats.add_parser("csv", help="CSV or TSV with a header line, e.g. Common Voice's validated.tsv "
                               "(client_id, path, sentence, ...; audio in clips/ beside it)")
    p_csv.add_argument("file", help="the CSV/TSV file; relative audio paths resolve against --audio-dir, else "
                       "its folder or the clips/ folder in it")
    p_csv.add_argument("--audio-column", default="path", help="column of audio file paths (default: path)")
    p_csv.add_argument("--text-column", default="sentence", help="column of transcripts, stored as 'text' "
                       "(default: sentence)")
    p_csv.add_argument("--delimiter", default="auto", choices=sorted(CSV_DELIMITERS), metavar="auto|,|\\t",
                       help="auto (a tab where "
                       "the header has one, else a comma), ',' or '\\t'")
    p_csv.add_argument("--audio-dir", default=None, help="folder that relative audio paths resolve against")
    p_folder = formats.add_parser("folder", help="audio files with a .txt or .lab transcript beside each")
    p_folder.add_argument("dir", help="searched recursively; the speaker is each file's folder name")
    p_hf = formats.add_parser("hf", help="local Hugging Face dataset: save_to_disk folder or parquet files")
    p_hf.add_argument("path", help="save_to_disk folder, a parquet file, a folder of them, or a glob")
    p_hf.add_argument("--audio-column", default="audio", help="column of audio: datasets' Audio "
                      "({'bytes', 'path'}), bytes or a path")
    p_hf.add_argument("--text-column", default="text", help="column of transcripts, stored as 'text'")
    p_hf.add_argument("--target-audio-column", default=None, help="second audio per row (TTS/S2ST target)")
    p_hf.add_argument("--split", default="train", help="split of a DatasetDict, or the parquet files "
                      "whose names say it")
    p_pairs = formats.add_parser("s2st", help="paired source and target speech (speech-to-speech translation) "
                                 "from a local Hugging Face dataset: save_to_disk folder or parquet files")
    p_pairs.add_argument("path", help="save_to_disk folder, a parquet file, a folder of them, or a glob")
    p_pairs.add_argument("--source-audio-column", default="source_audio", help="the speech to translate: "
                         "datasets' Audio ({'bytes', 'path'}), bytes or a path; stored as the sample's flac")
    p_pairs.add_argument("--target-audio-column", default="target_audio", help="its translation spoken; stored "
                         "as target.flac")
    p_pairs.add_argument("--source-text-column", default=None, help="optional transcript of the source, "
                         "stored as 'text'")
    p_pairs.add_argument("--target-text-column", default=None, help="optional transcript of the target, stored "
                         "as 'translation' (task s2st needs it: the text side of the spoken answer)")
    p_pairs.add_argument("--source-language", default=None, help="stored as 'source_language' in every record")
    p_pairs.add_argument("--target-language", default=None, help="stored as 'target_language' in every record; "
                         "the instruction names it ('Translate the speech into LANGUAGE ...'): write a name, "
                         "e.g. English")
    p_pairs.add_argument("--task", default="s2st", help="task written into every record (s2st; s2tt or t2st "
                         "train the other directions from the same pairs)")
    p_pairs.add_argument("--split", default="train", help="split of a DatasetDict, or the parquet files whose "
                         "names say it")
    p_conv = formats.add_parser("conversations", help="JSONL lines of {'messages': [turns with text/audio "
                                "parts], 'tools': [...]}, for SFT (task 'sft')")
    p_conv.add_argument("conversations", help="JSONL file; relative audio paths resolve against its folder")
    p_pref = formats.add_parser("preferences", help="JSONL lines of {'messages': [turns], 'chosen': {'text', "
                                "'audio'?}, 'rejected': {...}}, for DPO and reward models (task 'preference')")
    p_pref.add_argument("preferences", help="JSONL file; relative audio paths resolve against its folder")
    for p in (p_manifest, p_kaldi, p_csv, p_folder, p_hf, p_pairs, p_conv, p_pref):
        p.add_argument("out_dir", help="folder for shard-*.tar and index.json")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        p.add_argument("--workers", type=int, default=2, help="decoding processes")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be at least 1, got {args.shard_size}")
    try:
        if args.format == "manifest":
            corpus = read_manifest(args.manifest)
        elif args.format == "kaldi":
            corpus = read_kaldi(args.data_dir, args.root)
        elif args.format == "csv":
            corpus = read_csv(args.file, args.audio_column, args.text_column, args.delimiter, args.audio_dir)
        elif args.format == "folder":
            corpus = read_folder(args.dir)
        elif args.format == "conversations":
            corpus = read_conversations(args.conversations)
        elif args.format == "preferences":
            corpus = read_preferences(args.preferences)
        elif args.format == "s2st":
            if args.task in ("s2st", "s2tt") and args.target_text_column is None:
                print(f"data.corpus.prepare: warning: no --target-text-column: task {args.task!r} reads the record's "
                      f"'translation' and skips records without one", file=sys.stderr)
            corpus = read_hf_pairs(args.path, args.source_audio_column, args.target_audio_column,
                                   args.source_text_column, args.target_text_column, args.split,
                                   args.source_language, args.target_language, args.task)
        else:
            corpus = read_hf(args.path, args.audio_column, args.text_column, args.split,
                             args.target_audio_column)
        prepare(corpus, args.out_dir, args.shard_size, args.workers, progress=not args.no_progress)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hours and samples per task, language, speaker and style, and a duration histogram, of shards.

`python -m data.corpus.stats SHARDS... [--json]` reads the shards themselves, not their index.json.

`Counts` is also what data.corpus.prepare writes into index.json, so both always count the same way.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import sys
import tarfile
from typing import Dict, List, Optional

import soundfile as sf

from data.shards import local_shard_paths, read_samples

DIMENSIONS = ("task", "language", "speaker", "style")
DEFAULT_TASK = "asr"
UNKNOWN = "unknown"  # a sample without the field still counts, so every dimension sums to the total
DURATION_EDGES_S = (0, 1, 2, 5, 10, 20, 30)  # bins [0,1) [1,2) ... [20,30) and 30+
BIN_LABELS = tuple(f"{lo}-{hi}" for lo, hi in zip(DURATION_EDGES_S, DURATION_EDGES_S[1:])) + (
    f"{DURATION_EDGES_S[-1]}+",)


def categories(meta: dict) -> Dict[str, str]:
    """The value of each dimension for one sample's metadata; style is "emotion" or else "style"."""
    values = {"task": meta.get("task", DEFAULT_TASK), "language": meta.get("language"),
              "speaker": meta.get("speaker"), "style": meta.get("emotion", meta.get("style"))}
    return {dim: UNKNOWN if value in (None, "") else str(value) for dim, value in values.items()}


def duration_bin(duration_s: float) -> str:
    for label, upper_s in zip(BIN_LABELS, DURATION_EDGES_S[1:]):
        if duration_s < upper_s:
            return label
    return BIN_LABELS[-1]


class Counts:
    """Samples and seconds per value of each dimension; `state()` is exact JSON, `to_json()` the report."""

    def __init__(self, state: Optional[dict] = None):
        self.table: Dict[str, Dict[str, List[float]]] = {dim: {} for dim in DIMENSIONS}
        for dim, values in (state or {}).items():
            for value, (samples, seconds) in values.items():
                self.table[dim][value] = [samples, seconds]

    def add(self, meta: dict, duration_s: float) -> None:
        for dim, value in categories(meta).items():
            entry = self.table[dim].setdefault(value, [0, 0.0])
            entry[0] += 1
            entry[1] += duration_s

    def merge(self, other: "Counts") -> None:
        for dim, values in other.table.items():
            for value, (samples, seconds) in values.items():
                entry = self.table[dim].setdefault(value, [0, 0.0])
                entry[0] += samples
                entry[1] += seconds

    def state(self) -> dict:
        return {dim: {v: list(self.table[dim][v]) for v in sorted(self.table[dim])} for dim in DIMENSIONS}

    def to_json(self) -> dict:
        """{"task": {"asr": {"samples": n, "hours": h}}, "language": {...}, "speaker": ..., "style": ...}"""
        return {dim: {value: {"samples": samples, "hours": round(seconds / 3600, 6)}
                      for value, (samples, seconds) in sorted(self.table[dim].items())}
                for dim in DIMENSIONS}


# ---------------------------------------------------------------------------------- reading shards

# Only metadata and main audio are kept, so a shard full of codes or targets holds little in memory.
_MEMBERS = ("json", "flac", "wav")


def _duration_s(meta: dict, members: Dict[str, bytes]) -> float:
    if isinstance(meta.get("duration_s"), (int, float)) and not isinstance(meta["duration_s"], bool):
        return float(meta["duration_s"])
    audio = members.get("flac", members.get("wav"))
    if audio is None:
        raise ValueError("no duration_s and no audio")
    info = sf.info(io.BytesIO(audio))  # the header is enough; no need to decode
    return info.frames / info.samplerate


def collect(paths: List[str]) -> dict:
    """Counts, histogram and totals over every sample of the shards at `paths`; a bad sample or shard
    is listed under "errors" and the scan goes on."""
    counts, histogram = Counts(), collections.Counter()
    num_samples, total_s, target_s, errors = 0, 0.0, 0.0, []
    for path in paths:
        try:
            for key, members in read_samples(path, _MEMBERS):
                try:
                    meta = json.loads(members["json"].decode("utf-8"))
                    if not isinstance(meta, dict):
                        raise ValueError(f"metadata is a JSON {type(meta).__name__}, expected an object")
                    duration_s = _duration_s(meta, members)
                except (KeyError, ValueError, UnicodeDecodeError, sf.LibsndfileError, RuntimeError) as exc:
                    why = "no .json member" if isinstance(exc, KeyError) else str(exc)
                    errors.append(f"{path}:{key}: {why}")
                    continue
                counts.add(meta, duration_s)
                histogram[duration_bin(duration_s)] += 1
                num_samples += 1
                total_s += duration_s
                target_s += meta.get("target_duration_s", 0) or 0
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:  # ValueError: a member twice in a sample
            errors.append(f"{path}: unreadable shard ({exc})")
    return {"num_shards": len(paths), "num_samples": num_samples, "hours": round(total_s / 3600, 6),
            "target_hours": round(target_s / 3600, 6), "counts": counts.to_json(),
            "duration_histogram": {label: histogram[label] for label in BIN_LABELS}, "errors": errors}


def format_report(stats: dict) -> str:
    lines = [f"{stats['num_samples']} samples, {stats['hours']:.3f} h in {stats['num_shards']} shards"
             + (f" (+{stats['target_hours']:.3f} h target audio)" if stats["target_hours"] else "")]
    for dim in DIMENSIONS:
        values = stats["counts"][dim]
        width = max([len(dim)] + [len(v) for v in values])
        lines.append(f"\n{dim:<{width}}  {'samples':>8}  {'hours':>9}")
        lines += [f"{v:<{width}}  {c['samples']:>8}  {c['hours']:>9.3f}" for v, c in values.items()]
    most = max(stats["duration_histogram"].values(), default=0) or 1
    lines.append(f"\n{'duration (s)':<12}  {'samples':>8}")
    lines += [f"{label:<12}  {n:>8}  {'#' * round(40 * n / most)}".rstrip()
              for label, n in stats["duration_histogram"].items()]
    if stats["errors"]:
        lines.append(f"\n{len(stats['errors'])} unreadable: " + "; ".join(stats["errors"][:5]))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.corpus.stats", description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="dataset folders, index.json, tar files, globs or brace "
                                                   "patterns")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    try:
        paths = local_shard_paths(args.shards, "data.corpus.stats")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = collect(paths)
    print(json.dumps(stats, ensure_ascii=False) if args.json else format_report(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())

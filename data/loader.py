"""The shard loader: datasets mixed by weight -> equal shares per (rank, worker) slot -> decode -> log-mel
-> task template -> batcher -> batches; infinite, exactly resumable, re-splittable to another world size.

Every slot's stream is a pure function of (seed, slot, its state): which positions of an epoch it reads and
in which order comes from data.epochs, so a state is a few counters plus the batcher's held samples, and a
resume re-reads only what the shuffle buffer and the batcher held, decoding only the latter.
"""
from __future__ import annotations

import bisect
import collections
import copy
import gzip
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torchaudio
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from data import epochs, remote
from data.audio import AudioError, decode_audio
from data.audio_tokenizers import audio_tokenizer_hash
from data.batching import BATCHING_MODES, Batcher, pad_mels
from data.features import SAMPLE_RATE, log_mel, num_audio_tokens, split_chunks
from data.shards import INDEX_NAME, MissingIndexError, read_index, shard_paths
from data.tasks import ANSWERS, DEFAULT_TASK, TASKS, RenderOptions, Sample
from data.templates import DEFAULT_ASR_INSTRUCTION, IGNORE_INDEX, TemplateError
from data.tokenize import TOKENIZER_NAME, read_tokenizer_record
from data.tokenizer import SpecialIds, load_tokenizer, special_ids

logger = logging.getLogger(__name__)

_STATE_VERSION = 2
_MAX_SKIPPED_KEYS = 20
_DEFAULT_DATASET = "default"
RENDER_MODES = ("full", "prompt", "pairs")


@dataclass
class DatasetConfig:
    """One dataset of a mixture."""
    name: str = ""
    """Its name in metrics, batches ("datasets") and the loader state; unique within data.datasets."""
    shards: List[str] = field(default_factory=list)
    """Dataset folders holding index.json, tar paths, globs or brace patterns, or URLs, as data.shards."""
    weight: float = 1.0
    """Share of the mixture's samples, relative to the other datasets' weights."""
    task: Optional[str] = None
    """Task of its records whose JSON names none; None = data.task."""


@dataclass
class DataConfig:
    """Where training samples come from and how they are batched.

    Faults while reading: an OSError opening or reading a shard is retried after the waits of
    IO_RETRY_DELAYS_S (0.5, 1, 2, 4 s), going on after the samples already delivered; if it persists, the
    rest of that shard is skipped for the epoch and counted once as "io_error" (the run goes on, as with
    bad input; the metrics and the log name the shard and the error). A corrupt tar keeps its complete
    samples and is counted as "bad_shard" without retries. A damaged index.json is warned about and its
    shards' samples are counted from their tar headers, the same on every rank; an OSError that persists
    while counting stops the loader, since ranks with different counts would get overlapping shares."""
    shards: List[str] = field(default_factory=list)
    """Dataset folders holding index.json, tar paths, globs (`d/*.tar`) or brace patterns (`d/s-{0..9}.tar`);
    the folders and tars may be http(s)://, s3:// or gs:// URLs, or `pipe:CMD` (data.remote), streamed.
    One dataset; leave empty when data.datasets is set."""
    datasets: List[DatasetConfig] = field(default_factory=list)
    """Several datasets mixed by weight; empty = the one dataset data.shards names."""
    tokenizer: str = ""
    """Folder of the extended tokenizer (`python -m data.tokenizer build`)."""
    task: str = DEFAULT_TASK
    """Task of records whose JSON names none in its "task" field (see data.tasks.TASKS)."""
    batching: str = "fixed"
    """fixed (batch_size samples), tokens (batches by a token budget) or packed (samples packed into rows)."""
    batch_size: int = 8
    """Samples per rank per micro-batch with batching=fixed; every batch holds exactly this many."""
    max_tokens: int = 4096
    """Decoder tokens per micro-batch, padding included (batching=tokens or packed)."""
    max_mel_frames: int = 0
    """Cap on the encoder's input frames per micro-batch (chunks x longest chunk); 0 = no cap."""
    max_seq_len: int = 2048
    """Row length with batching=packed; longer samples are skipped and counted as "too_many_tokens"."""
    batch_buffer: int = 64
    """Rendered samples the batcher sorts or packs over (batching=tokens or packed)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = decode in the training process)."""
    min_audio_s: float = 0.0
    """Samples with shorter audio input are skipped and counted as "too_short"."""
    max_audio_s: float = 30.0
    """Samples with longer audio are skipped and counted as "too_long"."""
    shuffle_buffer: int = 500
    """Raw samples each worker holds per dataset to shuffle within an epoch (0 or 1: shard order only)."""
    asr_instruction: str = DEFAULT_ASR_INSTRUCTION
    """Instruction text placed before the audio in ASR samples."""
    audio_tokenizer: Optional[str] = None
    """Audio tokenizer the codes must come from: its hash, or its file (`kmeans:F.pt`, `s3:F.onnx`).
    Every dataset folder's tokenizer.json must then name it; unset, the tokenizers found are only logged."""
    render: str = "full"
    """What a record becomes. full: its task's whole sequence, loss on the answer (training, SFT).
    prompt: the prompt part only (with_answer=False, any task), labels all -100, for generation (GRPO,
    PPO); codes of the answer are not needed, the batch's "meta" holds each record's JSON plus "key" for the
    rewards. pairs: a record of a paired task ("preference") as its chosen and its rejected sequence, one
    sample for shuffling, shares and resume; a batch of B pairs has 2B rows, chosen rows first, with
    "num_pairs" and "meta" (DPO, reward models); other records are skipped as "not_a_pair". prompt and
    pairs need batching=fixed."""


# ---------------------------------------------------------------------------------------------- shards

def resolve_shards(patterns: List[str], key: str = "data.shards") -> List[str]:
    """Tar paths or URLs named by dataset folders, index.json files, tar paths, globs or brace patterns, or
    their URLs (data.shards.shard_paths), in order."""
    if not patterns:
        raise ValueError(f"{key} is empty: expected dataset folders, tar paths or glob patterns")
    paths = shard_paths(list(patterns))
    duplicates = sorted(p for p, n in collections.Counter(paths).items() if n > 1)
    if duplicates:
        # A repeated shard would be trained on twice per epoch and breaks the one-owner split.
        raise ValueError(f"{key} names {duplicates[0]!r} more than once; each shard must appear once")
    return paths


def check_audio_tokenizer(paths: List[str], expected: Optional[str]) -> None:
    """Refuse shards whose folder's tokenizer.json names another audio tokenizer than `expected`."""
    want = audio_tokenizer_hash(expected) if expected else None
    folders = {remote.folder_of(p) for p in paths}
    if None in folders and want is not None:
        logger.warning("pipe: shards have no folder holding a tokenizer.json: data.audio_tokenizer is not "
                       "checked against their audio codes")
    for folder in sorted(f for f in folders if f is not None):
        record = _tokenizer_record(folder)
        if record is None:
            continue  # no codes in this folder: samples that need them are skipped as "missing_codes"
        found = record["hash"]
        if want is None:
            logger.info("dataset folder %s: audio codes made by %s tokenizer %s", folder, record.get("name"), found)
        elif not found.startswith(want):
            raise ValueError(f"dataset folder {folder!r} has audio codes from tokenizer {found} "
                             f"({record.get('name')}), but data.audio_tokenizer names {want}; re-run "
                             "`python -m data.tokenize` on it with that tokenizer")
        elif not record.get("complete", True):
            raise ValueError(f"dataset folder {folder!r}: data.tokenize with tokenizer {found} has not finished "
                             "(tokenizer.json says complete=false); re-run it to tokenize the remaining shards")


def _tokenizer_record(folder: str) -> Optional[Dict[str, Any]]:
    """The folder's tokenizer.json (data.tokenize.read_tokenizer_record), the folder a path or a URL."""
    if not remote.is_url(folder):
        return read_tokenizer_record(folder)
    url = remote.join(folder, TOKENIZER_NAME)
    try:
        record = json.loads(remote.read_bytes(url))
    except FileNotFoundError:
        return None
    except ValueError:  # invalid JSON or UTF-8: refused below, as a local file would be
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
        raise ValueError(f"{url} is not an audio tokenizer record: expected JSON with a 'hash' "
                         "(written by `python -m data.tokenize`)")
    return record


IO_RETRY_DELAYS_S: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
"""Seconds to wait before each re-open of a shard after an OSError while opening or reading it (a file
briefly missing, a network filesystem's hiccup): len() retries, 7.5 s in all. A re-open skips the samples
already delivered, so none comes out twice or is lost. When they are spent, the rest of that shard is
skipped for the epoch and counted once as "io_error" (named like a "bad_shard"), with the path and the
error logged: as with bad input, one shard's fault does not stop the run, and the metrics say it happened.
A corrupt tar (tarfile's errors, EOFError) is not retried: it would fail the same way again. A URL's stream
resumes a dropped connection at the byte reached on its own (data.remote, the same waits), so only a fault
that outlasts those resumes comes here."""


def _open_binary(path: str):
    """The shard opened for reading: a local file, or a URL's or pipe: command's stream (data.remote); the one
    place the loader opens shards (tests inject faults here)."""
    if remote.is_remote(path):
        return remote.open_stream(path, IO_RETRY_DELAYS_S)
    return open(path, "rb")


def _is_transient(error: BaseException) -> bool:
    """Whether a read error may go away on a re-open: an OSError that is not a corrupt gzip stream or a
    file object that cannot do what tarfile asks."""
    return isinstance(error, OSError) and not isinstance(error, (gzip.BadGzipFile, io.UnsupportedOperation))


def _read_shard(path: str) -> Iterator[Dict[str, Any]]:
    """Raw samples of one tar ({"__key__", "flac", "json", ...} bytes), members grouped by key in file order.

    A read error (a tar cut off, corrupt blocks) ends the shard with one marker sample named after the
    key being read; every sample completed before it still comes out. An OSError re-opens the file after
    the waits of IO_RETRY_DELAYS_S and goes on after the samples already delivered; once they are spent,
    the marker's "__reason__" is "io_error" instead of "bad_shard".
    """
    delivered, failures = 0, 0
    reading = None  # the key of the first sample not delivered yet, once seen: what a marker names
    while True:
        key, sample, completed = None, None, 0  # completed: samples finished in this pass of the file
        try:
            with _open_binary(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # one sequential pass
                for info in tar:
                    if not info.isreg() or _META_MEMBER.match(info.name):
                        continue
                    prefix, ext = base_plus_ext(info.name)
                    if prefix is None:
                        continue
                    if prefix != key:
                        if sample is not None:
                            completed += 1
                            if completed > delivered:
                                delivered, failures = delivered + 1, 0  # progress: the retries start afresh
                                yield sample
                        key, sample = prefix, {"__key__": prefix, "__url__": path}
                        if completed >= delivered:
                            reading = prefix
                    if completed >= delivered:  # members of samples delivered before a re-open are not read
                        sample[ext.lower()] = tar.extractfile(info).read()
            if sample is not None and completed >= delivered:
                yield sample
            return
        except Exception as e:  # a truncated or corrupt tar must not stop training
            error = f"{type(e).__name__}: {e}"
            if _is_transient(e) and failures < len(IO_RETRY_DELAYS_S):
                delay_s = IO_RETRY_DELAYS_S[failures]
                failures += 1
                logger.warning("shard %s: %s after %d samples; re-opening it in %.1f s (retry %d of %d)",
                               path, error, delivered, delay_s, failures, len(IO_RETRY_DELAYS_S))
                time.sleep(delay_s)
                continue
            if _is_transient(e):
                reason = "io_error"
                logger.warning("shard %s: %s persists after %d retries; its rest from sample %s on is skipped "
                               "(io_error)", path, error, failures, reading)
            else:
                reason = "bad_shard"
                logger.warning("shard %s is unreadable from sample %s on (%s); its rest is skipped", path, reading,
                               error)
            # The sample being read when it broke may be incomplete: it becomes the marker.
            yield {"__key__": reading or "<unreadable shard>", "__url__": path, "__error__": error,
                   "__reason__": reason}
            return


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar iterator leaves out


def _scan_count(path: str) -> int:
    """Samples in a tar without index.json, from its headers alone, grouped the way _read_shard groups them.

    A corrupt tar counts the samples before the damage, the same on every rank. An OSError is retried as
    _read_shard does; if it persists this raises, because a count that differs between ranks would give
    them overlapping shares of the epoch. A URL or pipe: stream cannot seek past the members' data, so it is
    read whole (a folder's index.json spares that).
    """
    mode = "r|*" if remote.is_remote(path) else "r:*"
    for attempt in range(len(IO_RETRY_DELAYS_S) + 1):
        num_samples, key = 0, None
        try:
            with _open_binary(path) as f, tarfile.open(fileobj=f, mode=mode) as tar:
                for info in tar:
                    if not info.isreg() or _META_MEMBER.match(info.name):
                        continue
                    prefix, _ = base_plus_ext(info.name)
                    if prefix is not None and prefix != key:
                        num_samples, key = num_samples + 1, prefix
            return num_samples
        except (tarfile.TarError, EOFError, OSError) as e:
            if not _is_transient(e):
                logger.warning("shard %s: counting its samples stopped at %d (%s)", path, num_samples, e)
                return num_samples
            if attempt == len(IO_RETRY_DELAYS_S):
                raise OSError(f"shard {path}: counting its samples failed {attempt + 1} times "
                              f"({type(e).__name__}: {e}); every rank needs the same count, so the loader "
                              "cannot start") from e
            logger.warning("shard %s: %s: %s while counting its samples; retrying in %.1f s", path,
                           type(e).__name__, e, IO_RETRY_DELAYS_S[attempt])
            time.sleep(IO_RETRY_DELAYS_S[attempt])
    raise AssertionError("unreachable")


def _index_counts(folder: str) -> Dict[str, int]:
    """Samples per shard name from `folder`'s index.json (a path or a URL); {} without one. A damaged index
    is warned about, naming the file and what is wrong, and its shards are counted from their headers instead."""
    path = remote.join(folder, INDEX_NAME)
    try:
        shards = read_index(folder)["shards"]
    except MissingIndexError:
        return {}  # bare tars: counting them is the normal way
    except ValueError as e:
        # read_index's messages start with the file's path.
        logger.warning("%s; the samples of its folder's shards are counted from their tar headers instead", e)
        return {}
    counts, bad = {}, []
    for s in shards:
        n = s.get("num_samples")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            counts[s["name"]] = n
        else:
            bad.append(f"{s['name']}: num_samples={n!r}")
    if bad:
        logger.warning("%s: %d shard(s) without a valid sample count (%s%s); they are counted from their tar "
                       "headers instead", path, len(bad), "; ".join(bad[:3]), "; ..." if len(bad) > 3 else "")
    return counts


def shard_counts(paths: List[str]) -> List[int]:
    """Samples per shard: from its folder's index.json where that lists it, else one scan of its headers.

    A corrupt index.json (invalid JSON, missing fields, a bad num_samples) is warned about and its shards
    scanned rather than refused: the scan reads the tar itself, so every rank gets the same counts and
    equal shares stay equal. (A dataset folder named as the spec still needs a readable index: it is the
    list of shards, see data.shards.shard_paths.) A pipe: command has no folder: its output is scanned.
    """
    by_folder: Dict[str, Dict[str, int]] = {}
    out = []
    for path in paths:
        folder = remote.folder_of(path)
        if folder is not None and folder not in by_folder:
            by_folder[folder] = _index_counts(folder)
        known = by_folder[folder].get(remote.name_of(path)) if folder is not None else None
        out.append(known if known is not None else _scan_count(path))
    return out


# ---------------------------------------------------------------------------------------------- samples

class _Skip(Exception):
    """A sample that cannot be used; `reason` is the stats key, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# data.audio's reasons -> our stats keys; anything else it rejects is "bad_audio".
_AUDIO_REASONS = {"non-finite samples": "non_finite_audio", "empty audio": "too_short"}


def _parse_meta(raw: Dict[str, Any], max_audio_s: Optional[float]) -> Dict[str, Any]:
    """The record's JSON object, or _Skip with the reason."""
    if "__error__" in raw:
        raise _Skip(raw.get("__reason__", "bad_shard"), raw["__error__"])
    if "json" not in raw:
        raise _Skip("missing_json")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Skip("bad_json") from None
    if not isinstance(meta, dict):
        raise _Skip("bad_json")
    duration_s = meta.get("duration_s")
    # The metadata's duration lets a long sample be dropped before paying for its decode.
    if max_audio_s is not None and isinstance(duration_s, (int, float)) and duration_s > max_audio_s:
        raise _Skip("too_long")
    return meta


def _decode_member(raw: Dict[str, Any], member: str, max_audio_s: Optional[float]) -> torch.Tensor:
    """16 kHz waveform of an audio member ("flac", "target.flac"; a ".wav" of the same name also does)."""
    audio = raw.get(member)
    if audio is None and member.endswith("flac"):
        audio = raw.get(member[:-4] + "wav")
    if audio is None:
        raise _Skip("missing_audio", f"no member {member!r}")
    try:
        wave_T, sample_rate = decode_audio(audio, f"{_sample_name(raw)}.{member}")
    except AudioError as e:
        raise _Skip(_AUDIO_REASONS.get(e.reason.split(" (")[0], "bad_audio")) from None
    except Exception:  # whatever else a decoder throws at odd bytes costs one sample, not the run
        raise _Skip("bad_audio") from None
    if sample_rate != SAMPLE_RATE:
        wave_T = torchaudio.functional.resample(wave_T, sample_rate, SAMPLE_RATE)
    if max_audio_s is not None and len(wave_T) > max_audio_s * SAMPLE_RATE:
        raise _Skip("too_long")
    return wave_T


def _read_codes(raw: Dict[str, Any], member: str) -> np.ndarray:
    """The 1-D integer audio codes in a `.npy` member; missing -> "missing_codes", unreadable -> "bad_codes"."""
    if member not in raw:
        raise _Skip("missing_codes", f"no member {member!r} (run data.tokenize on the shards)")
    try:
        codes = np.load(io.BytesIO(raw[member]), allow_pickle=False)
    except Exception:  # any broken .npy costs one sample
        raise _Skip("bad_codes", f"{member!r} is not a .npy array") from None
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise _Skip("bad_codes", f"{member!r} holds {codes.dtype} {codes.shape}: expected 1-D integers")
    return codes


def _chunk_mels(wave_T: torch.Tensor) -> List[torch.Tensor]:
    """Log-mel [128, F] per 25 s chunk; a tail chunk too short for one audio token is dropped."""
    mels = [log_mel(chunk) for chunk in split_chunks(wave_T)]
    mels = [m for m in mels if num_audio_tokens(m.shape[1]) >= 1]
    if not mels:
        raise _Skip("too_short")
    return mels


def _record(raw: Dict[str, Any], max_audio_s: Optional[float], default_task: str,
            force_task: Optional[str]) -> Tuple[Dict[str, Any], str, Any]:
    """(the record's JSON, its task name, the Task), or _Skip with the reason."""
    meta = _parse_meta(raw, max_audio_s)
    name = force_task or meta.get("task", default_task)
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise _Skip("unknown_task", f"task {name!r} is not one of {sorted(TASKS)}")
    return meta, name, task


def _members(members, meta: Dict[str, Any]) -> List[str]:
    try:
        return members(meta)
    except TemplateError as e:
        raise _Skip(e.reason, str(e)) from None


def _inputs(raw: Dict[str, Any], meta: Dict[str, Any], task, code_members: List[str],
            max_audio_s: Optional[float], min_audio_s: float) -> Tuple[Sample, Dict[str, List[torch.Tensor]], float]:
    """(the Sample a template renders, {audio member: log-mel per chunk}, seconds of audio decoded): the
    codes members named and every audio member the task reads; _Skip with the reason if one is unusable."""
    sample = Sample(raw["__key__"], meta)
    audio_members = _members(task.audio, meta)
    duration_s = meta.get("duration_s")
    if audio_members and isinstance(duration_s, (int, float)) and duration_s < min_audio_s:
        raise _Skip("too_short")  # by the metadata, before paying for the decode
    # Codes first: a record waiting for data.tokenize is skipped without decoding its audio.
    sample.codes = {m: _read_codes(raw, m) for m in code_members}
    waves = {m: _decode_member(raw, m, max_audio_s) for m in audio_members}
    num_audio_s = sum(len(wave_T) for wave_T in waves.values()) / SAMPLE_RATE
    if audio_members and num_audio_s < min_audio_s:
        raise _Skip("too_short")
    mels = {m: _chunk_mels(wave_T) for m, wave_T in waves.items()}
    sample.mel_frames = {m: [x.shape[1] for x in chunks] for m, chunks in mels.items()}
    return sample, mels, num_audio_s


def _render_task(task, sample: Sample, tok, ids: SpecialIds, options: RenderOptions):
    try:
        return task.render(sample, tok, ids, options)
    except TemplateError as e:
        raise _Skip(e.reason, str(e)) from None


def render_raw(raw: Dict[str, Any], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
               max_audio_s: Optional[float] = None, with_answer: bool = True, default_task: str = DEFAULT_TASK,
               force_task: Optional[str] = None, min_audio_s: float = 0.0, answer: str = "chosen",
               keep_meta: bool = False) -> Dict[str, Any]:
    """Render a raw sample with its record's task (or `force_task`); _Skip with the reason if it cannot.

    Returns {key, task, text, mels: [128, F] per chunk, num_audio_s, input_ids, labels}, plus "meta" (the
    record's JSON and its "key") with `keep_meta`. with_answer=False renders the prompt: labels all -100,
    and of the codes only those the prompt reads (Task.prompt_codes) are needed. `answer` picks a paired
    task's answer (RenderOptions.answer).
    """
    meta, name, task = _record(raw, max_audio_s, default_task, force_task)
    code_members = _members(task.codes if with_answer else task.prompt_codes, meta)
    sample, mels, num_audio_s = _inputs(raw, meta, task, code_members, max_audio_s, min_audio_s)
    rendered = _render_task(task, sample, tok, ids, RenderOptions(instruction, with_answer, answer))
    # A prompt carries no loss, whatever a template labels.
    labels = rendered.labels if with_answer else [IGNORE_INDEX] * len(rendered.input_ids)
    out = {"key": raw["__key__"], "task": name, "text": meta.get("text", ""),
           "mels": [m for member in rendered.audio for m in mels[member]], "num_audio_s": num_audio_s,
           "input_ids": rendered.input_ids, "labels": labels}
    if keep_meta:
        out["meta"] = {**meta, "key": raw["__key__"]}
    return out


def render_pair(raw: Dict[str, Any], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
                max_audio_s: Optional[float] = None, default_task: str = DEFAULT_TASK,
                force_task: Optional[str] = None, min_audio_s: float = 0.0) -> Dict[str, Any]:
    """A record of a paired task rendered with its chosen and with its rejected answer, as one sample:
    {key, task, text, meta (the record's JSON and "key"), pair: [chosen, rejected]}, each of the two
    {key, input_ids, labels, mels, num_audio_s} like render_raw's dict (the prompt's audio is decoded once
    and heard by both). _Skip("not_a_pair") for a record whose task is not paired or that lacks an answer.
    """
    meta, name, task = _record(raw, max_audio_s, default_task, force_task)
    if not task.paired:
        raise _Skip("not_a_pair", f"task {name!r} renders one answer, not a chosen and a rejected one")
    code_members = _members(task.codes, meta)
    sample, mels, num_audio_s = _inputs(raw, meta, task, code_members, max_audio_s, min_audio_s)
    rows = []
    for answer in ANSWERS:
        rendered = _render_task(task, sample, tok, ids, RenderOptions(instruction, True, answer))
        rows.append({"key": raw["__key__"], "input_ids": rendered.input_ids, "labels": rendered.labels,
                     "mels": [m for member in rendered.audio for m in mels[member]], "num_audio_s": num_audio_s})
    return {"key": raw["__key__"], "task": name, "text": meta.get("text", ""),
            "meta": {**meta, "key": raw["__key__"]}, "pair": rows}


def _sample_name(raw: Dict[str, Any]) -> str:
    return f"{os.path.basename(raw['__url__'])}:{raw['__key__']}"


# ---------------------------------------------------------------------------------------------- reading

@dataclass
class _Dataset:
    """A resolved dataset: its shards in config order with their sample counts."""
    name: str
    index: int
    paths: List[str]
    counts: List[int]
    weight: float
    task: str

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        # By file name, not location: a run may resume with its shards moved to object storage.
        listing = "\n".join(f"{remote.name_of(p)}:{n}" for p, n in zip(self.paths, self.counts, strict=True))
        return hashlib.sha1(listing.encode()).hexdigest()


_MISSING = {"__missing__": True}  # a position past a shard's breaking point, already counted once


class _EpochReader:
    """Raw samples at ascending positions of one dataset epoch, reading only the shards that hold them.

    Positions a broken shard cannot deliver come back as a marker ("bad_shard", or "io_error" when an
    OSError outlasted the retries) once per shard and plan (at the plan's first position past the break,
    whoever reads it, so a resume counts it the same way) and as _MISSING otherwise.
    """

    def __init__(self, ds: _Dataset, epoch: int, seed: int, plan: epochs.Ranges, needed: Iterator[int]):
        order = epochs.shard_order(len(ds.paths), seed, ds.index, epoch)
        self.paths = [ds.paths[i] for i in order]
        self.starts = [0, *itertools.accumulate(ds.counts[i] for i in order)][:-1]
        self.plan, self.needed = plan, needed
        self.shard, self.raws, self.local, self.broken = -1, None, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[int, Dict[str, Any]]:
        position = next(self.needed)
        shard = bisect.bisect_right(self.starts, position) - 1
        if shard != self.shard:
            if self.raws is not None:
                self.raws.close()  # closes the tar now, not when the generator is collected
            self.shard, self.raws, self.local, self.broken = shard, _read_shard(self.paths[shard]), 0, None
        local = position - self.starts[shard]
        assert local >= self.local, "positions must come in ascending order"
        while self.broken is None:
            raw = next(self.raws, None)
            if raw is None:
                self.broken = (self.local, "the tar holds fewer samples than its index.json says",
                               "<missing samples>", "bad_shard")
            elif "__error__" in raw:
                self.broken = (self.local, raw["__error__"], raw["__key__"], raw.get("__reason__", "bad_shard"))
            else:
                self.local += 1
                if self.local - 1 == local:
                    return position, raw
        if position == epochs.first_at_or_after(self.plan, self.starts[shard] + self.broken[0]):
            return position, {"__key__": self.broken[2], "__url__": self.paths[shard],
                              "__error__": self.broken[1], "__reason__": self.broken[3]}
        return position, _MISSING


def _fetch(ds: _Dataset, epoch: int, seed: int, positions: List[int]) -> Dict[int, Dict[str, Any]]:
    """The raw samples at `positions` of one dataset epoch."""
    plan = epochs.merge([(p, p + 1) for p in set(positions)])
    return dict(_EpochReader(ds, epoch, seed, plan, epochs.iter_positions(plan)))


class _DatasetStream:
    """One dataset's raw samples for one slot, epoch after epoch, in buffer-shuffled order; `state` says where."""

    def __init__(self, ds: _Dataset, seed: int, slot: int, num_slots: int, generation: int, state: Dict,
                 buffer: int, where: str):
        self.ds, self.seed, self.slot, self.num_slots, self.generation = ds, seed, slot, num_slots, generation
        self.state, self.buffer, self.where = copy.deepcopy(state), buffer, where
        self.epoch_skips: collections.Counter = collections.Counter()
        self._open()

    def _open(self) -> None:
        st = self.state
        self.plan = epochs.plan_of(st, self.ds.num_samples, self.num_slots, self.slot)
        key = epochs.shuffle_key(self.seed, self.ds.name, st["epoch"], self.slot, self.generation)
        self.shuffle = epochs.BufferShuffle(self.plan, st["buffer"], key, st["consumed"])
        # What the buffer held at the resume point is read again, then the plan goes on where reading stood.
        needed = itertools.chain(self.shuffle.held(), epochs.iter_positions(self.plan, self.shuffle.num_read))
        self.reader = _EpochReader(self.ds, st["epoch"], self.seed, self.plan, needed)
        self.store: Dict[int, Dict[str, Any]] = {}

    def next_raw(self) -> Tuple[tuple, Dict[str, Any]]:
        """(uid, raw sample): uid = (dataset name, epoch, position) names the sample across resumes."""
        position = self.shuffle.next()
        while position is None:
            self._next_epoch()
            position = self.shuffle.next()
        self.state["consumed"] += 1
        while position not in self.store:
            read_at, raw = next(self.reader)
            self.store[read_at] = raw
        return (self.ds.name, self.state["epoch"], position), self.store.pop(position)

    def _next_epoch(self) -> None:
        st = self.state
        if st["plan"] is None and st["usable"] == 0:
            raise ValueError(
                f"{self.where} got no usable sample in epoch {st['epoch']} of dataset {self.ds.name!r} "
                f"({st['consumed']} raw samples, skipped: {dict(self.epoch_skips)}); the dataset holds too few "
                f"samples ({self.ds.num_samples}) for {self.num_slots} (rank, worker) slots, or all of them fail")
        if st["queue"]:
            epoch, plan = st["queue"][0]
            self.state = {**epochs.new_stream_state(self.buffer, epoch), "plan": plan, "queue": st["queue"][1:]}
        else:
            self.state = epochs.new_stream_state(self.buffer, st["epoch"] + 1)
        self.epoch_skips.clear()
        self._open()

    def snapshot(self) -> Dict:
        return {**self.state, "queue": list(self.state["queue"])}


# ---------------------------------------------------------------------------------------------- slots

def _uid(value) -> tuple:
    """A uid back from JSON (lists) to the tuple the batcher saw."""
    name, epoch, position = value
    return (name, int(epoch), int(position))


def _new_slot_state(datasets: List[_Dataset], buffer: int) -> Dict[str, Any]:
    """A slot at the very start: every dataset at epoch 0, nothing held."""
    return {"datasets": {ds.name: epochs.new_stream_state(buffer) for ds in datasets}, "mix": {}, "adds": 0,
            "pending": [], "redo": None, "emitted": 0}


class _SlotStream:
    """The batches of one (rank, worker) slot: mixture -> dataset streams -> render -> batcher."""

    def __init__(self, cfg: DataConfig, datasets: List[_Dataset], rank: int, worker: int, num_workers: int,
                 world_size: int, seed: int, generation: int, state: Dict[str, Any]):
        self.cfg, self.datasets, self.seed, self.generation = cfg, {ds.name: ds for ds in datasets}, seed, generation
        self.slot, self.num_slots = rank * num_workers + worker, world_size * num_workers
        self.where = f"rank {rank} worker {worker}"
        self.state = state

    def _render(self, raw: Dict[str, Any], ds: _Dataset) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg.render == "pairs":
            return render_pair(raw, self.tok, self.ids, cfg.asr_instruction, cfg.max_audio_s, default_task=ds.task,
                               min_audio_s=cfg.min_audio_s)
        prompt = cfg.render == "prompt"
        return render_raw(raw, self.tok, self.ids, cfg.asr_instruction, cfg.max_audio_s, with_answer=not prompt,
                          default_task=ds.task, min_audio_s=cfg.min_audio_s, keep_meta=prompt)

    def batches(self) -> Iterator[Dict[str, Any]]:
        cfg, state = self.cfg, self.state
        self.tok = load_tokenizer(cfg.tokenizer)
        self.ids = special_ids(self.tok)
        self.batcher = Batcher(cfg.batching, self.ids.end_of_text, cfg.batch_size, cfg.max_tokens,
                               cfg.max_mel_frames, cfg.max_seq_len, cfg.batch_buffer)
        self.streams = {name: _DatasetStream(ds, self.seed, self.slot, self.num_slots, self.generation,
                                             state["datasets"][name], cfg.shuffle_buffer, self.where)
                        for name, ds in self.datasets.items()}
        self.mixture = epochs.Mixture({name: ds.weight for name, ds in self.datasets.items()},
                                      epochs.mixture_key(self.seed, self.slot, self.generation), state["mix"])
        self.adds = state["adds"]
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_keys: List[str] = []
        yield from self._replay()
        while True:
            name = self.mixture.peek()
            stream = self.streams[name]
            uid, raw = stream.next_raw()
            if raw is _MISSING:
                continue
            try:
                sample = self._render(raw, stream.ds)
                reason = self.batcher.reject_reason(sample)
                if reason is not None:
                    raise _Skip(reason)
            except _Skip as s:
                self.skipped[s.reason] += 1
                stream.epoch_skips[s.reason] += 1
                self.skipped_keys = (self.skipped_keys + [f"{_sample_name(raw)} ({s.reason})"])[-_MAX_SKIPPED_KEYS:]
                continue
            stream.state["usable"] += 1
            self.mixture.advance(name)
            yield from self._add(sample, uid)

    def _add(self, sample: Dict[str, Any], uid: tuple, emitted: int = 0) -> Iterator[Dict[str, Any]]:
        sample["uid"] = uid
        arrival = self.adds
        before = [[list(u), self._arrival[u]] for u in self.batcher.pending_uids()]
        self._arrival[uid] = arrival
        self.adds += 1
        out = self.batcher.add(sample)
        if out:
            self._arrival = {u: self._arrival[u] for u in self.batcher.pending_uids()}
        after = [[list(u), self._arrival[u]] for u in self.batcher.pending_uids()]
        for j in range(emitted, len(out)):
            batch = out[j]
            if j == len(out) - 1:
                resume = {"adds": self.adds, "pending": after, "redo": None, "emitted": 0}
            else:  # more batches of this same add follow: a resume re-does the add and drops the first j + 1
                held = [u for later in out[j + 1:] for u in later["uids"]]
                resume = {"adds": arrival, "pending": before, "redo": [list(uid), arrival], "emitted": j + 1,
                          "held": [list(u) for u in held] + [u for u, _ in after]}
            batch["datasets"] = [u[0] for u in batch["uids"]]
            batch["epochs"] = [u[1] for u in batch["uids"]]
            batch["_state"] = {"datasets": {n: s.snapshot() for n, s in self.streams.items()},
                               "mix": dict(self.mixture.counts), **resume}
            batch["_skipped"] = (dict(self.skipped), self.skipped_keys)
            self.skipped, self.skipped_keys = collections.Counter(), []
            yield batch

    def _replay(self) -> Iterator[Dict[str, Any]]:
        """Rebuild what the batcher held at the state (decoding only those samples), and finish a cut add."""
        state = self.state
        self._arrival: Dict[tuple, int] = {}
        wanted = [(_uid(u), a) for u, a in state["pending"]]
        redo = (_uid(state["redo"][0]), state["redo"][1]) if state["redo"] else None
        by_epoch: Dict[tuple, List[int]] = collections.defaultdict(list)
        for (name, epoch, position), _ in wanted + ([redo] if redo else []):
            by_epoch[name, epoch].append(position)
        raws = {(name, epoch, p): raw for (name, epoch), positions in by_epoch.items()
                for p, raw in _fetch(self.datasets[name], epoch, self.seed, positions).items()}
        samples = {}
        for uid, raw in raws.items():
            try:
                samples[uid] = self._render(raw, self.datasets[uid[0]])
            except _Skip as s:
                raise ValueError(f"sample {_sample_name(raw)} was held by the batcher at the checkpoint and "
                                 f"now fails ({s}); the shards changed since the checkpoint") from None
            samples[uid]["uid"] = uid
        self.batcher.restore([(samples[u], a) for u, a in wanted], state["adds"])
        self._arrival = {u: a for u, a in wanted}
        if redo:
            yield from self._add(samples[redo[0]], redo[0], emitted=state["emitted"])


class _WorkerStreams(IterableDataset):
    """In each DataLoader worker (or in the training process): that worker's slot stream."""

    def __init__(self, cfg: DataConfig, datasets: List[_Dataset], rank: int, world_size: int, seed: int,
                 generation: int, worker_states: List[Dict[str, Any]]):
        self.cfg, self.datasets, self.rank, self.world_size, self.seed = cfg, datasets, rank, world_size, seed
        self.generation, self.worker_states = generation, worker_states

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        stream = _SlotStream(self.cfg, self.datasets, self.rank, worker, len(self.worker_states), self.world_size,
                             self.seed, self.generation, self.worker_states[worker])
        for batch in stream.batches():
            batch["_worker"] = worker
            yield batch


# ---------------------------------------------------------------------------------------------- loader

class ShardLoader:
    """Infinite iterator of batches for one rank, with `state_dict` / `load_state_dict` for resuming.

    A batch is the Batcher's dict (input_ids, labels, attention_mask, position_ids, segment_ids when packed,
    mels, mel_lengths, keys, uids, num_samples, num_tokens, num_audio_s) plus, per sample, the dataset
    ("datasets") and that dataset's epoch ("epochs") it came from. With data.render=prompt it adds "meta"
    (each row's record JSON plus "key"); with data.render=pairs its 2B rows are B chosen then B rejected
    sequences, and keys, uids, datasets, epochs, meta and num_samples count the B pairs ("num_pairs").
    """

    def __init__(self, cfg: DataConfig, datasets: List[_Dataset], rank: int, world_size: int, seed: int):
        self.cfg, self.datasets, self.rank, self.world_size, self.seed = cfg, datasets, rank, world_size, seed
        self._num_streams = max(cfg.num_workers, 1)
        self._worker_states = [_new_slot_state(datasets, cfg.shuffle_buffer) for _ in range(self._num_streams)]
        self._generation = 0
        self._batches = 0
        self._skipped: collections.Counter = collections.Counter()
        self._skipped_keys: List[str] = []
        self._iterator = None
        self._waiting: Dict[int, collections.deque] = {}

    @property
    def shards(self) -> List[str]:
        return [p for ds in self.datasets for p in ds.paths]

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._iterator is None:
            streams = _WorkerStreams(self.cfg, self.datasets, self.rank, self.world_size, self.seed,
                                     self._generation, copy.deepcopy(self._worker_states))
            # The workers' base seed from a generator of our own: the same for a resumed run as for an
            # uninterrupted one, and no draw from the training process's global stream.
            seeds = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 1009 + self._generation)
            self._iterator = iter(DataLoader(streams, batch_size=None, num_workers=self.cfg.num_workers,
                                             generator=seeds))
            self._waiting = {w: collections.deque() for w in range(self._num_streams)}
        # Batches go round-robin over workers; after a restart the DataLoader begins again at worker 0,
        # so hold batches until the worker an uninterrupted run would read next has delivered.
        want = self._batches % self._num_streams
        while not self._waiting[want]:
            batch = next(self._iterator)
            self._waiting[batch.pop("_worker")].append(batch)
        batch = self._waiting[want].popleft()
        self._worker_states[want] = batch.pop("_state")
        reasons, keys = batch.pop("_skipped")
        self._batches += 1
        self._skipped.update(reasons)
        self._skipped_keys = (self._skipped_keys + keys)[-_MAX_SKIPPED_KEYS:]
        return batch

    def stats(self) -> Dict[str, Any]:
        """Samples skipped so far in the batches consumed: {"skipped": {reason: n}, "skipped_keys": the last
        skipped samples as "SHARD:KEY (reason)", oldest first}."""
        return {"skipped": dict(self._skipped), "skipped_keys": list(self._skipped_keys)}

    def state_dict(self) -> Dict[str, Any]:
        """Where this rank's streams stand after the last batch returned (JSON-able plain types)."""
        return {"version": _STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers, "seed": self.seed,
                "datasets": [[ds.name, ds.fingerprint()] for ds in self.datasets],
                "generation": self._generation, "batches": self._batches,
                "workers": copy.deepcopy(self._worker_states),
                "skipped": dict(self._skipped), "skipped_keys": list(self._skipped_keys)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from saved loader state; the next batch restarts the workers.

        `state` is one rank's state_dict() or {"ranks": [every rank's state_dict()]} (what a checkpoint
        gathers). Same world_size and num_workers: this rank continues exactly where it stood (its batches
        equal an uninterrupted run's). Otherwise every rank's state is needed: what each dataset's started
        epochs have left, unread or held by a batcher, is split evenly among the new (rank, worker) slots,
        so no sample of those epochs is lost or seen twice; later epochs split normally.
        """
        ranks = state["ranks"] if isinstance(state, dict) and "ranks" in state else [state]
        if not ranks or not all(isinstance(r, dict) for r in ranks):
            raise ValueError(f"loader state: expected a state_dict() or {{'ranks': [...]}}, got {state!r:.200}")
        for r in ranks:
            self._check_compatible(r)
        old_world, old_workers = ranks[0]["world_size"], ranks[0]["num_workers"]
        if old_world == self.world_size and max(old_workers, 1) == self._num_streams:
            mine = [r for r in ranks if r["rank"] == self.rank]
            if not mine:
                raise ValueError(f"loader state holds ranks {sorted(r['rank'] for r in ranks)}, "
                                 f"not this rank {self.rank}")
            self._restore(mine[0])
        else:
            found = sorted(r["rank"] for r in ranks)
            if found != list(range(old_world)) or any(r["num_workers"] != old_workers for r in ranks):
                raise ValueError(f"loader state was saved with world_size={old_world}, num_workers={old_workers} "
                                 f"and this run has world_size={self.world_size}, num_workers={self.cfg.num_workers}: "
                                 f"re-splitting needs every old rank's state ({{'ranks': [...]}}), got ranks {found}")
            self._resplit(ranks, old_world, max(old_workers, 1))
        self._iterator = None

    def _check_compatible(self, state: Dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}: expected {_STATE_VERSION} "
                             "(a state from an older loader cannot be resumed; start the data stream afresh)")
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run has seed {self.seed}; "
                             "resuming needs the same seed")
        saved = [tuple(d) for d in state["datasets"]]
        mine = [(ds.name, ds.fingerprint()) for ds in self.datasets]
        if saved != mine:
            names = [n for n, _ in saved]
            differs = next((n for n, fp in mine if (n, fp) not in saved), names[0] if names else "?")
            raise ValueError(f"loader state was saved with other datasets or shards (dataset {differs!r} differs; "
                             f"saved {names}, now {[n for n, _ in mine]}); resuming needs the same datasets, "
                             "shard lists and index counts")

    def _restore(self, state: Dict[str, Any]) -> None:
        self._worker_states = copy.deepcopy(state["workers"])
        self._generation, self._batches = state["generation"], state["batches"]
        self._skipped = collections.Counter(state["skipped"])
        self._skipped_keys = list(state["skipped_keys"])

    def _resplit(self, ranks: List[Dict[str, Any]], old_world: int, old_workers: int) -> None:
        ranks = sorted(ranks, key=lambda r: r["rank"])
        old_slots = [(r["rank"] * old_workers + w, ws) for r in ranks for w, ws in enumerate(r["workers"])]
        generation = max(r["generation"] for r in ranks)
        new_states = [_new_slot_state(self.datasets, self.cfg.shuffle_buffer) for _ in range(self._num_streams)]
        for ds in self.datasets:
            held = []
            for _, ws in old_slots:
                unseen = ws["held"] if ws.get("redo") else [u for u, _ in ws["pending"]]
                held += [(int(e), int(p)) for name, e, p in unseen if name == ds.name]
            per_slot = epochs.resplit(ds.name, [(slot, ws["datasets"][ds.name]) for slot, ws in old_slots], held,
                                      ds.num_samples, old_world * old_workers, self.world_size * self._num_streams,
                                      self.seed, generation, self.cfg.shuffle_buffer)
            for w in range(self._num_streams):
                new_states[w]["datasets"][ds.name] = per_slot[self.rank * self._num_streams + w]
        self._worker_states, self._generation, self._batches = new_states, generation + 1, 0
        # Skip counts so far stay in the run's totals, on rank 0.
        self._skipped = collections.Counter()
        self._skipped_keys = []
        if self.rank == 0:
            for r in ranks:
                self._skipped.update(r["skipped"])
                self._skipped_keys = (self._skipped_keys + r["skipped_keys"])[-_MAX_SKIPPED_KEYS:]


def _dataset_specs(cfg: DataConfig) -> List[Tuple[str, str, List[str], float, str]]:
    """(config key, name, shard patterns, weight, default task) of every dataset, checked."""
    if cfg.datasets and cfg.shards:
        raise ValueError("data.datasets and data.shards are both set: name the shards in data.datasets[*].shards "
                         "(a mixture) or in data.shards (one dataset), not both")
    if not cfg.datasets:
        return [("data.shards", _DEFAULT_DATASET, list(cfg.shards), 1.0, cfg.task)]
    specs, names = [], set()
    for i, d in enumerate(cfg.datasets):
        key = f"data.datasets[{i}]"
        if not isinstance(d.name, str) or not d.name or d.name in names:
            raise ValueError(f"{key}.name={d.name!r}: expected a non-empty name unique within data.datasets")
        names.add(d.name)
        if not (isinstance(d.weight, (int, float)) and d.weight > 0 and math.isfinite(d.weight)):
            raise ValueError(f"{key}.weight={d.weight!r} (dataset {d.name!r}): expected a positive number")
        if d.task is not None and d.task not in TASKS:
            raise ValueError(f"{key}.task={d.task!r} (dataset {d.name!r}): expected one of {sorted(TASKS)}")
        specs.append((f"{key}.shards", d.name, list(d.shards), float(d.weight), d.task or cfg.task))
    return specs


def _check_config(cfg: DataConfig, rank: int, world_size: int) -> None:
    if cfg.task not in TASKS:
        raise ValueError(f"data.task={cfg.task!r}: expected one of {sorted(TASKS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}: expected 0 <= rank < world_size")
    if cfg.batching not in BATCHING_MODES:
        raise ValueError(f"data.batching={cfg.batching!r}: expected one of {list(BATCHING_MODES)}")
    if cfg.render not in RENDER_MODES:
        raise ValueError(f"data.render={cfg.render!r}: expected one of {list(RENDER_MODES)}")
    if cfg.render != "full" and cfg.batching != "fixed":
        # A pair's two rows must stay in one batch and a prompt batch maps row i to meta[i]: no packing.
        raise ValueError(f"data.render={cfg.render!r} needs data.batching='fixed', got data.batching="
                         f"{cfg.batching!r}")
    for key, low in (("batch_size", 1), ("num_workers", 0), ("shuffle_buffer", 0), ("max_tokens", 1),
                     ("max_mel_frames", 0), ("max_seq_len", 1), ("batch_buffer", 1)):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"data.{key}={value!r}: expected an integer >= {low}")
    if cfg.batching == "packed" and cfg.max_seq_len > cfg.max_tokens:
        raise ValueError(f"data.max_seq_len={cfg.max_seq_len} is larger than data.max_tokens={cfg.max_tokens}: "
                         "a packed batch holds max_tokens // max_seq_len rows, so expected max_seq_len <= max_tokens")
    if not (cfg.max_audio_s > 0 and math.isfinite(cfg.max_audio_s)):
        raise ValueError(f"data.max_audio_s={cfg.max_audio_s}: expected a positive number of seconds")
    if not (0 <= cfg.min_audio_s < cfg.max_audio_s):
        raise ValueError(f"data.min_audio_s={cfg.min_audio_s}: expected seconds >= 0 and below "
                         f"data.max_audio_s={cfg.max_audio_s}")


def build_loader(cfg: DataConfig, rank: int, world_size: int, seed: int) -> ShardLoader:
    """The loader of `rank` out of `world_size`; `seed` must be the same on every rank."""
    _check_config(cfg, rank, world_size)
    specs = _dataset_specs(cfg)
    special_ids(load_tokenizer(cfg.tokenizer))  # fail here, not inside a worker
    num_slots = world_size * max(cfg.num_workers, 1)
    datasets, owner = [], {}
    for index, (key, name, patterns, weight, task) in enumerate(specs):
        paths = resolve_shards(patterns, key)
        for path in paths:
            if path in owner:
                raise ValueError(f"{key} names {path!r}, which dataset {owner[path]!r} also names; "
                                 "a shard may belong to one dataset only (use weights to sample one more often)")
            owner[path] = name
        ds = _Dataset(name, index, paths, shard_counts(paths), weight, task)
        if ds.num_samples < num_slots:
            raise ValueError(f"dataset {name!r} ({key}) holds {ds.num_samples} samples, fewer than the "
                             f"{num_slots} (rank, worker) slots of world_size={world_size} x "
                             f"num_workers={max(cfg.num_workers, 1)}: each slot needs at least one sample per epoch")
        datasets.append(ds)
    check_audio_tokenizer([p for ds in datasets for p in ds.paths], cfg.audio_tokenizer)
    return ShardLoader(cfg, datasets, rank, world_size, seed)


def iter_rendered(shards: List[str], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
                  with_answer: bool = True) -> Iterator[Dict[str, Any]]:
    """Every usable sample of `shards` rendered (render_raw's dict), in file order, in this process; no
    duration limit applies, and samples that cannot be used are skipped with a warning naming them."""
    for path in resolve_shards(shards):
        for raw in _read_shard(path):
            try:
                yield render_raw(raw, tok, ids, instruction, max_audio_s=None, with_answer=with_answer)
            except _Skip as s:
                logger.warning("evaluation skips %s: %s", _sample_name(raw), s.reason)


def iter_eval_samples(shards: List[str], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
                      max_samples: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """ASR evaluation samples in file order: {key, text, prompt_ids, mels [N,128,F], mel_lengths [N]}.

    Samples without audio input (e.g. TTS records: nothing to transcribe) are skipped with a warning.
    """
    produced = 0
    if max_samples is not None and max_samples <= 0:
        return
    for sample in iter_rendered(shards, tok, ids, instruction, with_answer=False):
        if not sample["mels"]:
            logger.warning("evaluation skips %s: task %s has no audio input", sample["key"], sample["task"])
            continue
        mels, mel_lengths = pad_mels(sample["mels"])
        produced += 1
        yield {"key": sample["key"], "text": sample["text"], "prompt_ids": sample["input_ids"],
               "mels": mels, "mel_lengths": mel_lengths}
        if max_samples is not None and produced >= max_samples:
            return  # before reading the next sample: it would be decoded for nothing

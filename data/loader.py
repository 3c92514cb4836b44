"""The shard loader: shard lists -> rank/worker split -> decode -> log-mel -> template -> batches.

Infinite and exactly resumable: each worker's stream is a pure function of (seed, epoch, rank, worker),
so a position in it is a count of raw samples, and skipping that many reproduces what follows.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torchaudio
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data.audio import AudioError, decode_audio
from data.audio_tokenizers import audio_tokenizer_hash
from data.features import N_MELS, SAMPLE_RATE, log_mel, num_audio_tokens, split_chunks
from data.shards import shard_paths
from data.tasks import DEFAULT_TASK, TASKS, RenderOptions, Sample
from data.templates import DEFAULT_ASR_INSTRUCTION, IGNORE_INDEX, TemplateError
from data.tokenize import read_tokenizer_record
from data.tokenizer import SpecialIds, load_tokenizer, special_ids

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
_MAX_SKIPPED_KEYS = 20


@dataclass
class DataConfig:
    """Where training samples come from and how they are batched."""
    shards: List[str] = field(default_factory=list)
    """Dataset folders holding index.json, tar paths, globs (`d/*.tar`) or brace patterns (`d/s-{0..9}.tar`)."""
    tokenizer: str = ""
    """Folder of the extended tokenizer (`python -m data.tokenizer build`)."""
    task: str = DEFAULT_TASK
    """Task of records whose JSON names none in its "task" field (see data.tasks.TASKS)."""
    batch_size: int = 8
    """Samples per rank per micro-batch; every batch holds exactly this many."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = decode in the training process)."""
    max_audio_s: float = 30.0
    """Samples with longer audio are skipped and counted as "too_long"."""
    shuffle_buffer: int = 500
    """Raw samples each worker holds to shuffle within an epoch (0 or 1: shard order only)."""
    asr_instruction: str = DEFAULT_ASR_INSTRUCTION
    """Instruction text placed before the audio in ASR samples."""
    audio_tokenizer: Optional[str] = None
    """Audio tokenizer the codes must come from: its hash, or its file (`kmeans:F.pt`, `s3:F.onnx`).
    Every dataset folder's tokenizer.json must then name it; unset, the tokenizers found are only logged."""


# ---------------------------------------------------------------------------------------------- shards

def resolve_shards(patterns: List[str]) -> List[str]:
    """Tar paths named by dataset folders, index.json files, tar paths, globs or brace patterns, in order."""
    if not patterns:
        raise ValueError("data.shards is empty: expected dataset folders, tar paths or glob patterns")
    paths = shard_paths(list(patterns))
    duplicates = sorted(p for p, n in collections.Counter(paths).items() if n > 1)
    if duplicates:
        # A repeated shard would be trained on twice per epoch and breaks the one-owner split.
        raise ValueError(f"data.shards names {duplicates[0]!r} more than once; each shard must appear once")
    return paths


def check_audio_tokenizer(paths: List[str], expected: Optional[str]) -> None:
    """Refuse shards whose folder's tokenizer.json names another audio tokenizer than `expected`."""
    want = audio_tokenizer_hash(expected) if expected else None
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        record = read_tokenizer_record(folder)
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


def _read_shard(path: str) -> Iterator[Dict[str, Any]]:
    """Raw samples of one tar ({"__key__", "flac", "json", ...} bytes); a read error ends it with a marker."""
    try:
        with open(path, "rb") as f:
            members = ({**m, "__url__": path} for m in tar_file_iterator(f))
            yield from group_by_keys(members)
    except Exception as e:  # a truncated or corrupt tar must not stop training
        logger.warning("shard %s is unreadable from some point on (%s: %s); its rest is skipped",
                       path, type(e).__name__, e)
        yield {"__key__": "<unreadable rest of shard>", "__url__": path, "__error__": f"{type(e).__name__}: {e}"}


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
        raise _Skip("bad_shard")
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


def _render(raw: Dict[str, Any], tok, ids: SpecialIds, instruction: str, max_audio_s: Optional[float],
            with_answer: bool = True, default_task: str = DEFAULT_TASK,
            force_task: Optional[str] = None) -> Dict[str, Any]:
    """Render a raw sample with its record's task (or `force_task`); _Skip with the reason if it cannot."""
    meta = _parse_meta(raw, max_audio_s)
    name = force_task or meta.get("task", default_task)
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise _Skip("unknown_task", f"task {name!r} is not one of {sorted(TASKS)}")
    sample = Sample(raw["__key__"], meta)
    try:
        code_members, audio_members = task.codes(meta), task.audio(meta)
    except TemplateError as e:
        raise _Skip(e.reason, str(e)) from None
    # Codes first: a record waiting for data.tokenize is skipped without decoding its audio.
    sample.codes = {m: _read_codes(raw, m) for m in code_members}
    waves = {m: _decode_member(raw, m, max_audio_s) for m in audio_members}
    mels = {m: _chunk_mels(wave_T) for m, wave_T in waves.items()}
    sample.mel_frames = {m: [x.shape[1] for x in chunks] for m, chunks in mels.items()}
    try:
        rendered = task.render(sample, tok, ids, RenderOptions(instruction, with_answer))
    except TemplateError as e:
        raise _Skip(e.reason, str(e)) from None
    return {"key": raw["__key__"], "task": name, "text": meta.get("text", ""),
            "mels": [m for member in rendered.audio for m in mels[member]],
            "num_audio_s": sum(len(wave_T) for wave_T in waves.values()) / SAMPLE_RATE,
            "input_ids": rendered.input_ids, "labels": rendered.labels}


def _sample_name(raw: Dict[str, Any]) -> str:
    return f"{os.path.basename(raw['__url__'])}:{raw['__key__']}"


def _pad_mels(mels: List[torch.Tensor]) -> tuple:
    """[N, 128, Fmax] zero padded, and the true frame counts [N]."""
    lengths = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
    out = torch.zeros(len(mels), N_MELS, int(lengths.max()))
    for i, m in enumerate(mels):
        out[i, :, :m.shape[1]] = m
    return out, lengths


def collate(samples: List[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """Right-pad rendered samples into the batch dict the trainer consumes."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        attention_mask[i, :n] = 1
    all_mels = [m for s in samples for m in s["mels"]]
    mels, mel_lengths = _pad_mels(all_mels) if all_mels else (None, torch.zeros(0, dtype=torch.long))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "mels": mels,
            "mel_lengths": mel_lengths, "keys": [s["key"] for s in samples],
            "num_audio_s": float(sum(s["num_audio_s"] for s in samples))}


# ---------------------------------------------------------------------------------------------- workers

class _WorkerStreams(IterableDataset):
    """In each DataLoader worker: that worker's share of every epoch, decoded and batched."""

    def __init__(self, cfg: DataConfig, shards: List[str], rank: int, world_size: int, seed: int,
                 resume: List[tuple]):
        self.cfg, self.shards, self.rank, self.world_size, self.seed = cfg, shards, rank, world_size, seed
        self.resume = resume

    def raw_epoch(self, epoch: int, slot: int, num_slots: int) -> Iterator[Dict[str, Any]]:
        """The raw samples (undecoded) of `epoch` that belong to `slot`, in shuffled order."""
        order = list(range(len(self.shards)))
        random.Random(self.seed + epoch).shuffle(order)  # the same on every rank and worker
        by_shard = len(self.shards) >= num_slots
        rng = random.Random((self.seed + epoch) * 1_000_003 + slot)
        buffer: List[Dict[str, Any]] = []
        index = 0
        for position, shard_index in enumerate(order):
            if by_shard and position % num_slots != slot:
                continue
            for raw in _read_shard(self.shards[shard_index]):
                if not by_shard:
                    index += 1
                    if (index - 1) % num_slots != slot:
                        continue
                if len(buffer) < max(self.cfg.shuffle_buffer, 1):
                    buffer.append(raw)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], raw = raw, buffer[j]
                yield raw
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        tok = load_tokenizer(self.cfg.tokenizer)
        ids = special_ids(tok)
        epoch, skip = self.resume[worker]
        pending: List[Dict[str, Any]] = []
        skipped: collections.Counter = collections.Counter()
        skipped_keys: List[str] = []
        while True:
            usable = 0
            consumed = 0
            for consumed, raw in enumerate(self.raw_epoch(epoch, slot, num_slots), 1):
                if consumed <= skip:  # already trained on before the restart: not even decoded
                    continue
                try:
                    pending.append(_render(raw, tok, ids, self.cfg.asr_instruction, self.cfg.max_audio_s,
                                           default_task=self.cfg.task))
                except _Skip as s:
                    skipped[s.reason] += 1
                    skipped_keys = (skipped_keys + [_sample_name(raw)])[-_MAX_SKIPPED_KEYS:]
                    continue
                usable += 1
                if len(pending) == self.cfg.batch_size:
                    batch = collate(pending, ids.end_of_text)
                    batch["_position"] = (worker, epoch, consumed)
                    batch["_skipped"] = (dict(skipped), skipped_keys)
                    yield batch
                    pending, skipped, skipped_keys = [], collections.Counter(), []
            if usable == 0 and skip == 0:
                raise ValueError(
                    f"rank {self.rank} worker {worker} got no usable sample in epoch {epoch} "
                    f"({consumed} raw samples, skipped: {dict(skipped)}); the shards hold too few samples for "
                    f"world_size={self.world_size} x num_workers={num_workers}, or all of them fail to decode")
            epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------- loader

class ShardLoader:
    """Infinite iterator of batches for one rank, with `state_dict` / `load_state_dict` for exact resume."""

    def __init__(self, cfg: DataConfig, shards: List[str], rank: int, world_size: int, seed: int):
        self.cfg, self.shards, self.rank, self.world_size, self.seed = cfg, shards, rank, world_size, seed
        self._num_streams = max(cfg.num_workers, 1)
        self._positions = [(0, 0)] * self._num_streams   # (epoch, raw samples) of each worker's last batch
        self._batches = 0
        self._skipped: collections.Counter = collections.Counter()
        self._skipped_keys: List[str] = []
        self._iterator = None
        self._waiting: Dict[int, collections.deque] = {}

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._iterator is None:
            streams = _WorkerStreams(self.cfg, self.shards, self.rank, self.world_size, self.seed,
                                     list(self._positions))
            self._iterator = iter(DataLoader(streams, batch_size=None, num_workers=self.cfg.num_workers))
            self._waiting = {w: collections.deque() for w in range(self._num_streams)}
        # Batches go round-robin over workers; after a restart the DataLoader begins again at worker 0,
        # so hold batches until the worker an uninterrupted run would read next has delivered.
        want = self._batches % self._num_streams
        while not self._waiting[want]:
            batch = next(self._iterator)
            self._waiting[batch["_position"][0]].append(batch)
        batch = self._waiting[want].popleft()
        worker, epoch, consumed = batch.pop("_position")
        reasons, keys = batch.pop("_skipped")
        self._positions[worker] = (epoch, consumed)
        self._batches += 1
        self._skipped.update(reasons)
        self._skipped_keys = (self._skipped_keys + keys)[-_MAX_SKIPPED_KEYS:]
        return batch

    def stats(self) -> Dict[str, Any]:
        """Samples skipped so far in the batches consumed: {"skipped": {reason: n}, "skipped_keys": [...]}."""
        return {"skipped": dict(self._skipped), "skipped_keys": list(self._skipped_keys)}

    def _fingerprint(self) -> str:
        return hashlib.sha1("\n".join(os.path.basename(p) for p in self.shards).encode()).hexdigest()

    def state_dict(self) -> Dict[str, Any]:
        """Where this rank's stream stands after the last batch returned (plain Python types)."""
        return {"version": _STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers, "seed": self.seed, "shards": self._fingerprint(),
                "batches": self._batches,
                "workers": [{"epoch": e, "samples": n} for e, n in self._positions],
                "skipped": dict(self._skipped), "skipped_keys": list(self._skipped_keys)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly after the batches recorded in `state`; the next batch restarts the workers."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}: expected {_STATE_VERSION}")
        for key in ("world_size", "num_workers"):
            mine = self.world_size if key == "world_size" else self.cfg.num_workers
            if state[key] != mine:
                raise ValueError(f"loader state was saved with {key}={state[key]}, this run has {key}={mine}: "
                                 f"resuming with a different world_size or num_workers is not supported yet "
                                 f"(it needs re-splitting the streams, a later feature)")
        if state["rank"] != self.rank:
            raise ValueError(f"loader state belongs to rank {state['rank']}, loaded on rank {self.rank}")
        if state["seed"] != self.seed or state["shards"] != self._fingerprint():
            raise ValueError("loader state was saved with a different seed or shard list; exact resume needs both "
                             f"unchanged (seed {state['seed']} -> {self.seed})")
        self._positions = [(w["epoch"], w["samples"]) for w in state["workers"]]
        self._batches = state["batches"]
        self._skipped = collections.Counter(state["skipped"])
        self._skipped_keys = list(state["skipped_keys"])
        self._iterator = None


def build_loader(cfg: DataConfig, rank: int, world_size: int, seed: int) -> ShardLoader:
    """The loader of `rank` out of `world_size`; `seed` must be the same on every rank."""
    if cfg.task not in TASKS:
        raise ValueError(f"data.task={cfg.task!r}: expected one of {sorted(TASKS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}: expected 0 <= rank < world_size")
    for key, low in (("batch_size", 1), ("num_workers", 0), ("shuffle_buffer", 0)):
        if getattr(cfg, key) < low:
            raise ValueError(f"data.{key}={getattr(cfg, key)}: expected an integer >= {low}")
    if not (cfg.max_audio_s > 0 and math.isfinite(cfg.max_audio_s)):
        raise ValueError(f"data.max_audio_s={cfg.max_audio_s}: expected a positive number of seconds")
    special_ids(load_tokenizer(cfg.tokenizer))  # fail here, not inside a worker
    shards = resolve_shards(cfg.shards)
    check_audio_tokenizer(shards, cfg.audio_tokenizer)
    return ShardLoader(cfg, shards, rank, world_size, seed)


def iter_eval_samples(shards: List[str], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
                      max_samples: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Evaluation samples in file order, one process: {key, text, prompt_ids, mels [N,128,F], mel_lengths [N]}.

    Undecodable samples are skipped with a warning; no duration limit applies.
    """
    produced = 0
    for path in resolve_shards(shards):
        for raw in _read_shard(path):
            if max_samples is not None and produced >= max_samples:
                return
            try:
                sample = _render(raw, tok, ids, instruction, max_audio_s=None, with_answer=False)
            except _Skip as s:
                logger.warning("evaluation skips %s: %s", _sample_name(raw), s.reason)
                continue
            if not sample["mels"]:  # e.g. a TTS record: nothing to transcribe
                logger.warning("evaluation skips %s: task %s has no audio input", _sample_name(raw), sample["task"])
                continue
            mels, mel_lengths = _pad_mels(sample["mels"])
            produced += 1
            yield {"key": sample["key"], "text": sample["text"], "prompt_ids": sample["input_ids"],
                   "mels": mels, "mel_lengths": mel_lengths}

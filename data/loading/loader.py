"""The shard loader: datasets mixed by weight -> equal shares per (rank, worker) slot -> decode -> log-mel
-> task template -> batcher -> batches; infinite, exactly resumable, re-splittable to another world size.

Every slot's stream is a pure function of (seed, slot, its state): which positions of an epoch it reads and
in which order comes from data.loading.epochs, so a state is a few counters plus the batcher's held samples, and a
resume re-reads only what the shuffle buffer and the batcher held, decoding only the latter.

Its parts: data.loading.shard_reader reads the tars, data.loading.samples decodes and renders one sample,
data.loading.streams runs a slot's stream. Here are the config, the loader (the slots in DataLoader workers, their state for resuming
or re-splitting), and the in-process iterators of held-out samples for evaluation.
"""
from __future__ import annotations

import collections
import copy
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from data.loading import epochs
from data.loading.batching import BATCHING_MODES, pad_mels
from data.loading.samples import SkipSample, render_raw, sample_name
from data.loading.shard_reader import check_audio_tokenizer, read_shard, resolve_shards, shard_counts
from data.loading.streams import MAX_SKIPPED_KEYS, DatasetShards, WorkerStreams, new_slot_state
from data.tasks import DEFAULT_TASK, TASKS
from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION
from data.text_tokenizer import SpecialIds, load_tokenizer, special_ids

logger = logging.getLogger(__name__)

_STATE_VERSION = 2
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
    data.loading.shard_reader.IO_RETRY_DELAYS_S (0.5, 1, 2, 4 s), going on after the samples already delivered; if it
    persists, the rest of that shard is skipped for the epoch and counted once as "io_error" (the run goes
    on, as with bad input; the metrics and the log name the shard and the error). A corrupt tar keeps its
    complete samples and is counted as "bad_shard" without retries. A damaged index.json is warned about and
    its shards' samples are counted from their tar headers, the same on every rank; an OSError that persists
    while counting stops the loader, since ranks with different counts would get overlapping shares."""
    shards: List[str] = field(default_factory=list)
    """Dataset folders holding index.json, tar paths, globs (`d/*.tar`) or brace patterns (`d/s-{0..9}.tar`);
    the folders and tars may be http(s)://, s3:// or gs:// URLs, or `pipe:CMD` (data.loading.remote), streamed.
    One dataset; leave empty when data.datasets is set."""
    datasets: List[DatasetConfig] = field(default_factory=list)
    """Several datasets mixed by weight; empty = the one dataset data.shards names."""
    tokenizer: str = ""
    """Folder of the extended tokenizer (`python -m data.text_tokenizer build`)."""
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
    """DataLoader worker processes per rank (0 = decode in the training process). A worker decodes audio and
    computes log-mels for its share of the batches; one or two per rank keep a GPU fed on these tasks, and
    together with worker_threads they should leave the training process its cores."""
    worker_threads: int = 1
    """torch intra-op threads of each worker process (decoding, resampling, log-mel). 1 (torch's own choice
    for DataLoader workers; 0 keeps it) keeps the workers off the cores the training process computes on.
    More than 1 starts the workers from a forkserver rather than by fork (a forked process that computes with
    several OpenMP threads can hang), a few seconds more at each start of the loader."""
    worker_priority: str = "auto"
    """CPU scheduling of the worker processes. idle: Linux SCHED_IDLE, a worker runs only on a core the
    training process leaves free, so it never preempts the training threads (on CPU every core computes, and
    a preempted thread stalls its whole parallel region; `python -m train.bench`: 4-6% more tokens/s on 2
    cores, though the loop then waits for its loader ~6% of the time). normal: the OS default. auto: idle when
    training on CPU (no CUDA, or STEPAUDIO_DEVICE=cpu), normal with a GPU, whose host threads mostly wait and
    whose workers must keep up."""
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


# ---------------------------------------------------------------------------------------------- loader

WORKER_PRIORITIES = ("auto", "normal", "idle")


def resolved_worker_priority(priority: str) -> str:
    """data.worker_priority with auto decided: idle when the training process computes on the CPU."""
    if priority != "auto":
        return priority
    on_cpu = os.environ.get("STEPAUDIO_DEVICE", "").lower() == "cpu" or not torch.cuda.is_available()
    return "idle" if on_cpu else "normal"


def _worker_context(threads: int) -> Optional[str]:
    """How workers start. torch's DataLoader forks them and gives each one thread; a forked worker that then
    computes with more (data.worker_threads > 1) can hang for ever in its first parallel region (GNU OpenMP
    is not fork-safe once the parent has used its thread pool). Those workers start from a forkserver
    instead: a clean process, a few seconds more at start."""
    return "forkserver" if threads > 1 else None


def _start_worker(threads: int, priority: str, worker_id: int) -> None:
    """A DataLoader worker's start: its torch thread count (data.worker_threads; 0 keeps torch's default) and
    its scheduling class (data.worker_priority, already resolved)."""
    if threads > 0:
        torch.set_num_threads(threads)
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux: the lowest nice value instead
            os.nice(19)


class ShardLoader:
    """Infinite iterator of batches for one rank, with `state_dict` / `load_state_dict` for resuming.

    A batch is the Batcher's dict (input_ids, labels, attention_mask, position_ids, segment_ids when packed,
    mels, mel_lengths, keys, uids, num_samples, num_tokens, num_audio_s) plus, per sample, the dataset
    ("datasets") and that dataset's epoch ("epochs") it came from. With data.render=prompt it adds "meta"
    (each row's record JSON plus "key"); with data.render=pairs its 2B rows are B chosen then B rejected
    sequences, and keys, uids, datasets, epochs, meta and num_samples count the B pairs ("num_pairs").
    """

    def __init__(self, cfg: DataConfig, datasets: List[DatasetShards], rank: int, world_size: int, seed: int):
        self.cfg, self.datasets, self.rank, self.world_size, self.seed = cfg, datasets, rank, world_size, seed
        self._num_streams = max(cfg.num_workers, 1)
        self._worker_states = [new_slot_state(datasets, cfg.shuffle_buffer) for _ in range(self._num_streams)]
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
            streams = WorkerStreams(self.cfg, self.datasets, self.rank, self.world_size, self.seed,
                                     self._generation, copy.deepcopy(self._worker_states))
            # The workers' base seed from a generator of our own: the same for a resumed run as for an
            # uninterrupted one, and no draw from the training process's global stream.
            seeds = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 1009 + self._generation)
            self._iterator = iter(DataLoader(streams, batch_size=None, num_workers=self.cfg.num_workers,
                                             generator=seeds,
                                             multiprocessing_context=_worker_context(self.cfg.worker_threads),
                                             worker_init_fn=functools.partial(
                                                 _start_worker, self.cfg.worker_threads,
                                                 resolved_worker_priority(self.cfg.worker_priority))))
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
        self._skipped_keys = (self._skipped_keys + keys)[-MAX_SKIPPED_KEYS:]
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
        new_states = [new_slot_state(self.datasets, self.cfg.shuffle_buffer) for _ in range(self._num_streams)]
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
                self._skipped_keys = (self._skipped_keys + r["skipped_keys"])[-MAX_SKIPPED_KEYS:]


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
    if cfg.worker_priority not in WORKER_PRIORITIES:
        raise ValueError(f"data.worker_priority={cfg.worker_priority!r}: expected one of {list(WORKER_PRIORITIES)}")
    if cfg.render not in RENDER_MODES:
        raise ValueError(f"data.render={cfg.render!r}: expected one of {list(RENDER_MODES)}")
    if cfg.render != "full" and cfg.batching != "fixed":
        # A pair's two rows must stay in one batch and a prompt batch maps row i to meta[i]: no packing.
        raise ValueError(f"data.render={cfg.render!r} needs data.batching='fixed', got data.batching="
                         f"{cfg.batching!r}")
    for key, low in (("batch_size", 1), ("num_workers", 0), ("worker_threads", 0), ("shuffle_buffer", 0),
                     ("max_tokens", 1), ("max_mel_frames", 0), ("max_seq_len", 1), ("batch_buffer", 1)):
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
        ds = DatasetShards(name, index, paths, shard_counts(paths), weight, task)
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
        for raw in read_shard(path):
            try:
                yield render_raw(raw, tok, ids, instruction, max_audio_s=None, with_answer=with_answer)
            except SkipSample as s:
                logger.warning("evaluation skips %s: %s", sample_name(raw), s.reason)


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

"""The streams of raw samples behind the loader: a dataset's epochs read in each (rank, worker) slot's share
and buffer-shuffled order (data.loading.epochs decides which positions, in what order), and a slot's stream
that mixes its datasets by weight, renders each sample (data.loading.samples) and batches them
(data.loading.batching), carrying the state a resume needs in every batch.
"""
from __future__ import annotations

import bisect
import collections
import copy
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from data.loading import epochs, remote
from data.loading.batching import Batcher
from data.loading.samples import SkipSample, render_pair, render_raw, sample_name
from data.loading.shard_reader import read_shard
from data.text_tokenizer import load_tokenizer, special_ids

MAX_SKIPPED_KEYS = 20
"""Skipped samples a slot's batch, and the loader's stats, name at most ("SHARD:KEY (reason)", the latest)."""


@dataclass
class DatasetShards:
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

    def __init__(self, ds: DatasetShards, epoch: int, seed: int, plan: epochs.Ranges, needed: Iterator[int]):
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
            self.shard, self.raws, self.local, self.broken = shard, read_shard(self.paths[shard]), 0, None
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


def _fetch(ds: DatasetShards, epoch: int, seed: int, positions: List[int]) -> Dict[int, Dict[str, Any]]:
    """The raw samples at `positions` of one dataset epoch."""
    plan = epochs.merge([(p, p + 1) for p in set(positions)])
    return dict(_EpochReader(ds, epoch, seed, plan, epochs.iter_positions(plan)))


class _DatasetStream:
    """One dataset's raw samples for one slot, epoch after epoch, in buffer-shuffled order; `state` says where."""

    def __init__(self, ds: DatasetShards, seed: int, slot: int, num_slots: int, generation: int, state: Dict,
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


def new_slot_state(datasets: List[DatasetShards], buffer: int) -> Dict[str, Any]:
    """A slot at the very start: every dataset at epoch 0, nothing held."""
    return {"datasets": {ds.name: epochs.new_stream_state(buffer) for ds in datasets}, "mix": {}, "adds": 0,
            "pending": [], "redo": None, "emitted": 0}


class _SlotStream:
    """The batches of one (rank, worker) slot: mixture -> dataset streams -> render -> batcher. `cfg` is the
    loader's data.loading.loader.DataConfig (not imported here: data.loading.loader imports this module)."""

    def __init__(self, cfg, datasets: List[DatasetShards], rank: int, worker: int, num_workers: int,
                 world_size: int, seed: int, generation: int, state: Dict[str, Any]):
        self.cfg, self.datasets, self.seed, self.generation = cfg, {ds.name: ds for ds in datasets}, seed, generation
        self.slot, self.num_slots = rank * num_workers + worker, world_size * num_workers
        self.where = f"rank {rank} worker {worker}"
        self.state = state

    def _render(self, raw: Dict[str, Any], ds: DatasetShards) -> Dict[str, Any]:
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
                    raise SkipSample(reason)
            except SkipSample as s:
                self.skipped[s.reason] += 1
                stream.epoch_skips[s.reason] += 1
                self.skipped_keys = (self.skipped_keys + [f"{sample_name(raw)} ({s.reason})"])[-MAX_SKIPPED_KEYS:]
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
            except SkipSample as s:
                raise ValueError(f"sample {sample_name(raw)} was held by the batcher at the checkpoint and "
                                 f"now fails ({s}); the shards changed since the checkpoint") from None
            samples[uid]["uid"] = uid
        self.batcher.restore([(samples[u], a) for u, a in wanted], state["adds"])
        self._arrival = {u: a for u, a in wanted}
        if redo:
            yield from self._add(samples[redo[0]], redo[0], emitted=state["emitted"])


class WorkerStreams(IterableDataset):
    """In each DataLoader worker (or in the training process): that worker's slot stream (`cfg`: the
    loader's DataConfig)."""

    def __init__(self, cfg, datasets: List[DatasetShards], rank: int, world_size: int, seed: int,
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

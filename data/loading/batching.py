"""Rendered samples -> batches: fixed-size, token-budget buckets, or several samples packed per row.

What a Batcher emits is a pure function of the samples added to it (no RNG, no clock), so a loader can
replay a stream through it and land exactly where an uninterrupted run stood.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from data.features import N_MELS
from data.tasks.pieces import IGNORE_INDEX

BATCHING_MODES = ("fixed", "tokens", "packed")

# A packed row is full at this share of max_seq_len: a batch of full rows goes out as soon as it has all its
# rows; emptier rows wait for samples that fill them until the buffer needs the room. 0.98 leaves room for
# rounding the row length up to a multiple of 8 within a 0.97 goal.
_FULL_FILL = 0.98
# A sample held while this many buffers' worth of later samples arrived goes out with the next cut
# whatever its batch's fill, so no length starves and the loader's pending set stays bounded.
_MAX_WAIT_BUFFERS = 4
# Packed rows are padded to a multiple of this (tensor-core friendly shapes, fewer distinct shapes).
_LEN_MULTIPLE = 8


def sample_rows(sample: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The sequences a sample puts into a batch: itself, or a pair's chosen and rejected renders
    (data.loading.samples.render_pair: {"pair": [chosen, rejected], ...})."""
    return sample["pair"] if "pair" in sample else [sample]


class _Item:
    """A held sample with what batching looks at: arrival index, token count, mel chunk sizes (a pair's
    two sequences counted together)."""
    __slots__ = ("sample", "arrival", "num_tokens", "num_chunks", "longest_chunk")

    def __init__(self, sample: Dict[str, Any], arrival: int):
        rows = sample_rows(sample)
        frames = [m.shape[1] for row in rows for m in row["mels"]]
        self.sample, self.arrival = sample, arrival
        self.num_tokens = sum(len(row["input_ids"]) for row in rows)
        self.num_chunks, self.longest_chunk = len(frames), max(frames, default=0)


def _frames_together(a, b) -> int:
    """Mel frames the encoder computes on the chunks of `a` and `b` (zero-padded to the longest chunk)."""
    return (a.num_chunks + b.num_chunks) * max(a.longest_chunk, b.longest_chunk)


class _Group:
    """Items headed for one batch (tokens mode) or one row (packed mode), with running sizes."""

    def __init__(self, items: Iterable[_Item] = ()):
        self.items: List[_Item] = []
        self.num_tokens = self.longest = self.num_chunks = self.longest_chunk = 0
        self.oldest = None
        for item in items:
            self.add(item)

    def add(self, item: _Item) -> None:
        self.items.append(item)
        self.num_tokens += item.num_tokens
        self.longest = max(self.longest, item.num_tokens)
        self.num_chunks += item.num_chunks
        self.longest_chunk = max(self.longest_chunk, item.longest_chunk)
        self.oldest = item.arrival if self.oldest is None else min(self.oldest, item.arrival)


def encoder_frames(sample: Dict[str, Any]) -> int:
    """Mel frames the encoder computes for `sample` alone: its chunks x its longest chunk."""
    item = _Item(sample, 0)
    return item.num_chunks * item.longest_chunk


class Batcher:
    """Collects rendered samples (dicts with "uid", "input_ids", "labels", "mels", ...) and emits batches.

    fixed:  `batch_size` samples per batch in arrival order; pair samples ({"pair": [chosen, rejected]})
            give 2 x batch_size rows (collate_pairs), and only this mode takes them.
    tokens: up to `buffer_size` samples are held, sorted by length and cut into batches of
            rows x longest row <= `max_tokens`; the last, partly filled batch waits for more samples.
    packed: held samples are packed best-fit decreasing into rows of <= `max_seq_len` tokens, and
            batches take `max_tokens // max_seq_len` rows: the token budget. Batches of rows 98 % full go
            out; rows below that wait for more samples until the buffer is full, and then the fullest rows
            go out as whole batches (a batch is short of rows only where max_mel_frames allows no more).
    In tokens and packed modes a batch's encoder input (mel chunks x longest chunk) stays within
    `max_mel_frames` when that is > 0; in fixed mode only single samples are held to it. Batches of these
    two modes carry "budget_tokens" (max_tokens; packed: rows x max_seq_len), the tokens a full batch
    holds: num_tokens / budget_tokens is its fill.
    """

    def __init__(self, mode: str, pad_id: int, batch_size: int = 8, max_tokens: int = 4096,
                 max_mel_frames: int = 0, max_seq_len: int = 2048, buffer_size: int = 64):
        if mode not in BATCHING_MODES:
            raise ValueError(f"batching mode={mode!r}: expected one of {list(BATCHING_MODES)}")
        for name, value, low in (("batch_size", batch_size, 1), ("max_tokens", max_tokens, 1),
                                 ("max_mel_frames", max_mel_frames, 0), ("max_seq_len", max_seq_len, 1),
                                 ("buffer_size", buffer_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"batching {name}={value!r}: expected an integer >= {low}")
        if mode == "packed" and max_seq_len > max_tokens:
            raise ValueError(f"batching max_seq_len={max_seq_len} is larger than max_tokens={max_tokens}: a "
                             "packed batch holds max_tokens // max_seq_len rows, so expected max_seq_len <= max_tokens")
        self.mode, self.pad_id, self.batch_size, self.max_tokens = mode, pad_id, batch_size, max_tokens
        self.max_mel_frames, self.max_seq_len, self.buffer_size = max_mel_frames, max_seq_len, buffer_size
        self.rows_per_batch = max_tokens // max_seq_len
        self._held: List[_Item] = []  # in arrival order
        self._arrivals = 0

    # ------------------------------------------------------------------------------------------ interface

    def reject_reason(self, sample: Dict[str, Any]) -> Optional[str]:
        """None if `sample` can be batched; else the stats key saying why it never can."""
        num_tokens = sum(len(row["input_ids"]) for row in sample_rows(sample))
        if (self.mode == "packed" and num_tokens > self.max_seq_len) or \
                (self.mode == "tokens" and num_tokens > self.max_tokens):
            return "too_many_tokens"
        if self.max_mel_frames and encoder_frames(sample) > self.max_mel_frames:
            return "too_many_mel_frames"
        return None

    @property
    def arrivals(self) -> int:
        """Samples added so far: the arrival index the next sample gets."""
        return self._arrivals

    def restore(self, held: List[tuple], arrivals: int) -> None:
        """Hold `held` [(sample, arrival index)] as an interrupted batcher did after its last cut, and
        continue numbering at `arrivals`: cuts look at how long samples waited, so resume needs both."""
        if self._held or self._arrivals:
            raise ValueError("Batcher.restore() needs a fresh batcher (it has already been given samples)")
        # Held as they are, not re-added: a cut over them now could differ from none at all, which is
        # what the interrupted batcher did with them until its next add.
        order = [arrival for _, arrival in held]
        if order != sorted(set(order)) or (order and order[-1] >= arrivals) or \
                (self.mode == "fixed" and len(held) >= self.batch_size):
            raise ValueError(f"Batcher.restore() got {len(held)} samples at arrivals {order[:8]} with arrivals="
                             f"{arrivals}: not what a {self.mode!r} batcher holds after a cut (wrong state or "
                             "other batching settings)")
        for sample, arrival in held:
            self._check(sample)
            self._held.append(_Item(sample, arrival))
        self._arrivals = arrivals

    def add(self, sample: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Hold `sample`; return the batches it completes (often none), in order."""
        self._check(sample)
        self._held.append(_Item(sample, self._arrivals))
        self._arrivals += 1
        if self.mode == "fixed":
            return self.flush() if len(self._held) == self.batch_size else []
        return self._cut(final=False) if len(self._held) >= self.buffer_size else []

    def _check(self, sample: Dict[str, Any]) -> None:
        if "uid" not in sample:
            raise ValueError(f"sample {sample.get('key')!r} has no 'uid': the Batcher reports held samples by uid")
        if "pair" in sample and self.mode != "fixed":
            raise ValueError(f"sample {sample.get('key')!r} is a pair: its two rows go into one batch, which "
                             f"batching mode 'fixed' does, not {self.mode!r}")
        reason = self.reject_reason(sample)
        if reason is not None:
            raise ValueError(f"sample {sample.get('key')!r} ({_Item(sample, 0).num_tokens} tokens, "
                             f"{encoder_frames(sample)} mel frames) cannot be batched: {reason}; "
                             "check reject_reason() and skip such samples before add()")

    def pending_uids(self) -> List[Any]:
        """uids of the samples held and not yet in an emitted batch, in arrival order."""
        return [item.sample["uid"] for item in self._held]

    def flush(self) -> List[Dict[str, Any]]:
        """Everything held, as batches (the end of a finite stream); nothing is held afterwards."""
        if self.mode != "fixed":
            return self._cut(final=True)
        held, self._held = self._held, []
        return [collate([item.sample for item in held], self.pad_id)] if held else []

    # ------------------------------------------------------------------------------------------ cutting

    def _mel_fits(self, a, b) -> bool:
        return not self.max_mel_frames or _frames_together(a, b) <= self.max_mel_frames

    def _stale(self, group: _Group, final: bool) -> bool:
        return final or group.oldest < self._arrivals - _MAX_WAIT_BUFFERS * self.buffer_size

    def _cut(self, final: bool) -> List[Dict[str, Any]]:
        if not self._held:
            return []
        emit, keep = (self._cut_tokens if self.mode == "tokens" else self._cut_packed)(final)
        self._held = sorted((item for group in keep for item in group.items), key=lambda item: item.arrival)
        return emit

    def _cut_tokens(self, final: bool):
        """Length-sorted greedy cut; every batch closed by the budget goes out, the open tail may wait."""
        closed: List[_Group] = []
        tail = _Group()
        for item in sorted(self._held, key=lambda item: (item.num_tokens, item.arrival)):
            rows, longest = len(tail.items) + 1, max(tail.longest, item.num_tokens)
            if tail.items and (rows * longest > self.max_tokens or not self._mel_fits(tail, item)):
                closed.append(tail)
                tail = _Group()
            tail.add(item)
        tail_full = (len(tail.items) + 1) * tail.longest > self.max_tokens
        if tail_full or len(tail.items) >= self.buffer_size or self._stale(tail, final):
            closed.append(tail)
            tail = _Group()
        closed.sort(key=lambda group: group.oldest)
        batches = [collate([item.sample for item in group.items], self.pad_id) for group in closed]
        for batch in batches:
            batch["budget_tokens"] = self.max_tokens
        return batches, [tail]

    def _pack_rows(self) -> List[_Group]:
        """Best-fit decreasing: longest sample first, into the fullest row it fits (ties: earliest row).

        Samples close to their wait limit go first, so they land in rows that the rest then fill."""
        rows: List[_Group] = []
        urgent_before = self._arrivals - (_MAX_WAIT_BUFFERS - 1) * self.buffer_size
        for item in sorted(self._held, key=lambda item: (item.arrival >= urgent_before, -item.num_tokens,
                                                         item.arrival)):
            best = None
            for row in rows:
                if row.num_tokens + item.num_tokens <= self.max_seq_len and self._mel_fits(row, item) \
                        and (best is None or row.num_tokens > best.num_tokens):
                    best = row
            if best is None:
                best = _Group()
                rows.append(best)
            best.add(item)
        return rows

    def _cut_packed(self, final: bool):
        """Whole batches of rows: those holding a sample at its wait limit, then complete batches of full rows,
        then the fullest rows while the buffer is still full. The rest is repacked at the next cut."""
        must, full, rest = [], [], []
        for row in self._pack_rows():
            if self._stale(row, final):
                must.append(row)
            else:
                (full if row.num_tokens >= _FULL_FILL * self.max_seq_len else rest).append(row)
        must.sort(key=lambda row: row.oldest)
        full.sort(key=lambda row: row.oldest)
        rest.sort(key=lambda row: (-row.num_tokens, row.oldest))
        # Rows in the order they go out; each batch takes the first rows that fit it (max_mel_frames), so a
        # batch that must go out is completed with the best rows that would otherwise wait.
        queue = must + full + rest
        must_ids, rest_ids = {id(row) for row in must}, {id(row) for row in rest}
        # Samples in rows still filling up; at a full buffer of them, the fullest rows go out.
        filling = sum(len(row.items) for row in rest)
        batches: List[List[_Group]] = []
        while queue:
            batch, items = [queue.pop(0)], _Group()
            for item in batch[0].items:
                items.add(item)
            for row in list(queue):
                if len(batch) == self.rows_per_batch:
                    break
                if self._mel_fits(items, row):
                    queue.remove(row)
                    batch.append(row)
                    for item in row.items:
                        items.add(item)
            urgent = any(id(row) in must_ids for row in batch)
            complete = len(batch) == self.rows_per_batch and \
                all(row.num_tokens >= _FULL_FILL * self.max_seq_len for row in batch)
            if not (urgent or complete or filling >= self.buffer_size):
                queue = batch + queue  # waits; so does every row after it
                break
            batches.append(batch)
            filling -= sum(len(row.items) for row in batch if id(row) in rest_ids)
        batches.sort(key=lambda batch: min(row.oldest for row in batch))
        return [collate_packed([[item.sample for item in row.items] for row in batch], self.pad_id,
                               max_len=self.max_seq_len, budget_tokens=self.rows_per_batch * self.max_seq_len)
                for batch in batches], queue


# ---------------------------------------------------------------------------------------------- collate

def pad_mels(mels: List[torch.Tensor]):
    """[N, 128, Fmax] zero padded and the true frame counts [N]; (None, empty) without audio."""
    if not mels:
        return None, torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
    out = torch.empty(len(mels), N_MELS, int(lengths.max()), dtype=mels[0].dtype)
    for i, m in enumerate(mels):  # write each chunk and zero only its padding (a full zero fill costs more)
        out[i, :, :m.shape[1]] = m
        out[i, :, m.shape[1]:] = 0
    return out, lengths


def _metas(samples: List[Dict[str, Any]]) -> Optional[List[Any]]:
    """The samples' "meta" (the record JSON that prompt and pairs modes keep for rewards), or None when
    they carry none."""
    have = sum("meta" in s for s in samples)
    if have not in (0, len(samples)):
        raise ValueError(f"{have} of {len(samples)} samples carry 'meta': expected all or none (one render mode)")
    return [s["meta"] for s in samples] if have else None


def _batch(rows: List[List[Dict[str, Any]]], pad_id: int, length: int, packed: bool,
           pairs: bool = False) -> Dict[str, Any]:
    """The batch dict: input_ids, labels, attention_mask, position_ids (and segment_ids if packed) [R, L];
    sample_index [R, L]: the sample each position belongs to, as an index into keys (and the loader's
    "datasets", for per-dataset losses), -1 on padding; mels [N, 128, Fmax] or None and mel_lengths [N] of
    every chunk in row-major sample order; keys, uids, num_samples, num_tokens (real), num_loss_tokens
    (labelled targets, labels[:, 1:] != -100), num_audio_s; "meta" per sample where the samples carry it;
    packed: cu_seq_lens and max_length for flash-attention's varlen kernel. Counts are host-side ints built
    here so that no GPU step syncs with the host to learn them."""
    ids, labels, mask, positions, segments, owners = [], [], [], [], [], []
    # A pair's two rows (collate_pairs: the chosen rows, then the rejected ones) are both its sample.
    num_samples = len(rows) // 2 if pairs else sum(len(row) for row in rows)
    index = 0
    for row in rows:
        r_ids, r_labels, r_pos, r_seg, r_own = [], [], [], [], []
        for segment, s in enumerate(row, 1):
            n = len(s["input_ids"])
            if len(s["labels"]) != n:
                raise ValueError(f"sample {s.get('key')!r} has {n} input_ids but {len(s['labels'])} labels")
            r_ids += s["input_ids"]
            # In a packed row the first label would be predicted from the previous sample's last token.
            r_labels += ([IGNORE_INDEX] + list(s["labels"][1:])) if packed and n else s["labels"]
            r_pos += range(n)
            r_seg += [segment] * n
            r_own += [index % num_samples] * n
            index += 1
        pad = length - len(r_ids)
        assert pad >= 0, (length, len(r_ids))
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE_INDEX] * pad)
        mask.append([1] * len(r_ids) + [0] * pad)
        positions.append(r_pos + [0] * pad)
        segments.append(r_seg + [0] * pad)
        owners.append(r_own + [-1] * pad)
    samples = [s for row in rows for s in row]
    mels, mel_lengths = pad_mels([m for s in samples for m in s["mels"]])
    labels_RL = torch.tensor(labels, dtype=torch.long)
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long),
             "attention_mask": torch.tensor(mask, dtype=torch.long),
             "labels": labels_RL,
             "position_ids": torch.tensor(positions, dtype=torch.long),
             "sample_index": torch.tensor(owners, dtype=torch.long),
             "mels": mels, "mel_lengths": mel_lengths, "keys": [s["key"] for s in samples],
             "uids": [s.get("uid") for s in samples], "num_samples": len(samples),
             "num_tokens": sum(len(s["input_ids"]) for s in samples),
             "num_loss_tokens": int((labels_RL[:, 1:] != IGNORE_INDEX).sum()),
             "num_audio_s": float(sum(s["num_audio_s"] for s in samples))}
    metas = _metas(samples)
    if metas is not None:
        batch["meta"] = metas
    if packed:
        batch["segment_ids"] = torch.tensor(segments, dtype=torch.long)
        batch["cu_seq_lens"], batch["max_length"] = packed_cu_seq_lens(batch["segment_ids"])
    return batch


def packed_cu_seq_lens(segment_ids_BT: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(cu_seq_lens int32 [S + 1], max_length) of the flattened batch, one sequence per segment of a row
    (padding included, and a row boundary always starts one): what flash-attention's varlen kernel takes.
    On the host this costs nothing; the collate builds it so no GPU step waits for it."""
    if segment_ids_BT.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids_BT.shape)}")
    T = segment_ids_BT.shape[1]
    flat_N = segment_ids_BT.reshape(-1)
    starts_N = torch.ones_like(flat_N, dtype=torch.bool)
    starts_N[1:] = flat_N[1:] != flat_N[:-1]
    starts_N[::T] = True
    cu_seq_lens = torch.cat([starts_N.nonzero().view(-1), flat_N.new_tensor([flat_N.numel()])]).to(torch.int32)
    return cu_seq_lens, int(cu_seq_lens.diff().max())


def collate(samples: List[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """One sample per row, right-padded with `pad_id` to the longest (fixed and tokens modes); pair
    samples go to collate_pairs. Samples that carry "meta" (prompt mode) give the batch "meta", one per row."""
    if not samples:
        raise ValueError("collate got no samples: expected at least one")
    if any("pair" in s for s in samples):
        return collate_pairs(samples, pad_id)
    return _batch([[s] for s in samples], pad_id, max(len(s["input_ids"]) for s in samples), packed=False)


def collate_pairs(pairs: List[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """B pairs -> 2B rows: rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones in the same
    order, all right-padded to the longest; mels in that row order (chosen rows' chunks first), so the
    model splices them as for any batch. keys, uids, "meta" and num_samples are per pair, "num_pairs" = B;
    num_tokens, num_loss_tokens and num_audio_s count all 2B rows."""
    if not pairs:
        raise ValueError("collate_pairs got no pairs: expected at least one")
    bad = [p.get("key") for p in pairs if len(p.get("pair", ())) != 2]
    if bad:
        raise ValueError(f"sample {bad[0]!r} is not a pair: expected \"pair\": [chosen, rejected] in every sample")
    rows = [[p["pair"][0]] for p in pairs] + [[p["pair"][1]] for p in pairs]
    batch = _batch(rows, pad_id, max(len(row[0]["input_ids"]) for row in rows), packed=False, pairs=True)
    batch.update(keys=[p["key"] for p in pairs], uids=[p.get("uid") for p in pairs], num_samples=len(pairs),
                 num_pairs=len(pairs))
    metas = _metas(pairs)
    if metas is not None:
        batch["meta"] = metas
    return batch


def collate_packed(rows: List[List[Dict[str, Any]]], pad_id: int, max_len: Optional[int] = None,
                   budget_tokens: Optional[int] = None) -> Dict[str, Any]:
    """Several samples per row, each with its own positions and segment id; rows padded to the fullest
    row's length rounded up to a multiple of 8 (but not past `max_len` when given). budget_tokens, when
    given, is copied into the batch (the tokens a full batch holds; see Batcher)."""
    if not rows or not all(rows):
        raise ValueError(f"collate_packed got rows of {[len(row) for row in rows]} samples: expected >= 1 row, "
                         "each with >= 1 sample")
    fill = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    length = -(-fill // _LEN_MULTIPLE) * _LEN_MULTIPLE
    if max_len is not None:
        length = max(fill, min(length, max_len))
    batch = _batch(rows, pad_id, length, packed=True)
    if budget_tokens is not None:
        batch["budget_tokens"] = budget_tokens
    return batch


def budget_fill(batches: Iterable[Dict[str, Any]]) -> float:
    """Real tokens / token budget (the sum of num_tokens over the sum of budget_tokens) over `batches`."""
    real = budget = 0
    for batch in batches:
        if "budget_tokens" not in batch:
            raise ValueError("budget_fill needs batches with 'budget_tokens' (batching=tokens or packed)")
        real += batch["num_tokens"]
        budget += batch["budget_tokens"]
    if budget == 0:
        raise ValueError("budget_fill got no batches: expected at least one")
    return real / budget


def packing_efficiency(batches: Iterable[Dict[str, Any]]) -> float:
    """Real tokens / computed tokens (the sum of input_ids.numel()) over `batches`."""
    real = computed = 0
    for batch in batches:
        real += int(batch["attention_mask"].sum())
        computed += batch["input_ids"].numel()
    if computed == 0:
        raise ValueError("packing_efficiency got no batches (or only empty ones): expected at least one token")
    return real / computed

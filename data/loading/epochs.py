"""Which samples each (rank, worker) slot reads, in which order: equal shares of a dataset's epoch, the
shuffle buffer and the mixture schedule in index space, and re-splitting what epochs have left among new slots.

No I/O here. A position is an index into one epoch's sequence of samples (its shards in that epoch's
shuffled order, each contributing its index.json count), so the reader, the resume logic and the
re-split all agree on "sample 1234 of epoch 5" without opening a tar.
"""
from __future__ import annotations

import bisect
import random
from typing import Dict, Iterator, List, Optional, Tuple

Ranges = List[List[int]]
"""Sorted, disjoint [start, stop) runs of positions (lists, so a state survives a JSON round trip)."""


def shard_order(num_shards: int, seed: int, dataset_index: int, epoch: int) -> List[int]:
    """The shards' reading order in `epoch`, the same on every rank and worker."""
    order = list(range(num_shards))
    # An int seed (not a string) keeps the one-dataset order of the first loader, which tests pin.
    random.Random(seed + epoch + 1_000_003 * dataset_index).shuffle(order)
    return order


def equal_share(num_samples: int, num_slots: int, slot: int) -> Ranges:
    """Slot `slot`'s contiguous share of an epoch; the last num_samples % num_slots positions are dropped
    for that epoch (a new shard order next epoch drops other samples), so every slot reads the same count."""
    per_slot = num_samples // num_slots
    return [[slot * per_slot, (slot + 1) * per_slot]] if per_slot else []


def count(ranges: Ranges) -> int:
    return sum(stop - start for start, stop in ranges)


def iter_positions(ranges: Ranges, skip: int = 0) -> Iterator[int]:
    """The positions of `ranges` in order, leaving out the first `skip`."""
    for start, stop in ranges:
        if skip >= stop - start:
            skip -= stop - start
            continue
        yield from range(start + skip, stop)
        skip = 0


def ranges_after(ranges: Ranges, skip: int) -> Ranges:
    """`ranges` without its first `skip` positions."""
    out = []
    for start, stop in ranges:
        if skip >= stop - start:
            skip -= stop - start
            continue
        out.append([start + skip, stop])
        skip = 0
    return out


def merge(pieces: List[Tuple[int, int]]) -> Ranges:
    """Disjoint [start, stop) pieces in any order -> Ranges; adjacent runs are joined."""
    out: Ranges = []
    for start, stop in sorted(p for p in pieces if p[1] > p[0]):
        assert not out or start >= out[-1][1], f"overlapping positions at {start}"
        if out and start == out[-1][1]:
            out[-1][1] = stop
        else:
            out.append([start, stop])
    return out


def split_even(ranges: Ranges, parts: int) -> List[Ranges]:
    """`ranges` cut in order into `parts` pieces whose counts differ by at most one (larger ones first)."""
    total = count(ranges)
    sizes = [total // parts + (1 if k < total % parts else 0) for k in range(parts)]
    out, k, need, current = [], 0, sizes[0] if sizes else 0, []
    for start, stop in ranges:
        while start < stop:
            while need == 0 and k < parts - 1:
                out.append(current)
                k, current = k + 1, []
                need = sizes[k]
            take = min(need, stop - start)
            current.append([start, start + take])
            start, need = start + take, need - take
    out.append(current)
    out += [[] for _ in range(parts - len(out))]
    return out


def first_at_or_after(ranges: Ranges, position: int) -> Optional[int]:
    """The smallest position of `ranges` that is >= `position`, or None."""
    k = bisect.bisect_right([stop for _, stop in ranges], position)
    if k == len(ranges):
        return None
    return max(ranges[k][0], position)


class BufferShuffle:
    """The order in which a shuffle buffer of `size` emits the positions of `ranges`.

    Output k is drawn uniformly from the buffer once it is full, so it comes from the first k + size inputs;
    the tail is shuffled as a whole. `consumed` replays that many outputs (no I/O) to stand where a stream
    stood; `held()` and `num_read` then say what a reader must fetch again.
    """

    def __init__(self, ranges: Ranges, size: int, key: str, consumed: int = 0):
        self.ranges, self.size, self.rng = ranges, max(size, 1), random.Random(key)
        self._inputs = iter_positions(ranges)
        self.num_read = 0
        self.buffer: List[int] = []
        self._draining = False
        for _ in range(consumed):
            assert self.next() is not None, "loader state consumed more samples than its plan holds"

    def next(self) -> Optional[int]:
        """The next position, or None when the plan is done."""
        if not self._draining:
            for position in self._inputs:
                self.num_read += 1
                if len(self.buffer) < self.size:
                    self.buffer.append(position)
                    continue
                j = self.rng.randrange(self.size)
                self.buffer[j], position = position, self.buffer[j]
                return position
            self.rng.shuffle(self.buffer)
            self._draining = True
        return self.buffer.pop() if self.buffer else None

    def held(self) -> List[int]:
        """Positions read into the buffer and not emitted yet, ascending."""
        return sorted(self.buffer)


class Mixture:
    """Which dataset the next usable sample comes from: a stride schedule with seeded jitter.

    Dataset d's k-th turn falls at (k + u) / weight_d with u uniform in [0, 1) from (key, d, k); the earliest
    turn goes next. Counts then stay within a sample or two of the weights at every point of the stream
    (an i.i.d. draw would wander by sqrt(n)), the order is still random, and the state is the counts.
    """

    def __init__(self, weights: Dict[str, float], key: str, counts: Optional[Dict[str, int]] = None):
        self.weights, self.key = dict(weights), key
        self.counts = {name: int((counts or {}).get(name, 0)) for name in weights}
        self._due = {name: self._due_time(name) for name in weights}

    def _due_time(self, name: str) -> float:
        jitter = random.Random(f"{self.key}/{name}/{self.counts[name]}").random()
        return (self.counts[name] + jitter) / self.weights[name]

    def peek(self) -> str:
        return min(self.weights, key=lambda name: self._due[name])  # ties: config order

    def advance(self, name: str) -> None:
        self.counts[name] += 1
        self._due[name] = self._due_time(name)


def shuffle_key(seed: int, name: str, epoch: int, slot: int, generation: int) -> str:
    return f"shuffle/{seed}/{name}/{epoch}/{slot}/{generation}"


def mixture_key(seed: int, slot: int, generation: int) -> str:
    return f"mix/{seed}/{slot}/{generation}"


def new_stream_state(buffer: int, epoch: int = 0) -> Dict:
    """One dataset's stream in one slot at the start of a normal epoch.

    plan None = the slot's equal share of the epoch; otherwise explicit Ranges (after a re-split), and
    `queue` holds the explicit plans of the epochs after it; once it is empty, epochs are normal again.
    """
    return {"epoch": epoch, "plan": None, "consumed": 0, "usable": 0, "buffer": buffer, "queue": []}


def plan_of(state: Dict, num_samples: int, num_slots: int, slot: int) -> Ranges:
    return state["plan"] if state["plan"] is not None else equal_share(num_samples, num_slots, slot)


def resplit(name: str, old: List[Tuple[int, Dict]], held: List[Tuple[int, int]], num_samples: int,
            old_num_slots: int, new_num_slots: int, seed: int, old_generation: int, buffer: int) -> List[Dict]:
    """New stream states of dataset `name` for `new_num_slots` slots, from every old slot's state.

    old: (old slot, its stream state) for all old slots; held: (epoch, position) of samples that were read
    but are in no batch returned yet (a batcher's pending ones). Whatever the old slots' epochs have left,
    unread or held, is split evenly among the new slots epoch by epoch; later epochs are normal.
    """
    unseen: Dict[int, List[Tuple[int, int]]] = {}
    last_epoch: Dict[int, int] = {}
    for slot, state in old:
        epoch = state["epoch"]
        plan = plan_of(state, num_samples, old_num_slots, slot)
        sim = BufferShuffle(plan, state["buffer"], shuffle_key(seed, name, epoch, slot, old_generation),
                            state["consumed"])
        pieces = unseen.setdefault(epoch, [])
        pieces += [(p, p + 1) for p in sim.held()]
        pieces += [tuple(r) for r in ranges_after(plan, sim.num_read)]
        for queued_epoch, ranges in state["queue"]:
            unseen.setdefault(queued_epoch, []).extend(tuple(r) for r in ranges)
            epoch = queued_epoch
        last_epoch[slot] = epoch
    for epoch, position in held:
        unseen.setdefault(epoch, []).append((position, position + 1))
    top = max([*unseen, *last_epoch.values()])
    for slot, epoch in last_epoch.items():  # slots that were behind had not started these epochs at all
        for later in range(epoch + 1, top + 1):
            unseen.setdefault(later, []).extend(tuple(r) for r in equal_share(num_samples, old_num_slots, slot))
    first = min(unseen)
    plans = {epoch: split_even(merge(unseen.get(epoch, [])), new_num_slots) for epoch in range(first, top + 1)}
    out = []
    for slot in range(new_num_slots):
        # Every epoch up to `top` gets an explicit (maybe empty) plan, so normal epochs resume at top + 1.
        queue = [[epoch, plans[epoch][slot]] for epoch in range(first, top + 1)]
        state = new_stream_state(buffer, epoch=first)
        state["plan"], state["queue"] = queue[0][1], queue[1:]
        out.append(state)
    return out

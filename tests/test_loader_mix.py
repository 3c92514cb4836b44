"""Loader mixture and shares on real tar shards: measured dataset proportions, each dataset cycling its own
epochs, and equal shares: every rank the same batches per epoch, each slot reading only its part."""
import collections

import pytest

import data.loading.streams
from data.loading import epochs
from data.loading.loader import DatasetConfig, build_loader
from tests.test_loader import _cfg, _tts, _write, make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _text_dataset(folder, prefix, num_shards, per_shard):
    keys = [[f"{prefix}{s}_{i}" for i in range(per_shard)] for s in range(num_shards)]
    _write(folder, [[(key, _tts(s * per_shard + i)) for i, key in enumerate(shard)] for s, shard in enumerate(keys)])
    return [key for shard in keys for key in shard]


def test_mixture_proportions_over_10000_samples_and_own_epochs(tmp_path, tok_dir):
    sizes = {"a": (8, 50), "b": (4, 50), "c": (4, 25)}  # shards, records per shard
    keys = {name: _text_dataset(tmp_path / name, name, *size) for name, size in sizes.items()}
    weights = {"a": 3.0, "b": 1.5, "c": 0.5}  # shares 0.6, 0.3, 0.1
    datasets = [DatasetConfig(name, [str(tmp_path / name)], weight) for name, weight in weights.items()]
    loader = build_loader(_cfg(tok_dir, datasets=datasets, batch_size=50, num_workers=0, shuffle_buffer=20),
                          rank=0, world_size=1, seed=11)
    batches = [next(loader) for _ in range(200)]
    seen = [(d, e, k) for b in batches for d, e, k in zip(b["datasets"], b["epochs"], b["keys"], strict=True)]
    assert len(seen) == 10_000
    counts = collections.Counter(d for d, _, _ in seen)
    for name, weight in weights.items():
        assert abs(counts[name] / 10_000 - weight / 5.0) < 0.02, counts
    # Each dataset cycles its own epochs (a: 6000 of 400 records = 15 epochs, c: 1000 of 100 = 10); every
    # complete epoch holds each record once, in a new order.
    orders = collections.defaultdict(list)
    for d, e, k in seen:
        orders[d, e].append(k)
    last = {name: max(e for d, e in orders if d == name) for name in weights}
    assert last == {"a": 14, "b": 14, "c": 9}
    for (name, epoch), order in orders.items():
        if epoch < last[name]:
            assert sorted(order) == sorted(keys[name]), (name, epoch)
    assert orders["c", 0] != orders["c", 1]


def test_every_rank_gets_the_same_batches_per_epoch(tmp_path, tok_dir):
    keys = _text_dataset(tmp_path / "ds", "k", 5, 10)  # 50 records, 4 slots: 12 each, 2 left out per epoch
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")], batch_size=3, num_workers=2)
    per_rank_epoch = collections.Counter()
    keys_by_epoch = collections.defaultdict(list)
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, seed=5)
        for _ in range(3 * 8):
            batch = next(loader)
            assert len(set(batch["epochs"])) == 1  # 12 per slot = 4 whole batches of 3
            per_rank_epoch[rank, batch["epochs"][0]] += 1
            keys_by_epoch[batch["epochs"][0]] += batch["keys"]
    assert per_rank_epoch == {(rank, epoch): 8 for rank in range(2) for epoch in range(3)}
    for epoch in range(3):
        assert len(keys_by_epoch[epoch]) == len(set(keys_by_epoch[epoch])) == 48
        assert set(keys_by_epoch[epoch]) <= set(keys)
    # A new shard order each epoch leaves other records out.
    assert len({frozenset(set(keys) - set(keys_by_epoch[e])) for e in range(3)}) > 1


def test_each_slot_reads_only_its_share(tmp_path, tok_dir, monkeypatch):
    _text_dataset(tmp_path / "ds", "k", 8, 6)  # 48 records in 8 shards; 4 ranks read 2 shards each per epoch
    opened = []
    real = data.loading.streams.read_shard
    monkeypatch.setattr(data.loading.streams, "read_shard", lambda path: opened.append(path) or real(path))
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")], batch_size=6, num_workers=0)
    per_rank = []
    for rank in range(4):
        opened.clear()
        loader = build_loader(cfg, rank=rank, world_size=4, seed=3)
        assert len({k for _ in range(2) for k in next(loader)["keys"]}) == 12
        per_rank.append(set(opened))
        assert len(opened) == 2, opened
    assert set().union(*per_rank) == {str(tmp_path / "ds" / f"shard-{s:06d}.tar") for s in range(8)}


def test_split_even_and_mixture_schedule():
    assert epochs.split_even([[0, 3], [5, 9], [20, 21]], 3) == [[[0, 3]], [[5, 8]], [[8, 9], [20, 21]]]
    assert epochs.split_even([[0, 2]], 3) == [[[0, 1]], [[1, 2]], []]
    mixture = epochs.Mixture({"x": 1.0, "y": 3.0}, "k")
    drawn = []
    for _ in range(400):
        drawn.append(mixture.peek())
        mixture.advance(drawn[-1])
        assert abs(drawn.count("y") - 0.75 * len(drawn)) <= 2  # within two samples of the weights all along
    again = epochs.Mixture({"x": 1.0, "y": 3.0}, "k", counts={"x": drawn[:200].count("x"),
                                                             "y": drawn[:200].count("y")})
    resumed = []
    for _ in range(200):
        resumed.append(again.peek())
        again.advance(resumed[-1])
    assert resumed == drawn[200:]  # the counts are the whole state

"""Loader resume on real tar shards: the exact batch sequence after a restart in every batching mode, and
a restart with another world size or worker count that sees every sample of the started epochs once."""
import collections
import dataclasses
import json

import pytest
import torch

from data.loading.loader import DatasetConfig, build_loader
from tests.test_loader import _cfg, _tts, _write, make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))

MODES = {
    "fixed": {"batching": "fixed", "batch_size": 3},
    "tokens": {"batching": "tokens", "max_tokens": 240, "batch_buffer": 8},     # records are 51..111 tokens
    "packed": {"batching": "packed", "max_tokens": 512, "max_seq_len": 256, "batch_buffer": 8},
}
TENSORS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids", "mel_lengths")


def _mixture(root, tok_dir, **kw):
    """Datasets a (48 records in 4 shards) and b (24 in 3), weights 2:1, of text-only records of varied length."""
    for name, num_shards, per_shard in (("a", 4, 12), ("b", 3, 8)):
        _write(root / name, [[(f"{name}{s}_{i}", _tts(s * per_shard + i, words=1 + (s * per_shard + i) % 9))
                              for i in range(per_shard)] for s in range(num_shards)])
    datasets = [DatasetConfig("a", [str(root / "a")], 2.0), DatasetConfig("b", [str(root / "b")], 1.0)]
    return _cfg(tok_dir, datasets=datasets, shuffle_buffer=5, **kw)


def _same_batch(got, want):
    assert got["keys"] == want["keys"] and got["uids"] == want["uids"] and got["epochs"] == want["epochs"]
    for name in TENSORS:
        assert (name in got) == (name in want), name
        if name in want:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("mode", list(MODES))
def test_exact_resume_with_workers(tmp_path, tok_dir, mode):
    cfg = _mixture(tmp_path, tok_dir, num_workers=2, **MODES[mode])
    k, m = 5, 15  # odd k: the resumed run starts at worker 1
    reference = build_loader(cfg, rank=1, world_size=2, seed=4)
    expected = [next(reference) for _ in range(k + m)]
    first = build_loader(cfg, rank=1, world_size=2, seed=4)
    [next(first) for _ in range(k)]
    state = json.loads(json.dumps({"ranks": [{"rank": 0}, first.state_dict()][1:]}))
    resumed = build_loader(cfg, rank=1, world_size=2, seed=4)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        _same_batch(next(resumed), want)
    assert max(e for b in expected for e in b["epochs"]) >= 1  # the run crossed into a second epoch


@pytest.mark.parametrize("mode", ["tokens", "packed"])
def test_exact_resume_after_every_batch(tmp_path, tok_dir, mode):
    cfg = _mixture(tmp_path, tok_dir, num_workers=0, **MODES[mode])
    reference = build_loader(cfg, rank=0, world_size=1, seed=2)
    batches, states = [], []
    for _ in range(16):
        batches.append(next(reference))
        states.append(reference.state_dict())
        assert json.loads(json.dumps(states[-1])) == states[-1]  # plain JSON types, nothing lost
    held = [len(s["workers"][0]["pending"]) for s in states]
    assert max(held) > 0  # the batcher held samples at some checkpoints: they must come back
    for k in range(1, 15):
        resumed = build_loader(cfg, rank=0, world_size=1, seed=2)
        resumed.load_state_dict(states[k - 1])
        _same_batch(next(resumed), batches[k])
        _same_batch(next(resumed), batches[k + 1])


def _seen(batches):
    return [(d, e, key) for b in batches for d, e, key in zip(b["datasets"], b["epochs"], b["keys"], strict=True)]


@pytest.mark.parametrize("old,stops,new", [((2, 2), (8, 30), (1, 1)), ((1, 0), (40,), (2, 0)),
                                            ((2, 0), (25, 9), (3, 1))], ids=["2x2_to_1", "1_to_2", "2_to_3"])
def test_new_world_size_sees_every_sample_of_started_epochs_once(tmp_path, tok_dir, old, stops, new):
    (old_world, old_workers), (new_world, new_workers) = old, new
    cfg = _mixture(tmp_path, tok_dir, num_workers=old_workers, **MODES["tokens"])
    seen, states = [], []
    for rank in range(old_world):
        loader = build_loader(cfg, rank=rank, world_size=old_world, seed=9)
        seen += _seen([next(loader) for _ in range(stops[rank])])  # ranks stop at different points
        states.append(json.loads(json.dumps(loader.state_dict())))
    top = max(e for _, e, _ in seen)
    assert top >= 1 and any(w["pending"] for s in states for w in s["workers"])  # cross-epoch, held samples
    new_cfg = dataclasses.replace(cfg, num_workers=new_workers)
    for rank in range(new_world):
        loader = build_loader(new_cfg, rank=rank, world_size=new_world, seed=9)
        loader.load_state_dict({"ranks": states})
        # A batch holds >= 2 records: enough batches to finish every started epoch, whatever the ranks held.
        seen += _seen([next(loader) for _ in range((top + 2) * 72 // new_world // 2 + 20)])
    for name, size in (("a", 48), ("b", 24)):
        for epoch in range(top + 1):
            counts = collections.Counter(key for d, e, key in seen if d == name and e == epoch)
            assert len(counts) == size and set(counts.values()) == {1}, (name, epoch, counts.most_common(2))


def test_exact_resume_after_a_resplit(tmp_path, tok_dir):
    cfg = _mixture(tmp_path, tok_dir, num_workers=0, **MODES["packed"])
    states = []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, seed=1)
        [next(loader) for _ in range(3 + 2 * rank)]
        states.append(loader.state_dict())
    reference = build_loader(cfg, rank=0, world_size=1, seed=1)
    reference.load_state_dict({"ranks": states})
    expected = [next(reference) for _ in range(3)]
    middle = reference.state_dict()
    assert middle["generation"] == 1 and middle["workers"][0]["datasets"]["a"]["plan"]  # a re-split epoch
    expected += [next(reference) for _ in range(8)]
    resumed = build_loader(cfg, rank=0, world_size=1, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(middle)))
    for want in expected[3:]:
        _same_batch(next(resumed), want)

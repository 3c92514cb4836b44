"""data.batching: fixed, token-budget and packed batches, on hand-made samples and seeded synthetic streams."""
from __future__ import annotations

import random

import pytest
import torch

from data.loading.batching import (BATCHING_MODES, Batcher, budget_fill, collate, collate_packed, encoder_frames,
                           packing_efficiency)

PAD = 7


def make_sample(uid, num_tokens, mel_frames=(), first_id=100, mel_value=1.0):
    """A rendered sample: ids first_id.., labels -100 on the first half, one mel chunk per frame count."""
    ids = list(range(first_id, first_id + num_tokens))
    labels = [-100] * (num_tokens // 2) + ids[num_tokens // 2:]
    mels = [torch.full((128, f), mel_value + 0.5 * i) for i, f in enumerate(mel_frames)]
    return {"uid": uid, "key": f"key{uid}", "task": "asr", "text": "", "mels": mels,
            "num_audio_s": 0.5 * len(mel_frames), "input_ids": ids, "labels": labels}


def short_mix_stream(n, seed):
    """Lengths like the demo curriculum's mix stage: ASR ~46, S2TT ~59 tokens with audio, TTS ~106 without."""
    rng = random.Random(seed)
    for uid in range(n):
        kind = uid % 3
        if kind == 0:
            yield make_sample(uid, rng.randint(40, 54), [rng.randint(20, 60)])
        elif kind == 1:
            yield make_sample(uid, rng.randint(96, 111))
        else:
            yield make_sample(uid, rng.randint(53, 67), [rng.randint(20, 60)])


def demo_like_stream(n, seed):
    """Lengths drawn like the demo mixture: short ASR with audio, long TTS without, dialogue in between."""
    rng = random.Random(seed)
    for uid in range(n):
        kind = rng.random()
        if kind < 0.5:
            sample = make_sample(uid, rng.randint(30, 100), [rng.randint(20, 80)])
        elif kind < 0.8:
            sample = make_sample(uid, rng.randint(100, 300))
        else:
            sample = make_sample(uid, rng.randint(60, 200), [rng.randint(20, 80)])
        yield sample


def run(batcher, samples):
    batches = []
    for s in samples:
        batches += batcher.add(s)
    return batches + batcher.flush()


def real_tokens_of_rows(batch):
    return [int(n) for n in batch["attention_mask"].sum(1)]


# ---------------------------------------------------------------------------------------------- fixed

def test_fixed_mode_matches_the_old_right_padded_collate():
    a = make_sample("a", 3, [4], first_id=10, mel_value=1.0)
    b = make_sample("b", 5, [], first_id=20)
    c = make_sample("c", 2, [2, 3], first_id=30, mel_value=3.0)
    batcher = Batcher("fixed", PAD, batch_size=3)
    assert batcher.add(a) == [] and batcher.add(b) == []
    [batch] = batcher.add(c)
    assert batch["input_ids"].tolist() == [[10, 11, 12, PAD, PAD], [20, 21, 22, 23, 24], [30, 31, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [-100, -100, 22, 23, 24],
                                        [-100, 31, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
    assert "segment_ids" not in batch
    assert batch["mels"].shape == (3, 128, 4) and batch["mel_lengths"].tolist() == [4, 2, 3]
    # chunks in sample order, zero padding after each chunk's own frames
    assert batch["mels"][:, 5, :].tolist() == [[1.0] * 4, [3.0, 3.0, 0.0, 0.0], [3.5, 3.5, 3.5, 0.0]]
    assert batch["keys"] == ["keya", "keyb", "keyc"] and batch["uids"] == ["a", "b", "c"]
    assert batch["num_samples"] == 3 and batch["num_tokens"] == 10 and batch["num_audio_s"] == 1.5
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    # same tensors as calling collate directly, and flush emits a last partial batch
    direct = collate([a, b, c], PAD)
    for key in ("input_ids", "labels", "attention_mask", "position_ids", "mels", "mel_lengths"):
        assert torch.equal(direct[key], batch[key])
    assert batcher.add(make_sample("d", 4)) == [] and batcher.pending_uids() == ["d"]
    [last] = batcher.flush()
    assert last["uids"] == ["d"] and last["mels"] is None and last["mel_lengths"].tolist() == []
    assert batcher.pending_uids() == [] and batcher.flush() == []


def test_fixed_mode_pending_uids_mid_stream():
    batcher = Batcher("fixed", PAD, batch_size=3)
    emitted = []
    for uid in range(7):
        emitted += [b["uids"] for b in batcher.add(make_sample(uid, 5))]
    assert emitted == [[0, 1, 2], [3, 4, 5]] and batcher.pending_uids() == [6]


# ---------------------------------------------------------------------------------------------- tokens

def test_tokens_mode_respects_budgets_and_loses_no_sample():
    samples = list(demo_like_stream(400, seed=3))
    batcher = Batcher("tokens", PAD, max_tokens=1024, max_mel_frames=300, buffer_size=32)
    batches = run(batcher, samples)
    by_uid = {s["uid"]: s for s in samples}
    uids = [u for b in batches for u in b["uids"]]
    assert sorted(uids) == list(range(400)) and len(uids) == 400  # none lost, none twice
    for b in batches:
        rows, length = b["input_ids"].shape
        assert rows * length <= 1024
        if b["mels"] is not None:
            assert b["mels"].shape[0] * b["mels"].shape[2] <= 300
        assert length == max(len(by_uid[u]["input_ids"]) for u in b["uids"])  # padded per batch
        for row, uid in enumerate(b["uids"]):  # each row is its sample
            ids = by_uid[uid]["input_ids"]
            assert b["input_ids"][row, :len(ids)].tolist() == ids
            assert b["labels"][row, :len(ids)].tolist() == by_uid[uid]["labels"]
    # bucketing: rows of a batch hold samples of similar length, so padding is far below fixed batches
    fixed = run(Batcher("fixed", PAD, batch_size=8), samples)
    assert packing_efficiency(batches) > packing_efficiency(fixed) + 0.1


def test_tokens_mode_pending_uids_mid_stream():
    batcher = Batcher("tokens", PAD, max_tokens=40, buffer_size=4)
    lengths = [10, 30, 10, 10]  # sorted: 10 10 10 | 30 -> 3 x 10 fits, 4 x 30 does not
    emitted = []
    for uid, n in enumerate(lengths):
        emitted += batcher.add(make_sample(uid, n))
    # the batch of three short samples is closed by the budget; the lone 30 (1 x 30, 2 x 30 > 40) is full too
    assert [b["uids"] for b in emitted] == [[0, 2, 3], [1]] and batcher.pending_uids() == []
    batcher = Batcher("tokens", PAD, max_tokens=150, buffer_size=4)
    emitted = []
    for uid, n in enumerate([40, 10, 45, 10]):
        emitted += batcher.add(make_sample(uid, n))
    # sorted 10 10 40 | 45: 3 x 40 fits, 4 x 45 does not; the tail [45] could take a second row of 45: waits
    assert [b["uids"] for b in emitted] == [[1, 3, 0]]
    assert batcher.pending_uids() == [2]
    assert [b["uids"] for b in batcher.flush()] == [[2]] and batcher.pending_uids() == []


# ---------------------------------------------------------------------------------------------- packed

def test_collate_packed_exact_ids_positions_segments_labels_and_mel_order():
    a = make_sample(1, 3, [5], first_id=10, mel_value=1.0)
    b = make_sample(2, 2, [], first_id=20)
    c = make_sample(3, 4, [2, 3], first_id=30, mel_value=3.0)
    d = make_sample(4, 1, [4], first_id=40, mel_value=4.0)
    batch = collate_packed([[a, b, d], [c]], PAD)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 40, PAD, PAD],
                                           [30, 31, 32, 33, PAD, PAD, PAD, PAD]]  # 6 rounded up to 8
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    # each sample's first label is -100 (never predicted across a boundary), its own labels after it
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21, -100, -100, -100],
                                        [-100, -100, 32, 33, -100, -100, -100, -100]]
    # chunks in row-major order of the samples: a (row 0), d (row 0), then c's two chunks (row 1)
    assert batch["mel_lengths"].tolist() == [5, 4, 2, 3]
    assert batch["mels"][:, 0, 0].tolist() == [1.0, 4.0, 3.0, 3.5]
    assert batch["mels"][2, 0, :].tolist() == [3.0, 3.0, 0.0, 0.0, 0.0]
    assert batch["keys"] == ["key1", "key2", "key4", "key3"] and batch["uids"] == [1, 2, 4, 3]
    assert batch["num_samples"] == 4 and batch["num_tokens"] == 10 and batch["num_audio_s"] == 2.0
    assert collate_packed([[a, b, d]], PAD, max_len=7)["input_ids"].shape == (1, 7)  # rounding stops at max_len


def test_packed_stream_is_efficient_complete_and_well_formed():
    samples = list(demo_like_stream(1500, seed=0))
    by_uid = {s["uid"]: s for s in samples}
    for max_seq_len, max_tokens in ((1024, 4096), (2048, 8192)):
        batches = run(Batcher("packed", PAD, max_tokens=max_tokens, max_seq_len=max_seq_len, buffer_size=64),
                      samples)
        assert packing_efficiency(batches) >= 0.97
        uids = [u for b in batches for u in b["uids"]]
        assert sorted(uids) == list(range(1500)) and len(uids) == 1500
        for b in batches:
            assert b["input_ids"].shape[0] <= max_tokens // max_seq_len
            assert b["input_ids"].shape[1] <= max_seq_len and b["input_ids"].shape[1] % 8 == 0
            assert all(n <= max_seq_len for n in real_tokens_of_rows(b))
            # walk each row by segment: ids, positions and labels are each sample's own
            order = iter(b["uids"])
            for row in range(b["input_ids"].shape[0]):
                seg_row = b["segment_ids"][row].tolist()
                for segment in range(1, max(seg_row) + 1):
                    where = [i for i, s in enumerate(seg_row) if s == segment]
                    sample = by_uid[next(order)]
                    assert b["input_ids"][row, where].tolist() == sample["input_ids"]
                    assert b["position_ids"][row, where].tolist() == list(range(len(where)))
                    assert b["labels"][row, where].tolist() == [-100] + sample["labels"][1:]
            expected_chunks = [m.shape[1] for u in b["uids"] for m in by_uid[u]["mels"]]
            assert b["mel_lengths"].tolist() == expected_chunks


def test_packed_mode_mel_cap_and_text_audio_sharing():
    samples = list(demo_like_stream(300, seed=5))
    batches = run(Batcher("packed", PAD, max_tokens=2048, max_seq_len=512, max_mel_frames=400, buffer_size=32),
                  samples)
    assert sorted(u for b in batches for u in b["uids"]) == list(range(300))
    for b in batches:
        if b["mels"] is not None:
            assert b["mels"].shape[0] * b["mels"].shape[2] <= 400
    # text-only and audio samples share rows
    assert any(b["mels"] is not None and len(b["mel_lengths"]) < b["num_samples"] for b in batches)


def test_packed_batches_fill_the_token_budget():
    # Short samples (the demo mix): rows fill up long before a batch's rows do. Every batch takes its 4 rows
    # (only the flush at the end may hold fewer), nearly full, and says what its budget was.
    samples = list(short_mix_stream(900, seed=1))
    batches = run(Batcher("packed", PAD, max_tokens=2048, max_seq_len=512, buffer_size=64), samples)
    assert sorted(u for b in batches for u in b["uids"]) == list(range(900))
    assert all(b["budget_tokens"] == 4 * 512 for b in batches)
    assert all(b["input_ids"].shape[0] == 4 for b in batches[:-2])
    assert budget_fill(batches) >= 0.95 and packing_efficiency(batches) >= 0.97
    assert budget_fill(batches) == sum(b["num_tokens"] for b in batches) / (2048 * len(batches))
    # max_tokens not a multiple of max_seq_len: the budget is the rows that fit
    assert run(Batcher("packed", PAD, max_tokens=2000, max_seq_len=512), samples[:200])[0]["budget_tokens"] == 1536
    # tokens mode: the budget is max_tokens
    tokens = run(Batcher("tokens", PAD, max_tokens=1024, buffer_size=32), samples[:300])
    assert {b["budget_tokens"] for b in tokens} == {1024} and 0.5 < budget_fill(tokens) <= 1.0
    with pytest.raises(ValueError, match="needs batches with 'budget_tokens'"):
        budget_fill(run(Batcher("fixed", PAD, batch_size=4), samples[:8]))


def test_a_batch_that_must_go_out_is_completed_with_waiting_rows():
    # Samples of 100 and 90 tokens fill no 128-token row; pairs of 63 do (126 >= 98 %) and go out two rows a
    # batch. At its wait limit (4 buffers of arrivals) the 100 goes out, in a batch completed by another row.
    batcher = Batcher("packed", PAD, max_tokens=2 * 128, max_seq_len=128, buffer_size=4)
    out = batcher.add(make_sample(0, 100)) + batcher.add(make_sample(1, 90))
    for uid in range(2, 30):
        out += batcher.add(make_sample(uid, 63))
    assert all(b["input_ids"].shape[0] == 2 for b in out)
    assert out[0]["uids"] == [2, 3, 4, 5] and real_tokens_of_rows(out[0]) == [126, 126]
    # sample 0 waited 16 arrivals: its batch takes the next full row; the 90 follows two arrivals later
    assert [b["uids"] for b in out[3:5]] == [[0, 14, 15], [1, 16, 17]]
    assert real_tokens_of_rows(out[3]) == [100, 126] and batcher.pending_uids() == []


@pytest.mark.parametrize("mode", ["tokens", "packed"])
def test_restore_after_any_cut_continues_exactly(mode):
    samples = list(short_mix_stream(400, seed=4))
    settings = dict(max_tokens=1024, max_seq_len=512, buffer_size=24)
    whole = []
    batcher = Batcher(mode, PAD, **settings)
    states = []  # after each add: (batches so far, samples held with their arrival index)
    for sample in samples:
        whole += batcher.add(sample)
        states.append((len(whole), [(samples[u], u) for u in batcher.pending_uids()]))
    whole += batcher.flush()
    for k in (23, 24, 57, 150, 399):
        done, held = states[k]
        resumed = Batcher(mode, PAD, **settings)
        resumed.restore(held, k + 1)
        assert resumed.pending_uids() == [s["uid"] for s, _ in held]
        rest = run(resumed, samples[k + 1:])
        assert [b["uids"] for b in rest] == [b["uids"] for b in whole[done:]]
        for x, y in zip(rest, whole[done:]):
            assert torch.equal(x["input_ids"], y["input_ids"]) and x["budget_tokens"] == y["budget_tokens"]
    with pytest.raises(ValueError, match="needs a fresh batcher"):
        batcher.restore([], 0)
    with pytest.raises(ValueError, match=r"not what a 'packed' batcher holds after a cut"):
        Batcher("packed", PAD, **settings).restore([(samples[3], 3), (samples[1], 1)], 10)
    with pytest.raises(ValueError, match=r"not what a 'fixed' batcher holds after a cut"):
        Batcher("fixed", PAD, batch_size=2).restore([(samples[0], 0), (samples[1], 1)], 2)


def test_packed_pending_uids_and_bounded_wait():
    batcher = Batcher("packed", PAD, max_tokens=32, max_seq_len=32, buffer_size=4)
    out = []
    for uid, n in enumerate([20, 12, 5]):
        out += batcher.add(make_sample(uid, n))
    assert out == [] and batcher.pending_uids() == [0, 1, 2]
    # the 4th sample fills the buffer: rows [20 12] (32, full) and [10 5] (15, waits)
    [batch] = batcher.add(make_sample(3, 10))
    assert batch["uids"] == [0, 1] and real_tokens_of_rows(batch) == [32]
    assert batcher.pending_uids() == [2, 3]
    # on a long stream no sample waits more than about five buffers' worth of arrivals, and the held set
    # stays under the buffer plus one partial batch of full rows (3 rows of >= 30-token samples)
    batcher = Batcher("packed", PAD, max_tokens=4096, max_seq_len=1024, buffer_size=16)
    arrival, worst, most_held = {}, 0, 0
    for n, sample in enumerate(demo_like_stream(1200, seed=9)):
        arrival[sample["uid"]] = n
        for b in batcher.add(sample):
            worst = max(worst, max(n - arrival[u] for u in b["uids"]))
        most_held = max(most_held, len(batcher.pending_uids()))
    assert 0 < worst <= 5 * 16
    assert 16 <= most_held < 16 + 3 * 1024 // 30


# ---------------------------------------------------------------------------------------------- common

@pytest.mark.parametrize("mode", BATCHING_MODES)
def test_same_input_gives_identical_batches(mode):
    samples = list(demo_like_stream(250, seed=11))
    first = run(Batcher(mode, PAD, batch_size=5, max_tokens=2048, max_seq_len=1024, buffer_size=24), samples)
    second = run(Batcher(mode, PAD, batch_size=5, max_tokens=2048, max_seq_len=1024, buffer_size=24), samples)
    assert len(first) == len(second) > 10
    for x, y in zip(first, second):
        assert x.keys() == y.keys() and x["uids"] == y["uids"]
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[key]), key


@pytest.mark.parametrize("mode", ["tokens", "packed"])
def test_pending_uids_are_exactly_the_samples_not_yet_emitted(mode):
    batcher = Batcher(mode, PAD, max_tokens=1024, max_seq_len=512, buffer_size=16)
    emitted = []
    for n, sample in enumerate(demo_like_stream(200, seed=2)):
        emitted += [u for b in batcher.add(sample) for u in b["uids"]]
        pending = batcher.pending_uids()
        assert pending == sorted(pending)  # arrival order (uids are arrival indices here)
        assert sorted(emitted + pending) == list(range(n + 1))


def test_reject_reason():
    long_sample, audio = make_sample(0, 600), make_sample(1, 10, [300, 100])
    assert encoder_frames(audio) == 600  # two chunks padded to the longer one
    assert Batcher("packed", PAD, max_tokens=1024, max_seq_len=512).reject_reason(long_sample) == "too_many_tokens"
    assert Batcher("packed", PAD, max_tokens=1024, max_seq_len=600).reject_reason(long_sample) is None
    assert Batcher("tokens", PAD, max_tokens=599).reject_reason(long_sample) == "too_many_tokens"
    assert Batcher("tokens", PAD, max_tokens=600).reject_reason(long_sample) is None
    assert Batcher("fixed", PAD, max_tokens=16).reject_reason(long_sample) is None
    for mode in BATCHING_MODES:
        assert Batcher(mode, PAD, max_mel_frames=599).reject_reason(audio) == "too_many_mel_frames"
        assert Batcher(mode, PAD, max_mel_frames=600).reject_reason(audio) is None
        assert Batcher(mode, PAD).reject_reason(audio) is None  # 0: no cap
    with pytest.raises(ValueError, match=r"sample 'key0' \(600 tokens, 0 mel frames\) cannot be batched: "
                                         r"too_many_tokens; check reject_reason\(\)"):
        Batcher("tokens", PAD, max_tokens=100).add(long_sample)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match=r"^batching mode='pack': expected one of \['fixed', 'tokens', 'packed'\]$"):
        Batcher("pack", PAD)
    for name in ("batch_size", "max_tokens", "max_seq_len", "buffer_size"):
        with pytest.raises(ValueError, match=rf"^batching {name}=0: expected an integer >= 1$"):
            Batcher("tokens", PAD, **{name: 0})
    with pytest.raises(ValueError, match=r"^batching max_mel_frames=-1: expected an integer >= 0$"):
        Batcher("fixed", PAD, max_mel_frames=-1)
    with pytest.raises(ValueError, match=r"^batching max_seq_len=4096 is larger than max_tokens=2048"):
        Batcher("packed", PAD, max_tokens=2048, max_seq_len=4096)
    Batcher("tokens", PAD, max_tokens=2048, max_seq_len=4096)  # max_seq_len only bounds packed rows
    with pytest.raises(ValueError, match=r"has no 'uid'"):
        Batcher("fixed", PAD).add({k: v for k, v in make_sample(0, 3).items() if k != "uid"})
    with pytest.raises(ValueError, match=r"^packing_efficiency got no batches"):
        packing_efficiency([])
    with pytest.raises(ValueError, match=r"^collate got no samples"):
        collate([], PAD)

"""The shard loader on real tiny tar shards: rank/worker split, batch layout, exact resume, skips, config checks.

Also the builders test_loader_mix.py and test_loader_world.py share (text-only TTS records decode fast)."""
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset

import data.loading.samples
from data.features import SAMPLE_RATE, log_mel, mel_frames, num_audio_tokens
from data.loading.loader import DataConfig, DatasetConfig, build_loader, iter_eval_samples
from data.loading.shard_reader import resolve_shards, shard_counts
from data.shards import INDEX_FORMAT
from data.tasks.pieces import render_asr
from data.text_tokenizer import (
    build_text_tokenizer,
    extend_tokenizer,
    load_tokenizer,
    special_ids,
)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _text(i):
    return f"tone {WORDS[i % 10]} {WORDS[i // 10 % 10]}"


def _nan_wav():
    buf = io.BytesIO()
    soundfile.write(buf, np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), SAMPLE_RATE, format="WAV",
                    subtype="FLOAT")
    return buf.getvalue()


def _flac(duration_s, freq_hz):
    t = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buf.getvalue()


def _good(i, duration_s=None, meta_duration=True):
    duration_s = duration_s or 0.2 + 0.05 * (i % 5)
    meta = {"text": _text(i), "speaker": f"spk{i % 3}", "language": "en"}
    if meta_duration:
        meta["duration_s"] = duration_s
    return {"flac": _flac(duration_s, 200 + 20 * i), "json": json.dumps(meta).encode(), "txt": b"ignored"}


def _write(folder, shards):
    """shards: list of lists of (key, members); writes the tars and index.json, returns {key: members}."""
    folder.mkdir(parents=True)
    entries, samples = [], {}
    for s, shard in enumerate(shards):
        name = f"shard-{s:06d}.tar"
        with webdataset.TarWriter(str(folder / name)) as writer:
            for key, members in shard:
                writer.write({"__key__": key, **members})
                samples[key] = members
        entries.append({"name": name, "num_samples": len(shard)})
    (folder / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, "shards": entries}))
    return samples


def _dataset(folder, num_shards, per_shard):
    return _write(folder, [[(f"s{s}_{i}", _good(s * per_shard + i)) for i in range(per_shard)]
                           for s in range(num_shards)])


def make_tokenizer(path) -> str:
    """A small extended tokenizer (8 audio codes) for these records, saved in `path`."""
    texts = [_text(i) for i in range(100)] + ["Transcribe the speech."]
    extend_tokenizer(build_text_tokenizer(texts, vocab_size=300), 8).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _cfg(tok_dir, shards=(), **kw):
    return DataConfig(**{"shards": shards, "tokenizer": tok_dir, "batch_size": 3, "num_workers": 2,
                         "shuffle_buffer": 4, **kw})


@pytest.mark.parametrize("num_shards,per_shard", [(3, 8), (8, 3)], ids=["split_by_sample", "split_by_shard"])
def test_ranks_split_one_epoch_disjoint_and_complete(tmp_path, tok_dir, num_shards, per_shard):
    samples = _dataset(tmp_path / "ds", num_shards, per_shard)
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")])
    # 24 samples over 2 ranks x 2 workers: 6 per worker, so one epoch is 4 batches of 3 per rank.
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, seed=7)
        keys = [k for _ in range(4) for k in next(loader)["keys"]]
        assert len(keys) == len(set(keys)) == 12
        per_rank.append(set(keys))
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == set(samples)


def test_batch_layout(tmp_path, tok_dir):
    samples = _dataset(tmp_path / "ds", 2, 4)
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    loader = build_loader(_cfg(tok_dir, [str(tmp_path / "ds" / "shard-{000000..000001}.tar")], num_workers=0),
                          rank=0, world_size=1, seed=0)
    batch = next(loader)
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["attention_mask"].shape == batch["labels"].shape == (B, T)
    assert batch["mels"].shape[:2] == (3, 128) and batch["mels"].dtype == torch.float32
    total_s = 0.0
    for i, key in enumerate(batch["keys"]):
        wave = torch.from_numpy(soundfile.read(io.BytesIO(samples[key]["flac"]), dtype="float32")[0])
        total_s += len(wave) / SAMPLE_RATE
        frames = mel_frames(len(wave))
        assert batch["mel_lengths"][i] == frames
        assert torch.equal(batch["mels"][i, :, :frames], log_mel(wave))
        assert not batch["mels"][i, :, frames:].any()
        expected = render_asr(_text_of(samples[key]), [frames], tok, ids)
        n = len(expected.input_ids)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["input_ids"][i].tolist() == expected.input_ids + [ids.end_of_text] * (T - n)
        assert batch["labels"][i].tolist() == expected.labels + [-100] * (T - n)
        assert batch["input_ids"][i].tolist().count(ids.audio_patch) == num_audio_tokens(frames)
        answer = [t for t in batch["labels"][i].tolist() if t != -100]
        assert tok.decode(answer) == _text_of(samples[key]) + "<|endoftext|>"
    assert batch["num_audio_s"] == pytest.approx(total_s)


def _text_of(members):
    return json.loads(members["json"])["text"]


def _mixed_dataset(folder):
    """15 good samples with 5 bad ones spread over 4 shards."""
    bad = {"s0_2": {"flac": b"fLaC not really a flac", "json": json.dumps({"text": "x"}).encode()},
           "s1_1": {"flac": _flac(0.2, 300), "json": b"{not json"},
           "s2_3": _good(90, duration_s=1.5),                       # too long by its metadata
           "s3_0": _good(91, duration_s=1.5, meta_duration=False),  # too long once decoded
           "s3_3": {"wav": _nan_wav(), "json": json.dumps({"text": "nan"}).encode()}}
    shards, n = [], 0
    for s in range(4):
        shard = []
        for i in range(5):
            key = f"s{s}_{i}"
            shard.append((key, bad[key] if key in bad else _good(n)))
            n += 1
        shards.append(shard)
    return _write(folder, shards), bad


def test_skips_are_counted_by_reason(tmp_path, tok_dir):
    samples, bad = _mixed_dataset(tmp_path / "ds")
    loader = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], batch_size=1, num_workers=0, shuffle_buffer=0,
                               max_audio_s=1.0), rank=0, world_size=1, seed=0)
    # shuffle_buffer=0 and a fixed shard order: samples arrive shard by shard in file order.
    keys = [next(loader)["keys"][0] for _ in range(15)]
    assert set(keys) == set(samples) - set(bad)
    assert loader.stats()["skipped"] == {"bad_audio": 1, "bad_json": 1, "too_long": 2, "non_finite_audio": 1}
    assert sorted(k.split(" (")[0] for k in loader.stats()["skipped_keys"]) == sorted(
        f"shard-00000{k[1]}.tar:{k}" for k in bad)
    assert all(k.endswith(")") and k.split(" (")[1][:-1] in loader.stats()["skipped"]
               for k in loader.stats()["skipped_keys"])


def test_truncated_shard_keeps_its_good_samples(tmp_path, tok_dir):
    samples = _dataset(tmp_path / "ds", 2, 4)
    tar = tmp_path / "ds" / "shard-000001.tar"
    data_bytes = tar.read_bytes()
    tar.write_bytes(data_bytes[:len(data_bytes) // 2])  # cut inside the third sample or so
    loader = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], batch_size=1, num_workers=0, shuffle_buffer=0),
                          rank=0, world_size=1, seed=0)
    keys = set()
    while loader.stats()["skipped"] == {}:
        keys.update(next(loader)["keys"])
    assert loader.stats()["skipped"] == {"bad_shard": 1}
    # The sample being read when the tar broke is the one named; every sample before it arrived.
    (named,) = loader.stats()["skipped_keys"]
    assert named.startswith("shard-000001.tar:s1_") and named.endswith(" (bad_shard)")
    named = named.removesuffix(" (bad_shard)")
    assert {k for k in samples if k.startswith("s0_")} <= keys
    assert {k for k in keys if k.startswith("s1_")} == {f"s1_{i}" for i in range(int(named[-1]))}


def test_exact_resume(tmp_path, tok_dir):
    _mixed_dataset(tmp_path / "ds")
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")], batch_size=2, shuffle_buffer=3, max_audio_s=1.0)
    k, m = 5, 7  # odd k: the resumed run must start at worker 1; k + m crosses into the second epoch

    reference = build_loader(cfg, rank=0, world_size=1, seed=3)
    expected = [next(reference) for _ in range(k + m)]

    first = build_loader(cfg, rank=0, world_size=1, seed=3)
    for i in range(k):
        assert next(first)["keys"] == expected[i]["keys"]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may store it as JSON
    del first

    resumed = build_loader(cfg, rank=0, world_size=1, seed=3)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = next(resumed)
        assert got["keys"] == want["keys"]
        assert got["num_audio_s"] == want["num_audio_s"]
        for name in ("input_ids", "attention_mask", "labels", "mels", "mel_lengths"):
            assert torch.equal(got[name], want[name]), name
    assert resumed.stats() == reference.stats()
    assert sum(reference.stats()["skipped"].values()) >= 5  # the bad samples were met along the way


def test_resume_skips_without_decoding(tmp_path, tok_dir, monkeypatch):
    _dataset(tmp_path / "ds", 2, 5)
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")], batch_size=2, num_workers=0)
    first = build_loader(cfg, 0, 1, seed=1)
    [next(first) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["workers"][0]["datasets"]["default"]["consumed"] == 8
    assert state["workers"][0]["pending"] == []  # a fixed batcher holds nothing right after a batch

    decoded = []
    real_decode = data.loading.samples.decode_audio
    monkeypatch.setattr(data.loading.samples, "decode_audio",
                        lambda b, name: decoded.append(name) or real_decode(b, name))
    resumed = build_loader(cfg, 0, 1, seed=1)
    resumed.load_state_dict(state)
    assert next(resumed)["keys"] == next(first)["keys"]
    assert len(decoded) == 4  # the two batches' own samples, none of the 8 skipped ones

    # Samples the batcher held at the checkpoint are decoded again, and only those.
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")], num_workers=0, batching="tokens", max_tokens=60, batch_buffer=4)
    first = build_loader(cfg, 0, 1, seed=1)
    next(first)
    state = first.state_dict()
    held = len(state["workers"][0]["pending"])
    decoded.clear()
    want = next(first)["keys"]
    uninterrupted = len(decoded)
    decoded.clear()
    resumed = build_loader(cfg, 0, 1, seed=1)
    resumed.load_state_dict(state)
    assert next(resumed)["keys"] == want
    assert held > 0 and len(decoded) == uninterrupted + held


def test_resume_errors(tmp_path, tok_dir):
    _dataset(tmp_path / "ds", 2, 4)
    state = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")]), 0, 2, 0).state_dict()
    other = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], num_workers=1), 0, 2, 0)
    with pytest.raises(ValueError, match=r"saved with world_size=2, num_workers=2 and this run has world_size=2, "
                                         r"num_workers=1: re-splitting needs every old rank's state .*got ranks \[0\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed 0, this run has seed 5"):
        build_loader(_cfg(tok_dir, [str(tmp_path / "ds")]), 0, 2, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="other datasets or shards"):
        build_loader(_cfg(tok_dir, [str(tmp_path / "ds" / "shard-000000.tar")]), 0, 2, 0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"loader state version 1: expected 2"):
        build_loader(_cfg(tok_dir, [str(tmp_path / "ds")]), 0, 2, 0).load_state_dict({**state, "version": 1})


def test_too_few_samples_for_the_slots(tmp_path, tok_dir):
    _dataset(tmp_path / "ds", 1, 3)
    with pytest.raises(ValueError, match=r"dataset 'default' \(data.shards\) holds 3 samples, fewer than the 4 "
                                         r"\(rank, worker\) slots of world_size=4 x num_workers=1"):
        build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], num_workers=0), rank=3, world_size=4, seed=0)


def test_all_bad_is_a_clear_error(tmp_path, tok_dir):
    _write(tmp_path / "ds", [[(f"b{i}", {"flac": b"junk", "json": b"{}"}) for i in range(4)]])
    loader = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], num_workers=0), rank=1, world_size=2, seed=0)
    with pytest.raises(ValueError, match=r"rank 1 worker 0 got no usable sample in epoch 0 of dataset 'default' "
                                         r"\(2 raw samples, skipped: \{'bad_audio': 2\}\)"):
        next(loader)


def _tts(i, words=3):
    """A text-only TTS record (no audio to decode): text of `words` words, 1-7 audio codes."""
    text = " ".join(WORDS[(i + k) % 10] for k in range(words))
    return {"json": json.dumps({"task": "tts", "text": text}).encode(), "codes.npy": _npy(np.arange(i % 7 + 1) % 8)}


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_length_filter_and_batcher_rejects_are_counted(tmp_path, tok_dir):
    _write(tmp_path / "ds", [[("short", _good(0, duration_s=0.1)), ("wordy", _tts(3, words=60)),
                              ("ok1", _good(1, duration_s=0.3)), ("ok2", _good(2, duration_s=0.35))]])
    cfg = _cfg(tok_dir, [str(tmp_path / "ds")], num_workers=0, shuffle_buffer=0, min_audio_s=0.2,
               batching="tokens", max_tokens=120, batch_buffer=2)
    loader = build_loader(cfg, 0, 1, 0)
    assert sorted(next(loader)["keys"]) == ["ok1", "ok2"]
    assert loader.stats()["skipped"] == {"too_short": 1, "too_many_tokens": 1}
    assert sorted(loader.stats()["skipped_keys"]) == ["shard-000000.tar:short (too_short)",
                                                      "shard-000000.tar:wordy (too_many_tokens)"]


def test_bare_tars_are_counted_by_one_scan(tmp_path, tok_dir):
    _write(tmp_path / "ds", [[(f"k{i}", _good(i)) for i in range(5)], [(f"j{i}", _tts(i)) for i in range(3)]])
    (tmp_path / "ds" / "index.json").unlink()
    paths = [str(tmp_path / "ds" / "shard-000000.tar"), str(tmp_path / "ds" / "shard-000001.tar")]
    assert shard_counts(paths) == [5, 3]
    keys = [set(next(build_loader(_cfg(tok_dir, paths, num_workers=0, batch_size=4), r, 2, 0))["keys"])
            for r in range(2)]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == 8


@pytest.mark.parametrize("overrides,message", [
    ({"datasets": [DatasetConfig("a", ["x"])]}, "data.datasets and data.shards are both set"),
    ({"shards": [], "datasets": [DatasetConfig("a", ["x"]), DatasetConfig("a", ["y"])]},
     r"data.datasets\[1\].name='a': expected a non-empty name unique"),
    ({"shards": [], "datasets": [DatasetConfig("a", ["x"], weight=0.0)]}, r"data.datasets\[0\].weight=0.0"),
    ({"shards": [], "datasets": [DatasetConfig("a", ["x"], task="sing")]}, r"data.datasets\[0\].task='sing'"),
    ({"shards": [], "datasets": [DatasetConfig("a", [])]}, r"data.datasets\[0\].shards is empty"),
    ({"batching": "bucket"}, r"data.batching='bucket': expected one of \['fixed', 'tokens', 'packed'\]"),
    ({"max_seq_len": 0}, r"data.max_seq_len=0: expected an integer >= 1"),
    ({"batching": "packed", "max_seq_len": 512, "max_tokens": 256}, "data.max_seq_len=512 is larger than"),
    ({"min_audio_s": 40.0}, r"data.min_audio_s=40.0: expected seconds >= 0 and below data.max_audio_s=30.0"),
    ({"worker_threads": -1}, r"data.worker_threads=-1: expected an integer >= 0"),
    ({"worker_priority": "low"}, r"data.worker_priority='low': expected one of \['auto', 'normal', 'idle'\]"),
])
def test_config_errors_name_the_key(tmp_path, tok_dir, overrides, message):
    _dataset(tmp_path / "ds", 1, 2)
    with pytest.raises(ValueError, match=message):
        build_loader(_cfg(tok_dir, **{"shards": [str(tmp_path / "ds")], **overrides}), 0, 1, 0)


def test_bad_shard_patterns(tmp_path, tok_dir):
    _dataset(tmp_path / "ds", 2, 1)
    assert [p.rsplit("/", 1)[1] for p in resolve_shards([str(tmp_path / "ds" / "*.tar")])] == [
        "shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ValueError, match="nothing matches"):
        resolve_shards([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(ValueError, match="has no index.json"):
        resolve_shards([str(tmp_path)])
    with pytest.raises(ValueError, match="more than once"):
        resolve_shards([str(tmp_path / "ds"), str(tmp_path / "ds" / "shard-000000.tar")])


def test_eval_samples_in_file_order(tmp_path, tok_dir):
    samples = _write(tmp_path / "ds", [[("a", _good(1)), ("b", {"flac": b"junk", "json": b"{}"}),
                                        ("c", _good(2, duration_s=25.5)), ("d", _good(3))]])
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    got = list(iter_eval_samples([str(tmp_path / "ds")], tok, ids, "Transcribe the speech.", max_samples=2))
    assert [s["key"] for s in got] == ["a", "c"]
    assert got[1]["text"] == _text_of(samples["c"])
    assert got[1]["mel_lengths"].tolist() == [mel_frames(25 * SAMPLE_RATE), mel_frames(SAMPLE_RATE // 2)]
    assert got[1]["mels"].shape == (2, 128, mel_frames(25 * SAMPLE_RATE))
    assert got[1]["prompt_ids"] == render_asr("", got[1]["mel_lengths"].tolist(), tok, ids,
                                              "Transcribe the speech.", with_answer=False).input_ids
    assert got[1]["prompt_ids"].count(ids.audio_patch) == 313 + num_audio_tokens(mel_frames(SAMPLE_RATE // 2))


@pytest.mark.parametrize("priority, policy", [("auto", "SCHED_IDLE"), ("normal", "SCHED_OTHER"), ("idle", "SCHED_IDLE")])
def test_workers_take_one_thread_and_the_configured_priority(tmp_path, tok_dir, priority, policy, monkeypatch):
    """A worker computes log-mels with one torch thread (off the training process's cores), whatever the
    training process runs with, and at data.worker_priority (auto: idle here, with no GPU; the training
    process keeps its own class). Each worker writes what it runs with (fork carries the patch)."""
    from data.loading import streams

    _dataset(tmp_path / "ds", 2, 4)
    seen = tmp_path / "threads"
    seen.mkdir()
    original = streams.WorkerStreams.__iter__

    def recording(self):
        info = torch.utils.data.get_worker_info()
        (seen / str(info.id)).write_text(f"{torch.get_num_threads()} {os.sched_getscheduler(0)}")
        return original(self)

    monkeypatch.setattr(streams.WorkerStreams, "__iter__", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], worker_priority=priority), 0, 1, 0)
        next(loader)
    finally:
        torch.set_num_threads(before)
    assert sorted(p.read_text() for p in seen.iterdir()) == [f"1 {getattr(os, policy)}"] * 2
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_workers_with_several_threads_start_clean_and_give_the_same_batches(tmp_path, tok_dir):
    """data.worker_threads > 1: a forked worker that computes with several OpenMP threads after its parent
    used its own pool can hang in its first parallel region (it did here: this test hung before the workers
    started from a forkserver). They now start clean, with the configured threads and priority, and the
    batches are the one-thread workers'."""
    from data.loading.loader import _worker_context

    _dataset(tmp_path / "ds", 2, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(256, 256) @ torch.randn(256, 256)  # the parent's OpenMP pool is up
        batches = {}
        for threads in (1, 3):
            loader = build_loader(_cfg(tok_dir, [str(tmp_path / "ds")], worker_threads=threads), 0, 1, 0)
            batches[threads] = [next(loader) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    assert _worker_context(1) is None and _worker_context(3) == "forkserver"
    for one, three in zip(batches[1], batches[3]):
        assert one["keys"] == three["keys"]
        assert torch.equal(one["input_ids"], three["input_ids"]) and torch.equal(one["mels"], three["mels"])
    probe = ("import os, torch; from data.loading.loader import _start_worker; _start_worker(3, 'idle', 0); "
             "print(torch.get_num_threads(), os.sched_getscheduler(0) == os.SCHED_IDLE)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["3", "True"]

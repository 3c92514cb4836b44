"""I/O faults while reading shards and their index: injected at the loader's one open
(data.loading.shard_reader.open_shard).

A transient OSError (open or read) is retried after IO_RETRY_DELAYS_S and loses or repeats no sample; one
that outlasts the retries skips the rest of that shard counted as "io_error"; a corrupt tar is not retried;
a damaged index.json is warned about (naming the file and what is wrong) before its shards are scanned.
"""
import errno
import io
import json
import logging
import math
import os
import tarfile

import numpy as np
import pytest
import soundfile
import torch

import data.loading.shard_reader
from data.features import SAMPLE_RATE
from data.loading.loader import DataConfig, build_loader
from data.loading.shard_reader import read_shard, resolve_shards, scan_sample_count, shard_counts
from data.shards import INDEX_FORMAT, INDEX_NAME, ShardWriter, write_index
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer

torch.set_num_threads(1)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHARD_SIZES = (4, 6)
SCHEDULE = [0.5, 1.0, 2.0, 4.0]


def _text(i):
    return f"tone {WORDS[i % 10]} {WORDS[i // 10 % 10]}"


def _flac(i):
    t = np.arange(int((0.2 + 0.05 * (i % 4)) * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * math.pi * (200 + 20 * i) * t)).astype(np.float32), SAMPLE_RATE,
                    format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = [_text(i) for i in range(100)] + ["Transcribe the speech."]
    extend_tokenizer(build_text_tokenizer(texts, vocab_size=300), 8).save_pretrained(path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """Two shards as data.corpus.prepare writes them: s0_0..s0_3 and s1_0..s1_5 (flac then json), and index.json."""
    stats = []
    for s, size in enumerate(SHARD_SIZES):
        writer = ShardWriter(str(tmp_path / "ds"), max_samples=10_000, first_index=s)
        for i in range(size):
            meta = {"text": _text(10 * s + i), "language": "en"}
            writer.write(f"s{s}_{i}", {"flac": _flac(10 * s + i), "json": json.dumps(meta).encode()})
        stats += writer.close()
    write_index(str(tmp_path / "ds"), {"format": INDEX_FORMAT, "shards": stats})
    return tmp_path / "ds"


class _Clock:
    """Stands in for the loader's `time` module: records the waits instead of sleeping."""

    def __init__(self):
        self.waits = []

    def sleep(self, seconds):
        self.waits.append(seconds)


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(data.loading.shard_reader, "time", clock)
    return clock


class _FlakyFile(io.RawIOBase):
    """A shard file that returns at most 512 bytes per read (as a network filesystem may) and raises EIO on
    a read that starts at or past `fail_at`, while `faults` (shared, decremented) lasts."""

    def __init__(self, path, fail_at, faults):
        self.f, self.fail_at, self.faults, self.pos = open(path, "rb"), fail_at, faults, 0

    def readable(self):
        return True

    def read(self, size=-1):
        if self.pos >= self.fail_at and self.faults[0] > 0:
            self.faults[0] -= 1
            raise OSError(errno.EIO, "injected read fault")
        data = self.f.read(min(size, 512) if size >= 0 else 512)
        self.pos += len(data)
        return data

    def close(self):
        self.f.close()
        super().close()


def _data_offset(path, key):
    """Byte offset of the middle of sample `key`'s flac data in the tar."""
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{key}.flac")
        return info.offset_data + info.size // 2


def _inject(monkeypatch, target, fail_at=None, open_faults=0, read_faults=0):
    """Make the loader's opens of `target` fail `open_faults` times, then its reads `read_faults` times.

    Returns the list of paths opened, in order."""
    opened, open_left, read_left = [], [open_faults], [read_faults]

    def fake_open(path):
        opened.append(path)
        if path != target:
            return open(path, "rb")
        if open_left[0] > 0:
            open_left[0] -= 1
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return open(path, "rb") if fail_at is None else _FlakyFile(path, fail_at, read_left)

    monkeypatch.setattr(data.loading.shard_reader, "open_shard", fake_open)
    return opened


def _members(raws):
    return [(r["__key__"], r.get("flac"), r.get("json")) for r in raws]


# ------------------------------------------------------------------------------------------ reading a shard

def test_open_failing_twice_then_succeeding_yields_every_sample_once(folder, monkeypatch, clock):
    path = str(folder / "shard-000001.tar")
    clean = _members(read_shard(path))
    opened = _inject(monkeypatch, path, open_faults=2)
    assert _members(read_shard(path)) == clean
    assert [k for k, _, _ in clean] == [f"s1_{i}" for i in range(6)]
    assert opened == [path] * 3 and clock.waits == [0.5, 1.0]


def test_read_fault_mid_shard_once_keeps_keys_and_order(folder, monkeypatch, clock, caplog):
    path = str(folder / "shard-000001.tar")
    clean = _members(read_shard(path))
    opened = _inject(monkeypatch, path, fail_at=_data_offset(path, "s1_3"), read_faults=1)
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        assert _members(read_shard(path)) == clean  # same keys, same bytes, same order: none twice, none lost
    assert opened == [path] * 2 and clock.waits == [0.5]
    # s1_3 was being read: s1_0..s1_2 had come out, the re-open skipped them.
    assert [r.getMessage() for r in caplog.records] == [
        f"shard {path}: OSError: [Errno 5] injected read fault after 3 samples; re-opening it in 0.5 s "
        "(retry 1 of 4)"]


def test_retries_start_afresh_after_progress(folder, monkeypatch, clock):
    """Six faults, each further on than the last: more than the four retries, but each re-open made progress."""
    path = str(folder / "shard-000001.tar")
    clean = _members(read_shard(path))
    offsets = [_data_offset(path, f"s1_{i}") for i in range(6)]
    opens = []

    def fake_open(p):
        opens.append(p)
        # Open k fails in sample k's data; the seventh reads through.
        return _FlakyFile(p, offsets[len(opens) - 1] if len(opens) <= 6 else math.inf, [1])

    monkeypatch.setattr(data.loading.shard_reader, "open_shard", fake_open)
    assert _members(read_shard(path)) == clean
    assert len(opens) == 7 and clock.waits == [0.5] * 6


def test_persistent_read_fault_skips_the_rest_as_io_error(folder, monkeypatch, clock, caplog):
    path = str(folder / "shard-000001.tar")
    _inject(monkeypatch, path, fail_at=_data_offset(path, "s1_3"), read_faults=100)
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        raws = list(read_shard(path))
    assert [r["__key__"] for r in raws] == ["s1_0", "s1_1", "s1_2", "s1_3"]
    assert {k: raws[-1][k] for k in ("__error__", "__reason__")} == {
        "__error__": "OSError: [Errno 5] injected read fault", "__reason__": "io_error"}
    assert clock.waits == SCHEDULE
    assert caplog.records[-1].getMessage() == (
        f"shard {path}: OSError: [Errno 5] injected read fault persists after 4 retries; its rest from sample "
        "s1_3 on is skipped (io_error)")
    assert len(caplog.records) == 5


def test_persistent_open_failure_is_an_io_error_marker(folder, monkeypatch, clock):
    path = str(folder / "shard-000000.tar")
    opened = _inject(monkeypatch, path, open_faults=100)
    (marker,) = list(read_shard(path))
    assert marker == {"__key__": "<unreadable shard>", "__url__": path, "__reason__": "io_error",
                      "__error__": f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'"}
    assert len(opened) == 5 and clock.waits == SCHEDULE


def test_marker_names_the_undelivered_sample_when_reopening_fails(folder, monkeypatch, clock):
    """A read fault in s1_3, then the file is gone for every re-open: s1_3 is named, not the shard."""
    path = str(folder / "shard-000001.tar")
    fail_at, opens = _data_offset(path, "s1_3"), []

    def fake_open(p):
        opens.append(p)
        if len(opens) > 1:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", p)
        return _FlakyFile(p, fail_at, [1])

    monkeypatch.setattr(data.loading.shard_reader, "open_shard", fake_open)
    raws = list(read_shard(path))
    assert [r["__key__"] for r in raws] == ["s1_0", "s1_1", "s1_2", "s1_3"]
    assert (raws[-1]["__reason__"], raws[-1]["__error__"]) == (
        "io_error", f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'")
    assert len(opens) == 5 and clock.waits == SCHEDULE


def test_corrupt_tar_is_not_retried(folder, monkeypatch, clock):
    path = folder / "shard-000001.tar"
    cut_at = _data_offset(str(path), "s1_2")
    path.write_bytes(path.read_bytes()[:cut_at])
    opened = _inject(monkeypatch, str(path))
    raws = list(read_shard(str(path)))
    assert [r["__key__"] for r in raws] == ["s1_0", "s1_1", "s1_2"]
    assert raws[-1]["__reason__"] == "bad_shard" and raws[-1]["__error__"] == "ReadError: unexpected end of data"
    assert opened == [str(path)] and clock.waits == []


# ------------------------------------------------------------------------------------------ through the loader

def _epoch_keys(tok_dir, folder, num_batches):
    cfg = DataConfig(shards=[str(folder)], tokenizer=tok_dir, batch_size=1, num_workers=0, shuffle_buffer=0)
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    return [next(loader)["keys"][0] for _ in range(num_batches)], loader.stats()


def test_loader_read_fault_once_gives_the_same_sample_sequence(folder, tok_dir, monkeypatch, clock):
    clean, clean_stats = _epoch_keys(tok_dir, folder, 12)
    path = str(folder / "shard-000001.tar")
    _inject(monkeypatch, path, fail_at=_data_offset(path, "s1_3"), read_faults=1)
    keys, stats = _epoch_keys(tok_dir, folder, 12)
    assert keys == clean and sorted(keys[:10]) == sorted(f"s0_{i}" for i in range(4)) + [f"s1_{i}" for i in range(6)]
    assert stats == clean_stats == {"skipped": {}, "skipped_keys": []}
    assert clock.waits == [0.5]


def test_loader_counts_a_persistent_fault_as_io_error(folder, tok_dir, monkeypatch, clock):
    path = str(folder / "shard-000001.tar")
    # Five failing reads: the first try and the four retries of epoch 0; epoch 1 reads the shard whole.
    _inject(monkeypatch, path, fail_at=_data_offset(path, "s1_3"), read_faults=5)
    keys, stats = _epoch_keys(tok_dir, folder, 8)  # 7 usable in epoch 0; the marker is counted by batch 8
    assert sorted(keys[:7]) == [f"s0_{i}" for i in range(4)] + ["s1_0", "s1_1", "s1_2"]
    assert stats == {"skipped": {"io_error": 1}, "skipped_keys": ["shard-000001.tar:s1_3 (io_error)"]}
    assert clock.waits == SCHEDULE


# ------------------------------------------------------------------------------------------ counting samples

def test_scan_count_retries_a_transient_open_failure(folder, monkeypatch, clock):
    path = str(folder / "shard-000001.tar")
    opened = _inject(monkeypatch, path, open_faults=1)
    assert scan_sample_count(path) == 6
    assert opened == [path] * 2 and clock.waits == [0.5]


def test_scan_count_fails_when_the_fault_persists(folder, monkeypatch, clock):
    path = str(folder / "shard-000001.tar")
    _inject(monkeypatch, path, open_faults=100)
    with pytest.raises(OSError) as error:
        scan_sample_count(path)
    assert str(error.value) == (
        f"shard {path}: counting its samples failed 5 times (FileNotFoundError: [Errno 2] No such file or "
        f"directory: '{path}'); every rank needs the same count, so the loader cannot start")
    assert clock.waits == SCHEDULE


def test_scan_count_of_a_corrupt_tar_stops_without_retrying(folder, monkeypatch, clock):
    path = folder / "shard-000001.tar"
    with tarfile.open(path) as tar:
        cut_at = tar.getmember("s1_4.flac").offset + 100  # inside s1_4's header
    path.write_bytes(path.read_bytes()[:cut_at])
    assert scan_sample_count(str(path)) == 4 and clock.waits == []


# ------------------------------------------------------------------------------------------ index.json

def _counts_with_scans(monkeypatch, folder):
    scanned = []
    real = data.loading.shard_reader.scan_sample_count
    monkeypatch.setattr(data.loading.shard_reader, "scan_sample_count",
                        lambda p: scanned.append(os.path.basename(p)) or real(p))
    paths = [str(folder / "shard-000000.tar"), str(folder / "shard-000001.tar")]
    return shard_counts(paths), scanned


def test_intact_or_absent_index_gives_no_warning(folder, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        assert _counts_with_scans(monkeypatch, folder) == ([4, 6], [])
        (folder / INDEX_NAME).unlink()
        assert _counts_with_scans(monkeypatch, folder) == ([4, 6], ["shard-000000.tar", "shard-000001.tar"])
    assert caplog.records == []


def test_invalid_json_index_is_warned_about_then_scanned(folder, tok_dir, monkeypatch, caplog):
    index = folder / INDEX_NAME
    index.write_text('{"format": 1, "shards": [')
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        assert _counts_with_scans(monkeypatch, folder) == ([4, 6], ["shard-000000.tar", "shard-000001.tar"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{index} is not valid JSON (Expecting value: line 1 column 26 (char 25)); the samples of its folder's "
        "shards are counted from their tar headers instead"]
    # Through the loader (named by a glob, as a folder spec needs the index to list its shards): one epoch whole.
    caplog.clear()
    cfg = DataConfig(shards=[str(folder / "*.tar")], tokenizer=tok_dir, batch_size=1, num_workers=0,
                     shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    assert str(index) in caplog.records[0].getMessage()
    assert sorted(next(loader)["keys"][0] for _ in range(10)) == sorted(
        [f"s0_{i}" for i in range(4)] + [f"s1_{i}" for i in range(6)])


def test_index_without_shards_field_is_warned_about(folder, monkeypatch, caplog):
    index = folder / INDEX_NAME
    index.write_text(json.dumps({"format": INDEX_FORMAT}))
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        assert _counts_with_scans(monkeypatch, folder) == ([4, 6], ["shard-000000.tar", "shard-000001.tar"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{index}: 'shards' must be a list of {{'name': ..., ...}}, got None; the samples of its folder's shards "
        "are counted from their tar headers instead"]


def test_index_shard_without_count_is_warned_about_and_scanned_alone(folder, monkeypatch, caplog):
    index = folder / INDEX_NAME
    record = json.loads(index.read_text())
    del record["shards"][1]["num_samples"]
    index.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="data.loading.shard_reader"):
        assert _counts_with_scans(monkeypatch, folder) == ([4, 6], ["shard-000001.tar"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{index}: 1 shard(s) without a valid sample count (shard-000001.tar: num_samples=None); they are counted "
        "from their tar headers instead"]


def test_folder_spec_with_corrupt_index_fails_naming_the_file(folder):
    (folder / INDEX_NAME).write_text("not json")
    with pytest.raises(ValueError) as error:
        resolve_shards([str(folder)])
    assert str(error.value) == (f"{folder / INDEX_NAME} is not valid JSON "
                                "(Expecting value: line 1 column 1 (char 0))")

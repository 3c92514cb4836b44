"""data.files: a write that fails part-way leaves the old file as it was and no temporary behind."""
import os

import pytest

from data.files import atomic_path, atomic_write
from data.shards import ShardWriter


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old")
    atomic_write(str(path), b"new \xc3\xa9")
    assert path.read_bytes() == b"new \xc3\xa9"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        atomic_write(path, "new \ud800")  # the temporary is open when the encoding fails
    assert path.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["state.json"]

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_path_names_its_temporary_beside_the_file(tmp_path):
    with atomic_path(tmp_path / "a.wav", suffix=".tmp.wav") as tmp:
        assert tmp == str(tmp_path / "a.wav.tmp.wav")  # a program that wants a .wav name writes it
        (tmp_path / "a.wav.tmp.wav").write_bytes(b"RIFF")
        assert not (tmp_path / "a.wav").exists()  # nothing at the final name until the block ends
    assert os.listdir(tmp_path) == ["a.wav"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "b.wav"):
            raise KeyboardInterrupt  # the program failed before writing anything: nothing to remove
    assert os.listdir(tmp_path) == ["a.wav"]


def test_a_shard_writer_that_fails_keeps_its_finished_shards_and_leaves_no_temporary(tmp_path):
    with pytest.raises(RuntimeError, match="decoder died"):
        with ShardWriter(str(tmp_path), max_samples=2) as writer:
            for key in ("a", "b", "c"):  # shard 0 done, shard 1 open with one sample
                writer.write(key, {"json": b"{}"})
            assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar.tmp"]
            raise RuntimeError("decoder died")
    assert os.listdir(tmp_path) == ["shard-000000.tar"]


def test_versioned_files_round_trip_and_name_what_is_wrong(tmp_path):
    import pytest
    import torch

    from data.files import load_versioned, save_versioned

    path = tmp_path / "sub" / "m.pt"
    save_versioned(path, "demo.thing", 2, state={"w": torch.arange(3)}, config={"n": 3})
    blob = load_versioned(path, "demo.thing", 2, "thing", "python -m make.thing")
    assert blob["config"] == {"n": 3} and torch.equal(blob["state"]["w"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]  # no temporary left
    with pytest.raises(ValueError, match=r"m.pt: thing version 2, expected 3 \(write it again with `python -m "
                                         r"make.thing`\)"):
        load_versioned(path, "demo.thing", 3, "thing", "python -m make.thing")
    with pytest.raises(ValueError, match=r"m.pt is not a other file: expected format 'demo.other' \(written by "
                                         r"`python -m make.other`\)"):
        load_versioned(path, "demo.other", 2, "other", "python -m make.other")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk.pt is not a thing file \(UnpicklingError"):
        load_versioned(tmp_path / "junk.pt", "demo.thing", 2, "thing", "python -m make.thing")

"""Manifest -> shards: exact audio round trip, metadata, index, reproducibility, rejects, exit codes."""
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import webdataset as wds

from data.audio import AudioError, decode_audio, encode_flac, read_audio
from data.corpus.prepare import prepare_manifest
from data.shards import ShardWriter, read_index, shard_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pcm(seed, num_samples):
    return np.random.default_rng(seed).integers(-20000, 20000, size=num_samples, dtype=np.int16)


def _write_manifest(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return str(path)


def _read_samples(out_dir):
    """{key: {ext: bytes}} of every sample in the dataset, via webdataset as the loader reads it."""
    samples = {}
    for sample in wds.WebDataset(shard_paths(str(out_dir)), shardshuffle=False):
        samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


@pytest.fixture
def corpus(tmp_path):
    """Four 16 kHz 16-bit WAVs and one 44.1 kHz stereo file, with a manifest using relative paths."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    pcm = {f"utt{i}": _pcm(i, 4000 + 1234 * i) for i in range(4)}
    for name, samples in pcm.items():
        sf.write(audio_dir / f"{name}.wav", samples, 16000, subtype="PCM_16")
    stereo_TC = (np.random.default_rng(9).uniform(-0.4, 0.4, size=(22050, 2))).astype(np.float32)
    sf.write(audio_dir / "stereo.v2.wav", stereo_TC, 44100, subtype="FLOAT")
    lines = [
        {"audio": "audio/utt0.wav", "text": "zero", "speaker": "a"},
        {"id": "spk1-utt7", "audio": "audio/utt1.wav", "text": "one", "emotion": "happy"},
        {"id": "bad.id/x", "audio": "audio/utt2.wav", "text": "two"},
        {"audio": str(audio_dir / "utt3.wav"), "text": "three", "language": "en"},
        {"audio": "audio/stereo.v2.wav", "text": "stereo"},
    ]
    manifest = _write_manifest(tmp_path / "m.jsonl", lines)
    return manifest, pcm, stereo_TC, lines


def test_shards_hold_exact_audio_metadata_and_checksums(corpus, tmp_path):
    manifest, pcm, stereo_TC, lines = corpus
    out = tmp_path / "out"
    index = prepare_manifest(manifest, str(out), shard_size=2, workers=1, progress=False)
    samples = _read_samples(out)

    keys = ["utt0-00000001", "spk1-utt7", "utt2-00000003", "utt3-00000004", "stereo_v2-00000005"]
    assert list(samples) == keys
    for key, name in zip(keys[:4], pcm):
        wave_T, sr = decode_audio(samples[key]["flac"])
        assert sr == 16000
        np.testing.assert_array_equal(np.round(wave_T.numpy() * 32768).astype(np.int16), pcm[name])

    # 44.1 kHz stereo comes back 16 kHz mono: channel mean, resampled, within one 16-bit step.
    wave_T, sr = decode_audio(samples["stereo_v2-00000005"]["flac"])
    assert sr == 16000 and len(wave_T) == math.ceil(22050 * 16000 / 44100) == 8000
    expected_T = torchaudio.functional.resample(torch.from_numpy(stereo_TC.mean(axis=1)), 44100, 16000)
    assert torch.max(torch.abs(wave_T - expected_T)).item() <= 1 / 32768

    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    assert meta["spk1-utt7"] == {"id": "spk1-utt7", "text": "one", "emotion": "happy",
                                 "duration_s": len(pcm["utt1"]) / 16000, "num_samples": len(pcm["utt1"]),
                                 "sample_rate": 16000, "source": "audio/utt1.wav"}
    assert meta["utt0-00000001"]["speaker"] == "a" and meta["utt3-00000004"]["language"] == "en"
    assert meta["utt2-00000003"]["id"] == "bad.id/x"  # an invalid id stays metadata, not the key
    assert [m["text"] for m in meta.values()] == [line["text"] for line in lines]

    lengths = [len(p) for p in pcm.values()] + [8000]
    assert index == read_index(str(out))
    assert index["format"] == 1 and index["created_by"] == "data.corpus.prepare" and index["source"] == manifest
    assert index["num_samples"] == 5 and index["rejects"] == []
    assert index["total_duration_s"] == pytest.approx(sum(lengths) / 16000, abs=1e-6)
    assert [s["num_samples"] for s in index["shards"]] == [2, 2, 1]
    assert [s["duration_s"] for s in index["shards"]] == pytest.approx(
        [sum(lengths[0:2]) / 16000, sum(lengths[2:4]) / 16000, lengths[4] / 16000], abs=1e-6)
    for shard in index["shards"]:
        with open(out / shard["name"], "rb") as f:
            assert shard["sha256"] == hashlib.sha256(f.read()).hexdigest()
    # Nothing of this machine or moment in the tar headers, or re-runs would differ.
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.uname, m.mode) for m in tar.getmembers()} == {(0, 0, "", 0o444)}
        assert tar.getnames() == ["utt0-00000001.flac", "utt0-00000001.json", "spk1-utt7.flac", "spk1-utt7.json"]


def test_same_input_gives_byte_identical_shards(corpus, tmp_path):
    manifest = corpus[0]
    first = prepare_manifest(manifest, str(tmp_path / "a"), shard_size=2, workers=2, progress=False)
    again = prepare_manifest(manifest, str(tmp_path / "b"), shard_size=2, workers=1, progress=False)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in again["shards"]]
    for shard in first["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    # Re-preparing into the same folder with bigger shards leaves no stale shard behind.
    prepare_manifest(manifest, str(tmp_path / "a"), shard_size=10, workers=1, progress=False)
    assert sorted(os.listdir(tmp_path / "a")) == ["index.json", "prepare_state.json", "shard-000000.tar"]


def test_bad_lines_are_rejected_with_line_and_reason(tmp_path, capsys):
    sf.write(tmp_path / "good.wav", _pcm(1, 1600), 16000, subtype="PCM_16")
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    manifest = _write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "good.wav", "text": "good"},          # 1
        {"audio": "missing.wav", "text": "x"},                      # 2
        {"audio": "garbage.wav", "text": "x"},                      # 3
        {"audio": "empty.wav", "text": "x"},                        # 4
        '{"audio": "good.wav", "text": ',                           # 5
        {"audio": "good.wav"},                                      # 6
        {"audio": "good.wav", "text": 7},                           # 7
        {"id": "a", "audio": "good.wav", "text": "again"},          # 8
        {"audio": "nan.wav", "text": "x"},                          # 9
        "",                                                         # 10: blank lines are skipped
        {"id": "b", "audio": "good.wav", "text": "kept"},           # 11
    ])
    index = prepare_manifest(manifest, str(tmp_path / "out"), workers=1, progress=False)

    assert index["num_samples"] == 2
    texts = [json.loads(s["json"])["text"] for s in _read_samples(tmp_path / "out").values()]
    assert texts == ["good", "kept"]
    rejects = index["rejects"]
    assert [(r["line"], r["audio"]) for r in rejects] == [
        (2, "missing.wav"), (3, "garbage.wav"), (4, "empty.wav"), (5, None), (6, "good.wav"),
        (7, "good.wav"), (8, "good.wav"), (9, "nan.wav")]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0] == f"file not found: {tmp_path / 'missing.wav'}"
    assert reasons[1].startswith("unreadable audio (Format not recognised)")
    assert reasons[2] == f"empty audio (no samples): {tmp_path / 'empty.wav'}"
    assert reasons[3].startswith("invalid JSON: ")
    assert reasons[4] == "missing field 'text'"
    assert reasons[5] == "field 'text' must be a string, got int"
    assert reasons[6] == "duplicate key 'a' (first used on line 1)"
    assert reasons[7].startswith("non-finite samples (NaN or inf)")
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.endswith("8 rejected (1 duplicate key, 1 empty audio, 1 file not found, 1 invalid JSON, "
                            "1 missing field, 1 non-finite samples, 1 unreadable audio, 1 wrong type)")


def test_manifest_without_usable_line_exits_2(tmp_path):
    manifest = _write_manifest(tmp_path / "m.jsonl", [{"audio": "nope.wav", "text": "x"}, "not json"])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data.corpus.prepare", "manifest", manifest, str(out), "--workers", "1"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (f"error: manifest {manifest!r} has no usable line (2 rejected); first reasons: line 1: file not "
            f"found: {tmp_path / 'nope.wav'}; line 2: invalid JSON: ") in proc.stderr
    assert not (out / "index.json").exists()


def test_shard_paths_specs_and_errors(corpus, tmp_path):
    out = tmp_path / "out"
    prepare_manifest(corpus[0], str(out), shard_size=2, workers=1, progress=False)
    names = [str(out / f"shard-00000{i}.tar") for i in range(3)]
    assert shard_paths(str(out)) == names
    assert shard_paths(str(out / "index.json")) == names
    assert shard_paths(str(out / "shard-*.tar")) == names
    assert shard_paths(str(out / "shard-{000000..000001}.tar")) == names[:2]
    assert shard_paths([names[2], str(out / "shard-00000[01].tar")]) == [names[2]] + names[:2]

    with pytest.raises(ValueError, match=f"shard spec '{out}/x-\\*.tar': nothing matches"):
        shard_paths(str(out / "x-*.tar"))
    with pytest.raises(ValueError, match=f"dataset folder '{tmp_path}' has no index.json"):
        shard_paths(str(tmp_path))
    (out / "index.json").write_text('{"format": 7}')
    with pytest.raises(ValueError, match="format is 7, expected 1"):
        read_index(str(out))


def test_audio_and_writer_errors(tmp_path):
    with pytest.raises(AudioError, match="file not found: /no/such.wav"):
        read_audio("/no/such.wav")
    with pytest.raises(AudioError, match="unreadable audio"):
        decode_audio(b"not audio at all", name="shard-000000.tar:k1")
    # encode_flac clips instead of wrapping around: +2.0 becomes full scale, not a negative sample.
    wave_T, _ = decode_audio(encode_flac(torch.tensor([2.0, -2.0, 0.5])))
    assert wave_T.tolist() == [32767 / 32768, -1.0, 0.5]
    with ShardWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="sample key 'a.b' is invalid"):
            writer.write("a.b", {"json": b"{}"})

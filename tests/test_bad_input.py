"""Bad input never stops training: one test per kind of bad sample, through build_loader on real shards.

Each shard holds good samples around one bad one; the bad one must be skipped, counted under its reason
and named "shard:key" in loader.stats(), and every good sample must still arrive. Fixable audio (another
sample rate, stereo) must be converted and used.
"""
import io
import json
import math

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from data.features import SAMPLE_RATE, log_mel, mel_frames, num_audio_tokens
from data.loading.loader import DataConfig, build_loader
from data.shards import INDEX_FORMAT, ShardWriter, write_index
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids

torch.set_num_threads(1)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MAX_AUDIO_S = 1.0


def _text(i):
    return f"tone {WORDS[i % 10]} {WORDS[i // 10 % 10]}"


def _sine(duration_s, freq_hz, sample_rate=SAMPLE_RATE):
    t = np.arange(int(duration_s * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32)


def _audio(samples, sample_rate=SAMPLE_RATE, fmt="FLAC", subtype=None):
    buf = io.BytesIO()
    soundfile.write(buf, samples, sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _meta(i, **extra):
    return json.dumps({"text": _text(i), "language": "en", **extra}).encode()


def _good(i):
    return {"flac": _audio(_sine(0.2 + 0.05 * (i % 4), 200 + 20 * i)), "json": _meta(i)}


def _float_wav_with(value):
    samples = _sine(0.3, 440)
    samples[1000:1010] = value
    return {"wav": _audio(samples, fmt="WAV", subtype="FLOAT"), "json": _meta(50)}


def _truncated_flac():
    flac = _audio(_sine(0.8, 330))
    return {"flac": flac[:len(flac) // 2], "json": _meta(51)}


def _corrupt_flac():
    flac = _audio(_sine(0.8, 330))
    noise = np.random.default_rng(0).integers(0, 256, len(flac) - 200, dtype=np.uint8).tobytes()
    return {"flac": flac[:100] + noise + flac[-100:], "json": _meta(52)}  # a valid header, garbage frames


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = [_text(i) for i in range(100)] + ["Transcribe the speech."]
    extend_tokenizer(build_text_tokenizer(texts, vocab_size=300), 8).save_pretrained(path)
    return str(path)


def _write(folder, shards):
    """shards: lists of (key, members); a dataset folder as data.corpus.prepare writes it (tars + index.json)."""
    writer = ShardWriter(str(folder), max_samples=10_000)
    stats = []
    for shard in shards:
        for key, members in shard:
            writer.write(key, members)
        stats += writer.close()
        writer = ShardWriter(str(folder), max_samples=10_000, first_index=len(stats))
    write_index(str(folder), {"format": INDEX_FORMAT, "shards": stats})
    return str(folder)


def _with_bad(folder, bad_members, num_good=4):
    """One shard: good samples g0.. with the bad sample "bad" in the middle; returns (folder, good keys)."""
    good = [(f"g{i}", _good(i)) for i in range(num_good)]
    return _write(folder, [good[:2] + [("bad", bad_members)] + good[2:]]), {k for k, _ in good}


def _loader(tok_dir, folder, **kw):
    cfg = DataConfig(**{"shards": [folder], "tokenizer": tok_dir, "batch_size": 1, "num_workers": 0,
                        "shuffle_buffer": 0, "max_audio_s": MAX_AUDIO_S, **kw})
    return build_loader(cfg, rank=0, world_size=1, seed=0)


def _one_epoch(tok_dir, folder, num_usable):
    """The batches of one epoch (batch size 1) by key, and the loader's stats after them."""
    loader = _loader(tok_dir, folder)
    batches = {}
    for _ in range(num_usable):
        batch = next(loader)
        batches[batch["keys"][0]] = batch
    return batches, loader.stats()


# kind -> (bad sample's members, the reason it is counted under)
SKIPPED_KINDS = {
    "truncated_flac": (_truncated_flac(), "bad_audio"),
    "corrupt_flac": (_corrupt_flac(), "bad_audio"),
    "not_audio_at_all": ({"flac": b"fLaC not really a flac", "json": _meta(53)}, "bad_audio"),
    "zero_length_audio": ({"wav": _audio(np.zeros(0, np.float32), fmt="WAV"), "json": _meta(54)}, "too_short"),
    "zero_byte_member": ({"flac": b"", "json": _meta(55)}, "bad_audio"),
    "nan_samples": (_float_wav_with(np.nan), "non_finite_audio"),
    "inf_samples": (_float_wav_with(np.inf), "non_finite_audio"),
    "invalid_json": ({"flac": _audio(_sine(0.3, 300)), "json": b'{"text": "tone one'}, "bad_json"),
    "json_not_an_object": ({"flac": _audio(_sine(0.3, 300)), "json": b'["tone one"]'}, "bad_json"),
    "invalid_utf8_json": ({"flac": _audio(_sine(0.3, 300)), "json": b'{"text": "caf\xe9 one"}'}, "bad_json"),
    "no_text_for_asr": ({"flac": _audio(_sine(0.3, 300)), "json": b'{"language": "en"}'}, "missing_text"),
    "no_audio_member": ({"json": _meta(56)}, "missing_audio"),
    "no_json_member": ({"flac": _audio(_sine(0.3, 300))}, "missing_json"),
    "too_long_by_metadata": ({"flac": _audio(_sine(0.3, 300)), "json": _meta(57, duration_s=1.5)}, "too_long"),
    "too_long_once_decoded": ({"flac": _audio(_sine(1.5, 300)), "json": _meta(58)}, "too_long"),
}


@pytest.mark.parametrize("kind", sorted(SKIPPED_KINDS))
def test_bad_sample_is_skipped_counted_and_named(tmp_path, tok_dir, kind):
    members, reason = SKIPPED_KINDS[kind]
    folder, good = _with_bad(tmp_path / "ds", members)
    batches, stats = _one_epoch(tok_dir, folder, len(good))
    assert set(batches) == good
    assert stats == {"skipped": {reason: 1}, "skipped_keys": [f"shard-000000.tar:bad ({reason})"]}


def test_tar_cut_off_in_the_middle(tmp_path, tok_dir):
    whole = [(f"a{i}", _good(i)) for i in range(3)]
    cut = [(f"b{i}", _good(10 + i)) for i in range(3)] + [("cut", {"flac": _audio(_sine(0.9, 300)), "json": _meta(60)})]
    folder = _write(tmp_path / "ds", [whole, cut])
    tar = tmp_path / "ds" / "shard-000001.tar"
    data = tar.read_bytes()
    flac_at = data.index(b"cut.flac")
    tar.write_bytes(data[:flac_at + 512 + 4000])  # its header block, then 4 kB of its ~10 kB of FLAC
    # One batch into the next epoch: the marker is counted with the batch after it, and it may be last.
    batches, stats = _one_epoch(tok_dir, folder, 7)
    assert set(batches) == {k for k, _ in whole + cut[:3]}
    assert stats == {"skipped": {"bad_shard": 1}, "skipped_keys": ["shard-000001.tar:cut (bad_shard)"]}


def test_other_sample_rate_is_resampled_and_used(tmp_path, tok_dir):
    wave_8k = _sine(0.5, 300, sample_rate=8000)
    folder, good = _with_bad(tmp_path / "ds", {"flac": _audio(wave_8k, 8000), "json": _meta(70)})
    batches, stats = _one_epoch(tok_dir, folder, len(good) + 1)
    assert set(batches) == good | {"bad"} and stats["skipped"] == {}
    batch = batches["bad"]
    read_8k = torch.from_numpy(soundfile.read(io.BytesIO(_audio(wave_8k, 8000)), dtype="float32")[0])
    wave_16k = torchaudio.functional.resample(read_8k, 8000, SAMPLE_RATE)
    frames = mel_frames(2 * len(wave_8k))
    assert len(wave_16k) == 2 * len(wave_8k) and batch["mel_lengths"].tolist() == [frames] == [52]
    torch.testing.assert_close(batch["mels"][0, :, :frames], log_mel(wave_16k))
    patch = special_ids(load_tokenizer(tok_dir)).audio_patch
    assert batch["input_ids"][0].tolist().count(patch) == num_audio_tokens(frames)
    assert batch["num_audio_s"] == pytest.approx(0.5)


def test_stereo_is_downmixed_and_used(tmp_path, tok_dir):
    left, right = _sine(0.4, 300), 0.5 * _sine(0.4, 700)
    stereo = _audio(np.stack([left, right], axis=1))
    folder, good = _with_bad(tmp_path / "ds", {"flac": stereo, "json": _meta(71)})
    batches, stats = _one_epoch(tok_dir, folder, len(good) + 1)
    assert set(batches) == good | {"bad"} and stats["skipped"] == {}
    read_TC = soundfile.read(io.BytesIO(stereo), dtype="float32")[0]
    mono = torch.from_numpy(read_TC.mean(axis=1, dtype=np.float32))
    batch = batches["bad"]
    assert batch["mel_lengths"].tolist() == [mel_frames(len(left))]
    assert torch.equal(batch["mels"][0], log_mel(mono))
    assert not torch.equal(log_mel(mono), log_mel(torch.from_numpy(read_TC[:, 0].copy())))  # both channels count


def test_every_sample_bad_is_a_clear_error(tmp_path, tok_dir):
    folder = _write(tmp_path / "ds", [[("a", SKIPPED_KINDS["invalid_json"][0]), ("b", _float_wav_with(np.nan)),
                                       ("c", _corrupt_flac())]])
    loader = _loader(tok_dir, folder)
    with pytest.raises(ValueError, match="no usable sample") as error:
        next(loader)
    for reason in ("bad_json", "non_finite_audio", "bad_audio"):
        assert reason in str(error.value)

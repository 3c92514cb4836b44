"""The loader dispatching on each record's task over real tar shards: codes members, text-only samples
in mixed batches, and records skipped (never fatal) for missing or bad codes or an unknown task."""
import io
import json
import math

import numpy as np
import pytest
import soundfile
import torch
import webdataset

from data.features import SAMPLE_RATE, log_mel, mel_frames
from data.loading.loader import DataConfig, build_loader
from data.shards import INDEX_FORMAT
from data.tasks import TASKS, RenderOptions, Sample
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids


def _flac(duration_s, freq_hz=220.0):
    t = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buf.getvalue()


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _json(**meta):
    return json.dumps(meta).encode()


def _write(folder, samples):
    folder.mkdir(parents=True)
    with webdataset.TarWriter(str(folder / "shard-000000.tar")) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    (folder / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, "shards": [
        {"name": "shard-000000.tar", "num_samples": len(samples)}]}))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    extend_tokenizer(build_text_tokenizer(["the cat sat", "hallo welt", "Read the text aloud."] * 3,
                                          vocab_size=300), 16).save_pretrained(path)
    return str(path)


CODES_T0 = np.array([3, 1, 4, 1, 5, 9], dtype=np.int16)
CODES_S0 = np.array([2, 7, 1, 8, 2, 8, 1, 8, 2], dtype=np.int32)
CODES_X0 = np.array([15, 0], dtype=np.int32)
SAMPLES = [
    ("a0", {"flac": _flac(0.3), "json": _json(text="the cat")}),                    # asr by default
    ("t0", {"flac": _flac(0.4), "json": _json(task="tts", text="the cat sat"), "codes.npy": _npy(CODES_T0)}),
    ("t1", {"flac": _flac(0.4), "json": _json(task="tts", text="the cat")}),        # not tokenized yet
    ("s0", {"flac": _flac(0.5, 300), "target.flac": _flac(0.6), "target.codes.npy": _npy(CODES_S0),
            "json": _json(task="s2st", text="the cat", translation="hallo welt", target_num_samples=9600)}),
    ("x0", {"json": _json(task="tts", text="sat"), "codes.npy": _npy(CODES_X0)}),   # text only, no audio
    ("u0", {"flac": _flac(0.3), "json": _json(task="singing", text="la")}),
    ("b0", {"json": _json(task="tts", text="sat"), "codes.npy": _npy(np.zeros((2, 3), dtype=np.int32))}),
]


def test_mixed_tasks_one_batch(tmp_path, tok_dir):
    _write(tmp_path / "ds", SAMPLES)
    cfg = DataConfig(shards=[str(tmp_path / "ds")], tokenizer=tok_dir, batch_size=4, num_workers=0,
                     shuffle_buffer=0)
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    batch = next(loader)
    assert batch["keys"] == ["a0", "t0", "s0", "x0"]
    assert loader.stats()["skipped"] == {"missing_codes": 1}
    # Only a0 and s0 hear audio (s2st reads its input, not target.flac): two chunks, in row order.
    frames = [mel_frames(int(0.3 * SAMPLE_RATE)), mel_frames(int(0.5 * SAMPLE_RATE))]
    assert batch["mel_lengths"].tolist() == frames
    wave_s0 = torch.from_numpy(soundfile.read(io.BytesIO(SAMPLES[3][1]["flac"]), dtype="float32")[0])
    assert torch.equal(batch["mels"][1, :, :frames[1]], log_mel(wave_s0))
    assert batch["num_audio_s"] == pytest.approx(0.8)

    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    expected = {
        "a0": ("asr", {"flac": [frames[0]]}, {}),
        "t0": ("tts", {}, {"codes.npy": CODES_T0}),
        "s0": ("s2st", {"flac": [frames[1]]}, {"target.codes.npy": CODES_S0}),
        "x0": ("tts", {}, {"codes.npy": CODES_X0}),
    }
    metas = {key: json.loads(members["json"]) for key, members in SAMPLES}
    for row, key in enumerate(batch["keys"]):
        task, mel, codes = expected[key]
        want = TASKS[task].render(Sample(key, metas[key], mel, codes), tok, ids, RenderOptions())
        n = len(want.input_ids)
        assert batch["input_ids"][row, :n].tolist() == want.input_ids
        assert batch["labels"][row, :n].tolist() == want.labels
        assert batch["attention_mask"][row].sum() == n
    assert (batch["input_ids"] == ids.audio_start).sum() == 2
    # x0's answer: "sat" then codes 15, 0 and two audio pads, <tts_end>, <|EOT|>.
    x0_answer = [t for t in batch["labels"][3].tolist() if t != -100]
    assert x0_answer[1:] == [ids.first_audio_code + 15, ids.first_audio_code, ids.audio_pad, ids.audio_pad,
                             ids.tts_end, ids.eot]

    second = next(loader)  # u0 and b0 are skipped, the next epoch begins again with a0
    assert second["keys"] == ["a0", "t0", "s0", "x0"]
    assert loader.stats()["skipped"] == {"missing_codes": 2, "unknown_task": 1, "bad_codes": 1}
    assert loader.stats()["skipped_keys"] == ["shard-000000.tar:t1 (missing_codes)", "shard-000000.tar:u0 (unknown_task)",
                                              "shard-000000.tar:b0 (bad_codes)", "shard-000000.tar:t1 (missing_codes)"]


def test_text_only_batch_has_no_mels_and_config_task_is_the_default(tmp_path, tok_dir):
    _write(tmp_path / "ds", [(f"k{i}", {"json": _json(text="the cat"), "codes.npy": _npy(CODES_T0)})
                             for i in range(2)])
    cfg = DataConfig(shards=[str(tmp_path / "ds")], tokenizer=tok_dir, task="tts", batch_size=2, num_workers=0)
    batch = next(build_loader(cfg, rank=0, world_size=1, seed=0))
    assert batch["mels"] is None and batch["mel_lengths"].tolist() == [] and batch["num_audio_s"] == 0.0
    ids = special_ids(load_tokenizer(tok_dir))
    assert (batch["input_ids"] == ids.tts_start).sum(dim=1).tolist() == [1, 1]


def test_dialogue_reads_the_audio_members_its_turns_name(tmp_path, tok_dir):
    # Two spoken human turns: "flac" (0.3 s) then "target.flac" (0.6 s); their mels follow span order.
    messages = [{"role": "human", "audio": "flac"}, {"role": "assistant", "text": "the cat"},
                {"role": "human", "audio": "target.flac"}, {"role": "assistant", "text": "sat", "codes": "codes.npy"}]
    _write(tmp_path / "ds", [("d0", {"flac": _flac(0.3), "target.flac": _flac(0.6), "codes.npy": _npy(CODES_X0),
                                     "json": _json(task="dialogue", messages=messages)})])
    cfg = DataConfig(shards=[str(tmp_path / "ds")], tokenizer=tok_dir, batch_size=1, num_workers=0)
    batch = next(build_loader(cfg, rank=0, world_size=1, seed=0))
    assert batch["mel_lengths"].tolist() == [mel_frames(int(0.3 * SAMPLE_RATE)), mel_frames(int(0.6 * SAMPLE_RATE))]
    assert batch["num_audio_s"] == pytest.approx(0.9)
    ids = special_ids(load_tokenizer(tok_dir))
    answer = [t for t in batch["labels"][0].tolist() if t != -100]
    assert answer[1:] == [ids.first_audio_code + 15, ids.first_audio_code, ids.audio_pad, ids.audio_pad,
                          ids.tts_end, ids.eot]


def test_unknown_config_task(tmp_path, tok_dir):
    with pytest.raises(ValueError, match=r"data.task='sing': expected one of \['asr', 'asr_chat'"):
        build_loader(DataConfig(shards=[str(tmp_path)], tokenizer=tok_dir, task="sing"), 0, 1, 0)

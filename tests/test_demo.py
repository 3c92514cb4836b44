"""The espeak-ng demo corpus: sentence splits, one real utterance, and demo -> prepare end to end."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data import demo
from data.audio import read_audio
from data.demo import SLOTS, make_demo, make_sentences, speak
from data.prepare import prepare_manifest
from data.shards import shard_paths


def test_heldout_sentences_are_new_combinations_of_seen_words():
    train = make_sentences(400, seed=0)
    heldout = make_sentences(40, seed=1, exclude=set(train))
    assert len(set(train)) == 400 and len(set(heldout)) == 40
    assert not set(train) & set(heldout)
    assert make_sentences(400, seed=0) == train and make_sentences(400, seed=5) != train
    train_words = {w for s in train for w in s.split()}
    assert {w for s in heldout for w in s.split()} <= train_words
    for sentence in train + heldout:
        number, adjective, nouns, verb, the, colour, obj = sentence.split()
        assert (number in SLOTS[0] and adjective in SLOTS[1] and nouns[:-1] in SLOTS[2] and nouns[-1] == "s"
                and verb in SLOTS[3] and the == "the" and colour in SLOTS[4] and obj in SLOTS[5])
    # Every word is used once before any repeats, so 12 sentences already cover each slot.
    first12 = make_sentences(12, seed=3)
    assert {s.split()[1] for s in first12} == set(SLOTS[1])


def test_speak_one_utterance(tmp_path):
    path = str(tmp_path / "u.wav")
    speak("two red cats", "en-us+m3", path, speed=175)
    samples, sr = sf.read(path, dtype="float32")
    assert sr == 22050 and samples.ndim == 1
    assert 0.5 < len(samples) / sr < 3.0
    assert np.sqrt(np.mean(samples ** 2)) > 0.02
    assert len(read_audio(path)) == -(-len(samples) * 16000 // 22050)
    with pytest.raises(RuntimeError, match="espeak-ng failed for voice 'xx\\+nobody'"):
        speak("two", "xx+nobody", str(tmp_path / "v.wav"))
    assert not os.path.exists(tmp_path / "v.wav")


def test_missing_espeak_names_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(demo, "ESPEAK_DEFAULT_PATH", "/nonexistent/espeak-ng")
    with pytest.raises(RuntimeError, match="^espeak-ng not found: apt-get install espeak-ng$"):
        speak("two", "en+f2", "/tmp/never.wav")


def test_demo_corpus_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main([str(out), "--num-train", "6", "--num-heldout", "2", "--seed", "4"]) == 0
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [r["id"] for r in train] == [f"train-{i:05d}" for i in range(6)]
    assert len(heldout) == 2 and not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["speaker"] for r in train} == set(demo.VOICES)
    assert all(r["language"] == "en" and 150 <= r["speed"] <= 190 for r in train + heldout)
    assert len(os.listdir(out / "wav")) == 8
    assert capsys.readouterr().err.strip().endswith("8 spoken, 0 reused -> " + str(out))

    # A re-run reuses every wav and writes the same manifests.
    mtimes = {name: os.stat(out / "wav" / name).st_mtime_ns for name in os.listdir(out / "wav")}
    splits = make_demo(str(out), 6, 2, seed=4)
    assert capsys.readouterr().err.strip().endswith("0 spoken, 8 reused -> " + str(out))
    assert splits["train"] == train
    assert {name: os.stat(out / "wav" / name).st_mtime_ns for name in os.listdir(out / "wav")} == mtimes

    index = prepare_manifest(str(out / "train.jsonl"), str(tmp_path / "shards"), workers=1, progress=False)
    assert index["num_samples"] == 6 and index["rejects"] == []
    samples = list(wds.WebDataset(shard_paths(str(tmp_path / "shards")), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["id"] for r in train]
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["text"] for m in metas] == [r["text"] for r in train]
    assert all(1.0 < m["duration_s"] < 5.0 for m in metas)

"""The espeak-ng demo corpus: sentence splits, one real utterance, the German translations, and every
task's manifests -> prepare end to end."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data.tools import demo
from data.audio import read_audio
from data.tools.demo import SLOTS, STYLES, TTS_VOICE, make_demo, make_sentences, speak, translate_to_german
from data.corpus.prepare import prepare_conversations, prepare_manifest
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


def test_speed_and_pitch_change_the_speech(tmp_path):
    durations = {}
    for name, settings in STYLES.items():
        speak("two quiet cats paint the red table", TTS_VOICE, str(tmp_path / f"{name}.wav"), **settings)
        durations[name] = sf.info(str(tmp_path / f"{name}.wav")).duration
    speak("two quiet cats paint the red table", TTS_VOICE, str(tmp_path / "plain.wav"))
    plain_s = sf.info(str(tmp_path / "plain.wav")).duration
    assert durations["slowly"] > 1.3 * plain_s > 1.3 * 1.3 * durations["quickly"]
    assert abs(durations["in a high voice"] - plain_s) < 0.2 * plain_s
    assert (tmp_path / "in a high voice.wav").read_bytes() != (tmp_path / "plain.wav").read_bytes()


def test_german_translation_word_by_word():
    assert translate_to_german("two quiet cats paint the red table") == "zwei ruhige Katzen malen den roten Tisch"
    assert translate_to_german("twelve sleepy sailors open the pink door") == \
        "zwölf müde Seeleute öffnen die rosa Tür"
    assert translate_to_german("eleven wild frogs follow the silver house") == \
        "elf wilde Frösche verfolgen das silberne Haus"
    with pytest.raises(ValueError, match="^'a cat sat' is not a demo template sentence$"):
        translate_to_german("a cat sat")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_corpus_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main([str(out), "--num-train", "6", "--num-heldout", "2", "--seed", "4", "--num-tts", "2",
                      "--num-s2tt", "2", "--num-dialogue", "3"]) == 0
    # ASR as in earlier versions: OUT/{train,heldout}.jsonl with audio relative to OUT.
    train = _jsonl(out / "train.jsonl")
    heldout = _jsonl(out / "heldout.jsonl")
    assert [r["id"] for r in train] == [f"train-{i:05d}" for i in range(6)]
    assert len(heldout) == 2 and not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["speaker"] for r in train} == set(demo.VOICES)
    assert all(r["language"] == "en" and 150 <= r["speed"] <= 190 for r in train + heldout)
    assert _jsonl(out / "asr" / "train.jsonl") == [{**r, "audio": "../" + r["audio"]} for r in train]

    tasks = {task: {split: _jsonl(out / task / f"{split}.jsonl") for split in ("train", "heldout")}
             for task in ("tts", "s2tt", "dialogue")}
    assert [len(tasks[t]["train"]) for t in tasks] == [2, 2, 3]
    assert (out / "para" / "train.jsonl").is_file() and not (out / "timbre").exists()  # timbre on request only
    held_texts = {r["text"] for r in heldout}
    assert {r["text"] for r in tasks["tts"]["heldout"]} == held_texts == {r["text"] for r in tasks["s2tt"]["heldout"]}
    assert {r["messages"][2]["text"] for r in tasks["dialogue"]["heldout"]} == held_texts
    trained = {r["text"] for r in tasks["tts"]["train"] + tasks["s2tt"]["train"]} | {
        r["messages"][2]["text"] for r in tasks["dialogue"]["train"]}
    assert not trained & held_texts
    assert all(r["task"] == "tts" and r["speaker"] == TTS_VOICE for r in tasks["tts"]["train"])
    assert all(r["task"] == "s2tt" and r["translation"] == translate_to_german(r["text"])
               and r["target_language"] == "German" for r in tasks["s2tt"]["train"])
    dialogue = tasks["dialogue"]["train"]
    assert [r["style"] for r in dialogue] == list(STYLES)
    assert [m["role"] for m in dialogue[0]["messages"]] == ["system", "user", "assistant"]
    assert "slowly" not in dialogue[0]["messages"][0]["text"]  # the request, not the system prompt, asks

    texts = {r["text"] for r in _jsonl(out / "texts.jsonl")}
    assert {translate_to_german(t) for t in held_texts} <= texts
    assert f"say {dialogue[1]['messages'][2]['text']} quickly" in texts and "Read the text aloud." in texts
    spoken = len(os.listdir(out / "wav"))
    assert capsys.readouterr().err.strip().endswith(f"{spoken} spoken, 0 reused -> {out}")

    # A re-run reuses every wav and writes the same manifests.
    mtimes = {name: os.stat(out / "wav" / name).st_mtime_ns for name in os.listdir(out / "wav")}
    splits = make_demo(str(out), 6, 2, seed=4, tasks=("asr", "dialogue"), num_task_train={"dialogue": 3})
    assert capsys.readouterr().err.strip().endswith(f"0 spoken, {8 + 2 * 5} reused -> {out}")
    assert splits["asr"]["train"] == _jsonl(out / "asr" / "train.jsonl") and splits["dialogue"]["train"] == dialogue
    assert {name: os.stat(out / "wav" / name).st_mtime_ns for name in os.listdir(out / "wav")} == mtimes

    index = prepare_manifest(str(out / "train.jsonl"), str(tmp_path / "shards"), workers=1, progress=False)
    assert index["num_samples"] == 6 and index["rejects"] == []
    samples = list(wds.WebDataset(shard_paths(str(tmp_path / "shards")), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["id"] for r in train]
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["text"] for m in metas] == [r["text"] for r in train]
    assert all(1.0 < m["duration_s"] < 5.0 for m in metas)

    index = prepare_conversations(str(out / "dialogue" / "train.jsonl"), str(tmp_path / "dialogue"), workers=1,
                                  progress=False)
    assert index["num_samples"] == 3 and index["counts"]["style"].keys() == set(STYLES)
    sample = next(iter(wds.WebDataset(shard_paths(str(tmp_path / "dialogue")), shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert "turn1.flac" in sample and "turn2.flac" in sample and meta["task"] == "sft"
    assert meta["messages"][2] == {"role": "assistant", "text": dialogue[0]["messages"][2]["text"],
                                   "codes": "turn2.codes.npy"}
    # Seven words asked for "slowly" (110 words per minute) take over 3 s.
    assert meta["style"] == "slowly" and meta["audio_members"]["turn2.flac"]["duration_s"] > 3.0


def test_paralinguistic_and_timbre_records(tmp_path):
    from data.tools.demo import PARA_PITCHES, PARA_SPEEDS, VOICE_GENDERS, spoken_wav, voice_description
    from data.loading.samples import render_raw
    from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids

    out = tmp_path / "demo"
    splits = make_demo(str(out), 8, 2, seed=1, tasks=("para", "timbre"), num_task_train={"para": 2, "timbre": 3})
    para = splits["para"]["train"]
    # Each clip asked about each attribute, in a record of its own; the labels are what espeak was told.
    assert [r["id"] for r in para] == [f"para-train-{i:05d}-{a}" for i in range(2)
                                       for a in ("gender", "speed", "pitch")]
    assert [r["ask"] for r in para] == ["gender", "speed", "pitch"] * 2
    for r in para:
        assert r["task"] == "para_qa" and r["gender"] == VOICE_GENDERS[r["speaker"]]
        spoken = spoken_wav(r["text"], r["speaker"], PARA_SPEEDS[r["speed"]], PARA_PITCHES[r["pitch"]])
        assert r["audio"] == "../" + spoken["path"] and (out / spoken["path"]).is_file()
    assert [r["speaker"] for r in para[::3]] == demo.VOICES[:2]
    assert _jsonl(out / "para" / "heldout.jsonl") == splits["para"]["heldout"] and len(splits["para"]["heldout"]) == 6

    # Timbre: the clip the search finds and the answer are one voice; the clip says the split's next sentence.
    timbre = splits["timbre"]["train"]
    assert [r["speaker"] for r in timbre] == demo.VOICES[:3]
    for i, r in enumerate(timbre):
        assert r["task"] == "timbre_search" and r["query"] == voice_description(r["speaker"])
        assert r["target_audio"] == "../" + spoken_wav(r["text"], r["speaker"], 175)["path"]
        assert r["audio"] == "../" + spoken_wav(timbre[(i + 1) % 3]["text"], r["speaker"], 175)["path"]
    assert voice_description("en-us+m3") == "the American male voice m3"
    assert voice_description("en+f2") == "the British female voice f2"
    texts = {r["text"] for r in _jsonl(out / "texts.jsonl")}
    assert {"How fast does the speaker talk?", "female", "slow", "high"} <= texts
    assert f"In the voice of {timbre[0]['query']}, say: {timbre[0]['text']}" in texts

    # Through data.corpus.prepare and the para_qa template: each record answers its own question with its label.
    prepare_manifest(str(out / "para" / "train.jsonl"), str(tmp_path / "para"), workers=1, progress=False)
    tok = extend_tokenizer(build_text_tokenizer(sorted(texts) * 2, vocab_size=300), 8)
    ids = special_ids(tok)
    for raw in wds.WebDataset(shard_paths(str(tmp_path / "para")), shardshuffle=False):
        meta = json.loads(raw["json"])
        rendered = render_raw(raw, tok, ids)
        answer = tok.decode([t for t in rendered["labels"] if t != -100])
        assert answer == f"{meta[meta['ask']]}<|EOT|>", raw["__key__"]
    # Timbre manifests prepare with the answer as the target audio.
    index = prepare_manifest(str(out / "timbre" / "train.jsonl"), str(tmp_path / "timbre"), workers=1,
                             progress=False)
    assert index["num_samples"] == 3 and index["rejects"] == []
    sample = next(iter(wds.WebDataset(shard_paths(str(tmp_path / "timbre")), shardshuffle=False)))
    assert "flac" in sample and "target.flac" in sample

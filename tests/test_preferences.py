"""Preference pairs: JSONL -> shards (`python -m data.corpus.prepare preferences`) -> answer codes (data.codes) ->
the "preference" template (chosen or rejected answer) -> `python -m data.tools.show`.

Expected sequences are spelled from the tokenizer's own pieces (special ids by name, text by encode), so
they say what the chat format is rather than which ids a tokenizer layout happens to give.
"""
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from data.audio import decode_audio
from data.codes.tokenizers import KMeansTokenizer
from data.features import mel_frames, num_audio_tokens
from data.corpus.prepare import main as prepare_main
from data.corpus.preferences import read_preferences
from data.loading.samples import render_pair, render_raw
from data.shards import read_index, shard_paths
from data.tools.show import main as show_main
from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.pieces import IGNORE_INDEX, speech_answer
from data.codes.encode import tokenize_shards
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids

torch.set_num_threads(1)

TEXTS = ["system\nYou are a helpful assistant. Speaking style: calm.", "human\nwhere is the cat?",
         "assistant\nthe cat sat on the mat", "no idea", "it sat there", "the cat is here", "Be brief."]


@pytest.fixture(scope="module")
def tok_ids():
    tok = extend_tokenizer(build_text_tokenizer(TEXTS * 3, vocab_size=300), 8)
    return tok, special_ids(tok)


def _wav(path, num_samples, seed):
    pcm = np.random.default_rng(seed).integers(-20000, 20000, size=num_samples, dtype=np.int16)
    sf.write(str(path), pcm, 16000, subtype="PCM_16")


USER_TEXT = {"role": "user", "text": "where is the cat?"}
TEXT_PAIR = {"id": "p-text", "messages": [USER_TEXT], "chosen": {"text": "the cat sat on the mat"},
             "rejected": {"text": "no idea"}, "style": "calm"}
AUDIO_PAIR = {"id": "p-audio", "speaker": "spk1", "text": "the cat is here",
              "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "audio": "q.wav"}],
              "chosen": {"text": "the cat is here", "audio": "c.wav"}, "rejected": {"text": "it sat there",
                                                                                 "audio": "r.wav"}}


def _members(path):
    """{key: {member: bytes}} of a tar."""
    out = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            out.setdefault(key, {})[member] = tar.extractfile(info).read()
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The corpus of this file prepared by the CLI: two good pairs among bad lines; returns (root, stderr)."""
    root = tmp_path_factory.mktemp("pref")
    _wav(root / "q.wav", 3200, 0)   # 0.2 s: the prompt's audio
    _wav(root / "c.wav", 4800, 1)   # the spoken chosen answer
    _wav(root / "r.wav", 6400, 2)   # the spoken rejected answer
    (root / "broken.wav").write_bytes(b"RIFF not really")
    lines = [
        json.dumps(TEXT_PAIR),
        json.dumps(AUDIO_PAIR),
        "not json",
        json.dumps({"messages": [USER_TEXT], "chosen": {"audio": "c.wav"}, "rejected": {"text": "no"}}),
        json.dumps({"messages": [USER_TEXT], "chosen": {"text": "yes"},
                    "rejected": {"text": "no", "audio": "gone.wav"}}),
        json.dumps({"messages": [USER_TEXT], "chosen": {"text": "yes"}}),
        json.dumps({"messages": [USER_TEXT, {"role": "assistant", "text": "yes"}], "chosen": {"text": "yes"},
                    "rejected": {"text": "no"}}),
        json.dumps({"messages": [USER_TEXT], "chosen": {"text": "yes"}, "rejected": {"text": "yes"}}),
        json.dumps({"messages": [USER_TEXT], "chosen": {"text": 3}, "rejected": {"text": "no"}}),
        json.dumps({"messages": [USER_TEXT], "chosen": {"text": "yes", "audio": "broken.wav"},
                    "rejected": {"text": "no"}}),
        json.dumps({"messages": [USER_TEXT], "chosen": {"text": "yes", "voice": "x"}, "rejected": {"text": "no"}}),
        json.dumps({"task": "sft", "messages": [USER_TEXT], "chosen": {"text": "yes"}, "rejected": {"text": "no"}}),
    ]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_writes_good_pairs_and_rejects_bad_lines_naming_line_and_field(prepared, capsys):
    root = prepared
    out = root / "out"
    assert prepare_main(["preferences", str(root / "pairs.jsonl"), str(out), "--workers", "1",
                         "--no-progress"]) == 0
    assert "2 samples" in capsys.readouterr().err
    index = read_index(str(out))
    assert index["num_samples"] == 2 and index["input_format"] == "preferences"
    assert index["rejects"] == [
        {"line": 3, "audio": None, "reason": index["rejects"][0]["reason"]},
        {"line": 4, "audio": None, "reason": "'chosen.text' is missing"},
        {"line": 5, "audio": "gone.wav",
         "reason": f"'rejected.audio' file 'gone.wav' not found (looked for {root}/gone.wav)"},
        {"line": 6, "audio": None,
         "reason": "'rejected' is missing: expected {\"text\": str, \"audio\": optional path}"},
        {"line": 7, "audio": None, "reason": "messages[1] has role 'assistant': expected the last turn to be the human "
                                             "turn that 'chosen' and 'rejected' answer"},
        {"line": 8, "audio": None, "reason": "'chosen' and 'rejected' are the same answer: a pair must differ"},
        {"line": 9, "audio": None, "reason": "'chosen.text' must be a string, got int"},
        {"line": 10, "audio": "broken.wav", "reason": index["rejects"][7]["reason"]},
        {"line": 11, "audio": None, "reason": "'chosen' has unknown keys ['voice']: expected keys among ['text', "
                                              "'audio']"},
        {"line": 12, "audio": None, "reason": "'task' is 'sft': a preference record's task is 'preference'"},
    ]
    assert index["rejects"][0]["reason"].startswith("invalid JSON: ")
    assert index["rejects"][7]["reason"].startswith("chosen.flac (broken.wav): unreadable audio")

    [shard] = shard_paths(str(out))
    samples = _members(shard)
    assert list(samples) == ["p-text", "p-audio"]
    assert sorted(samples["p-text"]) == ["json"]
    assert sorted(samples["p-audio"]) == ["chosen.flac", "json", "rejected.flac", "turn1.flac"]
    assert [len(sf.read(io.BytesIO(samples["p-audio"][m]))[0]) for m in ("turn1.flac", "chosen.flac",
                                                                         "rejected.flac")] == [3200, 4800, 6400]
    text_meta = json.loads(samples["p-text"]["json"])
    assert text_meta == {"id": "p-text", "style": "calm", "task": "preference",
                         "messages": [{"role": "human", "text": "where is the cat?"}],
                         "chosen": {"text": "the cat sat on the mat"}, "rejected": {"text": "no idea"},
                         "duration_s": 0.0, "num_samples": 0, "sample_rate": 16000, "audio_members": {}}
    meta = json.loads(samples["p-audio"]["json"])
    assert (meta["task"], meta["speaker"], meta["text"]) == ("preference", "spk1", "the cat is here")
    assert meta["messages"] == [{"role": "system", "text": "Be brief."}, {"role": "human", "audio": "turn1.flac"}]
    assert meta["chosen"] == {"text": "the cat is here", "codes": "chosen.codes.npy"}
    assert meta["rejected"] == {"text": "it sat there", "codes": "rejected.codes.npy"}
    assert meta["audio_members"]["chosen.flac"] == {"source": "c.wav", "num_samples": 4800, "duration_s": 0.3}
    task = TASKS["preference"]
    assert task.audio(meta) == ["turn1.flac"]
    assert task.codes(meta) == ["chosen.codes.npy", "rejected.codes.npy"]
    assert task.prompt_codes(meta) == [] and task.paired

    # The reader alone: the same verdicts, with kinds for the summary line.
    corpus = read_preferences(str(root / "pairs.jsonl"))
    assert [c.key for c in corpus.candidates] == ["p-text", "p-audio", "pref-00000010"]
    assert [r.kind for r in corpus.rejects] == ["invalid JSON", "missing field", "audio not found", "missing field",
                                                "bad turn", "same answers", "wrong type", "bad answer",
                                                "unknown task"]


@pytest.fixture(scope="module")
def tokenized(prepared):
    """The prepared shards with codes from a small k-means tokenizer (8 codes)."""
    out = prepared / "tokenized"
    if not (prepared / "out" / "index.json").exists():
        prepare_main(["preferences", str(prepared / "pairs.jsonl"), str(prepared / "out"), "--workers", "1",
                      "--no-progress"])
    audio_tok = KMeansTokenizer(torch.randn(8, 128, generator=torch.Generator().manual_seed(0)))
    tokenize_shards([str(prepared / "out")], "kmeans", str(out), progress=False, audio_tokenizer=audio_tok)
    return out, audio_tok


def test_tokenize_adds_the_codes_of_both_spoken_answers(tokenized):
    out, audio_tok = tokenized
    samples = _members(shard_paths(str(out))[0])
    assert sorted(samples["p-audio"]) == ["chosen.codes.npy", "chosen.flac", "json", "rejected.codes.npy",
                                          "rejected.flac", "turn1.codes.npy", "turn1.flac"]
    assert sorted(samples["p-text"]) == ["json"]
    for member in ("chosen", "rejected"):
        codes = np.load(io.BytesIO(samples["p-audio"][f"{member}.codes.npy"]))
        wave_T, _ = decode_audio(samples["p-audio"][f"{member}.flac"])
        np.testing.assert_array_equal(codes, audio_tok.encode(wave_T))
    # 25 codes a second: 0.3 s and 0.4 s of speech.
    assert [len(np.load(io.BytesIO(samples["p-audio"][f"{m}.codes.npy"]))) for m in ("chosen", "rejected")] == [8, 10]


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _turn(tok, ids, role, text):
    return [ids.bot] + _enc(tok, f"{role}\n{text}") + [ids.eot]


def test_text_pair_renders_the_same_prompt_and_each_answer_labelled(tok_ids):
    tok, ids = tok_ids
    meta = {"task": "preference", "style": "calm", "messages": [{"role": "human", "text": "where is the cat?"}],
            "chosen": {"text": "the cat sat on the mat"}, "rejected": {"text": "no idea"}}
    prompt = (_turn(tok, ids, "system", "You are a helpful assistant. Speaking style: calm.")
              + _turn(tok, ids, "human", "where is the cat?") + [ids.bot] + _enc(tok, "assistant\n"))
    task = TASKS["preference"]
    for answer, text in (("chosen", "the cat sat on the mat"), ("rejected", "no idea")):
        rendered = task.render(Sample("k", meta), tok, ids, RenderOptions(answer=answer))
        body = _enc(tok, text) + [ids.eot]
        assert rendered.input_ids == prompt + body
        assert rendered.labels == [IGNORE_INDEX] * len(prompt) + body
    assert task.render(Sample("k", meta), tok, ids, RenderOptions()).input_ids[len(prompt):] == \
        _enc(tok, "the cat sat on the mat") + [ids.eot]  # chosen by default
    assert task.render(Sample("k", meta), tok, ids, RenderOptions(with_answer=False)).input_ids == prompt
    with pytest.raises(ValueError, match=r"RenderOptions.answer='best': expected one of \['chosen', 'rejected'\]"):
        task.render(Sample("k", meta), tok, ids, RenderOptions(answer="best"))


def test_spoken_pair_through_the_loader_renders_ta4_answers(tokenized, tok_ids):
    out, _ = tokenized
    tok, ids = tok_ids
    raw = next(r for r in _raws(out) if r["__key__"] == "p-audio")
    codes = {m: np.load(io.BytesIO(raw[f"{m}.codes.npy"])) for m in ("chosen", "rejected")}
    frames = mel_frames(3200)
    prompt = (_turn(tok, ids, "system", "Be brief.") + [ids.bot] + _enc(tok, "human\n") + [ids.audio_start]
              + [ids.audio_patch] * num_audio_tokens(frames) + [ids.audio_end, ids.eot]
              + [ids.bot] + _enc(tok, "assistant\n") + [ids.tts_start])
    pair = render_pair(raw, tok, ids, max_audio_s=30.0)
    assert pair["meta"]["key"] == "p-audio" and pair["meta"]["speaker"] == "spk1"
    for row, answer, text in zip(pair["pair"], ("chosen", "rejected"), ("the cat is here", "it sat there")):
        body = speech_answer(_enc(tok, text), codes[answer], ids) + [ids.eot]
        assert row["input_ids"] == prompt + body
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + body
        assert [m.shape for m in row["mels"]] == [(128, frames)] and row["num_audio_s"] == 0.2
        single = render_raw(raw, tok, ids, answer=answer)
        assert (single["input_ids"], single["labels"]) == (row["input_ids"], row["labels"])
    # The prompt alone needs no answer codes.
    bare = {k: v for k, v in raw.items() if not k.endswith("codes.npy")}
    prompt_only = render_raw(bare, tok, ids, with_answer=False, keep_meta=True)
    assert prompt_only["input_ids"] == prompt and set(prompt_only["labels"]) == {IGNORE_INDEX}
    assert prompt_only["meta"]["key"] == "p-audio"


def _raws(folder):
    from data.loading.shard_reader import read_shard
    return [raw for path in shard_paths(str(folder)) for raw in read_shard(path)]


def test_show_prints_prompt_once_then_both_answers(tokenized, tok_ids, tmp_path, capsys):
    out, _ = tokenized
    tok_ids[0].save_pretrained(tmp_path / "tok")
    assert show_main([str(out), "p-text", "--tokenizer", str(tmp_path / "tok")]) == 0
    report = capsys.readouterr().out
    head, body = report.split("L = labelled", 1)
    assert head.splitlines()[:2] == ["key: p-text (shard-000000.tar)", "task: preference"]
    tok, ids = tok_ids
    prompt_len = len(_turn(tok, ids, "system", "You are a helpful assistant. Speaking style: calm.")
                     + _turn(tok, ids, "human", "where is the cat?") + [ids.bot] + _enc(tok, "assistant\n"))
    chosen_len, rejected_len = (len(_enc(tok, text)) + 1 for text in ("the cat sat on the mat", "no idea"))
    assert head.splitlines()[-1] == (f"tokens: chosen {prompt_len + chosen_len} (labelled {chosen_len}), rejected "
                                     f"{prompt_len + rejected_len} (labelled {rejected_len}), audio chunks: 0 "
                                     f"(mel frames [])")
    assert body.split("\n\n", 1)[1] == """\
prompt:
  <|BOT|>
  'system\\nYou are a helpful assistant. Speaking style: calm.'
  <|EOT|>
  <|BOT|>
  'human\\nwhere is the cat?'
  <|EOT|>
  <|BOT|>
  'assistant\\n'

chosen:
L 'the cat sat on the mat'
L <|EOT|>

rejected:
L 'no idea'
L <|EOT|>
"""
    assert show_main([str(out), "p-audio", "--tokenizer", str(tmp_path / "tok")]) == 0
    report = capsys.readouterr().out
    chosen = report.split("\nchosen:\n", 1)[1].split("\n\nrejected:\n")[0].splitlines()
    raw = next(r for r in _raws(out) if r["__key__"] == "p-audio")
    codes = np.load(io.BytesIO(raw["chosen.codes.npy"])).tolist()
    assert chosen[:2] == [f"L 'the' | {' '.join(map(str, codes[:4]))}", f"L ' cat' | {' '.join(map(str, codes[4:8]))}"]
    assert chosen[2:] == ["L ' is' | pad pad pad pad", "L ' he' | pad pad pad pad", "L 're' | pad pad pad pad",
                          "L <tts_end>", "L <|EOT|>"]
    assert report.split("\nprompt:\n", 1)[1].split("\n\n")[0].splitlines()[-2:] == ["  'assistant\\n'",
                                                                                    "  <tts_start>"]

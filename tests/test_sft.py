"""SFT conversations: JSONL -> shards (`python -m data.corpus.prepare conversations`) -> the "sft" template.

The golden conversation holds a system prompt, tool schemas, a user turn of text + audio, a tool call,
the tool's result, a speech answer (TA4) and a second exchange; every assistant turn is labelled.
Ids are those of test_tasks.py's tokenizer (text ids < 400, <|BOT|> 401, <|EOT|> 402, ...).
"""
import io
import json

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data.corpus.conversations import read_conversations
from data.corpus.prepare import main as prepare_main
from data.corpus.prepare import prepare_conversations
from data.loading.samples import render_raw
from data.shards import shard_paths
from data.tasks import TASKS, RenderOptions, Sample
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids
from tests.test_tasks import TEXTS


@pytest.fixture(scope="module")
def tok_ids():
    tok = extend_tokenizer(build_text_tokenizer(TEXTS * 3, vocab_size=400), 8)
    return tok, special_ids(tok)


def _wav(path, num_samples, seed):
    pcm = np.random.default_rng(seed).integers(-20000, 20000, size=num_samples, dtype=np.int16)
    sf.write(str(path), pcm, 16000, subtype="PCM_16")


GOLDEN = {"id": "c1", "tools": [{"name": "time"}], "style": "calm", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "text", "text": "time?"}, {"type": "audio", "audio": "q.wav"}]},
    {"role": "assistant", "tool_call": {"name": "time", "arguments": {}}},
    {"role": "tool", "text": "noon"},
    {"role": "assistant", "content": [{"type": "text", "text": "hi"}, {"type": "audio", "audio": "a.wav"}]},
    {"role": "user", "text": "and you?"},
    {"role": "assistant", "text": "fine"}]}


@pytest.fixture
def golden_shards(tmp_path):
    _wav(tmp_path / "q.wav", 3200, 0)   # 22 mel frames -> 3 audio tokens
    _wav(tmp_path / "a.wav", 4800, 1)
    (tmp_path / "conv.jsonl").write_text(json.dumps(GOLDEN) + "\n")
    index = prepare_conversations(str(tmp_path / "conv.jsonl"), str(tmp_path / "out"), workers=1, progress=False)
    return tmp_path, index


def test_conversation_becomes_members_and_named_messages(golden_shards):
    tmp_path, index = golden_shards
    assert index["num_samples"] == 1 and index["rejects"] == [] and index["input_format"] == "conversations"
    [raw] = list(wds.WebDataset(shard_paths(str(tmp_path / "out")), shardshuffle=False))
    assert sorted(k for k in raw if not k.startswith("__")) == ["json", "turn1.flac", "turn4.flac"]
    assert len(sf.read(io.BytesIO(raw["turn1.flac"]))[0]) == 3200
    meta = json.loads(raw["json"])
    assert meta["task"] == "sft" and meta["tools"] == [{"name": "time"}] and meta["style"] == "calm"
    assert meta["messages"] == [
        {"role": "system", "text": "You are a helpful assistant."},
        {"role": "human", "text": "time?", "audio": "turn1.flac"},
        {"role": "assistant", "tool_call": {"name": "time", "arguments": {}}},
        {"role": "input", "text": "noon"},
        {"role": "assistant", "text": "hi", "codes": "turn4.codes.npy"},
        {"role": "human", "text": "and you?"},
        {"role": "assistant", "text": "fine"}]
    assert (meta["num_samples"], meta["duration_s"]) == (8000, 0.5)
    assert meta["audio_members"] == {"turn1.flac": {"source": "q.wav", "num_samples": 3200, "duration_s": 0.2},
                                     "turn4.flac": {"source": "a.wav", "num_samples": 4800, "duration_s": 0.3}}
    assert TASKS["sft"].audio(meta) == ["turn1.flac"] and TASKS["sft"].codes(meta) == ["turn4.codes.npy"]


GOLDEN_IDS = [
    401, 361, 359, 278, 198, 326, 302, 358, 302, 369, 347, 296, 75, 377, 13, 402,  # system turn as given
    # <|BOT|>tool_json_schemas\n[{"name": "time"}]<|EOT|>
    401, 287, 328, 362, 329, 335, 350, 198, 327, 1, 351, 312, 368, 305, 313, 60, 402,
    401, 340, 298, 198, 305, 30,              # <|BOT|>human\ntime?
    403, 405, 405, 405, 404, 402,             # <audio_start><audio_patch>x3<audio_end><|EOT|>
    # <|BOT|>assistant\n<tool_call>function\ntime\n{}</tool_call><|EOT|>
    401, 311, 198, 316, 308, 317, 352, 198, 305, 198, 367, 315, 287, 308, 29, 402,
    401, 398, 83, 198, 310, 402,              # <|BOT|>input\nnoon<|EOT|>
    401, 311, 198, 407,                       # <|BOT|>assistant\n<tts_start>
    71, 410, 411, 412, 413,                   # 'h' + audio 1 2 3 4
    72, 414, 417, 417, 417,                   # 'i' + audio 5 pad pad pad
    408, 402,                                 # <tts_end><|EOT|>
    401, 340, 298, 198, 256, 67, 387, 30, 402,  # <|BOT|>human\nand you?<|EOT|>
    401, 311, 198, 69, 397, 402,              # <|BOT|>assistant\nfine<|EOT|>
]
CALL, SPEECH, FINE = GOLDEN_IDS[48:61], GOLDEN_IDS[71:83], GOLDEN_IDS[95:98]
GOLDEN_LABELS = [-100] * 48 + CALL + [-100] * 10 + SPEECH + [-100] * 12 + FINE


def test_golden_render_labels_every_assistant_turn(golden_shards, tok_ids):
    tmp_path, _ = golden_shards
    tok, ids = tok_ids
    [raw] = list(wds.WebDataset(shard_paths(str(tmp_path / "out")), shardshuffle=False))
    meta = json.loads(raw["json"])
    rendered = TASKS["sft"].render(Sample("c1", meta, {"turn1.flac": [22]}, {"turn4.codes.npy": [1, 2, 3, 4, 5]}),
                                   tok, ids, RenderOptions())
    assert rendered.input_ids == GOLDEN_IDS
    assert rendered.labels == GOLDEN_LABELS
    assert rendered.audio == ["turn1.flac"]
    assert tok.decode(CALL) == '<tool_call>function\ntime\n{}</tool_call><|EOT|>'
    assert tok.decode(FINE) == "fine<|EOT|>"
    # "dialogue" on the same record trains only the turns after the last human turn.
    dialogue = TASKS["dialogue"].render(Sample("c1", {**meta, "messages": meta["messages"][1:]},
                                               {"turn1.flac": [22]}, {"turn4.codes.npy": [1, 2, 3, 4, 5]}),
                                        tok, ids, RenderOptions())
    assert [t for t in dialogue.labels if t != -100] == FINE
    # The prompt that generation continues ends at the first trained turn's header.
    prompt = TASKS["sft"].render(Sample("c1", meta, {"turn1.flac": [22]}, {}), tok, ids,
                                 RenderOptions(with_answer=False))
    assert prompt.input_ids == GOLDEN_IDS[:48]

    # Through the loader's own decoding (mels from the stored FLAC), with codes as data.codes adds them.
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, 2, 3, 4, 5], dtype=np.int64))
    sample = render_raw({**raw, "turn4.codes.npy": buffer.getvalue()}, tok, ids, "", max_audio_s=30.0)
    assert (sample["task"], sample["input_ids"], sample["labels"]) == ("sft", GOLDEN_IDS, GOLDEN_LABELS)
    assert [m.shape for m in sample["mels"]] == [(128, 22)]


def test_bad_lines_are_rejected_naming_line_and_field(tmp_path, capsys):
    _wav(tmp_path / "q.wav", 3200, 0)
    user = {"role": "user", "audio": "q.wav"}
    lines = [
        json.dumps({"messages": [user, {"role": "assistant", "text": "ok"}]}),
        "not json",
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "user", "audio": "gone.wav"}, {"role": "assistant", "text": "x"}]}),
        json.dumps({"messages": [{"role": "robot", "text": "x"}]}),
        json.dumps({"messages": [user, {"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}]}),
        json.dumps({"messages": [{"role": "system", "audio": "q.wav"}, {"role": "assistant", "text": "x"}]}),
        json.dumps({"messages": [{"role": "user", "text": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "q.wav"},
                                                              {"type": "text", "text": "what?"}]},
                                 {"role": "assistant", "text": "x"}]}),
        json.dumps({"messages": [user, {"role": "assistant", "tool_call": {"arguments": {}}}]}),
        json.dumps({"task": "nope", "messages": [user, {"role": "assistant", "text": "x"}]}),
        json.dumps({"messages": [user, {"role": "assistant", "text": 3}]}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    corpus = read_conversations(str(tmp_path / "c.jsonl"))
    assert [c.key for c in corpus.candidates] == ["conv-00000001"]
    reasons = {r.where["line"]: r.reason for r in corpus.rejects}
    assert reasons[2].startswith("invalid JSON: ")
    assert reasons[3] == "field 'messages' is []: expected a non-empty list of turns"
    assert reasons[4] == (f"messages[0].audio: audio file 'gone.wav' not found (looked for {tmp_path}/gone.wav)")
    assert reasons[5].startswith("messages[0].role is 'robot': expected one of ['assistant', 'human', ")
    assert reasons[6] == ('messages[1].content[0] is {"type": "image", "image": "x.png"}: expected {"type": '
                          '"text", "text": STR} or {"type": "audio", "audio": PATH}')
    assert reasons[7] == ("messages[0].audio: a system turn cannot hold audio (only user, input and assistant "
                          "turns)")
    assert reasons[8] == "no assistant turn among roles ['human']: SFT trains on assistant turns"
    assert reasons[9].startswith("messages[0] puts text after audio: expected the text part first")
    assert reasons[10].startswith("messages[1]: a tool_call is {\"name\": str")
    assert reasons[11].startswith("field 'task' is 'nope': expected one of [")
    assert reasons[12] == "messages[1].text must be a string, got int"
    assert sorted(reasons) == list(range(2, 13))

    # The CLI writes the one good conversation and lists the rejects with their line in index.json.
    assert prepare_main(["conversations", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--workers", "1",
                         "--no-progress"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 1
    assert [(r["line"], r["audio"]) for r in index["rejects"]][:3] == [(2, None), (3, None), (4, "gone.wav")]
    assert "11 rejected" in capsys.readouterr().err


def test_undecodable_audio_rejects_the_conversation_naming_the_member(tmp_path):
    _wav(tmp_path / "q.wav", 3200, 0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    good = {"messages": [{"role": "user", "audio": "q.wav"}, {"role": "assistant", "text": "ok"}]}
    bad = {"messages": [{"role": "user", "audio": "q.wav"}, {"role": "assistant", "text": "ok", "audio": "broken.wav"}]}
    text_only = {"id": "t1", "messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "ok"}]}
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, bad, text_only)))
    index = prepare_conversations(str(tmp_path / "c.jsonl"), str(tmp_path / "out"), workers=1, progress=False)
    assert index["num_samples"] == 2
    [reject] = index["rejects"]
    assert reject["line"] == 2 and reject["reason"].startswith("turn1.flac (broken.wav): unreadable audio")
    samples = list(wds.WebDataset(shard_paths(str(tmp_path / "out")), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["conv-00000001", "t1"]
    assert sorted(k for k in samples[1] if not k.startswith("__")) == ["json"]  # a text-only conversation

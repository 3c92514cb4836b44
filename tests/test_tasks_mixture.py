"""The tasks that complete the report's mixture: T2ST (text in, the translation spoken) and speech->text
continuation (audio in, the text that continues it). Golden ids and labels of tiny records, the members each
reads, the records each refuses, and both through the loader over a real tar shard.

The tokenizer is trained here on fixed texts, so the ids are stable: text ids < 300, then <|endoftext|> 300,
<|BOT|> 301, <|EOT|> 302, <audio_start> 303, <audio_end> 304, <audio_patch> 305, <tts_pad> 306,
<tts_start> 307, <tts_end> 308, <audio_0>..<audio_7> 309..316, audio pad <audio_8> 317.
"""
import io
import json
import math

import numpy as np
import pytest
import soundfile
import webdataset

from data.features import SAMPLE_RATE, mel_frames
from data.loading.loader import DataConfig, build_loader
from data.shards import INDEX_FORMAT
from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.pieces import TemplateError
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids

TEXTS = ["system\nTranslate the text into German and speak the translation.", "human\nthe cat sat",
         "assistant\ndie Katze", "and then it ran away"]

# <|BOT|>system\nTranslate the text into German and speak the translation.<|EOT|>
T2ST_SYSTEM_DE = [301, 288, 264, 279, 198, 272, 68, 261, 258, 280, 83, 266, 285, 78, 294, 287, 293, 267, 286,
                  261, 299, 283, 77, 13, 302]
HUMAN_THE_CAT = [301, 282, 263, 198, 290, 297, 302]   # <|BOT|>human\nthe cat<|EOT|>
ASSISTANT = [301, 274, 289, 298, 198]                 # <|BOT|>assistant\n


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    extend_tokenizer(build_text_tokenizer(TEXTS * 3, vocab_size=300), 8).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    assert (ids.end_of_text, ids.bot, ids.eot, ids.audio_start, ids.audio_end, ids.audio_patch) == (
        300, 301, 302, 303, 304, 305)
    assert (ids.tts_pad, ids.tts_start, ids.tts_end, ids.first_audio_code, ids.audio_pad) == (306, 307, 308, 309, 317)
    return tok, ids


def _render(tok_ids, task, meta, mel_frames_, codes, **options):
    tok, ids = tok_ids
    return TASKS[task].render(Sample("k", meta, mel_frames_, codes), tok, ids, RenderOptions(**options))


def test_t2st_speaks_the_translation_of_a_text_turn(tok_ids):
    meta = {"text": "the cat", "translation": "die Katze", "target_language": "German"}
    rendered = _render(tok_ids, "t2st", meta, {}, {"codes.npy": [1, 2, 3, 4, 5]})
    answer = [
        307,                                      # <tts_start>
        278, 310, 311, 312, 313,                  # 'di' + audio 1 2 3 4
        68, 314, 317, 317, 317,                   # 'e' + audio 5 pad pad pad
        295, 317, 317, 317, 317,                  # ' Kat' + audio pad x4
        291, 317, 317, 317, 317,                  # 'ze' + audio pad x4
        308, 302,                                 # <tts_end><|EOT|>
    ]
    assert rendered.input_ids == T2ST_SYSTEM_DE + HUMAN_THE_CAT + ASSISTANT + answer
    assert rendered.labels == [-100] * 38 + answer[1:]
    assert rendered.audio == []  # no audio heard: the source is text


def test_t2st_of_an_s2st_record_speaks_its_target_audio(tok_ids):
    # An S2ST record (source audio, target audio, both texts) trains T2ST too: the target's codes.
    meta = {"text": "the cat", "translation": "die Katze", "target_language": "German",
            "target_num_samples": 800}
    codes = {"codes.npy": [0, 0, 0], "target.codes.npy": [7, 0]}
    rendered = _render(tok_ids, "t2st", meta, {"flac": [20]}, codes)
    assert rendered.input_ids == T2ST_SYSTEM_DE + HUMAN_THE_CAT + ASSISTANT + [
        307, 278, 316, 309, 317, 317, 68, 317, 317, 317, 317, 295, 317, 317, 317, 317, 291, 317, 317, 317, 317,
        308, 302]
    assert rendered.audio == []


def test_t2st_prompt_without_a_target_language_asks_for_speech(tok_ids):
    tok, _ = tok_ids
    rendered = _render(tok_ids, "t2st", {"text": "the cat"}, {}, {}, with_answer=False)
    assert rendered.input_ids == [
        # <|BOT|>system\nTranslate the text and speak the translation.<|EOT|>
        301, 288, 264, 279, 198, 272, 68, 261, 258, 280, 83, 293, 267, 286, 261, 299, 283, 77, 13, 302,
    ] + HUMAN_THE_CAT + ASSISTANT + [307]         # ... <|BOT|>assistant\n<tts_start>
    assert rendered.labels == [-100] * len(rendered.input_ids)
    assert tok.decode(rendered.input_ids[:20]) == ("<|BOT|>system\nTranslate the text and speak the "
                                                   "translation.<|EOT|>")


def test_speech_to_text_continuation_hears_audio_then_continues_in_text(tok_ids):
    rendered = _render(tok_ids, "speech_to_text_continuation", {"text": "ignored", "continuation": "and then it ran"},
                       {"flac": [30]}, {})
    assert rendered.input_ids == [
        303, 305, 305, 305, 305, 304,             # <audio_start><audio_patch>x4<audio_end>
        268, 261, 77, 266, 83, 292,               # and then it ran
        300,                                      # <|endoftext|>
    ]
    assert rendered.labels == [-100] * 6 + [268, 261, 77, 266, 83, 292, 300]
    assert rendered.audio == ["flac"]
    # The prompt is the audio alone, one span per 25 s chunk; the continuation is not needed for it.
    prompt = _render(tok_ids, "speech_to_text_continuation", {}, {"flac": [20, 30]}, {}, with_answer=False)
    assert prompt.input_ids == [303, 305, 305, 304, 303, 305, 305, 305, 305, 304]
    assert prompt.labels == [-100] * 10 and prompt.audio == ["flac"]


def test_members_each_new_task_reads():
    assert (TASKS["t2st"].audio({}), TASKS["t2st"].codes({"text": "x"})) == ([], ["codes.npy"])
    assert TASKS["t2st"].codes({"text": "x", "target_num_samples": 8}) == ["target.codes.npy"]
    assert TASKS["t2st"].prompt_codes({"text": "x"}) == []  # an RL prompt set has no answers' codes
    task = TASKS["speech_to_text_continuation"]
    assert (task.audio({}), task.codes({}), task.prompt_codes({})) == (["flac"], [], [])


@pytest.mark.parametrize("task,meta,codes,reason,message", [
    ("t2st", {"text": "the cat"}, {"codes.npy": [1]}, "missing_field",
     "record field 'translation' is None: expected a string"),
    ("t2st", {"translation": "die Katze"}, {"codes.npy": [1]}, "missing_text",
     "record field 'text' is None: expected a string"),
    ("t2st", {"text": "the cat", "translation": "die Katze"}, {}, "missing_codes",
     "sample 'k' has no codes member 'codes.npy'"),
    ("t2st", {"text": "the cat", "translation": "x", "target_language": 7}, {"codes.npy": [1]}, "missing_field",
     "record field 'target_language' is 7: expected a string"),
    ("speech_to_text_continuation", {"text": "the cat"}, {}, "missing_field",
     "record field 'continuation' is None: expected a string"),
    ("speech_to_text_continuation", {"continuation": " "}, {}, "missing_text",
     "record field 'continuation' is ' ': expected non-empty text"),
    ("speech_to_text_continuation", {"continuation": "a <|endoftext|>"}, {}, "bad_text",
     "text 'a <|endoftext|>' contains a special token string"),
])
def test_records_the_new_tasks_refuse(tok_ids, task, meta, codes, reason, message):
    with pytest.raises(TemplateError) as err:
        _render(tok_ids, task, meta, {"flac": [20]}, codes)
    assert (err.value.reason, message in str(err.value)) == (reason, True), str(err.value)


def _flac(duration_s):
    t = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * math.pi * 220 * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buf.getvalue()


def _npy(values):
    buf = io.BytesIO()
    np.save(buf, np.array(values, dtype=np.int32))
    return buf.getvalue()


def test_loader_renders_both_tasks_from_shards(tmp_path, tok_dir, tok_ids):
    # One S2ST record read as T2ST (no mels: its source is the text) beside a continuation record.
    s2st = {"text": "the cat", "translation": "die Katze", "target_language": "German", "task": "t2st",
            "target_num_samples": 9600}
    cont = {"text": "the cat", "continuation": "and then it ran", "task": "speech_to_text_continuation"}
    folder = tmp_path / "ds"
    folder.mkdir()
    with webdataset.TarWriter(str(folder / "shard-000000.tar")) as writer:
        writer.write({"__key__": "s0", "flac": _flac(0.5), "target.flac": _flac(0.6), "json": json.dumps(s2st).encode(),
                      "target.codes.npy": _npy([7, 0])})
        writer.write({"__key__": "c0", "flac": _flac(0.3), "json": json.dumps(cont).encode()})
    (folder / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, "shards": [
        {"name": "shard-000000.tar", "num_samples": 2}]}))
    cfg = DataConfig(shards=[str(folder)], tokenizer=tok_dir, batching="fixed", batch_size=2, num_workers=0,
                     shuffle_buffer=0)
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    batch = next(loader)
    assert batch["keys"] == ["s0", "c0"] and loader.stats()["skipped"] == {}
    assert batch["mel_lengths"].tolist() == [mel_frames(int(0.3 * SAMPLE_RATE))]  # c0's audio only
    frames = {"flac": [mel_frames(int(0.3 * SAMPLE_RATE))]}
    expected = [_render(tok_ids, "t2st", s2st, {}, {"target.codes.npy": [7, 0]}),
                _render(tok_ids, "speech_to_text_continuation", cont, frames, {})]
    for row, rendered in enumerate(expected):
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == rendered.input_ids
        assert batch["labels"][row, :n].tolist() == rendered.labels

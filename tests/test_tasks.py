"""Golden sequences of every task template: exact ids and labels of a small record per task.

The tokenizer is trained here on fixed texts, so the ids below are stable: text ids < 400, then
<|endoftext|> 400, <|BOT|> 401, <|EOT|> 402, <audio_start> 403, <audio_end> 404, <audio_patch> 405,
<tts_pad> 406, <tts_start> 407, <tts_end> 408, <audio_0>..<audio_7> 409..416, audio pad <audio_8> 417.
"""
import pytest

from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.pieces import TemplateError
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids

TEXTS = ["system\nTranscribe the speech.", "human\nRead the text aloud.", "assistant\nthe cat sat",
         "Describe the speaker's voice.", "Listen to the speech and answer the question.",
         "You are a helpful assistant.", "Translate the speech into German and speak the translation.",
         "Gender: female. Emotion: happy.", "What emotion does the speaker express?",
         "<tool_call>function\ntime\n{}</tool_call>", "input\nnoon", "tool_json_schemas\n[{\"name\": \"time\"}]",
         "hallo it is noon, fine and you? Speaking style: calm."]


@pytest.fixture(scope="module")
def tok_ids():
    tok = extend_tokenizer(build_text_tokenizer(TEXTS * 3, vocab_size=400), 8)
    ids = special_ids(tok)
    assert (ids.end_of_text, ids.bot, ids.eot, ids.tts_pad, ids.tts_start, ids.tts_end) == (
        400, 401, 402, 406, 407, 408)
    assert (ids.first_audio_code, ids.audio_pad) == (409, 417)
    return tok, ids


def _render(tok_ids, task, meta, mel_frames, codes, **options):
    tok, ids = tok_ids
    return TASKS[task].render(Sample("k", meta, mel_frames, codes), tok, ids, RenderOptions(**options))


def test_registry_names():
    assert list(TASKS) == ["asr", "asr_chat", "tts", "s2tt", "s2st", "para_caption", "para_qa", "dialogue",
                           "tool_call", "sft", "audio_continuation", "interleaved_continuation",
                           "speech_to_text_continuation", "preference", "text", "t2st", "timbre_search"]


def test_asr(tok_ids):
    rendered = _render(tok_ids, "asr", {"text": "the cat"}, {"flac": [30]}, {})
    assert rendered.input_ids == [
        290, 309, 261, 285, 13,                   # Transcribe the speech.
        403, 405, 405, 405, 405, 404,             # <audio_start><audio_patch>x4<audio_end>
        364, 381, 400,                            # the cat<|endoftext|>
    ]
    assert rendered.labels == [-100] * 11 + [364, 381, 400]
    assert rendered.audio == ["flac"]


def test_asr_chat(tok_ids):
    rendered = _render(tok_ids, "asr_chat", {"text": "the cat"}, {"flac": [30]}, {})
    assert rendered.input_ids == [
        401, 361, 359, 278, 198, 290, 309, 261, 285, 13, 402,  # <|BOT|>system\nTranscribe the speech.<|EOT|>
        401, 340, 298, 198,                       # <|BOT|>human\n
        403, 405, 405, 405, 405, 404, 402,        # <audio_start><audio_patch>x4<audio_end><|EOT|>
        401, 311, 198, 364, 381, 402,             # <|BOT|>assistant\nthe cat<|EOT|>
    ]
    assert rendered.labels == [-100] * 25 + [364, 381, 402]
    assert rendered.audio == ["flac"]


def test_tts(tok_ids):
    rendered = _render(tok_ids, "tts", {"text": "the cat sat"}, {}, {"codes.npy": [1, 2, 3, 4, 5, 6]})
    assert rendered.input_ids == [
        # <|BOT|>system\nRead the text aloud.<|EOT|>
        401, 361, 359, 278, 198, 323, 330, 261, 390, 83, 370, 282, 67, 13, 402,
        401, 340, 298, 198, 364, 381, 391, 402,   # <|BOT|>human\nthe cat sat<|EOT|>
        401, 311, 198,                            # <|BOT|>assistant\n
        407,                                      # <tts_start>
        364, 410, 411, 412, 413,                  # 'the' + audio 1 2 3 4
        381, 414, 415, 417, 417,                  # ' cat' + audio 5 6 pad pad
        391, 417, 417, 417, 417,                  # ' sat' + audio pad pad pad pad
        408, 402,                                 # <tts_end><|EOT|>
    ]
    assert rendered.labels == [-100] * 27 + [
        364, 410, 411, 412, 413, 381, 414, 415, 417, 417, 391, 417, 417, 417, 417, 408, 402,
    ]
    assert rendered.audio == []


def test_s2tt(tok_ids):
    rendered = _render(tok_ids, "s2tt", {"translation": "hallo", "target_language": "German"}, {"flac": [20]}, {})
    assert rendered.input_ids == [
        # <|BOT|>system\nTranslate the speech into German.<|EOT|>
        401, 361, 359, 278, 198, 290, 348, 68, 261, 285, 371, 273, 379, 298, 13, 402,
        401, 340, 298, 198,                       # <|BOT|>human\n
        403, 405, 405, 404, 402,                  # <audio_start><audio_patch>x2<audio_end><|EOT|>
        401, 311, 198, 341, 346, 402,             # <|BOT|>assistant\nhallo<|EOT|>
    ]
    assert rendered.labels == [-100] * 28 + [341, 346, 402]
    assert rendered.audio == ["flac"]


def test_s2st(tok_ids):
    meta = {"translation": "hallo", "target_language": "German"}
    rendered = _render(tok_ids, "s2st", meta, {"flac": [20]}, {"target.codes.npy": [7, 0, 1, 2, 3, 4, 5, 6, 7]})
    assert rendered.input_ids == [
        # <|BOT|>system\nTranslate the speech into German and speak the translation.<|EOT|>
        401, 361, 359, 278, 198, 290, 348, 68, 261, 285, 371, 273, 379, 298, 288, 284, 261, 389, 349, 13, 402,
        401, 340, 298, 198,                       # <|BOT|>human\n
        403, 405, 405, 404, 402,                  # <audio_start><audio_patch>x2<audio_end><|EOT|>
        401, 311, 198,                            # <|BOT|>assistant\n
        407,                                      # <tts_start>
        341, 416, 409, 410, 411,                  # 'hal' + audio 7 0 1 2
        346, 412, 413, 414, 415,                  # 'lo' + audio 3 4 5 6
        406, 416, 417, 417, 417,                  # <tts_pad> + audio 7 pad pad pad
        408, 402,                                 # <tts_end><|EOT|>
    ]
    assert rendered.labels == [-100] * 34 + [
        341, 416, 409, 410, 411, 346, 412, 413, 414, 415, 406, 416, 417, 417, 417, 408, 402,
    ]
    assert rendered.audio == ["flac"]


def test_para_caption(tok_ids):
    rendered = _render(tok_ids, "para_caption", {"gender": "female", "emotion": "happy"}, {"flac": [20]}, {})
    assert rendered.input_ids == [
        # <|BOT|>system\nDescribe the speaker's voice.<|EOT|>
        401, 361, 359, 278, 198, 318, 309, 261, 307, 314, 386, 13, 402,
        401, 340, 298, 198,                       # <|BOT|>human\n
        403, 405, 405, 404, 402,                  # <audio_start><audio_patch>x2<audio_end><|EOT|>
        # <|BOT|>assistant\nGender: female. Emotion: happy.<|EOT|>
        401, 311, 198, 321, 339, 25, 303, 278, 393, 13, 378, 300, 25, 383, 356, 13, 402,
    ]
    assert rendered.labels == [-100] * 25 + [321, 339, 25, 303, 278, 393, 13, 378, 300, 25, 383, 356, 13, 402]
    assert rendered.audio == ["flac"]


def test_para_qa(tok_ids):
    meta = {"gender": "female", "emotion": "happy", "ask": "emotion"}
    rendered = _render(tok_ids, "para_qa", meta, {"flac": [20]}, {})
    assert rendered.input_ids == [
        # <|BOT|>system\nListen to the speech and answer the question.<|EOT|>
        401, 361, 359, 278, 198, 322, 294, 388, 261, 285, 288, 399, 266, 261, 385, 396, 13, 402,
        # <|BOT|>human\nWhat emotion does the speaker express?
        401, 340, 298, 198, 325, 269, 374, 300, 382, 270, 261, 307, 375, 354, 395, 30,
        403, 405, 405, 404, 402,                  # <audio_start><audio_patch>x2<audio_end><|EOT|>
        401, 311, 198, 342, 356, 402,             # <|BOT|>assistant\nhappy<|EOT|>
    ]
    assert rendered.labels == [-100] * 42 + [342, 356, 402]
    assert rendered.audio == ["flac"]


def test_dialogue(tok_ids):
    # An earlier speech answer is fed back as TA4 without loss; only the last answer is labelled.
    meta = {"style": "calm", "messages": [
        {"role": "human", "audio": "flac"},
        {"role": "assistant", "text": "hi", "codes": "codes.npy"},
        {"role": "human", "text": "and you?"},
        {"role": "assistant", "text": "fine", "codes": "target.codes.npy"}]}
    codes = {"codes.npy": [1, 2, 3], "target.codes.npy": [4, 5, 6, 7, 0]}
    rendered = _render(tok_ids, "dialogue", meta, {"flac": [20]}, codes)
    assert rendered.input_ids == [
        # <|BOT|>system\nYou are a helpful assistant. Speaking style: calm.<|EOT|>
        401, 361, 359, 278, 198, 326, 302, 358, 302, 369, 347, 296, 75, 377, 13, 380, 394, 70, 392, 345, 25,
        373, 76, 13, 402,
        401, 340, 298, 198,                       # <|BOT|>human\n
        403, 405, 405, 404, 402,                  # <audio_start><audio_patch>x2<audio_end><|EOT|>
        401, 311, 198,                            # <|BOT|>assistant\n
        407,                                      # <tts_start>
        71, 410, 411, 412, 417,                   # 'h' + audio 1 2 3 pad
        72, 417, 417, 417, 417,                   # 'i' + audio pad pad pad pad
        408, 402,                                 # <tts_end><|EOT|>
        401, 340, 298, 198, 256, 67, 387, 30, 402,  # <|BOT|>human\nand you?<|EOT|>
        401, 311, 198,                            # <|BOT|>assistant\n
        407,                                      # <tts_start>
        69, 413, 414, 415, 416,                   # 'f' + audio 4 5 6 7
        397, 409, 417, 417, 417,                  # 'ine' + audio 0 pad pad pad
        408, 402,                                 # <tts_end><|EOT|>
    ]
    assert rendered.labels == [-100] * 63 + [69, 413, 414, 415, 416, 397, 409, 417, 417, 417, 408, 402]
    assert rendered.audio == ["flac"]


def test_tool_call(tok_ids):
    # The call, the tool's result and the final answer all follow the last human turn: both assistant
    # turns are labelled, the result is not.
    meta = {"tools": [{"name": "time"}], "messages": [
        {"role": "human", "text": "time?"},
        {"role": "assistant", "tool_call": {"name": "time", "arguments": {}}},
        {"role": "input", "text": "noon"},
        {"role": "assistant", "text": "it is noon"}]}
    rendered = _render(tok_ids, "tool_call", meta, {}, {})
    assert rendered.input_ids == [
        # <|BOT|>system\nYou are a helpful assistant.<|EOT|>
        401, 361, 359, 278, 198, 326, 302, 358, 302, 369, 347, 296, 75, 377, 13, 402,
        # <|BOT|>tool_json_schemas\n[{"name": "time"}]<|EOT|>
        401, 287, 328, 362, 329, 335, 350, 198, 327, 1, 351, 312, 368, 305, 313, 60, 402,
        401, 340, 298, 198, 305, 30, 402,         # <|BOT|>human\ntime?<|EOT|>
        # <|BOT|>assistant\n<tool_call>function\ntime\n{}</tool_call><|EOT|>
        401, 311, 198, 316, 308, 317, 352, 198, 305, 198, 367, 315, 287, 308, 29, 402,
        401, 398, 83, 198, 310, 402,              # <|BOT|>input\nnoon<|EOT|>
        401, 311, 198, 343, 372, 376, 402,        # <|BOT|>assistant\nit is noon<|EOT|>
    ]
    assert rendered.labels == [-100] * 43 + [
        316, 308, 317, 352, 198, 305, 198, 367, 315, 287, 308, 29, 402, -100, -100, -100, -100, -100, -100,
        -100, -100, -100, 343, 372, 376, 402,
    ]
    assert rendered.audio == []


def test_audio_continuation(tok_ids):
    meta = {"continuation": "and you"}
    rendered = _render(tok_ids, "audio_continuation", meta, {"flac": [20]}, {"target.codes.npy": [1, 2, 3, 4, 5]})
    assert rendered.input_ids == [
        403, 405, 405, 404,                       # <audio_start><audio_patch>x2<audio_end>
        407,                                      # <tts_start>
        256, 410, 411, 412, 413,                  # 'an' + audio 1 2 3 4
        67, 414, 417, 417, 417,                   # 'd' + audio 5 pad pad pad
        387, 417, 417, 417, 417,                  # ' you' + audio pad pad pad pad
        408, 400,                                 # <tts_end><|endoftext|>
    ]
    assert rendered.labels == [-100] * 5 + [
        256, 410, 411, 412, 413, 67, 414, 417, 417, 417, 387, 417, 417, 417, 417, 408, 400,
    ]
    assert rendered.audio == ["flac"]


def test_interleaved_continuation(tok_ids):
    meta = {"prompt": "the", "text": "cat"}
    rendered = _render(tok_ids, "interleaved_continuation", meta, {}, {"codes.npy": [1, 2, 3, 4]})
    assert rendered.input_ids == [
        364,                                      # the
        407,                                      # <tts_start>
        337, 410, 411, 412, 413,                  # 'cat' + audio 1 2 3 4
        408, 400,                                 # <tts_end><|endoftext|>
    ]
    assert rendered.labels == [-100] * 2 + [337, 410, 411, 412, 413, 408, 400]
    assert rendered.audio == []


def test_prompt_ends_where_generation_starts(tok_ids):
    # A speech answer's prompt holds <tts_start>, as the public inference code writes it; a text
    # answer's prompt ends after "assistant\n".
    for task, meta, frames, codes in [
            ("s2st", {"translation": "hallo"}, {"flac": [20]}, {"target.codes.npy": [1, 2]}),
            ("s2tt", {"translation": "hallo"}, {"flac": [20]}, {}),
            ("audio_continuation", {}, {"flac": [20]}, {"target.codes.npy": [1]})]:
        full = _render(tok_ids, task, meta, frames, codes)
        prompt = _render(tok_ids, task, meta, frames, codes, with_answer=False)
        first_label = next(i for i, label in enumerate(full.labels) if label != -100)
        assert prompt.input_ids == full.input_ids[:first_label], task
        assert prompt.labels == [-100] * first_label
        assert prompt.audio == ["flac"]
    assert prompt.input_ids[-1] == 407  # <tts_start>


def test_text_answer_longer_than_audio_pads_audio_and_text_pads_after(tok_ids):
    rendered = _render(tok_ids, "interleaved_continuation", {"text": "the cat sat"}, {}, {"codes.npy": [5]})
    assert rendered.input_ids == [407, 364, 414, 417, 417, 417, 381, 417, 417, 417, 417, 391, 417, 417, 417, 417,
                                  408, 400]
    rendered = _render(tok_ids, "interleaved_continuation", {"text": ""}, {}, {"codes.npy": [0] * 9})
    assert rendered.input_ids == [407] + [406, 409, 409, 409, 409] * 2 + [406, 409, 417, 417, 417] + [408, 400]


def test_record_overrides_and_choices(tok_ids):
    tok, _ = tok_ids
    rendered = _render(tok_ids, "s2tt", {"translation": "hallo", "system": "hi"}, {"flac": [20]}, {})
    assert tok.decode(rendered.input_ids).startswith("<|BOT|>system\nhi<|EOT|><|BOT|>human\n<audio_start>")
    # Without "ask", the key's hash picks the field: fixed for "k", whatever the run.
    rendered = _render(tok_ids, "para_qa", {"gender": "female", "emotion": "happy"}, {"flac": [20]}, {})
    assert tok.decode(rendered.input_ids).endswith("What emotion does the speaker express?<audio_start>"
                                                   "<audio_patch><audio_patch><audio_end><|EOT|><|BOT|>assistant\n"
                                                   "happy<|EOT|>")
    rendered = _render(tok_ids, "para_qa", {"question": "Is it loud?", "answer": "no"}, {"flac": [20]}, {})
    assert tok.decode([t for t in rendered.labels if t != -100]) == "no<|EOT|>"
    rendered = _render(tok_ids, "para_caption", {"caption": "A calm voice.", "gender": "male"}, {"flac": [20]}, {})
    assert tok.decode([t for t in rendered.labels if t != -100]) == "A calm voice.<|EOT|>"


def test_members_each_task_reads():
    assert TASKS["tts"].codes({"text": "x"}) == ["codes.npy"]
    assert TASKS["tts"].codes({"text": "x", "target_num_samples": 800}) == ["target.codes.npy"]
    assert (TASKS["tts"].audio({}), TASKS["s2st"].audio({}), TASKS["s2st"].codes({})) == (
        [], ["flac"], ["target.codes.npy"])
    meta = {"messages": [{"role": "human", "audio": "flac"},
                         {"role": "assistant", "text": "a", "codes": "t1.codes.npy"},
                         {"role": "human", "audio": "q2.flac"}, {"role": "assistant", "text": "b"}]}
    assert (TASKS["dialogue"].audio(meta), TASKS["dialogue"].codes(meta)) == (["flac", "q2.flac"], ["t1.codes.npy"])


@pytest.mark.parametrize("task,meta,codes,reason,message", [
    ("s2tt", {"text": "x"}, {}, "missing_field", "record field 'translation' is None: expected a string"),
    ("asr_chat", {"text": "a <|EOT|> b"}, {}, "bad_text", "text 'a <|EOT|> b' contains a special token string"),
    ("s2st", {"translation": "x"}, {"target.codes.npy": [3, 8]}, "bad_codes",
     "audio code 8 is outside 0..7 (the tokenizer's audio codes)"),
    ("s2st", {"translation": "x"}, {"target.codes.npy": []}, "bad_codes", "needs at least one audio code"),
    ("para_caption", {"text": "x"}, {}, "missing_field", "record has none of caption, gender, age"),
    ("para_qa", {"gender": "male", "ask": "pitch"}, {}, "missing_field",
     "record asks about 'pitch': expected one of its fields ['gender']"),
    ("dialogue", {"messages": [{"role": "human", "text": "hi"}]}, {}, "bad_messages",
     "no assistant turn after the last human turn"),
    ("dialogue", {"messages": [{"role": "robot", "text": "hi"}]}, {}, "bad_messages", "has role 'robot'"),
    ("dialogue", {"messages": [{"role": "human", "codes": "codes.npy"}]}, {}, "bad_messages",
     "only assistant turns have codes"),
    ("tool_call", {"messages": [{"role": "human", "text": "hi"}]}, {}, "missing_field",
     "record field 'tools' is None: expected a non-empty list"),
])
def test_bad_records_name_the_problem(tok_ids, task, meta, codes, reason, message):
    with pytest.raises(TemplateError) as err:
        _render(tok_ids, task, meta, {"flac": [20]}, codes)
    assert (err.value.reason, message in str(err.value)) == (reason, True), str(err.value)

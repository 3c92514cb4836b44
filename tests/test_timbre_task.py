"""Task timbre_search: the golden sequence of a tiny record (request, audio_search call, the found clip as
the tool's result, the answer spoken in its voice), its prompt, the members it reads, and bad records.

The tokenizer is trained here on fixed texts, so the ids below are stable: text ids < 400, then
<|endoftext|> 400, <|BOT|> 401, <|EOT|> 402, <audio_start> 403, <audio_end> 404, <audio_patch> 405,
<tts_pad> 406, <tts_start> 407, <tts_end> 408, <audio_0>..<audio_7> 409..416, audio pad <audio_8> 417.
"""
import pytest

from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.chat import tool_call_text, tool_schemas_text
from data.tasks.timbre import AUDIO_SEARCH_SCHEMA, TIMBRE_SYSTEM, timbre_request
from data.tasks.pieces import TemplateError
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids

TEXTS = ["system\nhi", "tool_json_schemas\n" + tool_schemas_text([{"name": "audio_search"}]),
         "human\n" + timbre_request("the cat sat", "a tall man"),
         "assistant\n" + tool_call_text("audio_search", {"query": "a tall man"}), "input\n", "assistant\n",
         TIMBRE_SYSTEM, tool_schemas_text([AUDIO_SEARCH_SCHEMA])]
META = {"text": "the cat sat", "query": "a tall man", "system": "hi", "tools": [{"name": "audio_search"}]}


@pytest.fixture(scope="module")
def tok_ids():
    tok = extend_tokenizer(build_text_tokenizer(TEXTS * 3, vocab_size=400), 8)
    ids = special_ids(tok)
    assert (ids.end_of_text, ids.bot, ids.eot, ids.audio_start, ids.audio_patch, ids.tts_start, ids.tts_end) == (
        400, 401, 402, 403, 405, 407, 408)
    assert (ids.first_audio_code, ids.audio_pad) == (409, 417)
    return tok, ids


def _render(tok_ids, meta, codes=None, **options):
    tok, ids = tok_ids
    codes = {"target.codes.npy": [1, 2, 3, 4, 5, 6]} if codes is None else codes
    return TASKS["timbre_search"].render(Sample("k", meta, {"flac": [20]}, codes), tok, ids, RenderOptions(**options))


def test_timbre_search_golden(tok_ids):
    rendered = _render(tok_ids, META)
    # <tool_call>function\naudio_search\n{"query": "a tall man"}</tool_call><|EOT|>
    call = [334, 327, 335, 198, 293, 290, 198, 262, 310, 256, 257, 64, 323, 322, 291, 333, 303, 327, 29, 402]
    assert rendered.input_ids == [
        401, 367, 393, 198, 347, 402,             # <|BOT|>system\nhi<|EOT|>
        # <|BOT|>tool_json_schemas\n[{"name": "audio_search"}]<|EOT|>
        401, 303, 339, 369, 390, 356, 198, 314, 320, 256, 257, 293, 290, 291, 60, 402,
        # <|BOT|>human\nIn the voice of a tall man, say: the cat sat<|EOT|>
        401, 348, 297, 198, 336, 287, 325, 382, 259, 323, 322, 11, 285, 341, 25, 287, 380, 399, 402,
        401, 324, 198, *call,                     # <|BOT|>assistant\n + the call
        401, 392, 83, 198,                        # <|BOT|>input\n (the tool's result: the found clip)
        403, 405, 405, 404, 402,                  # <audio_start><audio_patch>x2<audio_end><|EOT|>
        401, 324, 198,                            # <|BOT|>assistant\n
        407,                                      # <tts_start>
        83, 410, 411, 412, 413,                   # 't' + audio 1 2 3 4
        261, 414, 415, 417, 417,                  # 'he' + audio 5 6 pad pad
        380, 417, 417, 417, 417,                  # ' cat' + audio pad pad pad pad
        399, 417, 417, 417, 417,                  # ' sat' + audio pad pad pad pad
        408, 402,                                 # <tts_end><|EOT|>
    ]
    # Loss on the call and on the spoken answer; the request, the clip and both headers are context.
    answer = [83, 410, 411, 412, 413, 261, 414, 415, 417, 417, 380, 417, 417, 417, 417, 399, 417, 417, 417, 417,
              408, 402]
    assert rendered.labels == [-100] * 44 + call + [-100] * 13 + answer
    assert rendered.audio == ["flac"]


def test_defaults_prompt_and_members(tok_ids):
    tok, _ = tok_ids
    text = tok.decode(_render(tok_ids, {"text": "the cat sat", "query": "a tall man"}).input_ids)
    assert text.startswith(f"<|BOT|>system\n{TIMBRE_SYSTEM}<|EOT|><|BOT|>tool_json_schemas\n"
                           f"{tool_schemas_text([AUDIO_SEARCH_SCHEMA])}<|EOT|><|BOT|>human\nIn the voice of a tall "
                           f"man, say: the cat sat<|EOT|>")
    text = tok.decode(_render(tok_ids, {**META, "request": "hello", "tool": "find_voice"}).input_ids)
    assert "<|BOT|>human\nhello<|EOT|>" in text and "<tool_call>function\nfind_voice\n" in text
    # Generation starts from the call: the prompt is everything before it and reads no codes.
    full = _render(tok_ids, META)
    prompt = _render(tok_ids, META, codes={}, with_answer=False)
    assert prompt.input_ids == full.input_ids[:44] and prompt.labels == [-100] * 44 and prompt.audio == []
    task = TASKS["timbre_search"]
    assert (task.audio(META), task.codes(META), task.prompt_codes(META)) == (["flac"], ["target.codes.npy"], [])


@pytest.mark.parametrize("meta,codes,reason,message", [
    ({"text": "the cat sat"}, None, "missing_field", "record field 'query' is None: expected a string"),
    ({"query": "a tall man"}, None, "missing_text", "record field 'text' is None: expected a string"),
    ({**META, "tools": []}, None, "missing_field", "record field 'tools' is []: expected a non-empty list"),
    (META, {}, "missing_codes", "sample 'k' has no codes member 'target.codes.npy'"),
    (META, {"target.codes.npy": [8]}, "bad_codes", "audio code 8 is outside 0..7"),
])
def test_bad_records_name_the_problem(tok_ids, meta, codes, reason, message):
    with pytest.raises(TemplateError) as err:
        _render(tok_ids, meta, codes)
    assert (err.value.reason, message in str(err.value)) == (reason, True), str(err.value)

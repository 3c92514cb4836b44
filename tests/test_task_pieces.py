"""The ASR template in Step-Audio 2 base format, pinned by a golden id sequence."""
import pytest

from data.features import num_audio_tokens
from data.tasks.pieces import IGNORE_INDEX, render_asr
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids

TEXTS = ["transcribe the speech", "the cat sat on the mat", "a cat and a dog"] * 3


@pytest.fixture(scope="module")
def tok_ids():
    tok = extend_tokenizer(build_text_tokenizer(TEXTS, vocab_size=270), 4)
    return tok, special_ids(tok)


def test_golden_two_chunks(tok_ids):
    tok, ids = tok_ids
    assert (ids.end_of_text, ids.audio_start, ids.audio_end, ids.audio_patch) == (270, 273, 274, 275)
    assert (num_audio_tokens(30), num_audio_tokens(20)) == (4, 2)
    rendered = render_asr("the cat sat", [30, 20], tok, ids, instruction="Transcribe the speech.")
    # "Transcribe the speech." | <audio_start> <audio_patch>x4 <audio_end> | <audio_start> <audio_patch>x2
    # <audio_end> | "the cat sat" <|endoftext|>
    assert rendered.input_ids == [
        51, 81, 259, 82, 266, 269, 262, 261, 79, 268, 265, 13,
        273, 275, 275, 275, 275, 274,
        273, 275, 275, 274,
        258, 263, 261, 256, 270]
    assert rendered.labels == [-100] * 22 + [258, 263, 261, 256, 270]
    assert tok.decode(rendered.input_ids[-5:-1]) == "the cat sat"


def test_prompt_only(tok_ids):
    tok, ids = tok_ids
    full = render_asr("the cat sat", [30, 20], tok, ids)
    prompt = render_asr("the cat sat", [30, 20], tok, ids, with_answer=False)
    assert prompt.input_ids == full.input_ids[:22]
    assert prompt.labels == [IGNORE_INDEX] * 22


def test_rejects_special_strings_in_transcript(tok_ids):
    tok, ids = tok_ids
    with pytest.raises(ValueError, match="contains a special token string"):
        render_asr("the <audio_patch> cat", [30], tok, ids)


def test_rejects_chunk_without_audio_tokens(tok_ids):
    tok, ids = tok_ids
    with pytest.raises(ValueError, match="an audio chunk of 3 mel frames gives 0 audio tokens"):
        render_asr("the cat", [30, 3], tok, ids)

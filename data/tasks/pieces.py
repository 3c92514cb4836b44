"""Token-level pieces of every task template: audio spans, checked text, the TA4 speech interleave, and
the ASR base-format template. Task templates built from these live in data/tasks/.

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts them), -100 where
no loss falls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

from transformers import PreTrainedTokenizerFast

from data.features import num_audio_tokens
from data.text_tokenizer import SpecialIds

IGNORE_INDEX = -100
DEFAULT_ASR_INSTRUCTION = "Transcribe the speech."
# The TA4 interleave of a speech answer: this many text tokens, then this many audio tokens, repeated.
TEXT_PER_GROUP = 1
AUDIO_PER_GROUP = 4


class TemplateError(ValueError):
    """A record a template cannot render; `reason` is the loader's skip-counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Rendered:
    """One rendered sequence: token ids and labels of the same length.

    `audio` names the audio members whose spans appear in input_ids, in order; each member contributes
    one span per 25 s chunk, so the batch's mels follow the same order.
    """
    input_ids: List[int]
    labels: List[int]
    audio: List[str] = field(default_factory=list)


class Builder:
    """Appends pieces to a sequence, each labelled or not."""

    def __init__(self) -> None:
        self.input_ids: List[int] = []
        self.labels: List[int] = []
        self.audio: List[str] = []

    def add(self, ids: Sequence[int], labelled: bool = False) -> None:
        self.input_ids += ids
        self.labels += list(ids) if labelled else [IGNORE_INDEX] * len(ids)

    def done(self) -> Rendered:
        return Rendered(self.input_ids, self.labels, self.audio)


def audio_span(mel_frames: int, ids: SpecialIds) -> List[int]:
    """`<audio_start>` + one `<audio_patch>` per adapter output + `<audio_end>` for a chunk of `mel_frames`."""
    num_patches = num_audio_tokens(mel_frames)
    if num_patches < 1:
        raise TemplateError("too_short", f"an audio chunk of {mel_frames} mel frames gives {num_patches} audio "
                                         f"tokens; expected at least 1 (the chunk is too short)")
    return [ids.audio_start] + [ids.audio_patch] * num_patches + [ids.audio_end]


def audio_spans(mel_frames: Sequence[int], ids: SpecialIds) -> List[int]:
    """One audio span per 25 s chunk of one recording."""
    if not mel_frames:
        raise TemplateError("missing_audio", "an audio input needs at least one chunk, got mel_frames=[]")
    return [i for frames in mel_frames for i in audio_span(frames, ids)]


def text_ids(text: str, tok: PreTrainedTokenizerFast, ids: SpecialIds) -> List[int]:
    """Token ids of plain text; TemplateError if the text spells a control or audio token.

    Such a text would desynchronise audio spans or end a turn early, so it is refused rather than
    encoded (e.g. a transcript containing "<audio_patch>").
    """
    out = tok.encode(text, add_special_tokens=False)
    control = {ids.end_of_text, ids.bot, ids.eot, ids.audio_start, ids.audio_end, ids.audio_patch,
               ids.tts_pad, ids.tts_start, ids.tts_end}
    if any(i in control or ids.first_audio_code <= i <= ids.audio_pad for i in out):
        raise TemplateError("bad_text", f"text {text[:80]!r} contains a special token string; "
                                        f"expected plain text")
    return out


def speech_answer(text: List[int], codes: Sequence[int], ids: SpecialIds) -> List[int]:
    """The TA4 body after `<tts_start>`: groups of one text token and four audio tokens, then `<tts_end>`.

    Text that runs out is padded with `<tts_pad>`, audio with the audio pad token, so every group is
    whole and the body lasts as long as the longer of the two.
    """
    if len(codes) == 0:
        raise TemplateError("bad_codes", "a speech answer needs at least one audio code, got none")
    bad = [int(c) for c in codes if not 0 <= int(c) < ids.num_audio_codes]
    if bad:
        raise TemplateError("bad_codes", f"audio code {bad[0]} is outside 0..{ids.num_audio_codes - 1} "
                                         f"(the tokenizer's audio codes)")
    num_groups = max(-(-len(text) // TEXT_PER_GROUP), -(-len(codes) // AUDIO_PER_GROUP))
    out: List[int] = []
    for g in range(num_groups):
        for t in range(g * TEXT_PER_GROUP, (g + 1) * TEXT_PER_GROUP):
            out.append(text[t] if t < len(text) else ids.tts_pad)
        for a in range(g * AUDIO_PER_GROUP, (g + 1) * AUDIO_PER_GROUP):
            out.append(ids.first_audio_code + int(codes[a]) if a < len(codes) else ids.audio_pad)
    return out + [ids.tts_end]


def render_asr(text: str, mel_frames: List[int], tok: PreTrainedTokenizerFast, ids: SpecialIds,
               instruction: str = DEFAULT_ASR_INSTRUCTION, with_answer: bool = True) -> Rendered:
    """ASR in the base format (no role tags): instruction, one audio span per chunk, transcript, end.

    Loss falls on the transcript and its `<|endoftext|>` only. with_answer=False returns the prompt,
    which greedy decoding continues.
    """
    if not mel_frames:
        raise TemplateError("missing_audio", "render_asr needs at least one audio chunk, got mel_frames=[]")
    out = Builder()
    out.add(tok.encode(instruction, add_special_tokens=False) + audio_spans(mel_frames, ids))
    if with_answer:
        out.add(text_ids(text, tok, ids) + [ids.end_of_text], labelled=True)
    return out.done()

"""Base-format continuation (no role tags): speech continued as TA4 speech, and text continued as
interleaved text and speech. Loss falls on everything after `<tts_start>`, ending at `<|endoftext|>`."""
from __future__ import annotations

from data.tasks.base import AUDIO, CODES, TARGET_CODES, RenderOptions, Sample, Task, text_field
from data.templates import Builder, Rendered, audio_spans, speech_answer, text_ids


def _audio_continuation(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    """The recording's audio heard, then its continuation spoken: "continuation" (its text, may be
    absent: all <tts_pad>) with target.codes.npy."""
    out = Builder()
    out.add(audio_spans(s.mel_frames[AUDIO], ids) + [ids.tts_start])
    out.audio.append(AUDIO)
    if opt.with_answer:
        text = text_ids(text_field(s.meta, "continuation", ""), tok, ids)
        out.add(speech_answer(text, s.codes[TARGET_CODES], ids) + [ids.end_of_text], labelled=True)
    return out.done()


def _interleaved_continuation(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    """Optional plain-text "prompt", then the recording's "text" and codes.npy as TA4."""
    out = Builder()
    out.add(text_ids(text_field(s.meta, "prompt", ""), tok, ids) + [ids.tts_start])
    if opt.with_answer:
        text = text_ids(text_field(s.meta, "text"), tok, ids)
        out.add(speech_answer(text, s.codes[CODES], ids) + [ids.end_of_text], labelled=True)
    return out.done()


CONTINUATION_TASKS = [
    Task("audio_continuation", _audio_continuation, lambda meta: [AUDIO], lambda meta: [TARGET_CODES],
         doc="base: audio span, then <tts_start> TA4 of \"continuation\" + target.codes.npy"),
    Task("interleaved_continuation", _interleaved_continuation, codes=lambda meta: [CODES],
         doc="base: \"prompt\" text, then <tts_start> TA4 of \"text\" + codes.npy"),
]

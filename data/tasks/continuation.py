"""Base-format continuation (no role tags): speech continued as TA4 speech, speech continued as text, and
text continued as interleaved text and speech. Loss falls on the continuation (everything after the heard
audio, or after `<tts_start>`), ending at `<|endoftext|>`."""
from __future__ import annotations

from data.tasks.base import AUDIO, CODES, TARGET_CODES, RenderOptions, Sample, Task, text_field
from data.tasks.pieces import Builder, Rendered, TemplateError, audio_spans, speech_answer, text_ids


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


def _speech_to_text_continuation(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    """The recording's audio heard, then the text that continues it ("continuation", e.g. the transcript
    of what follows the cut) as plain text."""
    out = Builder()
    out.add(audio_spans(s.mel_frames[AUDIO], ids))
    out.audio.append(AUDIO)
    if opt.with_answer:
        text = text_field(s.meta, "continuation")
        if not text.strip():
            raise TemplateError("missing_text", f"record field 'continuation' is {text!r}: expected non-empty "
                                                f"text")
        out.add(text_ids(text, tok, ids) + [ids.end_of_text], labelled=True)
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
    Task("speech_to_text_continuation", _speech_to_text_continuation, lambda meta: [AUDIO],
         doc="base: audio span, then \"continuation\" as text + <|endoftext|>"),
]

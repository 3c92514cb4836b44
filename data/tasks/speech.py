"""Single-turn tasks built from a record's fields: ASR (base and chat), TTS, S2TT, S2ST, and
paralinguistic captioning and question answering."""
from __future__ import annotations

import zlib
from typing import Any, Dict, List

from data.tasks.base import AUDIO, CODES, TARGET_CODES, RenderOptions, Sample, Task, text_field
from data.tasks.chat import Message, render_chat
from data.tasks.pieces import Rendered, TemplateError, render_asr

TTS_SYSTEM = "Read the text aloud."
PARA_CAPTION_SYSTEM = "Describe the speaker's voice."
PARA_QA_SYSTEM = "Listen to the speech and answer the question."
# Paralinguistic record fields in the order a caption lists them, with the question that asks for each.
PARA_QUESTIONS = {
    "gender": "Is the speaker male or female?",
    "age": "How old does the speaker sound?",
    "emotion": "What emotion does the speaker express?",
    "speed": "How fast does the speaker talk?",
    "pitch": "How high is the speaker's voice?",
    "style": "In what style does the speaker talk?",
}


def _audio_in(meta: Dict[str, Any]) -> List[str]:
    return [AUDIO]


def _system(meta: Dict[str, Any], default: str) -> Message:
    return Message("system", text_field(meta, "system", default))


def tts_codes(meta: Dict[str, Any]) -> List[str]:
    """The speech of `text`: the target audio's codes where the record has a target, else its own."""
    return [TARGET_CODES if "target_num_samples" in meta else CODES]


def _answer_text(meta: Dict[str, Any], name: str, opt: RenderOptions) -> str:
    """The answer's text field, or "" for a prompt (with_answer=False), which never shows it: a
    prompt-only corpus (RL) may hold no answers."""
    return text_field(meta, name) if opt.with_answer else ""


def _asr(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    text = text_field(s.meta, "text") if opt.with_answer else ""
    rendered = render_asr(text, s.mel_frames[AUDIO], tok, ids, opt.asr_instruction, opt.with_answer)
    rendered.audio = [AUDIO]
    return rendered


def _asr_chat(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat([_system(s.meta, opt.asr_instruction), Message("human", audio=AUDIO),
                        Message("assistant", _answer_text(s.meta, "text", opt))], s, tok, ids, opt)


def _tts(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    text = text_field(s.meta, "text")
    return render_chat([_system(s.meta, TTS_SYSTEM), Message("human", text),
                        Message("assistant", text, codes=tts_codes(s.meta)[0])], s, tok, ids, opt)


def _translate_system(meta: Dict[str, Any], speak: bool) -> Message:
    language = meta.get("target_language")
    into = f" into {text_field(meta, 'target_language')}" if language is not None else ""
    return _system(meta, f"Translate the speech{into}" + (" and speak the translation." if speak else "."))


def _s2tt(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat([_translate_system(s.meta, speak=False), Message("human", audio=AUDIO),
                        Message("assistant", _answer_text(s.meta, "translation", opt))], s, tok, ids, opt)


def _s2st(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat([_translate_system(s.meta, speak=True), Message("human", audio=AUDIO),
                        Message("assistant", _answer_text(s.meta, "translation", opt), codes=TARGET_CODES)],
                       s, tok, ids, opt)


def _para_value(meta: Dict[str, Any], name: str) -> str:
    value = meta[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TemplateError("missing_field", f"record field {name!r} is {value!r}: expected a string or number")
    return str(value)


def para_caption(meta: Dict[str, Any]) -> str:
    """The record's "caption", else one sentence per paralinguistic field present, in a fixed order."""
    if "caption" in meta:
        return text_field(meta, "caption")
    parts = [f"{name.capitalize()}: {_para_value(meta, name)}." for name in PARA_QUESTIONS if name in meta]
    if not parts:
        raise TemplateError("missing_field", f"record has none of caption, {', '.join(PARA_QUESTIONS)}")
    return " ".join(parts)


def para_question(key: str, meta: Dict[str, Any]) -> tuple:
    """(question, answer): the record's own pair, else about its "ask" field, else about one of its
    paralinguistic fields picked by a hash of the key (fixed per sample, spread over a corpus)."""
    if "question" in meta or "answer" in meta:
        return text_field(meta, "question"), text_field(meta, "answer")
    present = [name for name in PARA_QUESTIONS if name in meta]
    if "ask" in meta:
        if meta["ask"] not in present:
            raise TemplateError("missing_field", f"record asks about {meta['ask']!r}: expected one of its "
                                                 f"fields {present}")
        name = meta["ask"]
    elif present:
        name = present[zlib.crc32(key.encode()) % len(present)]
    else:
        raise TemplateError("missing_field", f"record has none of question/answer, {', '.join(PARA_QUESTIONS)}")
    return PARA_QUESTIONS[name], _para_value(meta, name)


def _para_caption(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat([_system(s.meta, PARA_CAPTION_SYSTEM), Message("human", audio=AUDIO),
                        Message("assistant", para_caption(s.meta) if opt.with_answer else "")], s, tok, ids, opt)


def _para_qa(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    if not opt.with_answer and "question" in s.meta:  # the prompt needs the record's question, not its answer
        question, answer = text_field(s.meta, "question"), ""
    else:
        question, answer = para_question(s.key, s.meta)
    return render_chat([_system(s.meta, PARA_QA_SYSTEM), Message("human", question, audio=AUDIO),
                        Message("assistant", answer)], s, tok, ids, opt)


SPEECH_TASKS = [
    Task("asr", _asr, _audio_in, doc="base format: instruction, audio, transcript <|endoftext|>"),
    Task("asr_chat", _asr_chat, _audio_in, doc="chat: system instruction, human audio, assistant transcript"),
    Task("tts", _tts, codes=tts_codes, doc="chat: human text, assistant speaks it (TA4)"),
    Task("s2tt", _s2tt, _audio_in, doc="chat: human audio, assistant \"translation\" text"),
    Task("s2st", _s2st, _audio_in, lambda meta: [TARGET_CODES],
         doc="chat: human audio, assistant speaks \"translation\" (TA4 of target.codes.npy)"),
    Task("para_caption", _para_caption, _audio_in, doc="chat: human audio, assistant describes the voice"),
    Task("para_qa", _para_qa, _audio_in, doc="chat: human question + audio, assistant answers"),
]

"""Text-to-speech translation (T2ST): a text in one language heard as a human text turn, the assistant
speaking its "translation" in another (TA4). The speech-input translations (S2TT, S2ST) are in speech.py.

One S2ST record with both texts (source "text", "translation", target.codes.npy) serves S2TT, S2ST and
T2ST alike; a record whose only audio is the translation spoken (codes.npy) serves T2ST too.
"""
from __future__ import annotations

from typing import Any, Dict

from data.tasks.base import RenderOptions, Sample, Task, text_field
from data.tasks.chat import Message, render_chat
from data.tasks.speech import tts_codes
from data.tasks.pieces import Rendered


def t2st_system(meta: Dict[str, Any]) -> str:
    """The record's "system", else the instruction naming its "target_language" where it has one."""
    into = f" into {text_field(meta, 'target_language')}" if meta.get("target_language") is not None else ""
    return text_field(meta, "system", f"Translate the text{into} and speak the translation.")


def _t2st(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    translation = text_field(s.meta, "translation") if opt.with_answer else ""
    return render_chat([Message("system", t2st_system(s.meta)), Message("human", text_field(s.meta, "text")),
                        Message("assistant", translation, codes=tts_codes(s.meta)[0])], s, tok, ids, opt)


TRANSLATION_TASKS = [
    Task("t2st", _t2st, codes=tts_codes,
         doc="chat: human \"text\", assistant speaks \"translation\" (TA4 of target.codes.npy where the record "
             "has a target, else codes.npy)"),
]

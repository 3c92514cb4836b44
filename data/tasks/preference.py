"""Preference pairs (`python -m data.corpus.prepare preferences`): a conversation that ends with a human turn, and
a "chosen" and a "rejected" answer to it. One render is the conversation plus one answer, picked by
RenderOptions.answer; the loader's pairs mode renders both (DPO, reward models)."""
from __future__ import annotations

from typing import Any, Dict, List

from data.tasks.base import ANSWERS, RenderOptions, Sample, Task
from data.tasks.chat import Message, message_members, render_chat
from data.tasks.dialogue import dialogue_messages
from data.tasks.pieces import Rendered, TemplateError


def answer_message(meta: Dict[str, Any], answer: str) -> Message:
    """meta[answer] ({"text": str, "codes": member of a spoken answer}) as the final assistant turn; a
    record without it is no pair (TemplateError "not_a_pair", the loader's skip reason)."""
    if answer not in ANSWERS:
        raise ValueError(f"RenderOptions.answer={answer!r}: expected one of {list(ANSWERS)}")
    if answer not in meta:
        raise TemplateError("not_a_pair", f"record has no {answer!r} answer: expected a preference pair "
                                          f"(python -m data.corpus.prepare preferences)")
    value = meta[answer]
    if not isinstance(value, dict):
        raise TemplateError("missing_field", f"record field {answer!r} is {value!r:.80}: expected "
                                             f"{{\"text\": str, \"codes\": member (a spoken answer)}}")
    text, codes = value.get("text"), value.get("codes")
    if not isinstance(text, str) or not (codes is None or isinstance(codes, str)):
        raise TemplateError("missing_field", f"record field {answer!r} is {value!r:.80}: expected a string "
                                             f"'{answer}.text' and, for a spoken answer, a string '{answer}.codes'")
    return Message("assistant", text, codes=codes)


def preference_prompt(meta: Dict[str, Any]) -> List[Message]:
    """The turns both answers reply to, led by a system turn as in dialogue (the record's own, else the
    default plus its style/emotion); the last one must be a human turn."""
    messages = dialogue_messages(meta)
    if messages[-1].role != "human":
        raise TemplateError("bad_messages", f"record field 'messages' ends with a {messages[-1].role} turn: "
                                            f"expected the human turn that 'chosen' and 'rejected' answer")
    return messages


def preference_messages(meta: Dict[str, Any], answer: str) -> List[Message]:
    """The prompt's turns plus the answer `answer` ("chosen" or "rejected") as the last, labelled, turn."""
    return preference_prompt(meta) + [answer_message(meta, answer)]


def _preference(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat(preference_messages(s.meta, opt.answer), s, tok, ids, opt)


def _codes(meta: Dict[str, Any]) -> List[str]:
    """Codes of the prompt's spoken turns and of both spoken answers: a pair renders both."""
    answers = [answer_message(meta, a).codes for a in ANSWERS]
    return list(dict.fromkeys(message_members(preference_prompt(meta))[1] + [c for c in answers if c]))


PREFERENCE_TASKS = [
    Task("preference", _preference, lambda meta: message_members(preference_prompt(meta))[0], _codes,
         doc="\"messages\" + the \"chosen\" (or, RenderOptions.answer, \"rejected\") answer, text or TA4 speech",
         prompt_codes=lambda meta: message_members(preference_prompt(meta))[1], paired=True),
]

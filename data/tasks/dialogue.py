"""Multi-turn tasks from a record's "messages": styled or emotional spoken dialogue, tool calls, and SFT
conversations (data.corpus.conversations), which train on every assistant turn."""
from __future__ import annotations

from typing import Any, Dict, List

from data.tasks.base import RenderOptions, Sample, Task, text_field
from data.tasks.chat import TOOL_SCHEMAS_ROLE, Message, message_members, parse_messages, prompt_members, \
    render_chat, tool_schemas_text
from data.tasks.pieces import Rendered, TemplateError

DIALOGUE_SYSTEM = "You are a helpful assistant."


def _style_note(meta: Dict[str, Any]) -> str:
    """' Speaking style: X. Emotion: Y.' for the record's style/emotion fields (empty without them)."""
    notes = [f" {label}: {text_field(meta, name)}." for name, label in (("style", "Speaking style"),
                                                                         ("emotion", "Emotion")) if name in meta]
    return "".join(notes)


def dialogue_messages(meta: Dict[str, Any]) -> List[Message]:
    """The record's turns, led by a system turn: its own, else "system" or the default plus the
    record's style and emotion (so one corpus field steers every answer's delivery)."""
    messages = parse_messages(meta.get("messages"))
    if messages[0].role != "system":
        system = text_field(meta, "system") if "system" in meta else DIALOGUE_SYSTEM + _style_note(meta)
        messages.insert(0, Message("system", system))
    return messages


def tool_messages(meta: Dict[str, Any]) -> List[Message]:
    """Dialogue turns with the tool schemas as one turn right after the system turn."""
    tools = meta.get("tools")
    if not isinstance(tools, list) or not tools:
        raise TemplateError("missing_field", f"record field 'tools' is {tools!r:.80}: expected a non-empty list "
                                             f"of tool schemas")
    messages = dialogue_messages(meta)
    return messages[:1] + [Message(TOOL_SCHEMAS_ROLE, tool_schemas_text(tools))] + messages[1:]


def sft_messages(meta: Dict[str, Any]) -> List[Message]:
    """Dialogue turns plus, where the record has "tools" and no schemas turn of its own, the schemas
    right after the system turn."""
    messages = dialogue_messages(meta)
    if "tools" in meta and not any(m.role == TOOL_SCHEMAS_ROLE for m in messages):
        messages = tool_messages(meta)
    return messages


def _dialogue(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat(dialogue_messages(s.meta), s, tok, ids, opt)


def _tool_call(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat(tool_messages(s.meta), s, tok, ids, opt)


def _sft(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat(sft_messages(s.meta), s, tok, ids, opt, every_answer=True)


DIALOGUE_TASKS = [
    Task("dialogue", _dialogue, lambda meta: message_members(dialogue_messages(meta))[0],
         lambda meta: message_members(dialogue_messages(meta))[1],
         doc="chat from \"messages\"; speech turns name their audio/codes members; style/emotion steer",
         prompt_codes=lambda meta: prompt_members(dialogue_messages(meta))[1]),
    Task("tool_call", _tool_call, lambda meta: message_members(tool_messages(meta))[0],
         lambda meta: message_members(tool_messages(meta))[1],
         doc="dialogue with \"tools\" schemas, assistant tool_call turns and \"input\" results",
         prompt_codes=lambda meta: prompt_members(tool_messages(meta))[1]),
    Task("sft", _sft, lambda meta: message_members(sft_messages(meta))[0],
         lambda meta: message_members(sft_messages(meta))[1],
         doc="conversation (python -m data.corpus.prepare conversations): loss on every assistant turn",
         prompt_codes=lambda meta: prompt_members(sft_messages(meta), every_answer=True)[1]),
]

"""Timbre from retrieved audio: the user asks for speech in a described voice, the assistant calls the
audio-search tool, the tool's result turn carries the clip it found (audio), and the assistant speaks its
answer in that clip's voice (TA4).

A record: "text" (the answer's words), "query" (the voice asked for: the call's argument), the clip as the
sample's audio (`flac`) and the answer's speech as its target (`target.flac`, coded as `target.codes.npy`);
optional "request" (the user's turn), "system", "tools" (the schemas shown) and "tool" (the name called).
Loss falls on the call and on the spoken answer, not on the clip.
"""
from __future__ import annotations

from typing import Any, Dict, List

from data.tasks.base import AUDIO, TARGET_CODES, RenderOptions, Sample, Task, text_field
from data.tasks.chat import TOOL_RESULT_ROLE, TOOL_SCHEMAS_ROLE, Message, render_chat, tool_schemas_text
from data.tasks.pieces import Rendered, TemplateError

TIMBRE_TASK = "timbre_search"
TIMBRE_SYSTEM = "You are a helpful assistant. Find voices with the audio_search tool and speak in them."
# UNVERIFIED: the report names an audio-search tool but publishes no schema; the name and schema are ours.
AUDIO_SEARCH_TOOL = "audio_search"
AUDIO_SEARCH_SCHEMA = {
    "type": "function",
    "function": {"name": AUDIO_SEARCH_TOOL, "description": "Find a voice sample that matches a description.",
                 "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                "required": ["query"]}},
}


def timbre_request(text: str, query: str) -> str:
    """The user's turn when the record has no "request"."""
    return f"In the voice of {query}, say: {text}"


def timbre_messages(meta: Dict[str, Any]) -> List[Message]:
    """system, tool schemas, the request, the assistant's search call, the tool's result (the clip, audio
    member `flac`), the spoken answer (`target.codes.npy`)."""
    text, query = text_field(meta, "text"), text_field(meta, "query")
    tools = meta.get("tools", [AUDIO_SEARCH_SCHEMA])
    if not isinstance(tools, list) or not tools:
        raise TemplateError("missing_field", f"record field 'tools' is {tools!r:.80}: expected a non-empty list "
                                             f"of tool schemas (or no field: the audio_search schema)")
    request = text_field(meta, "request", timbre_request(text, query))
    return [Message("system", text_field(meta, "system", TIMBRE_SYSTEM)),
            Message(TOOL_SCHEMAS_ROLE, tool_schemas_text(tools)),
            Message("human", request),
            Message("assistant", tool_call={"name": text_field(meta, "tool", AUDIO_SEARCH_TOOL),
                                            "arguments": {"query": query}}),
            Message(TOOL_RESULT_ROLE, audio=AUDIO),
            Message("assistant", text, codes=TARGET_CODES)]


def _timbre(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    return render_chat(timbre_messages(s.meta), s, tok, ids, opt)


TIMBRE_TASKS = [
    Task(TIMBRE_TASK, _timbre, lambda meta: [AUDIO], lambda meta: [TARGET_CODES],
         doc="chat: request, assistant calls audio_search(\"query\"), the input turn holds the found clip (flac), "
             "assistant speaks \"text\" in its voice (TA4 of target.codes.npy)"),
]

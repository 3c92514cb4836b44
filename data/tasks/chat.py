"""The Step-Audio 2 chat format: turns `<|BOT|>role\\n ... <|EOT|>`, speech input as audio spans, speech
answers as TA4, tool calls; every chat task builds a list of `Message`s and renders it here.

Loss falls on the answer: every assistant turn after the last human turn (a tool call, the tool's
result and the final answer all belong to it). Earlier turns, speech answers included, are context,
unless the task trains on every assistant turn (SFT: `every_answer=True`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from transformers import PreTrainedTokenizerFast

from data.tasks.base import RenderOptions, Sample
from data.tasks.pieces import Builder, Rendered, TemplateError, audio_spans, speech_answer, text_ids
from data.text_tokenizer import SpecialIds

ROLES = ("system", "human", "assistant", "input", "tool_json_schemas")
# UNVERIFIED (reference file): how tool use is written. A call is `<tool_call>function\n{name}\n{json}
# </tool_call>` inside the assistant turn, the schemas are one `tool_json_schemas` turn after the
# system turn, and a tool's result is an `input` turn. The JSON spelling (separators, key order) is
# ours. All of it is decided in this block and `tool_call_text`.
TOOL_SCHEMAS_ROLE = "tool_json_schemas"
TOOL_RESULT_ROLE = "input"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tool_call_text(name: str, arguments: Any) -> str:
    return f"{TOOL_CALL_OPEN}function\n{name}\n{json.dumps(arguments, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def tool_schemas_text(tools: Any) -> str:
    return json.dumps(tools, ensure_ascii=False)


@dataclass
class Message:
    """One turn. `audio` names the audio member spoken in it (speech input); `codes` names the codes
    member of an assistant's speech answer (TA4, with `text` as its text side)."""
    role: str
    text: str = ""
    audio: Optional[str] = None
    codes: Optional[str] = None
    tool_call: Optional[Dict[str, Any]] = None


def parse_messages(value: Any, where: str = "messages") -> List[Message]:
    """A record's list of turns ({"role", "text", "audio", "codes", "tool_call"}) as Messages."""
    if not isinstance(value, list) or not value:
        raise TemplateError("bad_messages", f"record field {where!r} is {value!r:.80}: expected a non-empty "
                                            f"list of turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise TemplateError("bad_messages", f"{where}[{i}] is {turn!r:.80}: expected an object")
        role = "human" if turn.get("role") == "user" else turn.get("role")
        unknown = sorted(set(turn) - {"role", "text", "audio", "codes", "tool_call"})
        if role not in ROLES or unknown:
            raise TemplateError("bad_messages", f"{where}[{i}] has role {turn.get('role')!r} and keys "
                                                f"{sorted(turn)}: expected a role in {ROLES} and keys among "
                                                f"role, text, audio, codes, tool_call")
        msg = Message(role, turn.get("text", ""), turn.get("audio"), turn.get("codes"), turn.get("tool_call"))
        if not isinstance(msg.text, str) or not all(m is None or isinstance(m, str) for m in (msg.audio, msg.codes)):
            raise TemplateError("bad_messages", f"{where}[{i}]: text, audio and codes must be strings")
        if (msg.codes is not None and role != "assistant") or (msg.audio is not None and role == "assistant"):
            raise TemplateError("bad_messages", f"{where}[{i}] ({role}): only assistant turns have codes "
                                                f"(a speech answer), only other turns have audio (speech input)")
        if msg.tool_call is not None:
            call = msg.tool_call
            if role != "assistant" or msg.codes is not None or not isinstance(call, dict) \
                    or not isinstance(call.get("name"), str) or "arguments" not in call:
                raise TemplateError("bad_messages", f"{where}[{i}]: a tool_call is {{\"name\": str, "
                                                    f"\"arguments\": ...}} in an assistant text turn")
        out.append(msg)
    return out


def _first_answer(messages: List[Message], every_answer: bool) -> Optional[int]:
    """Index of the first labelled turn: the first assistant turn (after the last human one unless
    every_answer); None without one."""
    humans = [i for i, m in enumerate(messages) if m.role == "human"]
    after = -1 if every_answer else max(humans, default=-1)
    return next((i for i, m in enumerate(messages) if m.role == "assistant" and i > after), None)


def render_chat(messages: List[Message], sample: Sample, tok: PreTrainedTokenizerFast, ids: SpecialIds,
                options: RenderOptions, every_answer: bool = False) -> Rendered:
    """Token ids and labels of a chat; the answer is every assistant turn after the last human one, or
    with `every_answer` every assistant turn. Without options.with_answer: the prompt up to the first
    labelled turn's header."""
    first_answer = _first_answer(messages, every_answer)
    prompt_only = first_answer is None and not options.with_answer
    if prompt_only:
        # A prompt record without answers (an RL prompt set): every turn, then the header generation starts
        # from; the record's "speech_answer": true asks for a spoken answer (<tts_start>).
        first_answer = len(messages)
    if first_answer is None:
        where = "" if every_answer else " after the last human turn"
        raise TemplateError("bad_messages", f"sample {sample.key!r}: no assistant turn{where} "
                                            f"(roles {[m.role for m in messages]})")
    out = Builder()
    for i, msg in enumerate(messages):
        labelled = i >= first_answer and msg.role == "assistant"
        if msg.role != "assistant":
            if msg.audio is None:  # a text turn is one string, as the public inference code tokenizes it
                out.add([ids.bot] + text_ids(f"{msg.role}\n{msg.text}", tok, ids) + [ids.eot])
                continue
            out.add([ids.bot] + text_ids(f"{msg.role}\n", tok, ids))
            if msg.text:  # text before audio, as in the public code's speech-translation example
                out.add(text_ids(msg.text, tok, ids))
            if msg.audio not in sample.mel_frames:
                raise TemplateError("missing_audio", f"sample {sample.key!r} has no audio member {msg.audio!r}")
            out.add(audio_spans(sample.mel_frames[msg.audio], ids))
            out.audio.append(msg.audio)
            out.add([ids.eot])
            continue
        # The answer's header is the prompt generation starts from; a speech answer's <tts_start> too,
        # since the public inference code writes it into the prompt to ask for speech.
        out.add([ids.bot] + text_ids("assistant\n", tok, ids) + ([ids.tts_start] if msg.codes else []))
        if i == first_answer and not options.with_answer:
            return out.done()
        if msg.codes is not None:
            if msg.codes not in sample.codes:
                raise TemplateError("missing_codes", f"sample {sample.key!r} has no codes member {msg.codes!r}")
            body = speech_answer(text_ids(msg.text, tok, ids), sample.codes[msg.codes], ids)
        else:
            call = msg.tool_call
            body = text_ids(msg.text + (tool_call_text(call["name"], call["arguments"]) if call else ""), tok, ids)
        out.add(body + [ids.eot], labelled)
    if prompt_only:
        speech = sample.meta.get("speech_answer") is True
        out.add([ids.bot] + text_ids("assistant\n", tok, ids) + ([ids.tts_start] if speech else []))
    return out.done()


def message_members(messages: List[Message]) -> tuple:
    """(audio members, codes members) the messages read, in order, each once."""
    audio = list(dict.fromkeys(m.audio for m in messages if m.audio is not None))
    codes = list(dict.fromkeys(m.codes for m in messages if m.codes is not None))
    return audio, codes


def prompt_members(messages: List[Message], every_answer: bool = False) -> tuple:
    """(audio members, codes members) of the prompt alone: the turns before the first labelled one, which
    is all a render with with_answer=False reads (e.g. the codes of an earlier spoken answer)."""
    first = _first_answer(messages, every_answer)
    return message_members(messages if first is None else messages[:first])

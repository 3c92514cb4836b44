"""Conversations for SFT from JSONL, one {"messages": [...], "tools": [...], ...} per line, read into
candidates for data.corpus.prepare: every audio part becomes a member ("turn2.flac") that the messages name.

A turn is {"role", "content": str | [{"type": "text", "text"} | {"type": "audio", "audio": PATH}]}, or
uses the shortcuts "text" / "audio"; an assistant turn may carry "tool_call": {"name", "arguments"}.
An assistant turn with audio is a speech answer: its text is what the audio says, and the template
reads its codes ("turn2.codes.npy", written by data.codes) rather than the audio.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from data.corpus.formats import Candidate, Corpus, Reject, _file_key, read_jsonl
from data.tasks import TASKS
from data.tasks.chat import parse_messages
from data.tasks.pieces import TemplateError

DEFAULT_TASK = "sft"
# What users write -> the chat format's role; "user" and "tool" are the common spellings of the others.
ROLES = {"system": "system", "user": "human", "human": "human", "assistant": "assistant", "input": "input",
         "tool": "input", "tool_json_schemas": "tool_json_schemas"}
_AUDIO_ROLES = ("human", "input", "assistant")
_TURN_KEYS = ("role", "content", "text", "audio", "tool_call")


def audio_member(turn: int) -> str:
    """The shard member holding the audio of messages[turn]."""
    return f"turn{turn}.flac"


def codes_member(turn: int) -> str:
    """The member data.codes writes beside audio_member(turn): the speech answer's codes."""
    return f"turn{turn}.codes.npy"


class _Bad(Exception):
    def __init__(self, kind: str, reason: str, audio: Optional[str] = None):
        super().__init__(reason)
        self.kind, self.audio = kind, audio


def _parts(turn: Dict[str, Any], where: str) -> List[Tuple[str, str, str]]:
    """[(kind, value, where)] of one turn's content, kind "text" or "audio", in the order given."""
    shortcuts = [k for k in ("text", "audio") if k in turn]
    content = turn.get("content")
    if content is not None and shortcuts:
        raise _Bad("bad turn", f"{where} has both 'content' and {shortcuts}: expected one of the two")
    if content is None:
        parts = [(k, turn[k], f"{where}.{k}") for k in shortcuts]
    elif isinstance(content, str):
        parts = [("text", content, f"{where}.content")]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "audio") or sorted(part) != sorted(("type", kind)):
                raise _Bad("bad part", f"{where}.content[{j}] is {json.dumps(part)[:80]}: expected "
                                       f"{{\"type\": \"text\", \"text\": STR}} or "
                                       f"{{\"type\": \"audio\", \"audio\": PATH}}")
            parts.append((kind, part[kind], f"{where}.content[{j}].{kind}"))
    else:
        raise _Bad("bad turn", f"{where}.content is {type(content).__name__}: expected a string or a list of parts")
    for kind, value, at in parts:
        if not isinstance(value, str):
            raise _Bad("wrong type", f"{at} must be a string, got {type(value).__name__}")
    if sum(kind == "text" for kind, _, _ in parts) > 1 or sum(kind == "audio" for kind, _, _ in parts) > 1:
        raise _Bad("bad turn", f"{where} has {[k for k, _, _ in parts]}: expected at most one text and one audio part")
    if [k for k, _, _ in parts] == ["audio", "text"]:
        raise _Bad("bad turn", f"{where} puts text after audio: expected the text part first (the chat format "
                               f"writes a turn's text before its audio)")
    return parts


def _turn(i: int, turn: Any, base_dir: str, members: Dict[str, Tuple[str, str]]) -> Dict[str, Any]:
    """One turn rewritten for the shard (audio -> member names); its audio file goes into `members`."""
    where = f"messages[{i}]"
    if not isinstance(turn, dict):
        raise _Bad("bad turn", f"{where} is {json.dumps(turn)[:80]}: expected an object")
    unknown = sorted(set(turn) - set(_TURN_KEYS))
    if unknown:
        raise _Bad("bad turn", f"{where} has unknown keys {unknown}: expected keys among {list(_TURN_KEYS)}")
    role = ROLES.get(turn.get("role")) if isinstance(turn.get("role"), str) else None
    if role is None:
        raise _Bad("bad role", f"{where}.role is {turn.get('role')!r}: expected one of {sorted(ROLES)}")
    out: Dict[str, Any] = {"role": role}
    for kind, value, at in _parts(turn, where):
        if kind == "text":
            out["text"] = value
            continue
        if role not in _AUDIO_ROLES:
            raise _Bad("bad turn", f"{at}: a {turn['role']} turn cannot hold audio (only user, input and "
                                   f"assistant turns)")
        path = os.path.join(base_dir, os.path.expanduser(value))
        if not os.path.isfile(path):
            raise _Bad("audio not found", f"{at}: audio file {value!r} not found (looked for {path})", value)
        members[audio_member(i)] = (value, path)
        if role == "assistant":
            out["codes"] = codes_member(i)
        else:
            out["audio"] = audio_member(i)
    if "tool_call" in turn:
        out["tool_call"] = turn["tool_call"]
    return out


def _conversation(record: Any, base_dir: str) -> Tuple[dict, Dict[str, Tuple[str, str]]]:
    """(the sample's metadata with messages naming members, {member: (path as given, path)})."""
    if not isinstance(record, dict):
        raise _Bad("invalid JSON", f"invalid JSON: expected an object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad("missing field", f"field 'messages' is {json.dumps(messages)[:80]}: expected a non-empty list "
                                    f"of turns")
    task = record.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or task not in TASKS:
        raise _Bad("unknown task", f"field 'task' is {task!r}: expected one of {sorted(TASKS)}")
    tools = record.get("tools")
    if tools is not None and (not isinstance(tools, list) or not tools):
        raise _Bad("wrong type", f"field 'tools' is {json.dumps(tools)[:80]}: expected a non-empty list of tool "
                                 f"schemas")
    members: Dict[str, Tuple[str, str]] = {}
    turns = [_turn(i, turn, base_dir, members) for i, turn in enumerate(messages)]
    if not any(t["role"] == "assistant" for t in turns):
        raise _Bad("no answer", f"no assistant turn among roles {[t['role'] for t in turns]}: SFT trains on "
                                f"assistant turns")
    try:
        parse_messages(turns)  # the checks the template makes when it renders (tool_call shape, ...)
    except TemplateError as exc:
        raise _Bad("bad turn", str(exc)) from None
    meta = {k: v for k, v in record.items() if k != "messages"}
    meta.update(task=task, messages=turns)
    return meta, members


def read_records(path: str, parse: Callable[[Dict[str, Any], str], Tuple[Dict[str, Any], Dict[str, Tuple[str, str]]]],
                 kind: str, key_prefix: str) -> Corpus:
    """A JSONL file whose records `parse(record, base_dir)` turns into (meta, audio members) or rejects with
    _Bad; relative audio paths resolve against the file's folder. Rejects are named by line."""
    base_dir = os.path.dirname(os.path.abspath(path))
    lines, rejects = read_jsonl(path)
    candidates = []
    for line_no, record in lines:
        where = {"line": line_no}
        try:
            meta, members = parse(record, base_dir)
        except _Bad as bad:
            rejects.append(Reject(line_no, where, bad.audio, str(bad), bad.kind))
            continue
        sources = [given for given, _ in members.values()]
        candidates.append(Candidate(line_no, where, _file_key(record, f"{key_prefix}-{line_no:08d}"), meta,
                                    ", ".join(sources), "", members=members))
    rejects.sort(key=lambda r: r.order)
    return Corpus(kind, path, candidates, rejects, unit="line")


def read_conversations(path: str) -> Corpus:
    """A JSONL file of conversations; relative audio paths resolve against its folder."""
    return read_records(path, _conversation, "conversations", "conv")

"""Preference pairs from JSONL, one {"messages": [...], "chosen": {...}, "rejected": {...}, ...} per line, read
into candidates for data.corpus.prepare (task "preference", data/tasks/preference.py).

"messages" are turns as in data.corpus.conversations; the last is the human turn both answers reply to. An answer
is {"text": str, "audio": optional path of the spoken answer}; its audio becomes the member "chosen.flac" or
"rejected.flac", and the record names the codes data.codes writes beside it ("chosen.codes.npy"), which
the template reads as a TA4 speech answer. Every other field ("style", "speaker", a reference "text", ...)
is kept as the record's metadata, for rewards and filters.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

from data.corpus.conversations import _Bad, _turn, read_records
from data.corpus.formats import Corpus
from data.tasks.chat import parse_messages
from data.tasks import ANSWERS
from data.tasks.pieces import TemplateError

TASK = "preference"
_ANSWER_KEYS = ("text", "audio")


def answer_audio_member(answer: str) -> str:
    """The shard member holding the spoken `answer` ("chosen" or "rejected")."""
    return f"{answer}.flac"


def answer_codes_member(answer: str) -> str:
    """The member data.codes writes beside answer_audio_member(answer)."""
    return f"{answer}.codes.npy"


def _answer(record: Dict[str, Any], name: str, base_dir: str, members: Dict[str, Tuple[str, str]]) -> dict:
    """record[name] rewritten for the shard ({"text", "codes"?}); its audio file goes into `members`."""
    if name not in record:
        raise _Bad("missing field", f"{name!r} is missing: expected {{\"text\": str, \"audio\": optional path}}")
    value = record[name]
    if not isinstance(value, dict):
        raise _Bad("wrong type", f"{name!r} is {json.dumps(value)[:80]}: expected {{\"text\": str, "
                                 f"\"audio\": optional path}}")
    unknown = sorted(set(value) - set(_ANSWER_KEYS))
    if unknown:
        raise _Bad("bad answer", f"{name!r} has unknown keys {unknown}: expected keys among {list(_ANSWER_KEYS)}")
    if "text" not in value:
        raise _Bad("missing field", f"'{name}.text' is missing")
    for key in _ANSWER_KEYS:
        if key in value and not isinstance(value[key], str):
            raise _Bad("wrong type", f"'{name}.{key}' must be a string, got {type(value[key]).__name__}")
    out = {"text": value["text"]}
    audio = value.get("audio")
    if audio is None:
        if not value["text"].strip():
            raise _Bad("empty answer", f"'{name}.text' is empty and there is no '{name}.audio': expected an answer")
        return out
    path = os.path.join(base_dir, os.path.expanduser(audio))
    if not os.path.isfile(path):
        raise _Bad("audio not found", f"'{name}.audio' file {audio!r} not found (looked for {path})", audio)
    members[answer_audio_member(name)] = (audio, path)
    out["codes"] = answer_codes_member(name)
    return out


def _preference(record: Any, base_dir: str) -> Tuple[dict, Dict[str, Tuple[str, str]]]:
    """(the sample's metadata with messages and answers naming members, {member: (path as given, path)})."""
    if not isinstance(record, dict):
        raise _Bad("invalid JSON", f"invalid JSON: expected an object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad("missing field", f"'messages' is {json.dumps(messages)[:80]}: expected a non-empty list of "
                                    f"turns ending with the human turn that the answers reply to")
    if record.get("task", TASK) != TASK:
        raise _Bad("unknown task", f"'task' is {record['task']!r}: a preference record's task is {TASK!r}")
    members: Dict[str, Tuple[str, str]] = {}
    turns = [_turn(i, turn, base_dir, members) for i, turn in enumerate(messages)]
    if turns[-1]["role"] != "human":
        raise _Bad("bad turn", f"messages[{len(turns) - 1}] has role {turns[-1]['role']!r}: expected the last turn "
                               f"to be the human turn that 'chosen' and 'rejected' answer")
    try:
        parse_messages(turns)  # the checks the template makes when it renders
    except TemplateError as exc:
        raise _Bad("bad turn", str(exc)) from None
    answers = {name: _answer(record, name, base_dir, members) for name in ANSWERS}
    chosen, rejected = (record[name] for name in ANSWERS)
    if chosen == rejected:
        raise _Bad("same answers", "'chosen' and 'rejected' are the same answer: a pair must differ")
    meta = {k: v for k, v in record.items() if k not in ("messages",) + ANSWERS}
    meta.update(task=TASK, messages=turns, **answers)
    return meta, members


def read_preferences(path: str) -> Corpus:
    """A JSONL file of preference pairs; relative audio paths resolve against its folder."""
    return read_records(path, _preference, "preferences", "pref")

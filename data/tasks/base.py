"""What a task template sees of one record (`Sample`), what it is told (`RenderOptions`), and what
the registry holds per task (`Task`): the render function plus the shard members it reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from transformers import PreTrainedTokenizerFast

from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION, Rendered, TemplateError
from data.text_tokenizer import SpecialIds

# Shard members (the part of a tar member's name after the sample key), as data.corpus.prepare and
# data.codes write them.
AUDIO = "flac"
TARGET_AUDIO = "target.flac"
CODES = "codes.npy"
TARGET_CODES = "target.codes.npy"
# The answers a paired task renders (RenderOptions.answer), in the order the loader's pairs mode stacks them.
ANSWERS = ("chosen", "rejected")


@dataclass
class Sample:
    """One record: its JSON, the mel frame count of each 25 s chunk of every audio member the task
    reads, and the audio codes of every codes member it reads."""
    key: str
    meta: Dict[str, Any]
    mel_frames: Dict[str, List[int]] = field(default_factory=dict)
    codes: Dict[str, Sequence[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderOptions:
    """Settings from the data config that templates use."""
    asr_instruction: str = DEFAULT_ASR_INSTRUCTION
    with_answer: bool = True
    """False: only the prompt that generation continues (up to `assistant\\n`, plus `<tts_start>` for a
    speech answer)."""
    answer: str = ANSWERS[0]
    """Which answer of a preference record a paired task renders: "chosen" or "rejected" (see
    data/tasks/preference.py); other tasks have one answer and ignore it."""


Render = Callable[[Sample, PreTrainedTokenizerFast, SpecialIds, RenderOptions], Rendered]
Members = Callable[[Dict[str, Any]], List[str]]


def _none(meta: Dict[str, Any]) -> List[str]:
    return []


@dataclass(frozen=True)
class Task:
    """A registered template: `audio(meta)` and `codes(meta)` name the members `render` needs, so the
    loader decodes only those and skips a record whose codes are missing.

    `prompt_codes(meta)` names the codes members the prompt alone (with_answer=False) reads, e.g. an
    earlier spoken assistant turn of a dialogue: a prompt-only corpus (RL) has no codes of its answers,
    and must not be skipped for them. `paired`: the task renders a chosen and a rejected answer of one
    prompt (RenderOptions.answer), so the loader's pairs mode can take its records."""
    name: str
    render: Render
    audio: Members = _none
    codes: Members = _none
    doc: str = ""
    prompt_codes: Members = _none
    paired: bool = False


def text_field(meta: Dict[str, Any], name: str, default: Optional[str] = None) -> str:
    """meta[name] as a string; TemplateError naming the field when it is absent or not a string."""
    value = meta.get(name, default)
    if not isinstance(value, str):
        reason = "missing_text" if name == "text" else "missing_field"
        raise TemplateError(reason, f"record field {name!r} is {value!r}: expected a string")
    return value

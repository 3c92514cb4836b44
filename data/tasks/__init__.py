"""The task registry: task name -> template that renders a record into Step-Audio 2 ids and labels.

A record names its task in its "task" field; the data config's `task` covers records that name none.
"""
from __future__ import annotations

from typing import Dict

from data.tasks.base import ANSWERS, AUDIO, CODES, TARGET_AUDIO, TARGET_CODES, RenderOptions, Sample, Task
from data.tasks.continuation import CONTINUATION_TASKS
from data.tasks.dialogue import DIALOGUE_TASKS
from data.tasks.preference import PREFERENCE_TASKS
from data.tasks.speech import SPEECH_TASKS
from data.tasks.text import TEXT_TASKS
from data.tasks.timbre import TIMBRE_TASKS
from data.tasks.translation import TRANSLATION_TASKS

TASKS: Dict[str, Task] = {t.name: t for t in SPEECH_TASKS + DIALOGUE_TASKS + CONTINUATION_TASKS + PREFERENCE_TASKS
                          + TEXT_TASKS + TRANSLATION_TASKS + TIMBRE_TASKS}
DEFAULT_TASK = "asr"

__all__ = ["ANSWERS", "AUDIO", "CODES", "DEFAULT_TASK", "TARGET_AUDIO", "TARGET_CODES", "TASKS", "RenderOptions",
           "Sample", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The registered task `name`; ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


"""Plain text as a base-format LM sequence: the text-only shares of every training stage.

No role tags and no audio: the record's "text", then `<|endoftext|>`, with loss on every token. A
conversation of text-only turns (a "messages" record, data.corpus.conversations) is the "sft" task instead.
"""
from __future__ import annotations

from data.tasks.base import RenderOptions, Sample, Task, text_field
from data.tasks.pieces import Builder, Rendered, TemplateError, text_ids

TEXT_TASK = "text"


def _text(s: Sample, tok, ids, opt: RenderOptions) -> Rendered:
    """"text" + <|endoftext|>, all labelled. It has no prompt to generate from: with_answer=False
    is a TemplateError ("no_prompt"), which the loader counts as a skip."""
    text = text_field(s.meta, "text")
    if not text.strip():
        raise TemplateError("missing_text", f"record field 'text' is {text!r}: expected non-empty text")
    if not opt.with_answer:
        raise TemplateError("no_prompt", f"task {TEXT_TASK!r} is plain text with no prompt to generate from")
    out = Builder()
    out.add(text_ids(text, tok, ids) + [ids.end_of_text], labelled=True)
    return out.done()


TEXT_TASKS = [
    Task(TEXT_TASK, _text, doc="base: \"text\" + <|endoftext|>, loss on every token, no audio; a text-only "
                              "\"messages\" conversation is task \"sft\""),
]

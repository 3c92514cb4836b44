"""`python -m data.tools.show SHARDS KEY [--task T] --tokenizer DIR`: one sample rendered as the model sees it.

One line per piece: text runs, audio spans collapsed (`<audio_patch>x13`), TA4 groups (`'the' | 1 2 3 4`);
lines marked `L` carry loss. The record's metadata and members come first. A preference pair shows its
prompt once, then the chosen and the rejected answer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from data.loading.samples import SkipSample, render_pair, render_raw
from data.loading.shard_reader import read_shard, resolve_shards
from data.tasks import TASKS
from data.tasks.pieces import AUDIO_PER_GROUP, DEFAULT_ASR_INSTRUCTION, IGNORE_INDEX, TEXT_PER_GROUP
from data.text_tokenizer import SpecialIds, load_tokenizer, special_ids

LEGEND = "L = labelled (loss falls there); a TA4 group is: text token | audio codes (pad = audio pad)"


def find_sample(shards: List[str], key: str) -> Dict[str, Any]:
    """The raw members of sample `key`, searching the shards in order; ValueError if absent."""
    searched = 0
    for path in resolve_shards(shards):
        for raw in read_shard(path):
            searched += 1
            if raw["__key__"] == key:
                return raw
    raise ValueError(f"no sample with key {key!r} in {shards} ({searched} samples searched)")


def format_sequence(input_ids: List[int], labels: List[int], tok, ids: SpecialIds) -> List[str]:
    """Readable lines for a rendered sequence, each prefixed "L " when its tokens carry loss."""
    return [line for _, line in _pieces(input_ids, labels, tok, ids)]


def _pieces(input_ids: List[int], labels: List[int], tok, ids: SpecialIds) -> List[Tuple[int, str]]:
    """(index of its first token, line) of every piece of a rendered sequence."""
    control = {ids.end_of_text, ids.bot, ids.eot, ids.audio_start, ids.audio_end, ids.audio_patch, ids.tts_pad,
               ids.tts_start, ids.tts_end}
    is_code = lambda t: ids.first_audio_code <= t <= ids.audio_pad
    is_text = lambda t: t not in control and not is_code(t)
    group = TEXT_PER_GROUP + AUDIO_PER_GROUP
    lines: List[Tuple[int, str]] = []
    i, n, in_speech = 0, len(input_ids), False
    while i < n:
        t = input_ids[i]
        end = i + 1
        if in_speech and t != ids.tts_end and i + group <= n \
                and all(is_code(a) for a in input_ids[i + TEXT_PER_GROUP:i + group]):
            end = i + group
            text = " ".join("<tts_pad>" if h == ids.tts_pad else repr(tok.decode([h]))
                            for h in input_ids[i:i + TEXT_PER_GROUP])
            codes = " ".join("pad" if a == ids.audio_pad else str(a - ids.first_audio_code)
                             for a in input_ids[i + TEXT_PER_GROUP:end])
            piece = f"{text} | {codes}"
        elif t == ids.audio_start and ids.audio_end in input_ids[i:]:
            end = input_ids.index(ids.audio_end, i) + 1
            piece = f"<audio_start> <audio_patch>x{end - i - 2} <audio_end>"
        elif is_text(t):
            while end < n and is_text(input_ids[end]) and \
                    (labels[end] == IGNORE_INDEX) == (labels[i] == IGNORE_INDEX):
                end += 1
            piece = repr(tok.decode(input_ids[i:end]))
        else:
            in_speech = t == ids.tts_start or (in_speech and t != ids.tts_end)
            while end < n and input_ids[end] == t and labels[end] == labels[i]:
                end += 1
            name = tok.convert_ids_to_tokens(t)
            piece = name if end - i == 1 else f"{name}x{end - i}"
        labelled = any(label != IGNORE_INDEX for label in labels[i:end])
        lines.append((i, ("L " if labelled else "  ") + piece))
        i = end
    return lines


def show(shards: List[str], key: str, tokenizer: str, task: Optional[str] = None,
         asr_instruction: str = DEFAULT_ASR_INSTRUCTION) -> str:
    """The report `python -m data.tools.show` prints; ValueError when the sample is absent or unusable."""
    if task is not None and task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {sorted(TASKS)}")
    tok = load_tokenizer(tokenizer)
    ids = special_ids(tok)
    raw = find_sample(shards, key)
    try:
        sample = render_raw(raw, tok, ids, asr_instruction, max_audio_s=None, force_task=task)
    except SkipSample as skip:
        raise ValueError(f"sample {key!r} cannot be rendered as task {task or '(its own)'}: {skip}") from None
    meta = json.loads(raw["json"].decode("utf-8"))
    members = sorted(k for k in raw if not k.startswith("__"))
    head = [f"key: {key} ({os.path.basename(raw['__url__'])})",
            f"task: {sample['task']}",
            f"meta: {json.dumps(meta, ensure_ascii=False, sort_keys=True)}",
            f"members: {', '.join(members)}"]
    if TASKS[sample["task"]].paired:
        try:
            pair = render_pair(raw, tok, ids, asr_instruction, max_audio_s=None, force_task=task)
        except SkipSample as skip:
            raise ValueError(f"sample {key!r} cannot be rendered as a pair: {skip}") from None
        return "\n".join(head + _pair_lines(pair["pair"], tok, ids)) + "\n"
    num_labelled = sum(label != IGNORE_INDEX for label in sample["labels"])
    out = head + [f"tokens: {len(sample['input_ids'])}, labelled: {num_labelled}, audio chunks: "
                  f"{len(sample['mels'])} (mel frames {[m.shape[1] for m in sample['mels']]})", LEGEND, ""]
    out += format_sequence(sample["input_ids"], sample["labels"], tok, ids)
    return "\n".join(out) + "\n"


def _pair_lines(rows: List[Dict[str, Any]], tok, ids: SpecialIds) -> List[str]:
    """A pair's report: the prompt both answers share, once, then each answer's own pieces."""
    chosen, rejected = rows
    prompt_len = min(_first_labelled(chosen["labels"]), _first_labelled(rejected["labels"]))
    common = next((i for i, (a, b) in enumerate(zip(chosen["input_ids"], rejected["input_ids"])) if a != b),
                  prompt_len)
    prompt_len = min(prompt_len, common)  # a spoken and a text answer differ from <tts_start> on
    named = list(zip(("chosen", "rejected"), rows))
    counts = ", ".join(f"{name} {len(row['input_ids'])} (labelled "
                       f"{sum(label != IGNORE_INDEX for label in row['labels'])})" for name, row in named)
    out = [f"tokens: {counts}, audio chunks: {len(chosen['mels'])} (mel frames "
           f"{[m.shape[1] for m in chosen['mels']]})", LEGEND, "", "prompt:"]
    out += [line for start, line in _pieces(chosen["input_ids"], chosen["labels"], tok, ids) if start < prompt_len]
    for name, row in named:
        out += ["", f"{name}:"] + [line for start, line in _pieces(row["input_ids"], row["labels"], tok, ids)
                                   if start >= prompt_len]
    return out


def _first_labelled(labels: List[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def main(argv: Optional[List[str]] = None) -> int:
    tasks = "\n".join(f"  {name:<26}{task.doc}" for name, task in TASKS.items())
    parser = argparse.ArgumentParser(prog="python -m data.tools.show", description=__doc__.splitlines()[0],
                                     epilog=f"tasks:\n{tasks}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="dataset folder, tar path, glob or brace pattern")
    parser.add_argument("key", help="sample key")
    parser.add_argument("--task", default=None, choices=sorted(TASKS),
                        help="render as this task (default: the record's \"task\" field, else asr)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (python -m data.text_tokenizer build)")
    parser.add_argument("--asr-instruction", default=DEFAULT_ASR_INSTRUCTION, help="instruction of ASR samples")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(show([args.shards], args.key, args.tokenizer, args.task, args.asr_instruction))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

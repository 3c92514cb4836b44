"""Reward functions to name in rl.rewards (`train.rl.rule_rewards:NAME`, keyword arguments in `args`): closed
forms of an answer and its prompt record's metadata, one float per sample.

Each takes the list of train.rl.rollout.RolloutSample (answer text, audio codes, whether it stopped, the
prompt record's JSON in `meta`) and returns a list of floats.
"""
from __future__ import annotations

import math
import re
from typing import List, Optional


def stopped(samples) -> List[float]:
    """1 for an answer that ended with its stop token by itself, 0 for one cut at rl.max_new_tokens."""
    return [1.0 if s.finished else 0.0 for s in samples]


def length_window(samples, min_tokens: int = 0, max_tokens: Optional[int] = None, unit: str = "text") -> List[float]:
    """A binary length reward (the report's first PPO stage rewards reasoning length): 1 when the answer's
    text tokens (unit=text), audio codes (unit=audio) or seconds of audio (unit=seconds) lie in
    [min_tokens, max_tokens] and the answer stopped by itself, else 0."""
    if unit not in ("text", "audio", "seconds"):
        raise ValueError(f"length_window unit={unit!r}: expected text, audio or seconds")
    out = []
    for s in samples:
        n = {"text": len(s.text_ids), "audio": len(s.audio_codes), "seconds": s.audio_s}[unit]
        inside = n >= min_tokens and (max_tokens is None or n <= max_tokens)
        out.append(1.0 if inside and s.finished else 0.0)
    return out


def _words(text: str) -> List[str]:
    return re.findall(r"[\w']+", text.lower())


def word_error_rate(hypothesis: str, reference: str) -> float:
    """Word-level Levenshtein distance / reference words (hypothesis words if the reference is empty)."""
    hyp, ref = _words(hypothesis), _words(reference)
    if not ref:
        return float(len(hyp) > 0)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / len(ref)


def text_match(samples, field: str = "text", sharpness: float = 3.0) -> List[float]:
    """1 - tanh(sharpness x WER) of the answer's text against the prompt record's `field` (CosyVoice's
    intelligibility reward, on text): 1 for the words asked for, towards 0 as they go wrong."""
    out = []
    for s in samples:
        reference = s.meta.get(field)
        if not isinstance(reference, str):
            raise ValueError(f"text_match: sample {s.key!r} has no text field {field!r} in its record")
        out.append(1.0 - math.tanh(sharpness * word_error_rate(s.text, reference)))
    return out


def exact_answer(samples, field: str = "answer") -> List[float]:
    """1 when the answer's words equal the record's `field` (audio-perception questions, the report's GRPO
    stage), else 0."""
    out = []
    for s in samples:
        reference = s.meta.get(field)
        if not isinstance(reference, str):
            raise ValueError(f"exact_answer: sample {s.key!r} has no field {field!r} in its record")
        out.append(1.0 if _words(s.text) == _words(reference) else 0.0)
    return out

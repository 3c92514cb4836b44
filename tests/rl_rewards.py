"""Rule rewards the RL tests name in rl.rewards (`tests.rl_rewards:NAME`): functions of the answers alone."""
from __future__ import annotations

from typing import List

# The tiny espeak tokenizer's 16 audio codes: a sampled answer of a fresh tiny model holds few of them.


def audio_share(samples) -> List[float]:
    """The share of an answer's tokens that are audio codes (0 for an empty answer)."""
    return [len(s.audio_codes) / max(len(s.answer_ids), 1) for s in samples]


def constant(samples) -> List[float]:
    return [1.0 for _ in samples]

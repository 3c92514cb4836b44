"""Rule rewards the RL tests name in rl.rewards (`tests.rl_rewards:NAME`): functions of the answers alone."""
from __future__ import annotations

import random
from typing import List

# The tiny espeak tokenizer's 16 audio codes: a sampled answer of a fresh tiny model holds few of them.


def audio_share(samples) -> List[float]:
    """The share of an answer's tokens that are audio codes (0 for an empty answer)."""
    return [len(s.audio_codes) / max(len(s.answer_ids), 1) for s in samples]


def shuffled_audio_share(samples) -> List[float]:
    """A placebo: audio_share of the answers, dealt to the samples in a random order (no signal)."""
    scores = audio_share(samples)
    random.Random(len(scores) * 7919 + sum(len(s.answer_ids) for s in samples)).shuffle(scores)
    return scores


def constant(samples) -> List[float]:
    return [1.0 for _ in samples]

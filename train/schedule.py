"""Learning-rate schedules: a linear warmup, then cosine | linear | constant | wsd, as a factor of the peak lr.

The factor of an optimizer step is a pure function of (step, tokens done before it), both kept in the
checkpoint, so a resumed run follows the schedule exactly. Each stage of a curriculum has its own schedule,
re-warmed from its own step 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def decay_factor(kind: str, progress: float, min_lr_ratio: float, decay_ratio: float) -> float:
    """The post-warmup factor at `progress` in [0, 1] of the budget (clamped); 1.0 = the peak lr."""
    p = min(1.0, max(0.0, progress))
    floor = min_lr_ratio
    if kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return floor + (1.0 - floor) * (1.0 - p)
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        # Warmup-stable-decay: the peak until the last decay_ratio of the budget, then linearly to the floor.
        stable_end = 1.0 - decay_ratio
        if p <= stable_end:
            return 1.0
        return floor + (1.0 - floor) * (1.0 - (p - stable_end) / decay_ratio)
    raise ValueError(f"optim.schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")


@dataclass
class Schedule:
    """Warmup over `warmup_steps`, then `kind` over the budget: `total_steps` steps, or `max_tokens` tokens.

    With a step budget, progress = (step - warmup) / (total_steps - warmup). With a token budget (it wins
    when set), progress = tokens done / max_tokens; the warmup's tokens count toward it.
    """
    kind: str
    warmup_steps: int
    min_lr_ratio: float
    decay_ratio: float
    total_steps: Optional[int] = None
    max_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        decay_factor(self.kind, 0.0, self.min_lr_ratio, self.decay_ratio)  # rejects an unknown kind
        if self.total_steps is None and self.max_tokens is None:
            raise ValueError("a schedule needs a budget: total_steps or max_tokens")

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """From a TrainConfig: optim.* and the budget (optim.decay_steps, else max_steps; or max_tokens)."""
        o = cfg.optim
        return cls(kind=o.schedule, warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                   decay_ratio=o.decay_ratio, total_steps=o.decay_steps or cfg.max_steps, max_tokens=cfg.max_tokens)

    def progress(self, step: int, tokens: int) -> float:
        if self.max_tokens:
            return tokens / self.max_tokens
        return (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)

    def factor(self, step: int, tokens: int = 0) -> float:
        """The lr factor of optimizer step `step` (0-based), after `tokens` real tokens were trained on."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return decay_factor(self.kind, self.progress(step, tokens), self.min_lr_ratio, self.decay_ratio)

"""What one training step is to the loop: the Algorithm interface every kind implements (sft in train.loop;
dpo, grpo, ppo and reward_model in train.rl) and the StepResult it reports.

A module of its own so that the algorithms of train.rl need not import train.loop, which builds them
(train.rl.build_algorithm): no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from train.engine import Engine


@dataclass
class TaskLosses:
    """A mixture's label-token cross-entropy per dataset (data.datasets order), as sums: steps, micro-batches
    and ranks add up, and loss/<name> is the log window's sum over all ranks divided by its tokens/<name>."""
    names: Tuple[str, ...]
    loss_sums: torch.Tensor
    """[datasets] fp32 on the device (read once per log line): summed cross-entropy of each one's label tokens."""
    tokens: List[int]
    """Label tokens of each dataset (host ints: counted from the batches' labels)."""

    def __add__(self, other: "TaskLosses") -> "TaskLosses":
        return TaskLosses(self.names, self.loss_sums + other.loss_sums,
                          [a + b for a, b in zip(self.tokens, other.tokens, strict=True)])


@dataclass
class StepResult:
    """What one step of an algorithm reports to the loop."""
    tokens: int
    """Real decoder tokens this rank trained on (a host int: the collate counted them)."""
    metrics: Dict[str, Any] = field(default_factory=dict)
    """name -> a float or a 0-dim tensor, left on the device (read once per log line): averaged over the
    steps of a log window and over the ranks."""
    audio_s: float = 0.0
    """Seconds of input audio in the step (audio_s_per_s)."""
    data_wait_s: float = 0.0
    """Seconds the step waited for the loader (data_stall: the share of the log window's time)."""
    flops: float = 0.0
    """Model FLOPs this rank computed in the step (train.flops), for tflops_per_s and MFU; 0 = not counted."""
    task_losses: Optional[TaskLosses] = None
    """This rank's per-dataset loss sums in a mixture (loss/<name>, tokens/<name>); None otherwise. Every
    rank reports them at every step (zeros for a dataset it saw none of): they join the log line's collective."""


class Algorithm:
    """One training step of a kind (sft here; dpo, grpo, ppo, reward_model in train.rl). The loop owns the
    rest: build, resume, schedule, log, evaluate, checkpoint, preempt, export.

    `engines` are trained models besides the loop's own (PPO's critic): checkpointed and resumed with it.
    state_dict / load_state_dict: this rank's data position and random state (saved in loader.pt beside
    every rank's), as data.loading.loader's loader takes it."""
    loader: Any

    def engines(self) -> Dict[str, Engine]:
        return {}

    def step(self, step: int) -> StepResult:
        raise NotImplementedError

    def evaluate(self, tag: str) -> Dict[str, float]:
        """Metrics of the kind's own held-out evaluation (e.g. pairwise accuracy); {} for none. A collective."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state)  # every rank's state: the loader picks (or re-splits) its own

    def skip_stats(self) -> Dict[str, Any]:
        """{"skipped": {reason: n}, "skipped_keys": ["SHARD:KEY (reason)", ...]} of this rank's data."""
        return self.loader.stats()

    def close(self) -> None:
        pass

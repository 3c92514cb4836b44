"""RLHF on speech answers: rollouts (train.rl.rollout), rewards (train.rl.rewards), the algorithms' arithmetic
(train.rl.losses) and their steps: GRPO and PPO (train.rl.policy), DPO and reward models (train.rl.pairs).

Every algorithm is a train.algorithm.Algorithm: the run's loop (train.loop) builds, resumes, schedules, logs,
evaluates, checkpoints and exports it like supervised training; the algorithm supplies the step."""
from __future__ import annotations

from typing import Any, Dict


def build_algorithm(cfg, engine, loader, ctx: Dict[str, Any]):
    """The Algorithm of cfg.kind (dpo, grpo, ppo, reward_model) around the loop's engine."""
    if cfg.kind in ("grpo", "ppo"):
        from train.rl.policy import PolicyGradient

        return PolicyGradient(cfg, engine, loader, ctx)
    if cfg.kind == "dpo":
        from train.rl.pairs import DPOStep

        return DPOStep(cfg, engine, loader, ctx)
    if cfg.kind == "reward_model":
        from train.rl.pairs import RewardModelStep

        return RewardModelStep(cfg, engine, loader, ctx)
    raise ValueError(f"kind={cfg.kind!r} is not an RL kind")

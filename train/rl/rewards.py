"""Rewards: one interface, `rewards(samples, batch) -> (total [B], {component: [B]})`, over the components a
recipe lists in rl.rewards: Python functions (`module:function`), learned reward models (score models,
read at the answer's last token), summed with their weights. Every component is returned for logging.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from model.score import last_token_scores
from train.config import RewardConfig
from train.rl.losses import last_token_index
from train.rl.rollout import RolloutSample, answer_mask


def import_function(spec: str, key: str = "rl.rewards[].function") -> Callable:
    """The callable named `module:function`; ValueError naming the key when it cannot be imported."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"config key '{key}' = {spec!r}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"config key '{key}' = {spec!r}: module {module_name!r} has no function {name!r}")
    return fn


def _as_scores(values: Any, n: int, where: str) -> torch.Tensor:
    scores = torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()
    if scores.numel() != n:
        raise ValueError(f"reward {where} returned {scores.numel()} values for {n} samples")
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"reward {where} returned {scores[bad].item()} for sample {bad} (expected finite numbers)")
    return scores


class Rewards:
    """The weighted sum of rl.rewards' components. score_model(folder) -> a FrozenModel-like object whose
    forward(batch) gives `values` [B, T] (built by the caller: it knows the engine settings)."""

    def __init__(self, specs: List[RewardConfig], score_model: Optional[Callable[[str], Any]] = None,
                 truncated_reward: Optional[float] = None):
        self.components: List[Tuple[str, float, Callable]] = []
        self.models: List[Any] = []
        for i, spec in enumerate(specs):
            if spec.function:
                fn = import_function(spec.function, f"rl.rewards[{i}].function")
                if spec.args:
                    fn = functools.partial(fn, **dict(spec.args))
                self.components.append((spec.name, spec.weight, self._function(fn, spec.function)))
            else:
                if score_model is None:
                    raise ValueError(f"rl.rewards[{i}] names a reward model ({spec.model}) but no way to build one "
                                     f"was given")
                if not Path(spec.model).is_dir():
                    raise ValueError(f"config key 'rl.rewards[{i}].model' = {spec.model!r}: no such folder")
                model = score_model(spec.model)
                self.models.append(model)
                self.components.append((spec.name, spec.weight, self._model(model)))
        self.truncated_reward = truncated_reward

    @staticmethod
    def _function(fn: Callable, name: str) -> Callable:
        def call(samples: List[RolloutSample], batches: List[Dict[str, Any]]) -> torch.Tensor:
            return _as_scores(fn(samples), len(samples), name)
        return call

    @staticmethod
    def _model(model) -> Callable:
        def call(samples: List[RolloutSample], batches: List[Dict[str, Any]]) -> torch.Tensor:
            scores = []
            for batch in batches:
                values_BT = model.forward(batch).scores
                last_B = last_token_index(answer_mask(batch)).to(values_BT.device)
                scores.append(last_token_scores(values_BT, last_B).float().cpu())
            return _as_scores(torch.cat(scores), len(samples), "model")
        return call

    def __call__(self, samples: List[RolloutSample], batches: List[Dict[str, Any]]
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total [B], {name: [B]}) for the samples, whose training rows are `batches` in order (reward models
        score those rows; every rank must call this: under ZeRO-3 a reward model's forward is a collective).
        A cut answer (not finished) gets rl.truncated_reward as its total when that is set."""
        parts: Dict[str, torch.Tensor] = {}
        total = torch.zeros(len(samples))
        for name, weight, call in self.components:
            scores = call(samples, batches)
            parts[name] = scores
            total = total + weight * scores
        if self.truncated_reward is not None:
            cut = torch.tensor([not s.finished for s in samples])
            total = torch.where(cut, torch.full_like(total, self.truncated_reward), total)
        return total, parts

    def close(self) -> None:
        for model in self.models:
            model.close()
        self.models = []


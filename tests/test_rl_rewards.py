"""The reward interface: functions named in the recipe (with args), weighted sums, each component kept for
the logs, cut answers, and clear errors for bad functions and bad return values; the rule rewards."""
from __future__ import annotations

import math

import pytest
import torch

from train.config import RewardConfig
from train.rl import rule_rewards as R
from train.rl.rewards import Rewards
from train.rl.rollout import RolloutSample


def _sample(text="", codes=(), finished=True, meta=None, answer=None):
    answer = list(answer if answer is not None else range(len(codes) + len(text.split()) + 1))
    return RolloutSample(key="k", meta=meta or {}, prompt_ids=[1, 2], answer_ids=answer, finished=finished,
                         text_ids=list(range(len(text.split()))), audio_codes=list(codes), text=text)


def test_weighted_sum_of_components_each_kept_and_cut_answers_get_the_truncated_reward():
    samples = [_sample("a b", codes=[1, 2, 3, 4], finished=True), _sample("c", codes=[], finished=False)]
    rewards = Rewards([RewardConfig(name="stop", function="train.rl.rule_rewards:stopped", weight=2.0),
                       RewardConfig(name="len", function="train.rl.rule_rewards:length_window", weight=0.5,
                                    args={"min_tokens": 3, "unit": "audio"})])
    total, parts = rewards(samples, [])
    assert parts["stop"].tolist() == [1.0, 0.0] and parts["len"].tolist() == [1.0, 0.0]
    assert total.tolist() == [2.5, 0.0]
    cut = Rewards([RewardConfig(name="stop", function="tests.rl_rewards:constant")], truncated_reward=-1.0)
    assert cut(samples, [])[0].tolist() == [1.0, -1.0]


def test_bad_functions_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"rl.rewards\[0\].function' = 'no_such_module:f': cannot import module"):
        Rewards([RewardConfig(name="x", function="no_such_module:f")])
    with pytest.raises(ValueError, match=r"module 'train.rl.rule_rewards' has no function 'nope'"):
        Rewards([RewardConfig(name="x", function="train.rl.rule_rewards:nope")])
    bad = Rewards([RewardConfig(name="x", function="tests.rl_rewards:constant")])
    with pytest.raises(ValueError, match="returned 1 values for 2 samples"):
        bad.components[0] = ("x", 1.0, Rewards._function(lambda s: [1.0], "f"))
        bad([_sample(), _sample()], [])
    nan = Rewards([RewardConfig(name="x", function="tests.rl_rewards:constant")])
    nan.components[0] = ("x", 1.0, Rewards._function(lambda s: [0.0, math.nan], "g"))
    with pytest.raises(ValueError, match="reward g returned nan for sample 1"):
        nan([_sample(), _sample()], [])


def test_rule_rewards():
    assert R.word_error_rate("the cat sat", "the cat sat") == 0.0
    assert R.word_error_rate("the dog sat down", "the cat sat") == pytest.approx(2 / 3)
    got = R.text_match([_sample("The cat, sat!", meta={"text": "the cat sat"}), _sample("a cat", meta={"text": "the cat sat"})])
    assert got[0] == 1.0 and got[1] == pytest.approx(1 - math.tanh(3 * 2 / 3))
    with pytest.raises(ValueError, match="has no text field 'text'"):
        R.text_match([_sample("x")])
    assert R.exact_answer([_sample("Yes.", meta={"answer": "yes"}), _sample("no", meta={"answer": "yes"})]) == [1.0, 0.0]
    lengths = R.length_window([_sample("a b c"), _sample("a"), _sample("a b c", finished=False)], min_tokens=2,
                              max_tokens=4)
    assert lengths == [1.0, 0.0, 0.0]
    assert R.length_window([_sample(codes=list(range(50)))], min_tokens=2, unit="seconds") == [1.0]  # 2 s of codes

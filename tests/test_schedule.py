"""Learning-rate schedules: exact factors of warmup, cosine, linear, constant and wsd, by steps and by tokens."""
from __future__ import annotations

import math

import pytest

from tests.conftest import REPO
from train.recipe import ConfigError, load_config
from train.schedule import Schedule, decay_factor


def steps_schedule(kind: str, **kw) -> Schedule:
    args = dict(kind=kind, warmup_steps=2, min_lr_ratio=0.1, decay_ratio=0.2, total_steps=12)
    return Schedule(**{**args, **kw})


def test_warmup_is_linear_from_the_first_step():
    for kind in ("cosine", "linear", "constant", "wsd"):
        s = steps_schedule(kind, warmup_steps=4)
        assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_exact_values():
    s = steps_schedule("cosine")
    assert s.factor(2) == 1.0  # progress 0 right after warmup
    assert s.factor(7) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 10 post-warmup steps
    assert s.factor(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert s.factor(12) == pytest.approx(0.1) and s.factor(50) == pytest.approx(0.1)  # floor, clamped


def test_linear_constant_and_wsd_exact_values():
    lin = steps_schedule("linear")
    assert [round(lin.factor(i), 10) for i in (2, 4, 7, 12)] == [1.0, 0.82, 0.55, 0.1]
    const = steps_schedule("constant")
    assert [const.factor(i) for i in (0, 2, 12, 99)] == [0.5, 1.0, 1.0, 1.0]
    wsd = steps_schedule("wsd")  # stable for the first 80% of the 10 post-warmup steps, then linear to 0.1
    assert [round(wsd.factor(i), 10) for i in (2, 6, 10, 11, 12, 13)] == [1.0, 1.0, 1.0, 0.55, 0.1, 0.1]


def test_token_budget_drives_progress():
    s = Schedule("linear", warmup_steps=0, min_lr_ratio=0.0, decay_ratio=0.1, max_tokens=1000)
    assert [s.factor(step, tokens) for step, tokens in ((0, 0), (5, 250), (9, 1000), (10, 1500))] == \
        [1.0, 0.75, 0.0, 0.0]
    warm = Schedule("cosine", warmup_steps=2, min_lr_ratio=0.1, decay_ratio=0.1, max_tokens=1000, total_steps=5)
    assert warm.factor(1, 500) == 1.0  # still warming up: the step decides
    assert warm.factor(3, 500) == pytest.approx(0.55)  # the token budget wins over total_steps
    wsd = Schedule("wsd", warmup_steps=0, min_lr_ratio=0.2, decay_ratio=0.5, max_tokens=100)
    assert [wsd.factor(0, t) for t in (0, 50, 75, 100)] == [1.0, 1.0, pytest.approx(0.6), pytest.approx(0.2)]


def test_from_config_reads_the_recipe():
    cfg = load_config(str(REPO / "recipes/demo/asr.yaml"))  # warmup 40, 600 steps, floor 0.05, cosine
    s = Schedule.from_config(cfg)
    assert (s.kind, s.warmup_steps, s.total_steps, s.max_tokens) == ("cosine", 40, 600, None)
    assert s.factor(0) == 1 / 40 and s.factor(40) == 1.0 and s.factor(600) == pytest.approx(0.05)
    shorter = Schedule.from_config(load_config(str(REPO / "recipes/demo/asr.yaml"), ["optim.decay_steps=140"]))
    assert shorter.factor(90) == pytest.approx(0.05 + 0.95 * 0.5)
    tokens = Schedule.from_config(load_config(str(REPO / "recipes/demo/asr.yaml"),
                                              ["max_tokens=5000", "optim.schedule=linear", "optim.warmup_steps=0"]))
    assert tokens.factor(3, 1000) == pytest.approx(0.05 + 0.95 * 0.8)


def test_bad_schedule_values_are_named():
    with pytest.raises(ValueError, match=r"optim.schedule='step': expected one of cosine, linear, constant, wsd"):
        decay_factor("step", 0.5, 0.1, 0.1)
    with pytest.raises(ConfigError, match=r"config key 'optim.schedule' = 'cosin': expected cosine, linear"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"config key 'optim.decay_ratio' = 0.0: expected a number in \(0, 1\]"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["optim.schedule=wsd", "optim.decay_ratio=0"])
    with pytest.raises(ValueError, match="a schedule needs a budget"):
        Schedule("cosine", warmup_steps=0, min_lr_ratio=0.1, decay_ratio=0.1)

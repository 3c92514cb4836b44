"""make rlhf-demo's driver (train/rlhf_demo.py): every run it plans loads against the schema with the reward it
builds, a missing demo is named, and the report table reads the figures it is given. (The whole demo runs
in `make rlhf-demo`, minutes on two cores: not in the suite.)"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from train.recipe import load_config
from train.rl.speech_eval import Answer
from train.rlhf_demo import (RECIPE, check_demo, demo_paths, format_report, planned_runs, reward_scores,
                             reward_specs, rewards_override)
from tests.conftest import REPO


def _args(**kw):
    base = dict(runs="grpo,placebo,ppo,dpo", seeds=3, steps=30, ppo_steps=15, dpo_steps=30)
    return argparse.Namespace(**{**base, **kw})


def test_every_planned_run_loads_with_the_reward_it_builds(tmp_path):
    paths = demo_paths(tmp_path / "demo")
    common = [f"model.init_from={paths['sft']}", f"data.tokenizer={paths['sft']}",
              f"data.shards=[{paths['prompts']}]", f"data.audio_tokenizer={paths['codes']}",
              rewards_override(reward_specs(paths, tmp_path / "out" / "style.pt"))]
    runs = planned_runs(_args(), tmp_path / "pairs")
    assert list(runs) == ["grpo-seed0", "grpo-seed1", "grpo-seed2", "grpo-placebo", "ppo", "dpo"]
    kinds = {}
    for name, overrides in runs.items():
        cfg = load_config(str(REPO / RECIPE), [f"run_dir={tmp_path / name}", *common, *overrides])
        kinds[name] = (cfg.kind, cfg.seed, cfg.max_steps, cfg.rl.placebo, cfg.data.render)
        assert [(r.name, r.weight) for r in cfg.rl.rewards] == [("style", 1.0), ("rate", 1.0), ("words", 1.0),
                                                                 ("guard", 0.5)]
        assert cfg.rl.rewards[0].args == {"classifier": str(tmp_path / "out" / "style.pt"),
                                          "codes": f"kmeans:{tmp_path / 'demo' / 'kmeans.pt'}"}
        assert cfg.rl.rewards[2].args == {"asr_model": str(tmp_path / "demo/curriculum/stages/0-asr/export"),
                                          "codes": f"kmeans:{tmp_path / 'demo' / 'kmeans.pt'}", "sharpness": 1.0}
        assert cfg.model.init_from == str(tmp_path / "demo/curriculum/stages/3-dialogue/export")
    assert kinds == {"grpo-seed0": ("grpo", 0, 30, False, "prompt"), "grpo-seed1": ("grpo", 1, 30, False, "prompt"),
                     "grpo-seed2": ("grpo", 2, 30, False, "prompt"), "grpo-placebo": ("grpo", 0, 30, True, "prompt"),
                     "ppo": ("ppo", 0, 15, False, "prompt"), "dpo": ("dpo", 0, 30, False, "pairs")}
    assert list(planned_runs(_args(runs="grpo", seeds=1), None)) == ["grpo-seed0"]
    assert "dpo" not in planned_runs(_args(), None)  # no pairs, no DPO


def test_a_missing_demo_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"3-dialogue/export, .*0-asr/export, .*kmeans.pt, .*dialogue/train, .*"
                                         r"train.jsonl missing: run `make demo` first"):
        check_demo(demo_paths(tmp_path / "nowhere"))


def test_the_report_table_reads_each_models_figures():
    summary = lambda ratio, stop, total: {"heldout": {"slow_over_quick_s_per_word": ratio},  # noqa: E731
                                          "all": {"stop_rate": stop}, "reward": {"total": total}}
    report = {"models": {"sft": {"summary": summary(1.2, 0.75, 0.9)}, "grpo": {"summary": summary(1.6, 1.0, 1.8)}},
              "espeak": {"espeak": {"slow_over_quick_s_per_word": 2.2, "all": {"stop_rate": 1.0}}}}
    assert format_report(report).splitlines() == [
        "| measure | sft | grpo | espeak | goal |", "|---|---|---|---|---|",
        "| slow/quick s per word | 1.200 | 1.600 | 2.200 | >= 1.5 |",
        "| stop rate | 0.750 | 1.000 | 1.000 | >= 0.95 |",
        "| reward | 0.900 | 1.800 | - |  |"]


def test_the_recipe_is_the_demo_run(tmp_path):
    cfg = load_config(str(REPO / RECIPE), [])
    assert (cfg.kind, cfg.model.trainable, cfg.rl.kl_coef, cfg.rl.truncated_reward) == \
        ("grpo", ["decoder", "lm_head"], 0.05, 0.0)
    assert Path(cfg.model.init_from) == Path("runs/demo/curriculum/stages/3-dialogue/export")


def test_held_out_answers_are_scored_with_the_runs_reward_specs():
    # 7 words past the slow target (0.34 x 1.4 s a word, 25 codes a second): rate 1; a 25-code quick answer
    # that never ended: its parts are scored, its total is 0 (rl.truncated_reward); the guard wants 10 codes.
    specs = [{"name": "rate", "weight": 1.0, "function": "train.rl.speech_rewards:speaking_rate", "args": {}},
             {"name": "guard", "weight": 0.5, "function": "train.rl.speech_rewards:audio_guard", "args": {}}]
    slow = list(range(84))  # 84 codes = 3.36 s = 0.48 s a word
    answers = [Answer(key="a", style="slowly", text_asked="", prompt_ids=[], answer_ids=[], stopped=True, text="",
                      audio_codes=slow),
               Answer(key="b", style="quickly", text_asked="", prompt_ids=[], answer_ids=[], stopped=False,
                      text="", audio_codes=list(range(25))),
               Answer(key="a", style="slowly", text_asked="", prompt_ids=[], answer_ids=[], stopped=True, text="",
                      audio_codes=[3] * 5)]
    requests = [{"key": "a", "text": "one two three four five six seven"}, {"key": "b", "text": "one two three"}]
    got = reward_scores(answers, requests, specs)
    assert got["rate"][0] == 1.0 and got["guard"] == [1.0, 1.0, 0.0]
    assert got["total"] == [1.5, 0.0, got["rate"][2]]
    # 25 codes for 3 words: 0.333 s a word; quick is at most 0.34 / 1.4 = 0.243, nothing from 1.5x that.
    assert got["rate"][1] == pytest.approx(1 - math.log(1 / 3 / (0.34 / 1.4)) / math.log(1.5))


def test_parallel_runs_share_the_cores_unless_the_caller_chose(tmp_path, monkeypatch):
    import sys

    from train.rlhf_demo import _run
    probe = [sys.executable, "-c", "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _run(probe, tmp_path / "a.log", threads=3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _run(probe, tmp_path / "b.log", threads=3)
    assert (tmp_path / "a.log").read_text().split() == ["threads", "3"]
    assert (tmp_path / "b.log").read_text().split() == ["threads", "1"]
    failing = [sys.executable, "-c", "import sys; print('bad key'); sys.exit(3)"]
    with pytest.raises(SystemExit, match=r"(?s)step failed \(exit 3\).*bad key"):
        _run(failing, tmp_path / "c.log")


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_stops_the_runs_not_yet_started(tmp_path, monkeypatch, jobs):
    import threading
    import time

    import train.rlhf_demo as demo
    started, lock = [], threading.Lock()

    def fake_run(name, overrides, out, common, threads):
        with lock:
            started.append((name, threads))
        if name == "b":
            raise SystemExit(f"error: step failed: {name}")
        time.sleep(0.2)  # a run takes a while: the failure is seen while the queue still waits
        return out / name / "export"
    monkeypatch.setattr(demo, "train_run", fake_run)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 4)
    assert demo.train_all({"a": [], "c": []}, tmp_path, [], jobs) == {"a": tmp_path / "a" / "export",
                                                                       "c": tmp_path / "c" / "export"}
    assert sorted(started) == [("a", 4 // jobs), ("c", 4 // jobs)]
    started.clear()
    with pytest.raises(SystemExit, match="step failed: b"):
        demo.train_all({name: [] for name in "abcdef"}, tmp_path, [], jobs)
    assert len(started) <= jobs + 2 and ("f", 4 // jobs) not in started  # the queue behind the failure never ran

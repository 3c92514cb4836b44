"""A curriculum whose stages are SFT, a reward model and PPO on that reward model runs with one command; the
policy stages chain past the reward model; a run killed in the PPO stage resumes there."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.conftest import run_cli
from tests.test_rl_train import base, pairs  # noqa: F401,F811  (module fixtures)
from train.curriculum import plan
from train.recipe import ConfigError, load_config

PY = sys.executable


def _recipe(tmp_path, espeak_data, pairs, base):
    recipe = {
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"preset": "tiny", "init_from": str(base)},
        "data": {"shards": [str(espeak_data["train"])], "tokenizer": str(espeak_data["tokenizer"]), "task": "asr",
                 "batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "engine": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"every_steps": 1, "export": True},
        "metrics": {"log_every": 1},
        "eval": {"shards": []},
        "rl": {"max_new_tokens": 8, "num_generations": 1},
        "stages": [
            {"name": "sft", "max_steps": 1},
            {"name": "rm", "kind": "reward_model", "max_steps": 1,
             "overrides": {"data": {"shards": [str(pairs["train"])]}}},
            {"name": "ppo", "kind": "ppo", "max_steps": 3,
             "overrides": {"rl": {"rewards": [{"name": "rm", "model": "stage:rm"}]}}},
        ]}
    path = tmp_path / "rl_curriculum.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sft_reward_model_ppo_curriculum_runs_chains_and_resumes_in_the_ppo_stage(espeak_data, pairs, base, tmp_path):
    recipe = _recipe(tmp_path, espeak_data, pairs, base)
    cfg = load_config(str(recipe))
    plans = plan(cfg)
    stages = tmp_path / "run" / "stages"
    assert [p.cfg.kind for p in plans] == ["sft", "reward_model", "ppo"]
    assert [p.cfg.data.render for p in plans] == ["full", "pairs", "prompt"]  # from the kind
    # The reward model and PPO both start from the SFT policy; PPO's reward is the reward model's export.
    assert plans[1].cfg.model.init_from == plans[2].cfg.model.init_from == str(stages / "0-sft" / "export")
    assert plans[2].cfg.rl.rewards[0].model == str(stages / "1-rm" / "export")
    with pytest.raises(AssertionError, match="exited -9"):
        run_cli(PY, "-m", "train", str(recipe), env={"STEPAUDIO_FAULT": "kill:2:0"})  # only PPO has a step 2
    assert (stages / "0-sft" / "DONE").is_file() and (stages / "1-rm" / "DONE").is_file()
    assert not (stages / "2-ppo" / "DONE").exists()
    out = run_cli(PY, "-m", "train", str(recipe))
    assert "stage 0 'sft' is done" in out.stderr + out.stdout and "stage 1 'rm' is done" in out.stderr + out.stdout
    summary = json.loads((tmp_path / "run" / "curriculum.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done", "done", "done"]
    ppo = [json.loads(line) for line in (stages / "2-ppo" / "metrics.jsonl").read_text().splitlines()]
    assert f"resumed from {stages / '2-ppo' / 'checkpoints' / 'step_00000001'}" in out.stderr + out.stdout
    assert sorted({m["step"] for m in ppo if "reward/rm_mean" in m}) == [1, 2, 3]


def test_a_stage_reference_must_name_an_earlier_stage(espeak_data, pairs, base, tmp_path):
    recipe = _recipe(tmp_path, espeak_data, pairs, base)
    data = yaml.safe_load(recipe.read_text())
    data["stages"][2]["overrides"]["rl"]["rewards"][0]["model"] = "stage:later"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"rl.rewards\[0\].model' of stage 'ppo' = 'stage:later': no earlier stage"):
        plan(load_config(str(recipe)))

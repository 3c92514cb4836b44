"""RL on two gloo ranks under ZeRO 0, 2 and 3 and with LoRA: steps complete, the first minibatch's importance
ratio is exactly 1 and its KL exactly 0, a killed run resumes like the uninterrupted one, and rollouts
whose answers end at very different times on the two ranks neither hang nor change."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cli
from tests.test_rl_train import base, rule, steps, train  # noqa: F401  (base: the module's fixture)

PY = sys.executable


@pytest.mark.parametrize("zero,kind,lora", [(0, "grpo", True), (2, "ppo", False), (3, "ppo", False)])
def test_rl_steps_on_two_ranks_start_at_ratio_one_and_kl_zero(zero, kind, lora, espeak_data, base, tmp_path):
    start = ["lora.enabled=true", f"lora.init_from={base}", "lora.r=4", "model.init_from=null"] if lora else []
    run = tmp_path / "run"
    train(run, espeak_data, base, kind, f"engine.zero_stage={zero}", "data.batch_size=2", "rl.num_generations=2",
          "rl.kl_coef=0.1", "optim.lr=1e-3", "max_steps=2", rule("audio_share"), *start, nproc=2)
    logged = steps(run)
    assert sorted(logged) == [1, 2]
    # One minibatch, one epoch: the only policy update of step 1 sees the rollout's own log-probabilities,
    # and the reference (LoRA: the base, adapters off; else a frozen copy) equals the starting policy.
    assert logged[1]["ratio"] == 1.0 and logged[1]["kl"] == 0.0 and logged[1]["clip_fraction"] == 0.0
    assert logged[2]["kl"] > 0.0  # the policy moved
    if kind == "ppo":
        assert (run / "checkpoints").is_dir()
        ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
        assert (ckpt / "critic").is_dir()  # the critic's engine is checkpointed beside the policy's


def test_zero3_rl_killed_mid_run_resumes_with_equal_losses(espeak_data, base, tmp_path):
    setup = ["engine.zero_stage=3", "data.batch_size=2", "rl.num_generations=2", "rl.kl_coef=0.1",
             "optim.lr=1e-3", "rl.epochs=2", "rl.num_minibatches=2", rule("audio_share"), "checkpoint.every_steps=2",
             "max_steps=4"]
    train(tmp_path / "whole", espeak_data, base, "ppo", *setup, nproc=2)
    with pytest.raises(AssertionError):
        train(tmp_path / "split", espeak_data, base, "ppo", *setup, nproc=2, env={"STEPAUDIO_FAULT": "kill:3:1"})
    train(tmp_path / "split", espeak_data, base, "ppo", *setup, nproc=2)
    whole, split = steps(tmp_path / "whole"), steps(tmp_path / "split")
    for step in (3, 4):
        for key in ("reward", "policy_loss", "value_loss", "kl"):
            assert split[step][key] == whole[step][key], (step, key)


def test_zero3_rollouts_where_one_rank_ends_early_do_not_hang_and_match_each_rank_alone(tmp_path):
    out = tmp_path / "answers"
    run_cli(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "tests" / "rl_rollout_ranks.py"), str(out), timeout=300)
    together = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    alone = {r: json.loads((out / f"alone{r}.json").read_text()) for r in (0, 1)}
    assert {r: together[r]["answers"] for r in (0, 1)} == {r: alone[r]["answers"] for r in (0, 1)}
    # Rank 0's answers stop at once (its stop token is its first answer token); rank 1 decodes far longer.
    assert max(len(a) for a in together[0]["answers"]) == 1
    assert max(len(a) for a in together[1]["answers"]) == together[1]["max_new_tokens"]
    assert min(len(a) for a in together[1]["answers"]) > 5
    assert together[0]["gathers"] == together[1]["gathers"] == 1  # parameters gathered once per rollout batch

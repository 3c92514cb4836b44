"""python -m train.plan on the paper's curriculum: tokens, FLOPs, GPU-hours and memory by the stated formulas."""
import json

import pytest

from model.config import preset_config
from train import memory, plan
from train.flops import flops_per_token, forward_passes, training_passes
from train.recipe import load_config

PAPER = "recipes/step_audio2/curriculum.yaml"
H100_BF16 = 989e12


@pytest.fixture(scope="module")
def paper_plan():
    return plan.plan_run(load_config(PAPER), gpus=64, gpu="h100", mfu=0.4)


def test_paper_stage_1(paper_plan):
    align = paper_plan["stages"][0]
    assert align["name"] == "align" and align["kind"] == "sft"
    assert align["tokens"] == 100_000_000_000
    # 64 GPUs x grad_accum 8 x 16384 tokens per micro-batch
    assert align["tokens_per_step"] == 64 * 8 * 16384 and align["steps"] == 11_921
    # stage 1 trains the adapter alone: the decoder passes the gradient but keeps its weights
    per_token = flops_per_token(preset_config("mini"), 8192, training_passes(["adapter"]))
    assert align["flops"] == 100e9 * per_token
    assert align["gpu_hours"] == align["flops"] / (H100_BF16 * 0.4) / 3600
    assert align["days"] == align["gpu_hours"] / 64 / 24
    # ZeRO-3 model states of all parameters with the adapter's trained (conv, linear1, linear2 with biases)
    adapter = 1280 * 1280 * 3 + 1280 + 1280 * 2048 + 2048 + 2048 * 3584 + 3584
    counts = plan._group_counts(json.dumps(preset_config("mini").to_dict()), 16,
                                tuple(load_config(PAPER).lora.target_modules), False)
    assert counts["adapter"] == adapter
    expected = memory.model_state_bytes(counts["total"], adapter, 3, False, 64)["gpu"] / memory.GIB
    assert align["gpu_gib"] == pytest.approx(expected, rel=1e-12)


def test_paper_rl_stages(paper_plan):
    by_name = {s["name"]: s for s in paper_plan["stages"]}
    mini = preset_config("mini")
    grpo = by_name["grpo_perception"]
    # 400 steps x 64 GPUs x 1 prompt x 8 answers x (256 new + 512 prompt tokens)
    assert grpo["tokens"] == 400 * 64 * 1 * 8 * (256 + 512) and grpo["attention_len"] == 768
    # rollout forward + old log-probabilities forward + one epoch of training; kl_coef 0: no reference
    expected = 2 * flops_per_token(mini, 768, forward_passes()) + flops_per_token(mini, 768)
    assert grpo["flops_per_token"] == expected
    assert grpo["models"] == ["policy"]
    assert by_name["ppo_reward_model"]["models"] == ["critic", "policy", "reference", "reward_model_0"]
    assert by_name["reward_model"]["models"] == ["reward_model"]
    total = paper_plan["total"]
    assert total["tokens"] == sum(s["tokens"] for s in paper_plan["stages"])
    assert total["gpu_hours"] == pytest.approx(total["flops"] / (H100_BF16 * 0.4) / 3600, rel=1e-12)


def test_cli_json(capsys):
    assert plan.main([PAPER, "--gpus", "16", "--gpu", "h200", "--mfu", "0.5", "--json", "stages=[align]"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| stage | kind | steps | tokens |")
    data = json.loads(out[-1])
    assert set(data) == {"recipe", "gpus", "gpu", "mfu", "prompt_tokens", "audio_share", "stages", "total"}
    assert set(data["total"]) == {"tokens", "flops", "gpu_hours", "days"}
    assert {"name", "kind", "steps", "tokens", "tokens_per_step", "attention_len", "flops_per_token", "flops",
            "peak_flops", "gpu_hours", "days", "zero_stage", "gpu_gib", "cpu_gib", "models"} <= set(data["stages"][0])
    assert data["gpus"] == 16 and data["stages"][0]["peak_flops"] == 989e12  # H200: the H100's compute
    # stages=[...] plans the stages it names
    assert [s["name"] for s in data["stages"]] == ["align"]
    assert data["total"]["gpu_hours"] == data["stages"][0]["gpu_hours"]


def test_bad_input(capsys):
    assert plan.main([PAPER, "--gpu", "tpu"]) == 2
    assert "--gpu 'tpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mfu"):
        plan.plan_run(load_config(PAPER), mfu=1.5)

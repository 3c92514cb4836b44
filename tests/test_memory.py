"""train.memory: the mini shape's counted parameters, the LoRA count, and table cells worked by hand; the RL rows
(PPO, GRPO/DPO) as sums of their models' shares."""
from __future__ import annotations

import json

import pytest

from train.config import LoraConfig
from train.memory import GIB, build_meta_model, count_params, main, memory_table, model_state_bytes, rl_table

P, T = 8_315_179_264, 7_678_210_304  # the mini LM: every parameter, and all but the encoder
L = 40_370_176  # LoRA r=16 on the decoder linears
S = P - 158_720 * 3584 + 3584 + 1  # its score model: no lm_head, a hidden -> 1 head with a bias
S_T = S - 636_968_960


@pytest.fixture(scope="module")
def mini_counts():
    return count_params(build_meta_model("mini"), LoraConfig(r=16))


@pytest.fixture(scope="module")
def score_counts():
    return count_params(build_meta_model("mini", score=True), LoraConfig(r=16))


@pytest.fixture(scope="module")
def rl_rows(mini_counts, score_counts):
    return rl_table(mini_counts, score_counts)


def _row(rows, algorithm, method, stage, offload, nodes=1):
    found = [r for r in rows if (r["algorithm"], r["method"], r["zero_stage"], r["offload"], r["nodes"]) ==
             (algorithm, method, stage, offload, nodes)]
    assert len(found) == 1, (algorithm, method, stage, offload, nodes)
    return found[0]


def test_counts_of_the_mini_shape(mini_counts):
    assert mini_counts["total"] == 8_315_179_264
    # 32 Whisper-large blocks + convs + LayerNorm + 1500 x 1280 positions.
    assert mini_counts["encoder"] == 636_968_960
    assert mini_counts["full_trainable"] == 8_315_179_264 - 636_968_960
    # Per layer r * (in + out): q, o 3584->3584; k, v 3584->512 (4 kv heads of 128); gate, up, down 3584<->18944.
    per_layer = 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert per_layer == 1_441_792
    assert mini_counts["lora"] == 28 * per_layer == 40_370_176
    # The largest module: embed_tokens or lm_head, 158720 x 3584.
    assert mini_counts["largest_module"] == 158_720 * 3584


def test_cells_by_hand():
    # Full fine-tuning on one node, ZeRO-2: whole bf16 weights + 1/8 of (bf16 grads + fp32 master, m, v).
    p, t = 8_315_179_264, 7_678_210_304
    assert model_state_bytes(p, t, 2, False, 8) == {"gpu": 16_630_358_528 + 13_436_868_032, "cpu": 0.0}
    assert model_state_bytes(p, t, 2, False, 8)["gpu"] / GIB == pytest.approx(28.0023, abs=1e-4)
    # ZeRO-3 with offload: only the gradient partition stays on the GPU.
    assert model_state_bytes(p, t, 3, True, 64) == {"gpu": 2 * t / 64, "cpu": (2 * p + 12 * t) / 64}
    with pytest.raises(ValueError, match="ZeRO stage 1: expected 2 or 3"):
        model_state_bytes(p, t, 1, False, 8)


def test_cli_prints_table_then_json(capsys):
    assert main(["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| method | nodes x GPUs | ZeRO |")
    assert "| full | 1 x 8 | 2 | no | 7,678,210,304 | 28.00 | 0.0 |" in lines
    report = json.loads(lines[-1])
    assert report["counts"]["total"] == 8_315_179_264
    assert len(report["rows"]) == 2 * 2 * 2 * 2  # method x nodes x stage x offload
    lora3 = next(r for r in report["rows"] if r["method"] == "lora" and r["nodes"] == 1 and r["zero_stage"] == 3
                 and not r["offload"])
    assert lora3["gpu_gib"] == pytest.approx((2 * (8_315_179_264 + 40_370_176) + 14 * 40_370_176) / 8 / GIB)


def test_score_model_is_the_lm_without_lm_head_plus_its_head(mini_counts, score_counts):
    assert mini_counts["lm_head"] == 158_720 * 3584 and mini_counts["score_head"] == 0
    assert score_counts["lm_head"] == 0 and score_counts["score_head"] == 3584 + 1
    assert score_counts["total"] == mini_counts["total"] - mini_counts["lm_head"] + 3584 + 1 == S == 7_746_330_369
    assert score_counts["encoder"] == mini_counts["encoder"] and score_counts["full_trainable"] == S_T
    assert score_counts["lora"] == mini_counts["lora"] == L  # the same decoder linears


def test_ppo_full_zero3_is_the_sum_of_its_models(rl_rows):
    row = _row(rl_rows, "ppo", "full", 3, "no")
    assert row["models"] == {
        "policy": {"params": P, "trainable": T, "gpu_gib": (2 * P + 14 * T) / 8 / GIB, "cpu_gib_per_node": 0.0},
        "reference": {"params": P, "trainable": 0, "gpu_gib": 2 * P / 8 / GIB, "cpu_gib_per_node": 0.0},
        "critic": {"params": S, "trainable": S_T, "gpu_gib": (2 * S + 14 * S_T) / 8 / GIB, "cpu_gib_per_node": 0.0},
        "reward_model": {"params": S, "trainable": 0, "gpu_gib": 2 * S / 8 / GIB, "cpu_gib_per_node": 0.0}}
    weights = 2 * (P + P + S + S)  # policy, reference, critic, reward model
    trained = T + S_T  # policy and critic: 2 B of gradient and 12 B of optimizer state each
    assert row["gpu_gib"] == pytest.approx((weights + 14 * trained) / 8 / GIB, rel=1e-12)
    assert row["gpu_gib"] == pytest.approx(31.58, abs=5e-3) and row["cpu_gib_per_node"] == 0.0
    # The rollout gathers the whole policy on every GPU.
    assert row["rollout_gib"] == 2 * P / GIB
    # rl.reference_offload moves exactly the reference's partition to CPU (8 GPUs per node).
    moved = _row(rl_rows, "ppo", "full", 3, "reference")
    assert moved["gpu_gib"] == pytest.approx(row["gpu_gib"] - 2 * P / 8 / GIB, rel=1e-12)
    assert moved["cpu_gib_per_node"] == pytest.approx(2 * P / GIB, rel=1e-12)
    # Everything offloaded: only the two trainable models' gradient partitions stay on the GPUs.
    everything = _row(rl_rows, "ppo", "full", 3, "all", nodes=8)
    assert everything["gpu_gib"] == pytest.approx(2 * trained / 64 / GIB, rel=1e-12)
    assert everything["cpu_gib_per_node"] == pytest.approx((weights + 12 * trained) / 8 / GIB, rel=1e-12)


def test_frozen_models_are_whole_under_zero2(rl_rows):
    row = _row(rl_rows, "grpo, dpo", "full", 2, "no")
    assert row["gpu_gib"] == pytest.approx((2 * P + 14 * T / 8 + 2 * P) / GIB, rel=1e-12)
    assert row["rollout_gib"] == 0.0  # the policy is whole already
    ppo = _row(rl_rows, "ppo", "full", 2, "no", nodes=8)
    assert ppo["models"]["reward_model"]["gpu_gib"] == 2 * S / GIB


def test_lora_reference_is_the_policy_with_adapters_off(rl_rows, mini_counts):
    plain = {(r["nodes"], r["zero_stage"], r["offload"]): r["gpu_gib"] for r in memory_table(mini_counts)
             if r["method"] == "lora"}
    for stage, offload in ((2, "no"), (3, "no"), (3, "all")):
        for nodes in (1, 8):
            row = _row(rl_rows, "grpo, dpo", "lora", stage, offload, nodes)
            # GRPO/DPO with LoRA hold no reference weights: exactly the LoRA fine-tuning row.
            assert list(row["models"]) == ["policy"] and row["gpu_gib"] == plain[(nodes, stage, offload == "all")]
    assert not [r for r in rl_rows if r["method"] == "lora" and r["offload"] == "reference"]
    # PPO's LoRA critic trains its adapters and its head; the reward model holds frozen adapters too.
    ppo = _row(rl_rows, "ppo", "lora", 3, "no")
    assert list(ppo["models"]) == ["policy", "critic", "reward_model"]
    assert ppo["models"]["critic"]["params"] == S + L and ppo["models"]["critic"]["trainable"] == L + 3585
    assert ppo["models"]["reward_model"]["gpu_gib"] == 2 * S / 8 / GIB  # frozen: no adapters on it
    # Tuning an existing adapter further: the reference is a frozen copy of base + adapter.
    tuned = _row(rl_rows, "grpo, dpo", "lora + adapter_init", 3, "no")
    assert tuned["models"]["reference"] == {"params": P + L, "trainable": 0, "gpu_gib": 2 * (P + L) / 8 / GIB,
                                            "cpu_gib_per_node": 0.0}


def test_cli_json_carries_the_rl_rows(capsys):
    assert main(["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| ppo | full | copy | 3 | no | 31.58 | 0.0 | 3.95 | 0.0 |" in lines
    assert "| grpo, dpo | lora | adapters off | 3 | no | 2.01 | 0.0 | 0.25 | 0.0 |" in lines
    report = json.loads(lines[-1])
    assert report["score_counts"]["total"] == S
    # algorithms x (full: 4 settings, lora: 3 (no reference to offload), lora + adapter_init: 4) x nodes
    assert len(report["rl_rows"]) == 2 * (4 + 3 + 4) * 2
    assert {r["algorithm"] for r in report["rl_rows"]} == {"ppo", "grpo, dpo"}

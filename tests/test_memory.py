"""train.memory: the mini shape's counted parameters, the LoRA count, and table cells worked by hand."""
from __future__ import annotations

import json

import pytest

from train.config import LoraConfig
from train.memory import GIB, build_meta_model, count_params, main, model_state_bytes


@pytest.fixture(scope="module")
def mini_counts():
    return count_params(build_meta_model("mini"), LoraConfig(r=16))


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

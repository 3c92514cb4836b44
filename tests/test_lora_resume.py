"""LoRA under ZeRO-2 and ZeRO-3 on two gloo ranks: adapter-only checkpoints that resume exactly, an adapter
that peft loads, and a ZeRO-3 base built partitioned."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from model.checkpoint import load_stepfun
from tests.conftest import REPO, run_cli
from tests.test_lora import base_dir, losses, torchrun  # noqa: F401  (base_dir is a fixture)


@pytest.mark.parametrize("stage", [2, 3])
def test_adapter_only_checkpoint_resumes_exactly(stage, espeak_data, base_dir, tmp_path):  # noqa: F811
    from peft import PeftModel

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(whole, espeak_data, base_dir, f"engine.zero_stage={stage}", "max_steps=6", "checkpoint.keep_last=2")
    step3 = whole / "checkpoints" / "step_00000003"
    torchrun(resumed, espeak_data, base_dir, f"engine.zero_stage={stage}", "max_steps=6",
             f"checkpoint.resume={step3}")
    expected, got = losses(whole), losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == expected[step], f"step {step}"  # bit-exact: the same float
    assert expected[6] < expected[1]

    # The checkpoint holds only the adapters: far smaller than the base, and no base tensor in it.
    ckpt_bytes = sum(p.stat().st_size for p in step3.glob("*_states.pt"))
    base_bytes = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    assert ckpt_bytes < base_bytes / 2
    for states in sorted(step3.glob("*model_states.pt")):
        module = torch.load(states, weights_only=False)["module"]
        # 2 layers x 7 linears x (A, B) + adapter.linear1/2 x (A, B) + the two audio-row deltas.
        assert len(module) == 2 * 7 * 2 + 2 * 2 + 2
        assert all(".lora_" in n or "trainable_tokens_delta" in n for n in module), sorted(module)[:5]

    # Both runs end with the same adapter, and peft loads it onto the base.
    model = PeftModel.from_pretrained(load_stepfun(base_dir), str(resumed / "adapter")).eval()
    again = PeftModel.from_pretrained(load_stepfun(base_dir), str(whole / "adapter")).eval()
    input_ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        out, out_whole = model(input_ids=input_ids).logits, again(input_ids=input_ids).logits
        out_base = load_stepfun(base_dir)(input_ids=input_ids).logits
    torch.testing.assert_close(out, out_whole, rtol=0, atol=1e-6)
    assert (out - out_base).abs().max() > 1e-4


def test_zero3_lora_builds_the_base_partitioned_and_matches_the_plain_model(espeak_data, base_dir, tmp_path):  # noqa: F811
    """Under ZeRO-3 a LoRA run's base is built partitioned and filled tensor by tensor, as full fine-tuning's
    is: never whole on a rank. The most ever whole at once is the largest tensor, or the embedding and lm_head
    together, gathered while peft copies the audio rows out of them; the loss through the engine is the plain
    model's."""
    out = tmp_path / "ranks"
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "tests" / "lora_zero3_ranks.py"), str(base_dir), str(espeak_data["tokenizer"]), str(out),
            timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["whole_after_build"] == []  # every base parameter partitioned
        # One gather per stored tensor, plus the one of both vocabulary matrices for the audio rows.
        assert got["gathers"] == got["base_params"] + 1
        assert got["most_whole"] == max(got["largest"], got["heads_numel"]) < got["base_numel"] / 3
        assert got["zero3_loss"] == pytest.approx(got["plain_loss"], rel=1e-6)
    assert ranks[0]["plain_loss"] == ranks[1]["plain_loss"]

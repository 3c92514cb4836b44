"""Activation checkpointing (model.gradient_checkpointing): the blocks really run again in backward, and
under DeepSpeed ZeRO-2 and ZeRO-3 on two gloo ranks the losses equal those of the same run without it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from data.features import num_audio_tokens
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from tests.conftest import data_overrides, run_cli

STEPS = 3
PATCH = 511  # the tiny preset's <audio_patch>: the last id of its 512-token vocabulary


def asr_batch() -> dict:
    """One sample: two text tokens, one 97-frame chunk's audio patches, five labelled text tokens."""
    gen = torch.Generator().manual_seed(0)
    mels = torch.randn(1, 128, 97, generator=gen)
    text = torch.randint(0, 500, (5,), generator=gen)
    input_ids = torch.cat([torch.tensor([3, 4]), torch.full((num_audio_tokens(97),), PATCH), text])[None]
    labels = torch.full_like(input_ids, -100)
    labels[0, -5:] = text
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, mels=mels,
                mel_lengths=torch.tensor([97]))


@pytest.mark.parametrize("parts", [[], ["encoder"], ["decoder"], ["encoder", "decoder"]])
def test_checkpointed_blocks_run_again_in_backward_with_the_same_gradients(parts):
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(preset_config("tiny"), gradient_checkpointing=parts).train()
    reference = StepAudio2ForCausalLM(preset_config("tiny")).train()
    reference.load_state_dict(model.state_dict())
    calls = {"encoder": 0, "decoder": 0}
    # The first module of a block: the recomputation stops early, once it has rebuilt what backward needs,
    # and transformers checkpoints a decoder layer's forward (its own hooks run once).
    firsts = {"encoder": model.encoder.blocks[0].attn_ln, "decoder": model.model.layers[0].input_layernorm}
    for part, first in firsts.items():
        first.register_forward_pre_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    for m in (model, reference):
        m(**asr_batch()).loss.backward()
    # One forward, plus one recomputation in backward for each checkpointed part.
    assert calls == {p: 2 if p in parts else 1 for p in ("encoder", "decoder")}
    assert torch.equal(model(**asr_batch()).loss, reference(**asr_batch()).loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-5, atol=1e-7), name


# Four runs in one launch (train.loop.run, as a curriculum runs its stages): the imports and the process
# group, most of a tiny run's time, are paid once.
_DRIVER = """
import gc, sys
from train.loop import run
from train.recipe import load_config

root, common = sys.argv[1], sys.argv[2:]
for stage in (2, 3):
    for name, extra in (("plain", []), ("checkpointed", ["model.gradient_checkpointing=[encoder,decoder]"])):
        run(load_config("recipes/demo/asr.yaml", [*common, f"run_dir={root}/zero{stage}-{name}",
                                                  f"engine.zero_stage={stage}", *extra]))
        gc.collect()
"""


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_checkpointing_under_zero2_and_zero3_trains_like_runs_without_it(espeak_data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
            str(tmp_path), *data_overrides(espeak_data), "model.preset=tiny", "data.batch_size=2",
            "data.num_workers=0", "eval.shards=[]", "engine.precision=fp32", "optim.warmup_steps=1",
            f"max_steps={STEPS}", "metrics.log_every=1", "checkpoint.export=false", "checkpoint.every_steps=0",
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=300)
    for stage in (2, 3):
        plain, checkpointed = losses(tmp_path / f"zero{stage}-plain"), losses(tmp_path / f"zero{stage}-checkpointed")
        assert sorted(plain) == sorted(checkpointed) == list(range(1, STEPS + 1)), stage
        for step in plain:
            assert checkpointed[step] == pytest.approx(plain[step], rel=1e-5), f"ZeRO-{stage} step {step}"
        # It trains: the steps after the first apply gradients computed through the recomputation.
        assert plain[STEPS] < plain[1], stage

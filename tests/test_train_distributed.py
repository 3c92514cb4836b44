"""Two ranks on gloo through torchrun: ZeRO-2 and ZeRO-3 train, checkpoint and resume exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import data_overrides, run_cli


def torchrun(run_dir: Path, data: dict, *overrides: str) -> None:
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}", *data_overrides(data),
            "model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "eval.shards=[]",
            "optim.warmup_steps=2", "optim.decay_steps=6", "metrics.log_every=1", "checkpoint.export=false",
            "checkpoint.every_steps=3", *overrides)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp32")])
def test_resume_continues_exactly_like_an_uninterrupted_run(stage, precision, espeak_data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    setup = [f"engine.zero_stage={stage}", f"engine.precision={precision}"]
    torchrun(whole, espeak_data, *setup, "max_steps=6", "checkpoint.export=true")
    torchrun(split, espeak_data, *setup, "max_steps=3")
    assert (split / "checkpoints" / "latest").read_text() == "step_00000003"
    torchrun(split, espeak_data, *setup, "max_steps=6", "checkpoint.export=true")

    expected, got = losses(whole), losses(split)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    # Bit-exact: the same losses and the same final weights as the uninterrupted run.
    assert got == expected
    whole_tensors = load_file(next((whole / "export").glob("model-*.safetensors")))
    split_tensors = load_file(next((split / "export").glob("model-*.safetensors")))
    assert sorted(whole_tensors) == sorted(split_tensors)
    assert [n for n in whole_tensors if not torch.equal(whole_tensors[n], split_tensors[n])] == []
    # The model learns: the loss of the last steps is below the first.
    assert expected[6] < expected[1]
    # keep_last=1 in the demo recipe: only the final checkpoint remains, and latest names it.
    kept = sorted(p.name for p in (split / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000006"]
    assert sorted(p.name for p in (split / "checkpoints" / "step_00000006").glob("rank_*.pt")) == \
        ["rank_00000.pt", "rank_00001.pt"]
    # The export (gathered from all ranks under ZeRO-3) says the dtype its tensors are stored in.
    export = split / "export"
    dtype = json.loads((export / "config.json").read_text())["torch_dtype"]
    assert dtype == {"bf16": "bfloat16", "fp32": "float32"}[precision]
    tensors = load_file(next(export.glob("model-*.safetensors")))
    assert {str(t.dtype) for t in tensors.values()} == {f"torch.{dtype}"}


def test_zero3_run_starts_partitioned_from_a_stepfun_folder(espeak_data, tmp_path):
    # A source export, then a ZeRO-3 run built partitioned from it (never whole on a rank) whose one
    # step at a vanishing learning rate must export the very same tensors.
    source, second = tmp_path / "source", tmp_path / "second"
    torchrun(source, espeak_data, "engine.zero_stage=2", "max_steps=2", "checkpoint.export=true")
    torchrun(second, espeak_data, "engine.zero_stage=3", "max_steps=1", "checkpoint.export=true",
             f"model.init_from={source / 'export'}", "optim.lr=1e-30", "optim.weight_decay=0")
    before = load_file(next((source / "export").glob("model-*.safetensors")))
    after = load_file(next((second / "export").glob("model-*.safetensors")))
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name

"""Resume on another number of ranks: a 2-rank run stops mid-epoch, one rank finishes it, and the
epoch's samples are each trained on exactly once (gloo, ZeRO-0, through torchrun as users start it)."""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import torch

from tests.conftest import data_overrides, run_cli

COMMON = ["model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "data.shuffle_buffer=4",
          "eval.shards=[]", "optim.warmup_steps=2", "metrics.log_every=1", "checkpoint.export=false",
          "checkpoint.every_steps=3", "metrics.sample_keys=true", "engine.zero_stage=0"]


def train(run_dir: Path, data: dict, nproc: int, *overrides: str) -> None:
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}", *data_overrides(data), *COMMON,
            *overrides)


def seen(run_dir: Path) -> collections.Counter:
    """(epoch, key) -> times trained on, over every rank's sample log."""
    counts: collections.Counter = collections.Counter()
    for log in (run_dir / "sample_keys").glob("rank_*.jsonl"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            counts.update(zip(record["epochs"], record["keys"]))
    return counts


def test_two_ranks_stop_mid_epoch_and_one_rank_finishes_it(espeak_data, tmp_path):
    run_dir = tmp_path / "run"
    keys = {json.loads(line)["id"] for line in
            (Path(espeak_data["root"]) / "corpus" / "train.jsonl").read_text().splitlines()}
    assert len(keys) == 24
    # 2 ranks x 3 steps x 2 samples = 12 of the epoch's 24; one rank then needs 6 steps for the other 12.
    train(run_dir, espeak_data, 2, "max_steps=3")
    first = seen(run_dir)
    assert sum(first.values()) == 12 and {e for e, _ in first} == {0}
    train(run_dir, espeak_data, 1, "max_steps=9")
    counts = seen(run_dir)
    epoch0 = {k: n for (e, k), n in counts.items() if e == 0}
    assert set(epoch0) == keys  # none lost
    assert set(epoch0.values()) == {1}  # none twice
    assert sum(counts.values()) == 24
    state = json.loads((run_dir / "checkpoints" / "step_00000009" / "train_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == 9


def universal_state(step_dir: Path, out: Path, name: str) -> dict:
    """A parameter's fp32 weight and Adam moments, whole, from a ZeRO 1-2 checkpoint (DeepSpeed's converter)."""
    if not out.is_dir():
        run_cli(sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
                "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
                "--num_merge_workers", "1")
    return {k: torch.load(out / "zero" / name / f"{k}.pt", weights_only=False)["param"]
            for k in ("fp32", "exp_avg", "exp_avg_sq")}


def test_zero2_checkpoint_of_two_ranks_resumes_on_one_with_its_optimizer_state(espeak_data, tmp_path):
    run_dir = tmp_path / "run"
    # lr 1e-30: the weights stay put, so the moments tell what the optimizer carried over. beta1 = 0.5.
    setup = ["engine.zero_stage=2", "optim.lr=1e-30", "optim.betas=[0.5,0.9]", "checkpoint.keep_last=5",
             "metrics.sample_keys=false"]
    train(run_dir, espeak_data, 2, "max_steps=2", *setup)
    train(run_dir, espeak_data, 1, "max_steps=3", *setup)
    ckpts = run_dir / "checkpoints"
    # Converted once for the resume, by rank 0, beside the checkpoints.
    assert (ckpts / "universal" / "step_00000002" / "zero").is_dir()
    name = "model.embed_tokens.weight"
    before = universal_state(ckpts / "step_00000002", ckpts / "universal" / "step_00000002", name)
    after = universal_state(ckpts / "step_00000003", tmp_path / "u3", name)
    assert torch.equal(before["fp32"], after["fp32"])
    # Rows of tokens that step 3's batch did not hold got no gradient: Adam's first moment is exactly
    # beta1 x what the two ranks left. A fresh optimizer would hold zeros there.
    m2, m3 = before["exp_avg"], after["exp_avg"]
    carried = (m2 != 0).any(dim=1) & torch.all(m3 == 0.5 * m2, dim=1)
    assert int(carried.sum()) >= 10
    assert torch.all(after["exp_avg_sq"][carried] > 0)

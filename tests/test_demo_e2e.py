"""A shortened demo run end to end: espeak corpus -> shards -> training -> WER -> StepFun export."""
from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file

from model.checkpoint import load_stepfun, stepfun_param_names
from tests.conftest import data_overrides, run_cli


def test_short_demo_run_learns_and_exports(espeak_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(sys.executable, "-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}",
                   *data_overrides(espeak_data), "model.preset=tiny", "max_steps=40", "data.batch_size=4",
                   "optim.lr=3e-3", "optim.warmup_steps=5", "metrics.log_every=5", "checkpoint.every_steps=20",
                   "eval.max_samples=3", "eval.max_new_tokens=8")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    wers = {k: v for r in records for k, v in r.items() if k.startswith("eval/wer_")}
    assert set(wers) == {"eval/wer_start", "eval/wer_end"}
    assert "WER" in proc.stderr and "held-out samples" in proc.stderr

    # The export holds exactly StepFun's parameter names and the trained weights of the last checkpoint.
    export = run_dir / "export"
    model = load_stepfun(str(export))
    assert sorted(model.state_dict()) == sorted(stepfun_param_names(model.config))
    trained = torch.load(run_dir / "checkpoints" / "step_00000040" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    exported = {}
    for shard in export.glob("model-*.safetensors"):
        exported.update(load_file(shard))
    assert sorted(exported) == sorted(trained)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name

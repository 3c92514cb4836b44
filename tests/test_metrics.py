"""The metrics sink: JSONL records on rank 0, nothing on other ranks, wandb offline when enabled."""
from __future__ import annotations

import json

from train.config import MetricsConfig
from train.metrics import NullSink, make_sink


def test_rank0_writes_jsonl_and_other_ranks_nothing(tmp_path):
    cfg = MetricsConfig(progress=False)
    sink = make_sink(cfg, str(tmp_path / "r0"), rank=0)
    sink.log(10, {"loss": 1.5, "lr": 1e-3})
    sink.log(20, {"loss": 1.25})
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(10, 1.5), (20, 1.25)]
    other = make_sink(cfg, str(tmp_path / "r1"), rank=1)
    assert type(other) is NullSink
    other.log(10, {"loss": 1.0})
    assert not (tmp_path / "r1").exists()


def test_wandb_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = make_sink(MetricsConfig(progress=False, wandb=True, wandb_project="t"), str(tmp_path), rank=0,
                     run_config={"seed": 3})
    sink.log(1, {"loss": 2.0, "note": "text is kept out of wandb"})
    sink.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0

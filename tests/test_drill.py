"""The fault drill (train.drill): a reduced drill on 2 ranks (a whole-job kill half-way through a checkpoint file,
then one rank killed alone) resumes to an uninterrupted run's exact weights with every sample logged once;
and the drill's own parts: the seeded draw, the order check, the audits that catch a sample or a loss logged
twice and a tensor that differs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train.drill import (KINDS, STAGES, KillPoint, candidates, check_sequence, draw, loss_problems, parse_point,
                         run_drill, sample_key_problems, stage_dir, weight_differences)


def test_a_reduced_drill_resumes_to_the_uninterrupted_weights(espeak_data, tmp_path):
    points = [parse_point("checkpoint:a:6:r0"), parse_point("rank1-only:b:4")]
    tally = run_drill(tmp_path, points, data={"train": espeak_data["train"], "tokenizer": espeak_data["tokenizer"]},
                      via="torchrun", say=lambda text: None)
    summary = json.dumps(tally, indent=1)
    kills = {k["point"]: k for k in tally["points"]}
    # Rank 0's model file of step 6 was cut half-way and the whole job SIGKILLed: the resume falls back to step 3.
    assert kills["checkpoint:a:6:r0"]["exit_code"] == -9 and kills["checkpoint:a:6:r0"]["missed"] is None, summary
    assert kills["checkpoint:a:6:r0"]["resumed"] == "a@3", summary
    # Rank 1 alone, after step 4 of the second stage: torchrun stops rank 0; the resume starts at step 3.
    assert kills["rank1-only:b:4"]["exit_code"] not in (0, -9) and kills["rank1-only:b:4"]["missed"] is None, summary
    assert kills["rank1-only:b:4"]["resumed"] == "b@3", summary
    assert tally["finished"] and tally["left_running"] == 0, summary
    assert tally["equal_runs"] == 1 and tally["weight_problems"] == [], summary  # every tensor torch.equal
    # 2 stages x 8 steps x 2 ranks x 2 samples, each step's samples those of the uninterrupted run.
    assert tally["samples_once"] and tally["samples"] == 64, summary
    assert tally["losses_once_and_equal"], summary  # every step's loss logged once, bit-equal
    assert tally["ok"], summary


def test_a_seed_draws_every_kind_in_the_order_they_land():
    for seed in range(50):
        points = draw(seed, 10)
        assert len(set(points)) == 10 and {p.kind for p in points} == set(KINDS)
        assert points == sorted(points, key=KillPoint.order)
        check_sequence(points)
    assert draw(3, 10) == draw(3, 10) and draw(3, 10) != draw(4, 10)
    assert all(parse_point(p.name) == p for p in candidates())


def test_a_point_the_attempt_before_has_passed_is_refused():
    # The export kill's resume starts at the stage's last checkpoint, after its last step: a second one there
    # would never fire.
    with pytest.raises(ValueError, match="export:a: the attempt before it resumes at stage a step 8"):
        check_sequence([parse_point("export:a")] * 2)
    with pytest.raises(ValueError, match="expected one of"):
        parse_point("mid-step:a:1")  # armed by the step before: step 1 has none


def write_keys(run_dir: Path, repeat_step: int = 0) -> None:
    """Sample-key logs as a run writes them; `repeat_step` logs that step twice on rank 0 (a rolled-back step
    left in the log)."""
    for stage, (_, steps) in enumerate(STAGES):
        for rank in (0, 1):
            records = [{"step": s, "keys": [f"k{stage}-{s}-{rank}-{i}" for i in range(2)], "epochs": [0, 0]}
                       for s in range(1, steps + 1)]
            if rank == 0 and stage == 1 and repeat_step:
                records.insert(repeat_step, records[repeat_step - 1])
            path = stage_dir(run_dir, stage) / "sample_keys" / f"rank_{rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_audit_catches_a_step_logged_twice_and_a_changed_tensor(tmp_path):
    reference, drilled = tmp_path / "reference", tmp_path / "drilled"
    write_keys(reference)
    write_keys(drilled)
    assert sample_key_problems(drilled, reference) == ([], 64)
    write_keys(drilled, repeat_step=1)
    problems, _ = sample_key_problems(drilled, reference)
    assert "stage b rank 0 logged steps [1, 1, 2, 3, 4, 5, 6, 7, 8]" in problems
    assert any("2 samples logged as trained more than once" in p for p in problems)

    for run in (reference, drilled):
        for stage in range(len(STAGES)):
            (stage_dir(run, stage) / "export").mkdir(parents=True)
            save_file({"w": torch.ones(3)}, str(stage_dir(run, stage) / "export" / "model.safetensors"))
    assert weight_differences(drilled, reference) == []
    changed = stage_dir(drilled, 1) / "export" / "model.safetensors"
    save_file({"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}, str(changed))
    assert weight_differences(drilled, reference) == ["stage b: w"]


def test_the_audit_catches_a_loss_logged_twice_or_changed(tmp_path):
    reference, drilled = tmp_path / "reference", tmp_path / "drilled"

    def write_losses(run_dir: Path, steps_b: list, last_loss: float = 0.5) -> None:
        for stage, (_, steps) in enumerate(STAGES):
            logged = steps_b if stage == 1 else list(range(1, steps + 1))
            records = [{"step": s, "loss": last_loss if s == steps else 1.0 / s} for s in logged]
            path = stage_dir(run_dir, stage) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))

    write_losses(reference, list(range(1, 9)))
    write_losses(drilled, list(range(1, 9)))
    assert loss_problems(drilled, reference) == []
    write_losses(drilled, [1, 1, 2, 3, 4, 5, 6, 7, 8])
    assert loss_problems(drilled, reference) == [
        "stage b: metrics.jsonl logs the loss of steps [1, 1, 2, 3, 4, 5, 6, 7, 8]"]
    write_losses(drilled, list(range(1, 9)), last_loss=0.5 + 2**-30)
    assert loss_problems(drilled, reference) == ["stage a: losses differ from the uninterrupted run's at steps [8]",
                                                 "stage b: losses differ from the uninterrupted run's at steps [8]"]

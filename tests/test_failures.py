"""kill -9 of a rank mid-training and mid-save, and a preemption signal: each restart continues from the
last complete checkpoint and ends with exactly the weights of an uninterrupted run (2 ranks, gloo)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from train.preempt import PREEMPTED_EXIT_CODE

MAX_STEPS = 12


def launch_cmd(run_dir: Path, data: dict, *overrides: str) -> list:
    return [sys.executable, "-m", "launch", "--gpus-per-node", "2", "--min-free-gb", "0.1", "recipes/demo/asr.yaml",
            f"run_dir={run_dir}", f"data.shards=[{data['train']}]", f"data.tokenizer={data['tokenizer']}",
            "eval.shards=[]", "model.preset=tiny", "data.batch_size=2", "data.num_workers=1",
            "optim.warmup_steps=2", f"max_steps={MAX_STEPS}", "metrics.log_every=1", "metrics.progress=false",
            "checkpoint.export=false", "checkpoint.every_steps=3", "checkpoint.keep_last=2", *overrides]


def env(fault: str = "") -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    out.pop("STEPAUDIO_FAULT", None)
    return {**out, "STEPAUDIO_FAULT": fault} if fault else out


def launch(run_dir: Path, data: dict, fault: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(run_dir, data), cwd=REPO, env=env(fault), capture_output=True, text=True,
                          timeout=300)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


def records(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def final_weights(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


def assert_same_run(got_dir: Path, want_dir: Path) -> None:
    got, want = final_weights(got_dir), final_weights(want_dir)
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert different == []
    # Every step's loss, the ones before and after each restart, matches the uninterrupted run.
    assert losses(got_dir) == losses(want_dir)


@pytest.fixture(scope="module")
def uninterrupted(espeak_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(run_dir, espeak_data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(losses(run_dir)) == list(range(1, MAX_STEPS + 1))
    assert losses(run_dir)[MAX_STEPS] < losses(run_dir)[1]
    return run_dir


def test_kill9_mid_training_then_mid_save_resumes_to_the_same_weights(espeak_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1 is SIGKILLed after its 5th step: torchrun takes rank 0 down and names the dead rank.
    crashed = launch(run_dir, espeak_data, fault="kill:5:1")
    ended = time.time()
    assert crashed.returncode != 0
    assert "Signal 9 (SIGKILL) received by PID" in crashed.stderr
    assert "rank      : 1 (local_rank: 1)" in crashed.stderr
    assert ended - records(run_dir)[-1]["time"] < 30  # the surviving rank did not hang in a collective
    assert latest(run_dir) == "step_00000003"

    # Rank 1 is SIGKILLed while writing the step-6 checkpoint: the half-written folder is never `latest`.
    crashed = launch(run_dir, espeak_data, fault="kill_in_save:6:1")
    assert crashed.returncode != 0
    assert "resumed from" in crashed.stderr and "at step 3" in crashed.stderr
    assert (run_dir / "checkpoints" / "step_00000006.tmp").is_dir()
    assert latest(run_dir) == "step_00000003"

    done = launch(run_dir, espeak_data)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "at step 3" in done.stderr
    assert latest(run_dir) == f"step_{MAX_STEPS:08d}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000009", "step_00000012"]
    assert_same_run(run_dir, uninterrupted)


def test_preemption_signal_checkpoints_exits_75_and_resumes_to_the_same_weights(espeak_data, uninterrupted,
                                                                                  tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(run_dir, espeak_data), cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what Slurm's --signal=USR1@120 delivers
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-4000:]
    stopped_at = max(losses(run_dir))
    assert 1 <= stopped_at < MAX_STEPS
    # The checkpoint is of the step the run stopped at, not of the last periodic one.
    assert latest(run_dir) == f"step_{stopped_at:08d}"
    assert f"checkpoint at step {stopped_at} written, exiting with 75" in stderr

    done = launch(run_dir, espeak_data)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"at step {stopped_at}" in done.stderr
    assert_same_run(run_dir, uninterrupted)

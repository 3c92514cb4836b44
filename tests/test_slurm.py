"""A real Slurm on this machine (munge, slurmctld, two fake nodes): slurm/train.sbatch trains on 2 nodes x 1
CPU rank, is sent Slurm's preemption signal mid-run, requeues itself, resumes and finishes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
MAX_STEPS = 40

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch")),
    reason="needs Debian packages slurm-wlm and munge (`make system-deps` installs them)")


@pytest.fixture
def slurm(tmp_path):
    state = tmp_path / "slurm"
    subprocess.run([str(CLUSTER), "start", str(state)], check=True, capture_output=True, text=True, timeout=60)
    try:
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], check=True, timeout=60)
        assert not list(state.glob("*.pid")), "a daemon of the test cluster is still running"


def job_info(job: str, env: dict) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout


def test_sbatch_two_nodes_requeues_on_the_signal_and_finishes(slurm, espeak_data, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline"}
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", f"--output={out}", "slurm/train.sbatch", "recipes/demo/asr.yaml",
         f"run_dir={run_dir}", f"data.shards=[{espeak_data['train']}]", f"data.tokenizer={espeak_data['tokenizer']}",
         "eval.shards=[]", "model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "optim.warmup_steps=2",
         f"max_steps={MAX_STEPS}", "metrics.log_every=1", "metrics.progress=false", "checkpoint.export=false",
         "checkpoint.every_steps=10", "--min-free-gb", "0.1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline, f"no training step after 120 s:\n{out.read_text() if out.exists() else ''}"
        time.sleep(0.1)
    # What `--signal=USR1@120` does before the time limit: USR1 to every process of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)

    deadline = time.time() + 150
    while "JobState=COMPLETED" not in (info := job_info(job, env)):
        assert not re.search(r"JobState=(FAILED|CANCELLED|TIMEOUT|NODE_FAIL)", info), out.read_text()[-6000:]
        assert time.time() < deadline, f"job not done after requeue:\n{info}\n{out.read_text()[-6000:]}"
        time.sleep(1)
    log = out.read_text()
    assert "Restarts=1" in info
    assert "start 1 on node[1-2]: 2 node(s) x 1 rank(s)" in log and "start 2 on node[1-2]" in log
    assert "requeueing job" in log
    for node in (0, 1):  # both nodes trained, in both attempts
        assert log.count(f"[launch node {node}] slurm: 2 node(s) x 1 rank(s)") == 2
        assert f"[launch node {node}] preempted" in log and f"[launch node {node}] finished" in log
    stopped_at = int(re.search(r"checkpoint at step (\d+) written", log).group(1))
    assert 1 <= stopped_at < MAX_STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, MAX_STEPS + 1))  # each step once: the resumed run went on where it stopped
    final = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == final.name
    assert sorted(p.name for p in final.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert not list(REPO.glob(".stepaudio2-preempted-*"))

"""slurm/train.sbatch: what it asks Slurm for and hands srun (with a stand-in srun), and on a real Slurm on
this machine (munge, slurmctld, two fake nodes) it trains on 2 nodes x 1 CPU rank, is sent Slurm's
preemption signal mid-run, requeues itself, resumes and finishes."""
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

SBATCH = REPO / "slurm" / "train.sbatch"
needs_slurm = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch")),
    reason="needs Debian packages slurm-wlm and munge (`make test-deps` installs them)")


def test_sbatch_asks_for_the_nodes_cpus_and_hands_them_to_srun(tmp_path):
    header = re.findall(r"^#SBATCH (\S+)$", SBATCH.read_text(), re.M)
    assert "--ntasks-per-node=1" in header and "--cpus-per-task=16" in header
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "gpu[1-3]", "SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "8",
            "STUB_SRUN_ARGS": str(tmp_path / "srun.args")}
    # srun gets the fewest CPUs Slurm gave any node (e.g. whole nodes of two sizes under --exclusive) ...
    for slurm_cpus, cpus in (({"SLURM_JOB_CPUS_PER_NODE": "96(x2),64", "SLURM_CPUS_PER_TASK": "16"}, 64),
                             ({"SLURM_CPUS_PER_TASK": "12"}, 12), ({}, 1)):
        proc = subprocess.run(["bash", str(SBATCH), "recipes/x.yaml", "max_steps=5"], env={**base, **slurm_cpus},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"on gpu[1-3]: 3 node(s) x 8 rank(s), {cpus} CPU(s) per node" in proc.stdout
        # ... explicitly: since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch.
        assert (tmp_path / "srun.args").read_text().splitlines() == [
            "--ntasks-per-node=1", f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1", "--label",
            ".venv/bin/python", "-m", "launch", "--nodes", "3", "--gpus-per-node", "8", "recipes/x.yaml",
            "max_steps=5"]


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


@needs_slurm
def test_sbatch_two_nodes_requeues_on_the_signal_and_finishes(slurm, espeak_data, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    cpus = min(2, len(os.sched_getaffinity(0)))  # each fake node has this machine's CPUs
    env = {**slurm, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline"}
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", f"--cpus-per-task={cpus}", f"--output={out}", "slurm/train.sbatch",
         "recipes/demo/asr.yaml",
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
    assert f"start 1 on node[1-2]: 2 node(s) x 1 rank(s), {cpus} CPU(s) per node" in log
    assert "start 2 on node[1-2]" in log
    assert "requeueing job" in log
    for node in (0, 1):  # both nodes trained, in both attempts
        assert log.count(f"[launch node {node}] slurm: 2 node(s) x 1 rank(s)") == 2
        # srun handed the step the job's CPUs; the test's own OMP_NUM_THREADS=1 is kept.
        assert log.count(f"[launch node {node}] threads: OMP_NUM_THREADS=1 per rank, as set ({cpus} CPU(s) for 1 "
                         f"rank(s) would give {cpus}; from SLURM_CPUS_PER_TASK={cpus})") == 2
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

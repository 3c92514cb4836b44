"""The launcher: Slurm/hostfile layouts, environment checks, and the watchdog of a hung rank."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launch.checks import check_run_dir
from launch.topology import detect, expand_nodelist, read_hostfile
from launch.__main__ import torchrun_command
from tests.conftest import REPO
from train.config import ConfigError, load_config


def test_slurm_nodelists_expand_in_order():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_nodelist("node1") == ["node1"]


def test_slurm_layout_puts_the_master_on_the_first_node_with_a_port_from_the_job_id():
    env = {"SLURM_JOB_NODELIST": "localhost,n2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "1234"}
    topo = detect(None, 8, env=env)
    assert (topo.nodes, topo.node_rank, topo.master_addr, topo.master_port, topo.source) == \
        (2, 1, "localhost", 21234, "slurm")
    cmd = torchrun_command(topo, "/runs/x", ["r.yaml", "max_steps=5"])
    assert cmd[cmd.index("--node-rank") + 1] == "1" and cmd[cmd.index("--nnodes") + 1] == "2"
    assert cmd[cmd.index("--master-addr") + 1] == "localhost" and cmd[-4:] == ["-m", "train", "r.yaml", "max_steps=5"]
    with pytest.raises(ValueError, match=r"--nodes 4 but the slurm layout has 2 nodes"):
        detect(4, 8, env=env)


def test_hostfile_layout_and_its_errors(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nlocalhost slots=8\nother slots=8\n")
    assert read_hostfile(str(hostfile)) == ["localhost", "other"]
    topo = detect(None, 8, hostfile=str(hostfile), node_rank=1, env={})
    assert (topo.nodes, topo.node_rank, topo.master_addr, topo.source) == (2, 1, "localhost", "hostfile")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no hosts"):
        read_hostfile(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"--nodes 2 outside Slurm needs --hostfile"):
        detect(2, 1, env={})


def test_run_dir_check_rejects_too_little_disk_and_unwritable_folders(tmp_path):
    assert check_run_dir(str(tmp_path / "run"), 0.001).startswith("run_dir: ")
    with pytest.raises(ValueError, match=r"GiB free, --min-free-gb asks for 1000000000.0"):
        check_run_dir(str(tmp_path / "run"), 1e9)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        check_run_dir(str(tmp_path / "file" / "run"), 0.001)


def test_resilience_config_is_validated():
    with pytest.raises(ConfigError, match=r"'resilience.preempt_signals' = \['SIGKILL'\]: expected names from"):
        load_config("recipes/demo/asr.yaml", ["resilience.preempt_signals=[SIGKILL]"])
    with pytest.raises(ConfigError, match=r"'resilience.watchdog_s' = -1.0"):
        load_config("recipes/demo/asr.yaml", ["resilience.watchdog_s=-1"])


def test_watchdog_dumps_the_hung_ranks_stack_and_ends_the_job(espeak_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "STEPAUDIO_FAULT": "hang:3:1"}  # rank 1 stops making progress after its 3rd step
    cmd = [sys.executable, "-m", "launch", "--gpus-per-node", "2", "--min-free-gb", "0.1", "recipes/demo/asr.yaml",
           f"run_dir={run_dir}", f"data.shards=[{espeak_data['train']}]", f"data.tokenizer={espeak_data['tokenizer']}",
           "eval.shards=[]", "model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "max_steps=20",
           "metrics.log_every=1", "metrics.progress=false", "checkpoint.export=false", "resilience.watchdog_s=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]
    trace = (run_dir / "watchdog" / "rank_1.txt").read_text()
    # faulthandler's dump of every thread, with the frame the rank hung in.
    assert "Thread 0x" in trace and 'faults.py", line' in trace and "in maybe_fault" in trace
    assert "watchdog: no step progress for 3.0 s; stack traces in" in proc.stderr
    # Rank 1 hung inside step 3, before the loss of step 3 was averaged over the ranks.
    logged = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 2
    assert "exitcode  : 1" in proc.stderr

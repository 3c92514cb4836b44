"""The launcher: Slurm/hostfile layouts, environment checks (GPUs expected but unusable), threads per rank,
and the watchdog of a hung rank."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from launch.checks import (CudaUnavailableError, check_devices, check_run_dir, expect_cuda, nvidia_driver_version,
                           require_cuda_if_expected)
from launch.topology import detect, expand_nodelist, node_cpus, rank_threads, read_hostfile
from launch.__main__ import torchrun_command
from tests.conftest import REPO
from train.recipe import ConfigError, load_config


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


def test_each_rank_gets_the_nodes_cpus_divided_by_its_ranks():
    env, line = rank_threads(2, env={"PATH": "/bin"}, affinity=16)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "8"}
    assert line == "threads: OMP_NUM_THREADS=8 per rank = 16 CPU(s) / 2 rank(s) (from this process's CPU affinity)"
    # Slurm's allotment wins over a wider affinity (no cgroups: the rest of the node belongs to other jobs) ...
    env, line = rank_threads(8, env={"SLURM_CPUS_PER_TASK": "96"}, affinity=224)
    assert env["OMP_NUM_THREADS"] == "12" and line.endswith("= 96 CPU(s) / 8 rank(s) (from SLURM_CPUS_PER_TASK=96)")
    # ... but not over a narrower one (what the cgroup or binding really left us).
    assert node_cpus({"SLURM_CPUS_PER_TASK": "32"}, affinity=8) == \
        (8, "this process's CPU affinity, below SLURM_CPUS_PER_TASK=32")
    assert rank_threads(8, env={"SLURM_CPUS_PER_TASK": "1"}, affinity=64)[0]["OMP_NUM_THREADS"] == "1"  # at least 1
    assert rank_threads(3, env={}, affinity=16)[0]["OMP_NUM_THREADS"] == "5"
    env, line = rank_threads(2, env={"OMP_NUM_THREADS": "3"}, affinity=16)
    assert env["OMP_NUM_THREADS"] == "3"
    assert line == ("threads: OMP_NUM_THREADS=3 per rank, as set (16 CPU(s) for 2 rank(s) would give 8; "
                    "from this process's CPU affinity)")


def test_gpus_are_expected_from_the_setting_slurm_or_the_driver(tmp_path):
    no_device, no_smi = str(tmp_path / "nvidia0"), (lambda name: None)

    def why(env, device=no_device, which=no_smi):
        return expect_cuda(env, nvidia_device=device, which=which)

    assert why({}) is None
    for blank in ({"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"},
                  {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, {"SLURM_GPUS_ON_NODE": "0"}):
        assert why(blank) is None, blank
    assert why({"SLURM_GPUS_ON_NODE": "8"}) == "Slurm gave this job GPUs (SLURM_GPUS_ON_NODE=8)"
    assert why({"SLURM_JOB_GPUS": "0"}) == "Slurm gave this job GPUs (SLURM_JOB_GPUS=0)"  # GPU index 0, not none
    assert why({"SLURM_STEP_GPUS": "2,3"}) == "Slurm gave this job GPUs (SLURM_STEP_GPUS=2,3)"
    assert why({"CUDA_VISIBLE_DEVICES": "0,1"}) == "CUDA_VISIBLE_DEVICES=0,1"
    assert why({}, which=lambda name: f"/usr/bin/{name}") == "nvidia-smi is installed (/usr/bin/nvidia-smi)"
    (tmp_path / "nvidia0").write_text("")
    # A job started without --gpus-per-node on a GPU node: Slurm hid the GPUs, the device file is still there.
    assert why({"CUDA_VISIBLE_DEVICES": ""}) == f"{no_device} exists"
    # The explicit setting wins either way.
    assert why({"STEPAUDIO_DEVICE": "cpu", "SLURM_GPUS_ON_NODE": "8"}) is None
    assert why({"STEPAUDIO_DEVICE": "CUDA"}, device=str(tmp_path / "none")) == "STEPAUDIO_DEVICE=CUDA"
    with pytest.raises(ValueError, match=r"STEPAUDIO_DEVICE='gpu': expected 'cuda', 'cpu', or unset"):
        why({"STEPAUDIO_DEVICE": "gpu"})


def test_the_driver_version_comes_from_the_kernel_module_or_nvidia_smi(tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                       "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert nvidia_driver_version(str(version), which=lambda name: None) == "535.104.05"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build  "
                       "(dvs-builder@U16)  Thu Feb 22 01:25:25 UTC 2024\n")
    assert nvidia_driver_version(str(version), which=lambda name: None) == "550.54.14"
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1 $2" = "--query-gpu=driver_version --format=csv,noheader" ] || exit 9\n'
                   'printf "570.86.15\\n570.86.15\\n"\n')
    smi.chmod(0o755)
    missing = str(tmp_path / "missing")
    assert nvidia_driver_version(missing, which=lambda name: str(smi)) == "570.86.15"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert nvidia_driver_version(missing, which=lambda name: str(smi)) == "unknown"
    assert nvidia_driver_version(missing, which=lambda name: None) == "unknown"


def _no_cuda(monkeypatch, cuda_build, warning=None):
    """torch as on a GPU node whose GPUs it cannot use."""
    def is_available():
        if warning:
            warnings.warn(warning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)


def test_expected_but_unusable_gpus_fail_with_the_reason_the_versions_and_the_fix(tmp_path, monkeypatch):
    device, version = tmp_path / "nvidia0", tmp_path / "version"
    device.write_text("")
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    probe = dict(nvidia_device=str(device), version_file=str(version), which=lambda name: None)
    # An old driver under a torch built for CUDA 13: torch's own warning is passed on.
    _no_cuda(monkeypatch, "13.0", "CUDA initialization: The NVIDIA driver on your system is too old (found version "
             "12020). (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:119.)")
    with pytest.raises(CudaUnavailableError) as error:
        require_cuda_if_expected({"SLURM_GPUS_ON_NODE": "8"}, **probe)
    assert str(error.value) == (
        "GPUs were expected (Slurm gave this job GPUs (SLURM_GPUS_ON_NODE=8)) but CUDA is unusable (torch sees 0 "
        "GPU(s); torch says: CUDA initialization: The NVIDIA driver on your system is too old (found version "
        "12020).); NVIDIA driver 535.104.05, torch built for CUDA 13.0. To fix: the driver is too old: upgrade the "
        "NVIDIA driver to one supporting CUDA 13.0 (>= 580.65.06); give the job GPUs (--gpus-per-node=N to sbatch "
        "or srun); or set STEPAUDIO_DEVICE=cpu to run on CPU on purpose")
    # A driver new enough for CUDA 12: the job most likely has no GPUs.
    _no_cuda(monkeypatch, "12.4")
    with pytest.raises(CudaUnavailableError) as error:
        require_cuda_if_expected({}, **probe)
    assert str(error.value) == (
        f"GPUs were expected ({device} exists) but CUDA is unusable (torch sees 0 GPU(s)); NVIDIA driver 535.104.05, "
        "torch built for CUDA 12.4. To fix: give the job GPUs (--gpus-per-node=N to sbatch or srun); or set "
        "STEPAUDIO_DEVICE=cpu to run on CPU on purpose")
    # No driver to read, and a torch without CUDA.
    _no_cuda(monkeypatch, None)
    with pytest.raises(CudaUnavailableError) as error:
        require_cuda_if_expected({"STEPAUDIO_DEVICE": "cuda"}, nvidia_device=str(tmp_path / "none"),
                                 version_file=str(tmp_path / "none"), which=lambda name: None)
    assert str(error.value) == (
        "GPUs were expected (STEPAUDIO_DEVICE=cuda) but CUDA is unusable (torch sees 0 GPU(s)); NVIDIA driver "
        "unknown, a CPU-only torch build. To fix: install a CUDA build of torch; or set STEPAUDIO_DEVICE=cpu to run "
        "on CPU on purpose")
    # On purpose on CPU, or nothing that promises GPUs: no error.
    assert require_cuda_if_expected({"STEPAUDIO_DEVICE": "cpu", "SLURM_GPUS_ON_NODE": "8"}, **probe) is None
    assert require_cuda_if_expected({}, nvidia_device=str(tmp_path / "none"), which=lambda name: None) is None


def test_this_machine_passes_the_gpu_check_as_it_is():
    # No GPU promised here (the CPU test machines), or one that works: either way the CPU tests run.
    why = require_cuda_if_expected()
    assert why is None or torch.cuda.device_count() > 0


def test_the_launchers_device_check_fails_where_gpus_were_expected(monkeypatch):
    _no_cuda(monkeypatch, "13.0")
    monkeypatch.setenv("STEPAUDIO_DEVICE", "cuda")
    with pytest.raises(CudaUnavailableError, match=r"^GPUs were expected \(STEPAUDIO_DEVICE=cuda\) but CUDA is"):
        check_devices(2)
    monkeypatch.setenv("STEPAUDIO_DEVICE", "cpu")
    assert check_devices(2) == "devices: no CUDA (STEPAUDIO_DEVICE=cpu), 2 CPU process(es) per node on gloo"
    # CPU on purpose while the GPUs work would still train on them: say how to hide them.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError) as error:
        check_devices(2)
    assert str(error.value) == ("STEPAUDIO_DEVICE=cpu, but this node's GPUs work and the ranks would train on them; "
                                "hide them too (CUDA_VISIBLE_DEVICES=) or unset STEPAUDIO_DEVICE")


def test_launch_dry_run_logs_the_devices_and_threads_and_refuses_missing_gpus(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    cmd = [sys.executable, "-m", "launch", "--dry-run", "--gpus-per-node", "2", "--min-free-gb", "0.01",
           "recipes/demo/asr.yaml", f"run_dir={tmp_path / 'run'}"]
    # CUDA_VISIBLE_DEVICES= hides any GPU, so the same holds on a GPU machine.
    env = {**base, "STEPAUDIO_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "", "SLURM_CPUS_PER_TASK": "2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[launch node 0] devices: no CUDA (STEPAUDIO_DEVICE=cpu), 2 CPU process(es) per node on gloo" in proc.stderr
    cpus = min(2, len(os.sched_getaffinity(0)))
    source = "SLURM_CPUS_PER_TASK=2" if cpus == 2 else "this process's CPU affinity, below SLURM_CPUS_PER_TASK=2"
    assert (f"[launch node 0] threads: OMP_NUM_THREADS={max(1, cpus // 2)} per rank = {cpus} CPU(s) / 2 rank(s) "
            f"(from {source})") in proc.stderr
    env["STEPAUDIO_DEVICE"] = "cuda"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "[launch node 0] error: GPUs were expected (STEPAUDIO_DEVICE=cuda) but CUDA is unusable" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr  # no torchrun command: nothing was started


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

"""Environment checks before any rank starts: devices (and whether GPUs were expected), a writable run
folder with free disk, and the network settings a multi-node hang is usually traced to."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Callable, List, Mapping, Optional

DEVICE_ENV = "STEPAUDIO_DEVICE"
NVIDIA_DEVICE = "/dev/nvidia0"
NVIDIA_VERSION_FILE = "/proc/driver/nvidia/version"
# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility table).
MIN_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}

Which = Callable[[str], Optional[str]]


class CudaUnavailableError(RuntimeError):
    """GPUs were expected on this machine, but torch cannot use CUDA."""


def expect_cuda(env: Optional[Mapping[str, str]] = None, nvidia_device: str = NVIDIA_DEVICE,
                which: Which = shutil.which) -> Optional[str]:
    """Why this machine or job should have usable GPUs, or None when it should not.

    STEPAUDIO_DEVICE=cuda or cpu decides; otherwise GPUs are expected when Slurm gave the job some, when
    CUDA_VISIBLE_DEVICES names some, or when the machine has an NVIDIA driver (its device file, or
    nvidia-smi). An empty CUDA_VISIBLE_DEVICES alone does not mean "none on purpose" (a job on a GPU node
    that asked Slurm for no GPUs can see it so: the very mistake this is here to catch); STEPAUDIO_DEVICE=cpu does."""
    env = os.environ if env is None else env
    setting = env.get(DEVICE_ENV, "").strip()
    if setting.lower() == "cuda":
        return f"{DEVICE_ENV}={setting}"
    if setting.lower() == "cpu":
        return None
    if setting:
        raise ValueError(f"{DEVICE_ENV}={setting!r}: expected 'cuda', 'cpu', or unset (detect)")
    count = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if count and count != "0":
        return f"Slurm gave this job GPUs (SLURM_GPUS_ON_NODE={count})"
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(key, "").strip():
            return f"Slurm gave this job GPUs ({key}={env[key].strip()})"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible not in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    if os.path.exists(nvidia_device):
        return f"{nvidia_device} exists"
    smi = which("nvidia-smi")
    if smi:
        return f"nvidia-smi is installed ({smi})"
    return None


def nvidia_driver_version(version_file: str = NVIDIA_VERSION_FILE, which: Which = shutil.which) -> str:
    """The loaded NVIDIA driver's version, from the kernel module or else nvidia-smi; "unknown" if neither."""
    try:
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023"
        match = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", Path(version_file).read_text().split("\n")[0] + " ")
        if match:
            return match.group(1)
    except OSError:
        pass
    smi = which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]  # one line per GPU, all the same driver
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown"


def _version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def require_cuda_if_expected(env: Optional[Mapping[str, str]] = None, nvidia_device: str = NVIDIA_DEVICE,
                             version_file: str = NVIDIA_VERSION_FILE, which: Which = shutil.which) -> Optional[str]:
    """Raises CudaUnavailableError when GPUs were expected (see expect_cuda) and torch cannot use them,
    instead of a run that trains on CPU over gloo; returns why GPUs were expected (None: they were not).

    The message says why GPUs were expected, the driver's version, torch's CUDA build, and what to do."""
    why = expect_cuda(env, nvidia_device, which)
    if why is None:
        return None
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch's "driver too old" warning, even if it was shown before
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 0:
        return why
    driver = nvidia_driver_version(version_file, which)
    give_gpus = "give the job GPUs (--gpus-per-node=N to sbatch or srun)"
    cuda = torch.version.cuda
    if cuda is None:
        build, fixes = "a CPU-only torch build", ["install a CUDA build of torch"]
    else:
        build = f"torch built for CUDA {cuda}"
        needs = MIN_DRIVER.get(cuda.split(".")[0])
        upgrade = f"upgrade the NVIDIA driver to one supporting CUDA {cuda}" + (f" (>= {needs})" if needs else "")
        if driver == "unknown" or not needs:
            fixes = [give_gpus, upgrade]
        elif _version(driver) < _version(needs):
            fixes = [f"the driver is too old: {upgrade}", give_gpus]
        else:  # the driver is new enough for torch's CUDA
            fixes = [give_gpus]
    fixes.append(f"or set {DEVICE_ENV}=cpu to run on CPU on purpose")
    said = "".join(f"; torch says: {str(w.message).split(' (Triggered internally')[0].strip()}"
                   for w in caught if "CUDA" in str(w.message))
    raise CudaUnavailableError(
        f"GPUs were expected ({why}) but CUDA is unusable (torch sees {count} GPU(s){said}); NVIDIA driver "
        f"{driver}, {build}. To fix: {'; '.join(fixes)}")


def check_devices(procs_per_node: int) -> str:
    """On CUDA every rank needs its own GPU; on CPU the ranks are plain processes (gloo), but only where
    no GPUs were expected (see require_cuda_if_expected)."""
    import torch

    why = require_cuda_if_expected()
    on_purpose = why is None and bool(os.environ.get(DEVICE_ENV, "").strip())
    if not torch.cuda.is_available():
        reason = f"{DEVICE_ENV}=cpu" if on_purpose else "no GPUs expected"
        return f"devices: no CUDA ({reason}), {procs_per_node} CPU process(es) per node on gloo"
    if on_purpose:
        raise ValueError(f"{DEVICE_ENV}=cpu, but this node's GPUs work and the ranks would train on them; "
                         f"hide them too (CUDA_VISIBLE_DEVICES=) or unset {DEVICE_ENV}")
    count = torch.cuda.device_count()
    if procs_per_node > count:
        raise ValueError(f"--gpus-per-node {procs_per_node} but this node sees {count} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return f"devices: {count} GPU(s) ({torch.cuda.get_device_name(0)}), using {procs_per_node} per node"


def check_run_dir(run_dir: str, min_free_gb: float) -> str:
    """The run folder must take checkpoints: writable, and min_free_gb free on its disk."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run_dir {run_dir} is not writable: {e}") from None
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < min_free_gb:
        raise ValueError(f"run_dir {run_dir} has {free_gb:.1f} GiB free, --min-free-gb asks for {min_free_gb}")
    return f"run_dir: {path.resolve()} ({free_gb:.0f} GiB free)"


def network_settings() -> List[str]:
    keys = sorted(k for k in os.environ if k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_")))
    # OMP_NUM_THREADS has a line of its own (launch.topology.rank_threads).
    keys += [k for k in ("MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES") if k in os.environ]
    return [f"{k}={os.environ[k]}" for k in keys] or ["no NCCL_*/GLOO_* settings in the environment"]

"""Environment checks before any rank starts: devices, a writable run folder with free disk, and the
network settings a multi-node hang is usually traced to."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List


def check_devices(procs_per_node: int) -> str:
    """On CUDA every rank needs its own GPU; on CPU the ranks are plain processes (gloo)."""
    import torch

    if not torch.cuda.is_available():
        return f"devices: no CUDA, {procs_per_node} CPU process(es) per node on gloo"
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
    keys += [k for k in ("MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if k in os.environ]
    return [f"{k}={os.environ[k]}" for k in keys] or ["no NCCL_*/GLOO_* settings in the environment"]

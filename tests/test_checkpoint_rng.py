"""Every rank's RNG in a training checkpoint: after a resume the streams continue as if never stopped (CPU
here; the CUDA generators through a stand-in torch.cuda), and on another number of ranks they start fresh."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from conftest import FakeEngine
from train.checkpoint import MANIFEST_NAME, Checkpointer
from train.config import CheckpointConfig


def refresh_manifest(folder: Path, *names: str) -> None:
    """After editing a checkpoint on purpose: its manifest names the new contents (else it counts as damage)."""
    import hashlib

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for name in names:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))




def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def save_at_step_3(run_dir, messages=None) -> Checkpointer:
    ckpt = Checkpointer(str(run_dir), CheckpointConfig(resume="auto"), rank=0, world_size=1,
                        log=(messages if messages is not None else []).append)
    ckpt.save(FakeEngine(), 3, {"position": 7}, "max_steps: 3\n", extra={"tokens": 30})
    return ckpt


def resume(run_dir, messages: list) -> dict:
    ckpt = Checkpointer(str(run_dir), CheckpointConfig(resume="auto"), rank=0, world_size=1, log=messages.append)
    state, loader_state = ckpt.load(FakeEngine(), *ckpt.resume_point())
    assert loader_state == {"ranks": [{"position": 7}]}
    return state


def test_after_a_resume_the_cpu_streams_continue_like_an_uninterrupted_run(one_rank_group, tmp_path):
    seed_all(1)
    draws()  # some steps of training
    save_at_step_3(tmp_path)
    uninterrupted = draws()
    seed_all(1)  # the restarted process seeds itself again, as train.loop.run does
    messages: list = []
    assert resume(tmp_path, messages)["step"] == 3
    assert draws() == uninterrupted
    assert messages == []


def test_on_another_number_of_ranks_the_streams_start_fresh(one_rank_group, tmp_path):
    seed_all(1)
    save_at_step_3(tmp_path)
    folder = tmp_path / "checkpoints" / "step_00000003"
    state = json.loads((folder / "train_state.json").read_text())
    (folder / "train_state.json").write_text(json.dumps({**state, "world_size": 2}))
    shutil.copy(folder / "rank_00000.pt", folder / "rank_00001.pt")
    refresh_manifest(folder, "train_state.json", "rank_00001.pt")
    seed_all(5)
    fresh = draws()
    seed_all(5)
    messages: list = []
    resume(tmp_path, messages)
    assert draws() == fresh
    assert messages == [f"{folder} was written by 2 ranks, this run has 1: the RNG streams (dropout etc.) "
                        f"start fresh"]


class FakeCuda:
    """torch.cuda on a machine with `devices` GPUs whose generators are the given byte states."""

    def __init__(self, states):
        self.states, self.set_calls = states, []

    def install(self, monkeypatch, devices: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_calls.append)


def test_the_cuda_generators_are_saved_and_set_back(one_rank_group, tmp_path, monkeypatch):
    saved = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    cuda = FakeCuda(saved)
    cuda.install(monkeypatch, devices=2)
    seed_all(2)
    save_at_step_3(tmp_path)
    on_disk = torch.load(tmp_path / "checkpoints" / "step_00000003" / "rank_00000.pt", weights_only=False)
    assert [t.tolist() for t in on_disk["rng"]["cuda"]] == [list(range(16)), list(range(16, 32))]
    cuda.states = [torch.zeros(16, dtype=torch.uint8)] * 2  # the restarted process's generators
    messages: list = []
    resume(tmp_path, messages)
    assert len(cuda.set_calls) == 1
    assert [t.tolist() for t in cuda.set_calls[0]] == [list(range(16)), list(range(16, 32))]
    assert messages == []


def test_cuda_generators_that_cannot_be_restored_are_named(one_rank_group, tmp_path, monkeypatch):
    cuda = FakeCuda([torch.arange(16, dtype=torch.uint8)] * 2)
    cuda.install(monkeypatch, devices=2)
    save_at_step_3(tmp_path)
    folder = tmp_path / "checkpoints" / "step_00000003"
    cuda.install(monkeypatch, devices=1)
    messages: list = []
    resume(tmp_path, messages)
    assert cuda.set_calls == []
    assert messages == [f"CPU RNG restored from {folder}, CUDA RNG fresh: the checkpoint holds 2 GPUs' "
                        f"generators, this rank sees 1"]
    # A checkpoint written without CUDA, resumed with it.
    rank_file = torch.load(folder / "rank_00000.pt", weights_only=False)
    del rank_file["rng"]["cuda"]
    torch.save(rank_file, folder / "rank_00000.pt")
    refresh_manifest(folder, "rank_00000.pt")
    messages.clear()
    resume(tmp_path, messages)
    assert cuda.set_calls == []
    assert messages == [f"CPU RNG restored from {folder}, CUDA RNG fresh: the checkpoint holds no CUDA "
                        f"generator state (written without CUDA)"]

"""Shared fixtures: a small real corpus spoken by espeak-ng, its tokenizer and shards (built once)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs a project command the way a user does, from the repo root; fails the test with its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(list(args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def espeak_data(tmp_path_factory) -> dict:
    """24 training and 6 held-out sentences spoken by espeak-ng, a tokenizer, and shards of both."""
    root = tmp_path_factory.mktemp("espeak")
    py = sys.executable
    run_cli(py, "-m", "data.tools.demo", str(root / "corpus"), "--num-train", "24", "--num-heldout", "6",
            "--tasks", "asr")
    run_cli(py, "-m", "data.text_tokenizer", "build", "--manifest", str(root / "corpus" / "train.jsonl"),
            "--out", str(root / "tokenizer"), "--vocab-size", "300", "--num-audio-codes", "16")
    run_cli(py, "-m", "data.corpus.prepare", "manifest", str(root / "corpus" / "train.jsonl"), str(root / "train"),
            "--shard-size", "6")
    run_cli(py, "-m", "data.corpus.prepare", "manifest", str(root / "corpus" / "heldout.jsonl"),
            str(root / "heldout"))
    return {"root": root, "tokenizer": root / "tokenizer", "train": root / "train", "heldout": root / "heldout"}


def data_overrides(data: dict) -> list[str]:
    """Points the demo recipe at the fixture's data."""
    return [f"data.shards=[{data['train']}]", f"data.tokenizer={data['tokenizer']}",
            f"eval.shards=[{data['heldout']}]"]


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group (for code that makes collectives), torn down after the test."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeEngine:
    """What train.checkpoint.Checkpointer asks of train.engine.Engine, minus DeepSpeed."""

    def __init__(self):
        self.cfg = SimpleNamespace(engine=SimpleNamespace(zero_stage=0))
        self.module = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"tiny": True}))

    def save(self, folder, tag, client_state):
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(folder) / tag / "mp_rank_00_model_states.pt")

    def load(self, folder, tag, universal=False):
        return torch.load(Path(folder) / tag / "mp_rank_00_model_states.pt", weights_only=True)

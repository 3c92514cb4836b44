"""Training checkpoints: engine state + every rank's loader state and RNG + step and tokens, written atomically.

Layout: RUN_DIR/checkpoints/step_00000100/ (DeepSpeed files, rank_00000.pt ... (RNG), loader.pt (every
rank's loader state, {"ranks": [...]}, so a loader can re-split them), train_state.json (step, tokens, ...),
config.yaml, model_config.json) and RUN_DIR/checkpoints/latest naming the newest complete one. A save goes to
`step_N.tmp` and is renamed only when every rank has written its part, so a crash mid-save leaves the
previous checkpoint as `latest`. `latest` moves only after the folder is verified (every rank's file
present, every .pt a complete archive).

RNG: each rank's file holds its torch CPU, python, numpy and (with CUDA) every visible GPU's generator. A
resume on the same number of ranks restores them, so dropout etc. continue exactly; on another number the
old streams belong to no rank in particular, and the run goes on with fresh ones (the data order is the
loader's and does not depend on them).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from train.config import CheckpointConfig
from train.faults import maybe_fault
from train.rendezvous import run_once_on_rank0


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per visible device
    return state


def _set_rng_state(state: Dict[str, Any]) -> Optional[str]:
    """Restores the generators; returns why the CUDA ones were not restored, or None."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if not torch.cuda.is_available():
        return "this run has no CUDA device" if "cuda" in state else None
    if "cuda" not in state:
        return "the checkpoint holds no CUDA generator state (written without CUDA)"
    if len(state["cuda"]) != torch.cuda.device_count():
        return (f"the checkpoint holds {len(state['cuda'])} GPUs' generators, this rank sees "
                f"{torch.cuda.device_count()}")
    torch.cuda.set_rng_state_all(state["cuda"])
    return None


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: str, cfg: CheckpointConfig, rank: int, world_size: int,
                 log: Callable[[str], None] = _stderr):
        """log: where rank 0 says what a load does not restore (RNG streams); e.g. the metrics sink's message."""
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.log = log

    def resume_point(self) -> Optional[Tuple[Path, str]]:
        """(folder, tag) to resume from per checkpoint.resume, or None to start fresh."""
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            latest = self.root / "latest"
            if not latest.is_file():
                return None
            tag = latest.read_text(encoding="utf-8").strip()
            folder = self.root
        else:
            path = Path(mode)
            folder, tag = path.parent, path.name
        if not (folder / tag / "train_state.json").is_file():
            raise FileNotFoundError(
                f"checkpoint.resume: {folder / tag} is not a complete checkpoint (no train_state.json)")
        return folder, tag

    def save(self, engine, step: int, loader_state: Dict[str, Any], config_yaml: str,
             extra: Optional[Dict[str, Any]] = None) -> Path:
        """Collective. loader_state is this rank's; extra (JSON data: tokens, wall_s ...) goes to train_state.json."""
        tag = f"step_{step:08d}"
        tmp_tag = tag + ".tmp"
        tmp_dir = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a save that crashed
        dist.barrier()
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, loader_state)
        engine.save(str(self.root), tmp_tag, client_state={"step": step})
        torch.save({"rng": _rng_state(), "step": step}, tmp_dir / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save({"ranks": gathered}, tmp_dir / "loader.pt")
        maybe_fault("save", step, self.rank)
        dist.barrier()
        if self.rank == 0:
            _verify(tmp_dir, self.world_size)
            (tmp_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
            # The model's own config.json content, so model.convert needs nothing but this folder.
            (tmp_dir / "model_config.json").write_text(
                json.dumps(engine.module.config.to_dict(), indent=2), encoding="utf-8")
            (tmp_dir / "train_state.json").write_text(
                json.dumps({**(extra or {}), "step": step, "world_size": self.world_size}), encoding="utf-8")
            final = self.root / tag
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp_dir, final)
            _write_atomic(self.root / "latest", tag)
            self._prune()
        dist.barrier()
        return self.root / tag

    def load(self, engine, folder: Path, tag: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Restores engine and RNG; returns (train_state.json's content, the loader state: {"ranks": [...]},
        every rank's, as data.loader's load_state_dict takes it)."""
        state = json.loads((folder / tag / "train_state.json").read_text(encoding="utf-8"))
        old_world = state["world_size"]
        if old_world != self.world_size and engine.cfg.engine.zero_stage in (1, 2):
            # ZeRO 1-2 optimizer state is cut into old_world pieces: DeepSpeed's universal checkpoint holds
            # it per parameter, and any number of ranks loads that.
            universal = self._universal(folder, tag, old_world)
            engine.load(str(universal.parent), universal.name, universal=True)
        elif old_world != self.world_size and engine.cfg.engine.zero_stage == 3:
            raise ValueError(
                f"checkpoint {folder / tag} was written by {old_world} ranks with ZeRO stage 3, this run has "
                f"{self.world_size}: resuming ZeRO-3 on another number of ranks is not supported (ZeRO 0-2 "
                f"checkpoints resume on any number; the data loader re-splits its epoch either way)")
        else:
            engine.load(str(folder), tag)
        mine = torch.load(folder / tag / f"rank_{self.rank % old_world:05d}.pt", weights_only=False)
        if old_world == self.world_size:
            not_cuda = _set_rng_state(mine["rng"])
            if not_cuda is not None and self.rank == 0:
                self.log(f"CPU RNG restored from {folder / tag}, CUDA RNG fresh: {not_cuda}")
        elif self.rank == 0:
            self.log(f"{folder / tag} was written by {old_world} ranks, this run has {self.world_size}: "
                     f"the RNG streams (dropout etc.) start fresh")
        if (folder / tag / "loader.pt").is_file():
            loader_state = torch.load(folder / tag / "loader.pt", weights_only=False)
        else:  # written before loader.pt existed: each rank file held its own rank's state
            loader_state = mine["loader"]
        return state, loader_state

    def _universal(self, folder: Path, tag: str, old_world: int) -> Path:
        """RUN_DIR/checkpoints/universal/<tag>: DeepSpeed's per-parameter form of a ZeRO 1-2 checkpoint,
        converted once by rank 0 (python -m deepspeed.checkpoint.ds_to_universal), then read by every rank.

        The others poll for its DONE marker (train.rendezvous) rather than wait in a barrier: for the 8B
        model the conversion takes longer than a collective may wait."""
        out = self.root / "universal" / tag

        def convert() -> None:
            shutil.rmtree(out, ignore_errors=True)  # converted by a version that wrote no DONE marker
            tmp = out.with_name(tag + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                   "--input_folder", str(folder / tag), "--output_folder", str(tmp),
                                   "--inject_missing_state", "--num_extract_workers", "1",
                                   "--num_merge_workers", "1"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {folder / tag} (written by {old_world} ranks) to DeepSpeed's "
                                   f"universal checkpoint failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            (tmp / "DONE").write_text(tag, encoding="utf-8")
            os.replace(tmp, out)  # DONE appears with the folder, complete

        run_once_on_rank0(out / "DONE", convert, self.rank,
                          f"converting {folder / tag} to DeepSpeed's universal checkpoint",
                          failed=out.with_name(tag + ".FAILED"))
        return out

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / old.name, ignore_errors=True)
            (self.root / "universal" / f"{old.name}.FAILED").unlink(missing_ok=True)


def _verify(folder: Path, world_size: int) -> None:
    """A checkpoint is complete when every rank's file is there and no .pt file is cut short."""
    missing = [f"rank_{r:05d}.pt" for r in range(world_size) if not (folder / f"rank_{r:05d}.pt").is_file()]
    missing += [] if (folder / "loader.pt").is_file() else ["loader.pt"]
    # torch.save writes a zip whose directory sits at the end: a truncated file is not a zip.
    broken = [p.name for p in sorted(folder.rglob("*.pt")) if not zipfile.is_zipfile(p)]
    if missing or broken:
        raise RuntimeError(f"checkpoint {folder} is incomplete (missing {missing}, truncated {broken}); "
                           f"`latest` still names the previous one")

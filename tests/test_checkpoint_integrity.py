"""A damaged newest checkpoint is named and skipped: every file of a checkpoint is in its manifest (size, sha256),
a resume checks it before anything loads, warns naming the file and falls back to the newest complete one;
with none usable it fails naming what is wrong with each. A file of ours that names code to run is refused,
never run. The resumed run's weights and every rank's torch/numpy/python RNG equal an uninterrupted run's.

One real 2-rank ZeRO-2 run (checkpoints at steps 2 and 4) is damaged in copies: the file kinds in-process
(Checkpointer.resume_point on a one-rank group), the fallback and the failure end to end (gloo, 2 ranks)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from train.checkpoint import MANIFEST_NAME, Checkpointer, load_plain, seed_host_generators
from train.config import CheckpointConfig

STEP2, STEP4 = "step_00000002", "step_00000004"


def launch(run_dir: Path, data: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch", "--gpus-per-node", "2", "--min-free-gb", "0.1", "recipes/demo/asr.yaml",
           f"run_dir={run_dir}", f"data.shards=[{data['train']}]", f"data.tokenizer={data['tokenizer']}",
           "eval.shards=[]", "model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "optim.warmup_steps=2",
           "max_steps=4", "metrics.log_every=1", "metrics.progress=false", "checkpoint.export=false",
           "checkpoint.every_steps=2", "checkpoint.keep_last=2", "engine.zero_stage=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("STEPAUDIO_FAULT", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base_run(espeak_data, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at steps 2 and 4, each with its manifest."""
    run_dir = tmp_path_factory.mktemp("integrity") / "base"
    proc = launch(run_dir, espeak_data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [STEP2, STEP4]
    files = {p.name for p in (ckpts / STEP4).iterdir()} - {MANIFEST_NAME}
    assert files == {"config.yaml", "loader.pt", "model_config.json", "mp_rank_00_model_states.pt",
                     "rank_00000.pt", "rank_00001.pt", "train_state.json",
                     "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    manifest = json.loads((ckpts / STEP4 / MANIFEST_NAME).read_text())["files"]
    assert sorted(manifest) == sorted(files)
    assert all(manifest[f]["size"] == (ckpts / STEP4 / f).stat().st_size for f in files)
    return run_dir


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"




def checkpointer(run_dir: Path, messages: list, resume: str = "auto") -> Checkpointer:
    return Checkpointer(str(run_dir), CheckpointConfig(resume=resume), rank=0, world_size=1, log=messages.append)


def truncate(path: Path) -> int:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return len(data) // 2


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(step_dir: Path, name: str, how: str) -> str:
    """Damages one file; returns what the check must say about it."""
    path = step_dir / name
    size = path.stat().st_size
    if how == "delete":
        path.unlink()
        return f"{name} is missing"
    if how == "truncate":
        return f"{name} is {truncate(path)} bytes, the manifest says {size} (cut short or replaced)"
    flip_a_byte(path)
    return f"{name} does not match its sha256 in the manifest (damaged)"


@pytest.mark.parametrize("name,how", [
    ("mp_rank_00_model_states.pt", "delete"),                   # DeepSpeed's model states
    ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncate"),  # rank 1's optimizer shard
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "flip"),
    ("rank_00001.pt", "delete"),                                # a rank's RNG
    ("rank_00000.pt", "truncate"),
    ("loader.pt", "truncate"),                                  # every rank's loader state
    ("train_state.json", "flip"),
    ("config.yaml", "delete"),
    ("model_config.json", "flip"),
])
def test_each_damaged_file_is_named_and_the_previous_checkpoint_is_used(run_copy, one_rank_group, name, how):
    ckpts = run_copy / "checkpoints"
    why = damage(ckpts / STEP4, name, how)
    messages: list = []
    assert checkpointer(run_copy, messages).resume_point() == (ckpts, STEP2)
    assert messages == [f"warning: checkpoint {ckpts / STEP4} is damaged ({why}): resuming from {ckpts / STEP2} "
                        f"instead"]


def test_a_missing_manifest_or_folder_is_named(run_copy, one_rank_group):
    ckpts = run_copy / "checkpoints"
    (ckpts / STEP4 / MANIFEST_NAME).unlink()  # train_state.json says there was one: not taken for an old checkpoint
    messages: list = []
    assert checkpointer(run_copy, messages).resume_point() == (ckpts, STEP2)
    assert messages == [f"warning: checkpoint {ckpts / STEP4} is damaged ({MANIFEST_NAME} is missing): resuming "
                        f"from {ckpts / STEP2} instead"]
    shutil.rmtree(ckpts / STEP4)  # `latest` names a folder that is gone
    messages.clear()
    assert checkpointer(run_copy, messages).resume_point() == (ckpts, STEP2)
    assert messages == [f"warning: checkpoint {ckpts / STEP4} is damaged (the folder does not exist): resuming "
                        f"from {ckpts / STEP2} instead"]


def test_none_usable_fails_naming_each_and_none_at_all_starts_fresh(run_copy, one_rank_group, tmp_path):
    ckpts = run_copy / "checkpoints"
    (ckpts / STEP4 / "loader.pt").unlink()
    flip_a_byte(ckpts / STEP2 / "rank_00000.pt")
    messages: list = []
    with pytest.raises(RuntimeError) as err:
        checkpointer(run_copy, messages).resume_point()
    assert str(err.value) == (
        f"checkpoint.resume=auto: no usable checkpoint ({ckpts / STEP4}: loader.pt is missing; {ckpts / STEP2}: "
        f"rank_00000.pt does not match its sha256 in the manifest (damaged)). Repair or remove them, or set "
        f"checkpoint.resume=none to start from scratch")
    assert messages == []
    # A checkpoint named on purpose is not replaced by another.
    with pytest.raises(RuntimeError) as err:
        checkpointer(run_copy, messages, resume=str(ckpts / STEP4)).resume_point()
    assert str(err.value) == (f"checkpoint.resume={ckpts / STEP4}: no usable checkpoint ({ckpts / STEP4}: "
                              f"loader.pt is missing). Repair or remove them, or set checkpoint.resume=none to "
                              f"start from scratch")
    assert checkpointer(tmp_path / "fresh", messages).resume_point() is None


class Marker:
    """Unpickling it creates a file: what a malicious checkpoint file would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def forge(step_dir: Path, name: str, obj) -> None:
    """Replaces a file with a pickle of obj and fixes its manifest entry, as someone who means it would."""
    torch.save(obj, step_dir / name)
    manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
    manifest["files"][name] = {"size": (step_dir / name).stat().st_size,
                               "sha256": hashlib.sha256((step_dir / name).read_bytes()).hexdigest()}
    (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


REFUSED = ("holds more than tensors and plain data (it names posix.system): refused to unpickle it, as that could "
           "run code")


def test_a_file_that_names_code_is_refused_never_run(run_copy, one_rank_group, tmp_path):
    ckpts, marker = run_copy / "checkpoints", tmp_path / "MARKER"
    forge(ckpts / STEP4, "rank_00001.pt", {"rng": Marker(marker), "step": 4})
    messages: list = []
    assert checkpointer(run_copy, messages).resume_point() == (ckpts, STEP2)
    assert messages == [f"warning: checkpoint {ckpts / STEP4} is damaged (rank_00001.pt {REFUSED}): resuming from "
                        f"{ckpts / STEP2} instead"]
    # Loaded anyway (past the check), the file is refused before DeepSpeed's files are touched.
    forge(ckpts / STEP4, "loader.pt", {"ranks": [Marker(marker)]})
    with pytest.raises(RuntimeError) as err:
        checkpointer(run_copy, messages).load(None, ckpts, STEP4)
    assert str(err.value) == (f"loading checkpoint {ckpts / STEP4} failed: rank 0: ValueError: "
                              f"{ckpts / STEP4 / 'loader.pt'} {REFUSED}")
    assert not marker.exists()


def legacy_rank_file(path: Path) -> None:
    """Rewrites a rank file as written before manifests: numpy's and python's RNG states in their own types."""
    rng = load_plain(path)["rng"]
    numpy_state = rng["numpy"]
    rng["numpy"] = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                    numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    rng["python"] = (rng["python"][0], tuple(rng["python"][1]), rng["python"][2])
    torch.save({"rng": rng, "step": 4}, path)


def test_a_checkpoint_from_before_manifests_is_accepted_with_a_note(run_copy, one_rank_group):
    ckpts = run_copy / "checkpoints"
    step4 = ckpts / STEP4
    (step4 / MANIFEST_NAME).unlink()
    state = json.loads((step4 / "train_state.json").read_text())
    del state["manifest"]
    (step4 / "train_state.json").write_text(json.dumps(state))
    for name in ("rank_00000.pt", "rank_00001.pt"):
        legacy_rank_file(step4 / name)
    messages: list = []
    assert checkpointer(run_copy, messages).resume_point() == (ckpts, STEP4)
    assert messages == [f"note: checkpoint {step4} has no {MANIFEST_NAME} (written before checkpoints carried one): "
                        f"checked that its files are present and complete, not their checksums"]
    (step4 / "rank_00001.pt").unlink()
    messages.clear()
    assert checkpointer(run_copy, messages).resume_point() == (ckpts, STEP2)
    assert messages == [f"warning: checkpoint {step4} is damaged (rank_00001.pt is missing): resuming from "
                        f"{ckpts / STEP2} instead"]


def rank_rng(step_dir: Path, rank: int) -> dict:
    return load_plain(step_dir / f"rank_{rank:05d}.pt")["rng"]


def assert_same_rng(got: dict, want: dict) -> None:
    assert torch.equal(got["torch"], want["torch"])
    assert got["python"] == want["python"]
    assert torch.equal(got["numpy"].pop("keys"), want["numpy"].pop("keys"))
    assert got["numpy"] == want["numpy"]


def test_two_ranks_fall_back_together_and_end_like_the_uninterrupted_run(base_run, run_copy, espeak_data):
    ckpts = run_copy / "checkpoints"
    # Rank 1's own optimizer shard: the rank that used to fail alone while rank 0 had printed "resumed".
    (ckpts / STEP4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    proc = launch(run_copy, espeak_data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (f"[default0]:warning: checkpoint {ckpts / STEP4} is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt "
            f"is missing): resuming from {ckpts / STEP2} instead\n") in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "resumed from" in line] == [
        f"[default0]:resumed from {ckpts / STEP2} at step 2"]
    want_dir, got_dir = base_run / "checkpoints" / STEP4, ckpts / STEP4
    want = torch.load(want_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    got = torch.load(got_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert sorted(got) == sorted(want)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
    for rank in (0, 1):
        assert_same_rng(rank_rng(got_dir, rank), rank_rng(want_dir, rank))


def test_every_generator_is_seeded_per_run_and_rank(base_run):
    """torch from the seed alone (the initial weights match across ranks); python and numpy from (seed, rank),
    which nothing in the training process has drawn from by step 4."""
    step4 = base_run / "checkpoints" / STEP4
    rngs = [rank_rng(step4, rank) for rank in (0, 1)]
    assert torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert rngs[0]["python"] != rngs[1]["python"]
    for rank, rng in enumerate(rngs):
        seed_host_generators(0, rank)  # the recipe's seed
        version, internal, gauss_next = random.getstate()
        assert rng["python"] == [version, list(internal), gauss_next]
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        assert torch.equal(rng["numpy"]["keys"], torch.from_numpy(keys.astype(np.int64)))
        assert (rng["numpy"]["pos"], rng["numpy"]["has_gauss"]) == (pos, has_gauss)


def test_with_no_usable_checkpoint_every_rank_stops_before_loading(run_copy, espeak_data):
    ckpts = run_copy / "checkpoints"
    (ckpts / STEP4 / "rank_00001.pt").unlink()
    truncated = truncate(ckpts / STEP2 / "mp_rank_00_model_states.pt")
    size = json.loads((ckpts / STEP2 / MANIFEST_NAME).read_text())["files"]["mp_rank_00_model_states.pt"]["size"]
    proc = launch(run_copy, espeak_data)
    assert proc.returncode != 0
    error = (f"RuntimeError: checkpoint.resume=auto: no usable checkpoint ({ckpts / STEP4}: rank_00001.pt is "
             f"missing; {ckpts / STEP2}: mp_rank_00_model_states.pt is {truncated} bytes, the manifest says {size} "
             f"(cut short or replaced)). Repair or remove them, or set checkpoint.resume=none to start from scratch")
    for rank in (0, 1):  # each rank's traceback, in its log (RUN_DIR/logs/node_0/RUN/attempt_0/RANK/stderr.log)
        logs = [p.read_text() for p in run_copy.glob(f"logs/node_0/*/attempt_0/{rank}/stderr.log")]
        assert sum(f"[rank{rank}]: {error}\n" in log for log in logs) == 1, proc.stderr[-4000:]
    assert "resumed from" not in proc.stderr
    assert "connection reset" not in proc.stderr.lower()

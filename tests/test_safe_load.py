"""Our checkpoint files (RNG, loader state) and train.export's read of DeepSpeed's stage-0 file load with
weights_only=True: plain data comes back equal, and a file whose pickle names code to run is refused with the
file named, the code never run."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from torch.serialization import get_unsafe_globals_in_checkpoint

from conftest import FakeEngine
from model.config import preset_config
from train.export import main as convert_main
from train.export import read_deepspeed_weights
from train.checkpoint import Checkpointer, load_plain
from train.config import CheckpointConfig


class Marker:
    """Unpickling it creates a file: what a malicious checkpoint file would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def refused(path: Path) -> str:
    return (f"{path} holds more than tensors and plain data (it names posix.system): refused to unpickle it, as "
            f"that could run code")






def test_rng_and_loader_files_hold_plain_data_and_restore_every_generator(one_rank_group, tmp_path):
    loader_state = {"position": 7, "workers": [{"epoch": 1, "taken": [3, 5]}], "skipped": {"too_long": 2}}
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(resume="auto"), rank=0, world_size=1, log=print)
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    np.random.randn()  # a cached gaussian: numpy's state carries it
    step_dir = ckpt.save(FakeEngine(), 3, loader_state, "max_steps: 3\n")
    for name in ("rank_00000.pt", "loader.pt"):
        assert get_unsafe_globals_in_checkpoint(step_dir / name) == []
    want = torch.rand(3).tolist(), random.random(), np.random.randn(2).tolist()
    torch.manual_seed(0)  # the restarted process's own seeding, which the checkpoint's states replace
    random.seed(0)
    np.random.seed(0)
    state, loaded = ckpt.load(FakeEngine(), *ckpt.resume_point())
    assert loaded == {"ranks": [loader_state]}
    assert (torch.rand(3).tolist(), random.random(), np.random.randn(2).tolist()) == want


def test_a_pickle_that_runs_code_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"rng": Marker(marker), "step": 3}, tmp_path / "rank_00001.pt")
    with pytest.raises(ValueError) as err:
        load_plain(tmp_path / "rank_00001.pt")
    assert str(err.value) == refused(tmp_path / "rank_00001.pt")
    assert not marker.exists()


def test_a_rank_file_from_before_manifests_loads_its_numpy_state_only_as_legacy(tmp_path):
    np.random.seed(9)
    numpy_state = np.random.get_state()
    torch.save({"rng": {"numpy": numpy_state, "python": random.getstate()}}, tmp_path / "rank_00000.pt")
    with pytest.raises(ValueError) as err:
        load_plain(tmp_path / "rank_00000.pt")
    assert str(err.value) == (f"{tmp_path / 'rank_00000.pt'} holds more than tensors and plain data (it names "
                              f"numpy._core.multiarray._reconstruct): refused to unpickle it, as that could run code")
    loaded = load_plain(tmp_path / "rank_00000.pt", legacy=True)["rng"]["numpy"]
    assert loaded[0] == "MT19937" and loaded[2:] == numpy_state[2:]
    assert np.array_equal(loaded[1], numpy_state[1])


def stage0_checkpoint(step_dir: Path) -> None:
    """A stage-0 training checkpoint folder as train.export reads it, minus the model states file."""
    step_dir.mkdir(parents=True)
    (step_dir / "train_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (step_dir / "config.yaml").write_text("model:\n  preset: tiny\n")
    config = preset_config("tiny", vocab_size=320, audio_patch_token_id=300)
    (step_dir / "model_config.json").write_text(json.dumps(config.to_dict()))


def test_convert_reads_deepspeed_stage0_weights_with_weights_only(tmp_path):
    step_dir = tmp_path / "step_00000002"
    stage0_checkpoint(step_dir)
    weights = {"lm_head.weight": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor([4])}
    # DeepSpeed pickles its loss scaler object into the optimizer state: a data class, allowed.
    torch.save({"module": weights, "optimizer": {"loss_scaler": LossScaler(2.0)}, "ds_version": "0.19.8"},
               step_dir / "mp_rank_00_model_states.pt")
    got = read_deepspeed_weights(step_dir)
    assert sorted(got) == sorted(weights)
    assert all(torch.equal(got[name], weights[name]) for name in weights)


def test_convert_refuses_a_model_states_file_that_runs_code(tmp_path):
    step_dir, marker = tmp_path / "step_00000002", tmp_path / "MARKER"
    stage0_checkpoint(step_dir)
    states = step_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "optimizer": Marker(marker)}, states)
    with pytest.raises(ValueError) as err:
        read_deepspeed_weights(step_dir)
    assert str(err.value) == refused(states)
    with pytest.raises(SystemExit) as exit_:
        convert_main([str(step_dir), str(tmp_path / "out")])
    assert str(exit_.value) == f"error: {refused(states)}"
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

"""train.gpu_check: what runs without a GPU (the rest runs on a GPU machine; README has its figures)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from train import gpu_check


def test_without_a_gpu_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "train.gpu_check", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": True, "skipped": "no CUDA GPU"}
    assert "no CUDA GPU on this machine: nothing to check here" in proc.stderr


def test_an_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--parts", "kernels,warp"])
    assert e.value.code == 2
    assert "unknown part(s) ['warp']" in capsys.readouterr().err


def test_model_flops_count_matmul_weights_attention_and_audio_frames():
    from model.config import preset_config
    from model.lalm import StepAudio2ForCausalLM

    model = StepAudio2ForCausalLM(preset_config("tiny", vocab_size=128, audio_patch_token_id=127))
    text = model.config.text_config
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = h // text["num_attention_heads"] * text["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    decoder = layers * per_layer + 128 * h  # + lm_head
    encoder = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() >= 2 and n.startswith(("encoder", "adapter")) and "positional" not in n)
    segments, mel_frames = [100, 28], 400
    expected = 3 * (2 * decoder * 128 + sum(2 * 2 * layers * h * n * n / 2 for n in segments)
                    + 2 * encoder * 200)
    assert gpu_check.model_flops_per_step(model, segments, mel_frames) == pytest.approx(expected)


@pytest.fixture(scope="module")
def check_data(tmp_path_factory):
    return gpu_check.prepare_data(tmp_path_factory.mktemp("gpu_check") / "data", num_train=8, num_heldout=4)


def test_kernels_part_on_cpu(check_data):
    """Every batching mode and a text-only batch through sdpa, varlen_sdpa and eager; packed rows equal each
    sample alone."""
    figures = gpu_check.check_kernels(check_data, torch.device("cpu"), torch.float32, preset="tiny")
    assert figures["kernels"] == ["sdpa", "varlen_sdpa", "eager"]
    assert set(figures["losses"]) == {f"{k}/{m}" for k in ("sdpa", "varlen_sdpa", "eager")
                                      for m in ("fixed", "tokens", "packed", "text_only")}
    for mode in ("fixed", "tokens", "packed", "text_only"):
        assert figures["losses"][f"sdpa/{mode}"] == pytest.approx(figures["losses"][f"eager/{mode}"], abs=2e-4)
    assert max(figures["packed_vs_alone"].values()) < 1e-5
    assert figures["auto_fp32"] == "varlen_sdpa"
    assert figures["padding"]["packed"] < figures["padding"]["fixed"]


def test_perf_probe_on_cpu_trains_and_decodes_under_zero3(check_data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train.gpu_check", "--device", "cpu", "--parts", "perf", "--json", "--data",
         str(check_data), "--out", str(tmp_path), "--perf-preset", "tiny", "--perf-vocab", "512",
         "--perf-tokens", "1024", "--perf-layers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    perf = json.loads(proc.stdout.strip().splitlines()[-1])["parts"]["perf"]
    assert perf["ok"] and perf["row_tokens"] == 1024 and perf["layers"] == 1
    assert perf["tokens_per_s"] > 0 and perf["ms_per_generated_token_batch4"] > 0
    assert 0 < perf["loss"] < 20


def test_rl_part_on_cpu(check_data, tmp_path):
    """GRPO and PPO from a saved model through train.loop.run: the first update's ratio 1 and KL 0, finite
    losses, exports. In a process of its own: the runs leave a one-rank process group and its environment."""
    code = ("import json, sys, torch; from pathlib import Path; from train import gpu_check; "
            "f = gpu_check.check_rl(Path(sys.argv[1]), Path(sys.argv[2]), torch.device('cpu'), steps=3, "
            "preset='tiny'); print(json.dumps(f))")
    env = {k: v for k, v in os.environ.items() if k not in gpu_check._GROUP_ENV}
    proc = subprocess.run([sys.executable, "-c", code, str(check_data), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**env, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures) == {"grpo", "ppo"}
    for kind in ("grpo", "ppo"):
        assert figures[kind]["first_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert figures[kind]["first_kl"] == pytest.approx(0.0, abs=1e-6)
        assert 0.0 <= min(figures[kind]["reward"]) and max(figures[kind]["reward"]) <= 1.0
        assert figures[kind]["generation_tokens_per_s"] > 0
        assert (tmp_path / "rl" / kind / "export" / "config.json").is_file()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # this process is left as it was


def test_ranks_part_does_not_hand_this_processs_group_to_its_launcher(tmp_path, monkeypatch):
    # After the train and rl parts this process holds a one-rank group: RANK, WORLD_SIZE, MASTER_PORT, ...
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "43995", "SOME_USER_SETTING": "kept"}.items():
        monkeypatch.setenv(key, value)
    seen = {}

    def launch(args, env, timeout_s):
        seen.update(env)
        raise gpu_check.CheckFailed("stop here")
    monkeypatch.setattr(gpu_check, "_launch", launch)
    with pytest.raises(gpu_check.CheckFailed, match="stop here"):
        gpu_check.check_ranks(tmp_path / "data", tmp_path, 2)
    assert not set(gpu_check._GROUP_ENV) & set(seen)
    assert seen["SOME_USER_SETTING"] == "kept" and seen["OMP_NUM_THREADS"] == "1"

"""The seam between host and device: what the collate counts on the host, what the engine moves, and that
every tensor the step loop and evaluation hand to the model is on the engine's device and in its dtype."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO, data_overrides
from data.loading.batching import collate, collate_packed, packed_cu_seq_lens
from train.engine import model_inputs


def _sample(key: str, n: int, mel_frames: int = 0, patches: int = 0) -> dict:
    ids = list(range(10, 10 + n))
    ids[1:1 + patches] = [99] * patches
    labels = [-100] * (n // 2) + ids[n // 2:]
    mels = [torch.randn(128, mel_frames)] if mel_frames else []
    return {"key": key, "input_ids": ids, "labels": labels, "mels": mels, "num_audio_s": mel_frames / 100}


def test_the_collate_counts_loss_tokens_and_varlen_bounds_on_the_host():
    samples = [_sample("a", 9, 40, 5), _sample("b", 6), _sample("c", 12)]
    fixed = collate(samples, pad_id=0)
    # Targets are labels[:, 1:]: a's 5 labelled of 9 (first label position 4 is a target), b's 3, c's 6.
    assert fixed["num_loss_tokens"] == int((fixed["labels"][:, 1:] != -100).sum()) == 5 + 3 + 6
    assert "cu_seq_lens" not in fixed
    packed = collate_packed([samples[:2], samples[2:]], pad_id=0)
    # Row 0: a (9) + b (6) + 1 pad to 16; row 1: c (12) + 4 pad. Each segment, padding too, is a sequence.
    assert packed["cu_seq_lens"].tolist() == [0, 9, 15, 16, 28, 32]
    assert packed["max_length"] == 12
    assert packed["cu_seq_lens"].dtype == torch.int32
    cu, longest = packed_cu_seq_lens(packed["segment_ids"])
    assert cu.tolist() == packed["cu_seq_lens"].tolist() and longest == 12
    # The packed row drops each sample's first label (predicted across the boundary otherwise).
    assert packed["num_loss_tokens"] == int((packed["labels"][:, 1:] != -100).sum())


def test_model_inputs_put_every_tensor_on_the_device_in_the_compute_dtype():
    samples = [_sample("a", 9, 40, 5), _sample("b", 6)]
    meta = torch.device("meta")  # not the batch's device: every tensor must be moved
    for batch, packed in ((collate(samples, pad_id=0), False), (collate_packed([samples], pad_id=0), True)):
        inputs = model_inputs(batch, meta, torch.bfloat16)
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        expected = {"input_ids", "attention_mask", "labels", "mels", "mel_lengths", "position_ids"}
        expected |= {"segment_ids", "cu_seq_lens"} if packed else set()
        assert set(tensors) == expected
        assert all(t.device == meta for t in tensors.values())
        assert tensors["mels"].dtype == torch.bfloat16
        assert tensors["input_ids"].dtype == torch.long and tensors["mel_lengths"].dtype == torch.long
        # Host-side counts travel as ints: the model needs no sync to learn them.
        assert inputs["num_loss_tokens"] == batch["num_loss_tokens"]
        assert ("max_length" in inputs) == packed
        assert "keys" not in inputs and "num_audio_s" not in inputs


def test_a_known_loss_token_count_gives_the_same_loss_and_a_wrong_one_is_refused():
    from model.config import preset_config
    from model.lalm import StepAudio2ForCausalLM

    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(preset_config("tiny", vocab_size=128, audio_patch_token_id=99)).eval()
    batch = collate([_sample("b", 6), _sample("c", 12)], pad_id=0)
    inputs = model_inputs(batch, torch.device("cpu"), torch.float32)
    counted = model(**{k: v for k, v in inputs.items() if k != "num_loss_tokens"})
    given = model(**inputs)
    assert given.num_label_tokens == counted.num_label_tokens == 9
    assert torch.equal(given.loss, counted.loss)
    try:
        model(**{**inputs, "num_loss_tokens": 8})
    except ValueError as e:
        assert str(e) == "num_loss_tokens=8 but labels hold 9 labelled targets"
    else:
        raise AssertionError("a wrong num_loss_tokens was accepted")


_RECORD_SCRIPT = r"""
import gc, json, sys, weakref
import torch
from model.lalm import StepAudio2ForCausalLM
from train.engine import Engine
from train.loop import run
from train.recipe import load_config

records = []
forward = StepAudio2ForCausalLM.forward

def recording_forward(self, *args, **kwargs):
    dtype = next(self.parameters()).dtype
    for name, value in list(zip(("input_ids",), args)) + list(kwargs.items()):
        if isinstance(value, torch.Tensor):
            records.append({"name": name, "device": str(value.device), "dtype": str(value.dtype),
                            "model_dtype": str(dtype), "training": self.training})
    return forward(self, *args, **kwargs)

StepAudio2ForCausalLM.forward = recording_forward
engines = []
engine_init = Engine.__init__

def keeping_a_weakref(self, *args, **kwargs):
    engine_init(self, *args, **kwargs)
    engines.append(weakref.ref(self.ds))

Engine.__init__ = keeping_a_weakref
cfg = load_config("recipes/demo/asr.yaml", sys.argv[2:] + [f"run_dir={sys.argv[1]}"])
gc.disable()  # what run() frees, it frees itself (Engine.close), not a later collection
run(cfg)
print("ALIVE " + json.dumps([ref() is not None for ref in engines]))
print("RECORDS " + json.dumps(records))
"""


def test_every_tensor_the_loop_and_evaluation_hand_the_model_is_on_its_device_and_run_frees_its_engine(espeak_data, tmp_path):
    overrides = data_overrides(espeak_data) + [
        "model.preset=tiny", "engine.precision=bf16", "max_steps=2", "data.batch_size=4", "data.num_workers=0",
        "eval.max_samples=3", "eval.max_new_tokens=4", "checkpoint.export=false", "metrics.progress=false"]
    proc = subprocess.run([sys.executable, "-c", _RECORD_SCRIPT, str(tmp_path / "run"), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The run's DeepSpeed engine (its optimizer state, on a GPU its memory) is gone once run() returns.
    assert json.loads(proc.stdout.split("ALIVE ", 1)[1].splitlines()[0]) == [False]
    records = json.loads(proc.stdout.split("RECORDS ", 1)[1])
    train_calls = [r for r in records if r["training"]]
    eval_calls = [r for r in records if not r["training"]]
    assert {r["name"] for r in train_calls} >= {"input_ids", "labels", "mels", "mel_lengths", "attention_mask"}
    assert {r["name"] for r in eval_calls} >= {"input_ids", "mels", "mel_lengths"}
    assert all(r["device"] == "cpu" for r in records)  # the engine's device on this machine
    # bf16: the model computes in bf16 and every floating input (mels) arrives in bf16 too.
    floating = [r for r in records if r["dtype"] in ("torch.float32", "torch.bfloat16", "torch.float16")]
    assert floating and all(r["dtype"] == r["model_dtype"] == "torch.bfloat16" for r in floating), floating

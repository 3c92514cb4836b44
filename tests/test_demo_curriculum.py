"""recipes/demo/curriculum.yaml itself, shortened: five stages on a small espeak corpus of every task,
killed inside the third stage and resumed; it ends where an uninterrupted run ends, bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

RECIPE = REPO / "recipes" / "demo" / "curriculum.yaml"
# Steps per stage; the kill lands in stage 2 ("mix") after its step 3, past its checkpoint at step 2.
SHORT = ["model.preset=tiny", "data.num_workers=0", "data.batch_size=4", "checkpoint.every_steps=2",
         "eval.max_samples=2", "eval.max_new_tokens=4", "metrics.log_every=1",
         "stages[0].max_steps=2", "stages[1].max_steps=2", "stages[2].max_steps=4", "stages[3].max_steps=2",
         "stages[4].max_steps=2"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A folder laid out as `make demo-data` lays out runs/demo, at a few samples per task."""
    root = tmp_path_factory.mktemp("demo_curriculum")
    demo, py = root / "runs" / "demo", sys.executable
    run_cli(py, "-m", "data.tools.demo", str(demo / "corpus"), "--num-train", "12", "--num-heldout", "3",
            "--num-tts", "12", "--num-s2tt", "12", "--num-dialogue", "8", "--num-para", "4")
    run_cli(py, "-m", "data.text_tokenizer", "build", "--manifest", str(demo / "corpus" / "texts.jsonl"),
            "--out", str(demo / "tokenizer"), "--vocab-size", "400", "--num-audio-codes", "16")
    for task in ("asr", "tts", "s2tt", "dialogue", "para"):
        fmt = "conversations" if task == "dialogue" else "manifest"
        for split in ("train", "heldout"):
            run_cli(py, "-m", "data.corpus.prepare", fmt, str(demo / "corpus" / task / f"{split}.jsonl"),
                    str(demo / "shards" / task / split), "--workers", "1", "--no-progress")
    run_cli(py, "-m", "data.codes", "fit", str(demo / "shards" / "tts" / "train"), "--num-codes", "16",
            "--out", str(demo / "kmeans.pt"), "--no-progress")
    run_cli(py, "-m", "data.codes", *(str(demo / "shards" / t / s) for t in ("tts", "dialogue")
                                         for s in ("train", "heldout")),
            "--tokenizer", f"kmeans:{demo / 'kmeans.pt'}", "--no-progress")
    return root


def curriculum(root: Path, run_dir: str, fault: str = "") -> subprocess.CompletedProcess:
    """`python -m train recipes/demo/curriculum.yaml` run from `root`, where its relative paths point."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "PYTHONPATH": str(REPO)}
    env.pop("STEPAUDIO_FAULT", None)
    if fault:
        env["STEPAUDIO_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "train", str(RECIPE), f"run_dir={run_dir}", *SHORT],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def export(root: Path, run_dir: str, stage: str) -> dict:
    folder = root / run_dir / "stages" / stage / "export"
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


def test_demo_curriculum_survives_a_kill_in_its_third_stage(demo_root):
    whole = curriculum(demo_root, "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = curriculum(demo_root, "split", fault="kill:3:0")
    assert killed.returncode != 0
    stages = demo_root / "split" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["0-asr", "1-tts", "2-mix"]
    assert not (stages / "2-mix" / "DONE").exists()
    assert (stages / "2-mix" / "checkpoints" / "latest").read_text() == "step_00000002"
    resumed = curriculum(demo_root, "split")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and "step 2" in log

    for stage in ("0-asr", "1-tts", "2-mix", "3-dialogue", "4-para"):
        expected, got = export(demo_root, "whole", stage), export(demo_root, "split", stage)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), stage
    # Stage 1 freezes the encoder: it leaves stage 1 exactly as stage 0 left it; the decoder moved.
    asr, tts = export(demo_root, "whole", "0-asr"), export(demo_root, "whole", "1-tts")
    assert all(torch.equal(asr[k], tts[k]) for k in asr if k.startswith("encoder."))
    assert not torch.equal(asr["model.norm.weight"], tts["model.norm.weight"])

    summary = json.loads((demo_root / "split" / "curriculum.json").read_text())
    stages_run = summary["stages"] if isinstance(summary, dict) else summary
    assert [s["name"] for s in stages_run] == ["asr", "tts", "mix", "dialogue", "para"]
    assert [s["steps"] for s in stages_run] == [2, 2, 4, 2, 2]
    assert [s["metric"] for s in stages_run] == ["wer", "code_accuracy", "bleu", "code_accuracy", "paralinguistic"]
    assert all(0.0 <= s[f"eval_{tag}"] <= 1.0 for s in stages_run[4:] for tag in ("start", "end"))

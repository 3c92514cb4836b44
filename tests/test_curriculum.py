"""The curriculum runner: a tiny three-stage curriculum from Qwen2.5/Qwen2-Audio-shaped parts, killed in its
second stage and run again, ends with exactly the weights of an uninterrupted run; done stages are skipped,
frozen groups stay bit-identical, the vocabulary grows once, lr multipliers reach the optimizer's groups."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from tests.conftest import REPO
from train.config import TrainConfig
from train.curriculum import plan
from train.engine import param_groups
from train.recipe import ConfigError, load_config

torch.set_num_threads(1)
TEXT_ROWS = 300  # the espeak fixture tokenizer's text vocabulary; its added tokens follow
GROWN_ROWS = 512  # init_from_parts rounds the 326-token vocabulary up to a multiple of 512

RECIPE = """
model:
  preset: tiny
  init_parts: {{qwen: {root}/qwen, audio_encoder: {root}/audio}}
data: {{shards: [{train}], tokenizer: {tok}, task: asr, batch_size: 2, num_workers: 0}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
checkpoint: {{every_steps: 2, keep_last: 2}}
metrics: {{log_every: 1, progress: false}}
eval: {{shards: [{heldout}], max_samples: 2, max_new_tokens: 4}}
stages:
  - name: align
    max_steps: 2
    overrides: {{model: {{trainable: [adapter]}}}}
  - name: extend
    max_steps: 4
    lr_multipliers: {{adapter: 2.5, embeddings: 2.5, lm_head: 2.0}}
    overrides:
      model.trainable: [adapter, embeddings, decoder, lm_head]
      optim: {{schedule: wsd, decay_ratio: 0.5}}
  - name: cool
    max_tokens: 500
    overrides:
      model: {{trainable: [adapter, embeddings, decoder, lm_head]}}
      optim: {{lr: 1.0e-3, schedule: linear}}
"""


@pytest.fixture(scope="module")
def recipe(espeak_data, tmp_path_factory) -> Path:
    """The curriculum recipe over the espeak shards, starting from tiny Qwen2 and Qwen2-Audio folders."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("curriculum")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=TEXT_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).save_pretrained(str(root / "qwen"))
    Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=TEXT_ROWS))
    ).save_pretrained(str(root / "audio"))
    path = root / "curriculum.yaml"
    path.write_text(RECIPE.format(root=root, train=espeak_data["train"], tok=espeak_data["tokenizer"],
                                  heldout=espeak_data["heldout"]))
    return path


def train(recipe: Path, run_dir: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("STEPAUDIO_FAULT", None)
    if fault:
        env["STEPAUDIO_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "train", str(recipe), f"run_dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def weights(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(shard))
    assert out, folder
    return out


def metrics(stage_dir: Path) -> list:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_param_groups_carry_the_multipliers_and_leave_frozen_groups_out():
    model = StepAudio2ForCausalLM(preset_config("tiny", vocab_size=64))
    cfg = TrainConfig(lr_multipliers={"adapter": 2.5, "lm_head": 0.5})
    cfg.model.trainable = ["adapter", "decoder", "lm_head"]
    cfg.optim.lr = 1e-3
    groups = param_groups(model, cfg)
    assert {g["name"]: g["lr"] for g in groups} == {
        "adapter.decay": 2.5e-3, "adapter.no_decay": 2.5e-3, "decoder.decay": 1e-3, "decoder.no_decay": 1e-3,
        "lm_head.decay": 5e-4}
    assert {g["name"]: g["weight_decay"] for g in groups}["adapter.no_decay"] == 0.0
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        trains = name.startswith(("adapter.", "model.layers.", "model.norm.", "lm_head."))
        assert p.requires_grad == trains and (id(p) in in_groups) == trains, name


def test_curriculum_kill_resume_skip_freeze_and_vocabulary(recipe, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = train(recipe, whole)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # Killed after step 3 of stage 1 ('align' has 2 steps, so the fault fires in 'extend'); latest: step 2.
    killed = train(recipe, split, fault="kill:3:0")
    assert killed.returncode == -9, killed.stderr[-4000:]
    stages = split / "stages"
    assert (stages / "0-align" / "DONE").is_file() and not (stages / "1-extend" / "DONE").is_file()
    assert (stages / "1-extend" / "checkpoints" / "latest").read_text() == "step_00000002"
    init_files = {p.name: p.stat().st_mtime_ns for p in (stages / "0-align" / "init").iterdir()}

    resumed = train(recipe, split)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage 0 'align' is done" in resumed.stderr and "skipped" in resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    # The vocabulary grew once: the resumed run neither rebuilt nor rewrote the grown init folder.
    assert {p.name: p.stat().st_mtime_ns for p in (stages / "0-align" / "init").iterdir()} == init_files

    for name in ("0-align", "1-extend", "2-cool"):
        got, want = weights(stages / name / "export"), weights(whole / "stages" / name / "export")
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    summary = json.loads((split / "curriculum.json").read_text())
    reference = json.loads((whole / "curriculum.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"] * 3
    assert [s["steps"] for s in summary["stages"]] == [s["steps"] for s in reference["stages"]]
    assert [s["tokens"] for s in summary["stages"]] == [s["tokens"] for s in reference["stages"]]
    assert summary["stages"][2]["eval_end"] == reference["stages"][2]["eval_end"]
    assert all(0 <= s["eval_start"] <= 1.5 and s["metric"] == "wer" and s["wall_s"] > 0 for s in summary["stages"])
    # 'cool' has a token budget: it stopped at the first step that reached 500 tokens.
    cool = [r for r in metrics(stages / "2-cool") if "loss" in r]
    assert cool[-1]["tokens"] >= 500 > cool[-2]["tokens"] and summary["stages"][2]["tokens"] == cool[-1]["tokens"]

    # Frozen groups are bit-identical through a stage; trained ones moved.
    init, align = weights(stages / "0-align" / "init"), weights(stages / "0-align" / "export")
    extend = weights(stages / "1-extend" / "export")
    assert all(torch.equal(align[k], init[k]) for k in init if not k.startswith("adapter.")), "align froze all else"
    assert not torch.equal(align["adapter.linear1.weight"], init["adapter.linear1.weight"])
    assert all(torch.equal(extend[k], align[k]) for k in align if k.startswith("encoder."))
    assert not torch.equal(extend["model.layers.0.mlp.up_proj.weight"], align["model.layers.0.mlp.up_proj.weight"])
    # The grown vocabulary: drawn once in init, carried unchanged through 'align', the same size everywhere.
    for state in (init, align, extend, weights(stages / "2-cool" / "export")):
        assert state["model.embed_tokens.weight"].shape[0] == GROWN_ROWS == state["lm_head.weight"].shape[0]
    assert torch.equal(align["model.embed_tokens.weight"][TEXT_ROWS:], init["model.embed_tokens.weight"][TEXT_ROWS:])
    assert not torch.equal(extend["model.embed_tokens.weight"], align["model.embed_tokens.weight"])

    # lr multipliers in the optimizer's groups; each stage re-warms (warmup 2: step 1 runs at half the peak).
    first = {name: next(r for r in metrics(stages / name) if "loss" in r) for name in ("0-align", "1-extend", "2-cool")}
    assert {k: v for k, v in first["0-align"].items() if k.startswith("lr/")} == {"lr/adapter": 1.5e-3}
    ext = first["1-extend"]
    assert ext["lr"] == 1.5e-3 and ext["lr/decoder"] == 1.5e-3 and "lr/encoder" not in ext
    assert (ext["lr/adapter"], ext["lr/embeddings"], ext["lr/lm_head"]) == pytest.approx((3.75e-3, 3.75e-3, 3e-3))
    assert first["2-cool"]["lr"] == pytest.approx(5e-4)


def test_running_one_stage_needs_its_starting_export(recipe, tmp_path):
    fresh = tmp_path / "fresh"
    cfg = load_config(str(recipe), [f"run_dir={fresh}", "stages=[cool]"])
    with pytest.raises(ConfigError, match=r"stage 'cool' \(stages\[2\]\) starts from the export of stage 'extend' "
                                          r"\(.*fresh/stages/1-extend/export\), which is not complete"):
        plan(cfg)
    given = load_config(str(recipe), [f"run_dir={fresh}", "stages=[cool]", "model.init_parts.qwen=null",
                                      "model.init_parts.audio_encoder=null", "model.init_from=/models/x"])
    plans = plan(given)
    assert [p.selected for p in plans] == [False, False, True]
    assert plans[2].cfg.model.init_from == "/models/x"
    # All stages: stage 1 starts from stage 0's export, stage 0 from the parts.
    chained = plan(load_config(str(recipe), [f"run_dir={fresh}"]))
    assert chained[1].cfg.model.init_from == str(fresh / "stages" / "0-align" / "export")
    assert chained[0].cfg.model.init_from is None and chained[0].cfg.model.init_parts.qwen

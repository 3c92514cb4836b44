"""LoRA: adapters train on a frozen base under ZeRO 0-3, adapter-only checkpoints resume exactly, peft loads
the adapter, and train.merge_lora writes a StepFun export equal to base + adapter."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.text_tokenizer import load_tokenizer, special_ids
from model.checkpoint import load_stepfun, save_stepfun, stepfun_param_names
from model.config import padded_vocab_size, preset_config
from model.lalm import StepAudio2ForCausalLM
from tests.conftest import data_overrides, run_cli
from train.config import LoraConfig
from train.lora import apply_lora, audio_rows
from train.recipe import ConfigError, load_config


@pytest.fixture(scope="module")
def base_dir(espeak_data, tmp_path_factory) -> Path:
    """A tiny base model in StepFun's layout, sized to the espeak tokenizer (random weights)."""
    tok = load_tokenizer(str(espeak_data["tokenizer"]))
    ids = special_ids(tok)
    torch.manual_seed(1)
    config = preset_config("tiny", vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    model = StepAudio2ForCausalLM(config)
    return save_stepfun(model.state_dict(), config, tmp_path_factory.mktemp("base") / "base", tokenizer=tok)


def torchrun(run_dir: Path, data: dict, base: Path, *overrides: str, nproc: int = 2):
    return run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}", *data_overrides(data),
                   "model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "eval.shards=[]",
                   "optim.lr=1e-2", "optim.warmup_steps=2", "optim.decay_steps=6", "metrics.log_every=1",
                   "checkpoint.every_steps=3", "lora.enabled=true", f"lora.init_from={base}", "lora.r=4",
                   "lora.adapter=true", "lora.train_audio_rows=true", *overrides)


def losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def lora_model(base: Path, cfg: LoraConfig, seed: int = 0) -> StepAudio2ForCausalLM:
    """The base with LoRA applied and every adapter tensor set to small random values (as if trained)."""
    model = load_stepfun(base)
    tok = load_tokenizer(str(base))
    ids = special_ids(tok)
    apply_lora(model, cfg, audio_rows(ids.first_audio_code, ids.num_audio_codes))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_config_rejects_lora_without_a_base_and_unknown_layers():
    with pytest.raises(ConfigError, match=r"config key 'lora.init_from' = None: expected the StepFun-layout"):
        load_config("recipes/demo/asr.yaml", ["lora.enabled=true"])
    with pytest.raises(ConfigError, match=r"config key 'lora.target_modules' = \['qkv'\]: expected names from"):
        load_config("recipes/demo/asr.yaml", ["lora.enabled=true", "lora.init_from=x", "lora.target_modules=[qkv]"])
    with pytest.raises(ConfigError, match=r"config key 'model.init_from' = 'y': expected unset when lora.enabled"):
        load_config("recipes/demo/asr.yaml", ["lora.enabled=true", "lora.init_from=x", "model.init_from=y"])


def test_lora_targets_the_decoder_linears_and_only_adapters_train(base_dir):
    model = lora_model(base_dir, LoraConfig(enabled=True, r=4, adapter=True, train_audio_rows=True))
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    expected = [f"model.layers.{i}.{kind}" for i in range(2) for kind in (
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
        "self_attn.q_proj", "self_attn.v_proj")]
    assert wrapped == sorted(["adapter.linear1", "adapter.linear2"] + expected)
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    # 16 audio codes + the audio pad: 17 rows of hidden 64 in each of the embeddings and lm_head.
    assert trainable["model.embed_tokens.token_adapter.trainable_tokens_delta.default"] == (17, 64)
    assert trainable["lm_head.token_adapter.trainable_tokens_delta.default"] == (17, 64)
    assert trainable["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (4, 64)


@pytest.mark.parametrize("audio_rows_on", [True, False])
def test_peft_loads_our_adapter_and_merge_writes_stepfun_layout(audio_rows_on, base_dir, tmp_path):
    from peft import PeftModel

    from train.lora import save_adapter

    cfg = LoraConfig(enabled=True, r=4, adapter=True, train_audio_rows=audio_rows_on, init_from=str(base_dir))
    ours = lora_model(base_dir, cfg)
    save_adapter(ours, ours.state_dict(), tmp_path / "adapter")
    input_ids = torch.randint(0, ours.config.vocab_size - 1, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = logits(ours, input_ids)
    base_logits = logits(load_stepfun(base_dir).eval(), input_ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes the output

    by_peft = PeftModel.from_pretrained(load_stepfun(base_dir), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(by_peft, input_ids), expected, rtol=0, atol=1e-5)

    run_cli(sys.executable, "-m", "train.merge_lora", str(base_dir), str(tmp_path / "adapter"),
            str(tmp_path / "merged"))
    merged = load_stepfun(tmp_path / "merged").eval()
    assert sorted(merged.state_dict()) == sorted(stepfun_param_names(merged.config))
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)

    base_t, merged_t = load_file(next(base_dir.glob("model-*.safetensors"))), \
        load_file(next((tmp_path / "merged").glob("model-*.safetensors")))
    tok = load_tokenizer(str(base_dir))
    rows = audio_rows(special_ids(tok).first_audio_code, special_ids(tok).num_audio_codes)
    text = torch.ones(merged.config.vocab_size, dtype=torch.bool)
    text[rows] = False
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged_t[name][text], base_t[name][text]), name
        assert torch.equal(merged_t[name][rows], base_t[name][rows]) is (not audio_rows_on), name
    lora_targets = ("_proj.weight", "adapter.linear1.weight", "adapter.linear2.weight")
    frozen = [n for n in base_t if not n.endswith(lora_targets) and n not in ("model.embed_tokens.weight",
                                                                            "lm_head.weight")]
    assert "encoder.conv1.weight" in frozen and "model.layers.0.self_attn.q_proj.bias" in frozen
    for name in frozen:
        assert torch.equal(merged_t[name], base_t[name]), name
    changed = [n for n in base_t if n.endswith(lora_targets) and not torch.equal(merged_t[n], base_t[n])]
    assert len(changed) == 2 * 7 + 2
    # The tokenizer and config of the base travel with the merged folder.
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()


def test_zero0_single_process_run_trains_only_the_adapter(espeak_data, base_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(sys.executable, "-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}", *data_overrides(espeak_data),
            "data.batch_size=2", "data.num_workers=0", "eval.shards=[]", "optim.lr=1e-2", "optim.warmup_steps=1",
            "metrics.log_every=1", "max_steps=5", "engine.zero_stage=0", "lora.enabled=true",
            f"lora.init_from={base_dir}", "lora.r=4")
    loss = losses(run_dir)
    assert sorted(loss) == [1, 2, 3, 4, 5] and loss[5] < loss[1]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32 and config["base_model_name_or_path"] == str(base_dir)
    assert config["trainable_token_indices"] is None
    assert len(adapter) == 2 * 7 * 2 and all(n.startswith("base_model.model.model.layers.") for n in adapter)
    # LoRA's B starts at zero: a nonzero B means the optimizer moved it.
    assert all(t.abs().max() > 0 for n, t in adapter.items() if ".lora_B." in n)
    assert not (run_dir / "export").exists()

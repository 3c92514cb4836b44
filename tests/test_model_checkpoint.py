"""Model folders in StepFun's layout: names, sharding, exact round trips and strict-load errors."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model.checkpoint import load_stepfun, save_stepfun, stepfun_param_names
from model.config import preset_config
from model.hf import AUTO_MAP
from model.lalm import StepAudio2ForCausalLM

torch.set_num_threads(1)
PATCH = 511


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return StepAudio2ForCausalLM(preset_config("tiny")).eval()


def prompt():
    mels = torch.randn(1, 128, 60, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 4] + [PATCH] * 7 + [8, 9]])  # 60 frames -> 7 audio tokens
    return ids, mels, torch.tensor([60])


def test_parameter_names_are_stepfuns(tiny):
    assert list(tiny.state_dict()) == stepfun_param_names(tiny.config)
    mini = stepfun_param_names(preset_config("mini"))
    assert len(mini) == 5 + 32 * 15 + 2 + 6 + 1 + 28 * 12 + 2
    assert "encoder.blocks.31.attn.key.weight" in mini and "encoder.blocks.0.attn.key.bias" not in mini
    assert "model.layers.27.self_attn.o_proj.weight" in mini and "model.layers.0.self_attn.o_proj.bias" not in mini


def test_save_then_load_is_exact(tiny, tmp_path):
    out = save_stepfun(tiny.state_dict(), tiny.config, tmp_path / "export")
    assert sorted(os.listdir(tmp_path)) == ["export"]  # the temporary folder was renamed away
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(stepfun_param_names(tiny.config))
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tiny.state_dict().values())
    # Our Hugging Face remote code is named in config.json (see tests/test_hf_auto.py).
    assert json.loads((out / "config.json").read_text()) == {**tiny.config.to_dict(), "auto_map": AUTO_MAP}

    loaded = load_stepfun(out).eval()
    assert loaded.state_dict().keys() == tiny.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))
    assert not loaded.encoder.positional_embedding.weight.requires_grad
    ids, mels, lengths = prompt()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mels=mels, mel_lengths=lengths).logits,
                           tiny(ids, mels=mels, mel_lengths=lengths).logits)
    assert load_stepfun(out, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_small_shard_limit_gives_several_shards_that_cover_every_tensor(tiny, tmp_path):
    out = save_stepfun(tiny.state_dict(), tiny.config, tmp_path / "export", max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    seen = {}
    for shard in shards:
        for name in safetensors.torch.load_file(str(out / shard)):
            seen[name] = shard
    assert seen == index["weight_map"]
    loaded = load_stepfun(out)
    assert torch.equal(loaded.model.embed_tokens.weight, tiny.model.embed_tokens.weight)


def test_saving_over_an_export_replaces_it(tiny, tmp_path):
    save_stepfun(tiny.state_dict(), tiny.config, tmp_path / "export", max_shard_bytes=300_000)
    save_stepfun(tiny.state_dict(), tiny.config, tmp_path / "export")
    assert sorted(os.listdir(tmp_path / "export")) == [
        "config.json", "configuration_step_audio_2.py", "generation_config.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "modeling_step_audio_2.py"]
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_strict_load_names_removed_and_added_tensors(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["adapter.linear1.bias"]
    out = save_stepfun(state, tiny.config, tmp_path / "removed")
    with pytest.raises(ValueError) as err:
        load_stepfun(out)
    assert str(err.value) == (f"checkpoint {out} does not match the model: missing tensors "
                              "['adapter.linear1.bias'], unexpected tensors []")

    state = dict(tiny.state_dict())
    state["encoder.blocks.0.attn.key.bias"] = torch.zeros(32)
    out = save_stepfun(state, tiny.config, tmp_path / "added")
    with pytest.raises(ValueError) as err:
        load_stepfun(out)
    assert str(err.value) == (f"checkpoint {out} does not match the model: missing tensors [], "
                              "unexpected tensors ['encoder.blocks.0.attn.key.bias']")


def test_shape_mismatch_and_missing_files_are_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["model.norm.weight"] = torch.ones(65)
    out = save_stepfun(state, tiny.config, tmp_path / "shape")
    with pytest.raises(ValueError) as err:
        load_stepfun(out)
    assert str(err.value) == (f"tensor 'model.norm.weight' has shape (65,) in "
                              f"{out / 'model-00001-of-00001.safetensors'}, the model expects (64,)")
    (out / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"has no model.safetensors.index.json$"):
        load_stepfun(out)
    (out / "config.json").unlink()
    with pytest.raises(ValueError) as err:
        load_stepfun(out)
    assert str(err.value) == f"model folder {out} has no config.json"


def test_tokenizer_is_saved_beside_the_weights(tiny, tmp_path):
    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<audio_patch>": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    out = save_stepfun(tiny.state_dict(), tiny.config, tmp_path / "export", tokenizer=tokenizer)
    again = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert again("hello world <audio_patch> moon")["input_ids"] == [1, 2, 3, 0]

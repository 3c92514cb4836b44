"""Model folders in StepFun's layout: config.json, safetensors shards + index, tokenizer files.

Saving goes through a temporary sibling folder renamed into place; loading is strict about names and shapes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import safetensors.torch
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from model.config import StepAudio2Config
from model.lalm import StepAudio2ForCausalLM

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"

_ENCODER_BLOCK = ("attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.value.weight",
                  "attn.value.bias", "attn.out.weight", "attn.out.bias", "attn_ln.weight", "attn_ln.bias",
                  "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp_ln.weight", "mlp_ln.bias")
_DECODER_LAYER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                  "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def stepfun_param_names(config: StepAudio2Config) -> List[str]:
    """Every tensor name of a StepFun checkpoint of this config, in model order."""
    names = ["encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias",
             "encoder.positional_embedding.weight"]
    for i in range(config.audio_encoder_config.n_audio_layer):
        names += [f"encoder.blocks.{i}.{suffix}" for suffix in _ENCODER_BLOCK]
    names += ["encoder.after_norm.weight", "encoder.after_norm.bias"]
    names += [f"adapter.{layer}.{p}" for layer in ("conv", "linear1", "linear2") for p in ("weight", "bias")]
    names.append("model.embed_tokens.weight")
    for i in range(int(config.text_config["num_hidden_layers"])):
        names += [f"model.layers.{i}.{suffix}" for suffix in _DECODER_LAYER]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def _shard_plan(tensors: Dict[str, torch.Tensor], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _standalone_cpu(tensor: torch.Tensor, seen_storages: set) -> torch.Tensor:
    # safetensors refuses views and tensors sharing storage (tied or sliced weights): copy those only,
    # so an 8B export does not hold a second full copy in memory.
    tensor = tensor.to("cpu")
    storage = tensor.untyped_storage()
    whole = tensor.is_contiguous() and storage.nbytes() == tensor.numel() * tensor.element_size()
    if whole and storage.data_ptr() not in seen_storages:
        seen_storages.add(storage.data_ptr())
        return tensor
    return tensor.contiguous().clone()


def save_stepfun(state_dict: Dict[str, torch.Tensor], config: StepAudio2Config, out_dir: Union[str, Path],
                 tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a complete model folder at out_dir (replacing one that is there) and return its path."""
    out_dir = Path(out_dir)
    tensors = {name: t.detach() for name, t in state_dict.items()}
    shards = _shard_plan(tensors, max_shard_bytes)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    weight_map: Dict[str, str] = {}
    seen: set = set()
    for i, names in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file({n: _standalone_cpu(tensors[n], seen) for n in names},
                                    str(tmp_dir / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in names})
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tmp_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp_dir))
    old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old_dir)
    os.rename(tmp_dir, out_dir)
    if old_dir.exists():
        shutil.rmtree(old_dir)
    return out_dir


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"model folder {path.parent} has no {path.name}")
    with open(path) as f:
        return json.load(f)


def load_stepfun(path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device] = "cpu") -> StepAudio2ForCausalLM:
    """Build the model on the meta device and assign the folder's tensors to it, strictly.

    dtype=None keeps the stored dtypes.
    """
    path = Path(path)
    config = StepAudio2Config.from_dict(_read_json(path / CONFIG_NAME))
    weight_map = _read_json(path / INDEX_NAME).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / INDEX_NAME} has no 'weight_map' mapping")
    with torch.device("meta"):
        model = StepAudio2ForCausalLM(config)
    expected = model.state_dict()
    missing = [n for n in expected if n not in weight_map]
    unexpected = sorted(n for n in weight_map if n not in expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing tensors {missing}, "
                         f"unexpected tensors {unexpected}")
    state: Dict[str, torch.Tensor] = {}
    for file_name in sorted(set(weight_map.values())):
        if not (path / file_name).is_file():
            raise ValueError(f"model folder {path} has no {file_name} (named in {INDEX_NAME})")
        shard = safetensors.torch.load_file(str(path / file_name), device=str(device))
        for name, tensor in shard.items():
            if weight_map.get(name) != file_name:
                raise ValueError(f"{path / file_name} holds tensor '{name}', which {INDEX_NAME} maps to "
                                 f"{weight_map.get(name)}")
            if tensor.shape != expected[name].shape:
                raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)} in {path / file_name}, "
                                 f"the model expects {tuple(expected[name].shape)}")
            state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    absent = [n for n in expected if n not in state]
    if absent:
        raise ValueError(f"checkpoint {path} does not match the model: missing tensors {absent}")
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE frequencies) are not in the checkpoint; rebuild them off the meta device.
    with torch.device(device):
        model.model.rotary_emb = Qwen2RotaryEmbedding(config=model.model.config)
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left_on_meta, left_on_meta
    return model

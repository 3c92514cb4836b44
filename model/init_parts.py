"""A fresh Step-Audio 2 from parts: a Qwen2.5 decoder folder, a Qwen2-Audio encoder folder, a new adapter.

The decoder's vocabulary grows to the extended tokenizer's; rows past the text tokens (new tokens, and
Qwen's untrained padding rows) are drawn from the per-dimension mean and std of the text rows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import safetensors
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from model.config import ADAPTER_HIDDEN, AudioEncoderConfig, StepAudio2Config, padded_vocab_size, preset_config
from model.encoder import Adaptor
from model.lalm import StepAudio2ForCausalLM

# Qwen2AudioEncoder name (after the folder's prefix) -> ours under "encoder.". {i} is a layer index.
ENCODER_NAMES = {
    "conv1.weight": "conv1.weight", "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight", "conv2.bias": "conv2.bias",
    "embed_positions.weight": "positional_embedding.weight",
    "layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.query.weight",
    "layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.query.bias",
    "layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.key.weight",
    "layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.value.weight",
    "layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.value.bias",
    "layers.{i}.self_attn.out_proj.weight": "blocks.{i}.attn.out.weight",
    "layers.{i}.self_attn.out_proj.bias": "blocks.{i}.attn.out.bias",
    "layers.{i}.self_attn_layer_norm.weight": "blocks.{i}.attn_ln.weight",
    "layers.{i}.self_attn_layer_norm.bias": "blocks.{i}.attn_ln.bias",
    "layers.{i}.fc1.weight": "blocks.{i}.mlp.0.weight", "layers.{i}.fc1.bias": "blocks.{i}.mlp.0.bias",
    "layers.{i}.fc2.weight": "blocks.{i}.mlp.2.weight", "layers.{i}.fc2.bias": "blocks.{i}.mlp.2.bias",
    "layers.{i}.final_layer_norm.weight": "blocks.{i}.mlp_ln.weight",
    "layers.{i}.final_layer_norm.bias": "blocks.{i}.mlp_ln.bias",
    "layer_norm.weight": "after_norm.weight", "layer_norm.bias": "after_norm.bias",
}
# How a full Qwen2AudioForConditionalGeneration folder (or a bare encoder's) prefixes encoder names.
ENCODER_PREFIXES = ("audio_tower.", "model.audio_tower.", "")
# Keys of a Qwen2 config.json that describe the file, not the network.
_NOT_TEXT_CONFIG = ("architectures", "torch_dtype", "dtype", "transformers_version", "auto_map", "_name_or_path")
# The release's 158720 rows are its 158258 tokens rounded up to a multiple of this.
VOCAB_MULTIPLE = 512


def _read_config(folder: Path) -> Dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"model folder {folder} has no config.json")
    return json.loads(path.read_text())


def read_safetensors_folder(folder: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Every tensor of a transformers folder: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"model folder {folder} has neither model.safetensors nor model.safetensors.index.json")
    tensors: Dict[str, torch.Tensor] = {}
    for name in files:
        with safetensors.safe_open(str(folder / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _audio_config(audio_dir: Path, llm_dim: int) -> AudioEncoderConfig:
    raw = _read_config(audio_dir)
    enc = raw.get("audio_config", raw)
    d_model = enc.get("d_model", 1280)
    if enc.get("encoder_ffn_dim", 4 * d_model) != 4 * d_model or enc.get("activation_function", "gelu") != "gelu":
        raise ValueError(f"{audio_dir}/config.json: the encoder must have encoder_ffn_dim = 4 * d_model and "
                         f"activation_function gelu, got {enc.get('encoder_ffn_dim')} and "
                         f"{enc.get('activation_function')}")
    return AudioEncoderConfig(n_mels=enc.get("num_mel_bins", 128), n_audio_ctx=enc.get("max_source_positions", 1500),
                              n_audio_state=d_model, n_audio_head=enc.get("encoder_attention_heads", 20),
                              n_audio_layer=enc.get("encoder_layers", 32), llm_dim=llm_dim)


def parts_config(qwen_dir: Union[str, Path], audio_dir: Union[str, Path], vocab_size: int,
                 audio_patch_token_id: int) -> StepAudio2Config:
    """The config the two folders describe, with the decoder's vocabulary set to vocab_size."""
    text = {k: v for k, v in _read_config(Path(qwen_dir)).items() if k not in _NOT_TEXT_CONFIG}
    text.update(model_type="qwen2", vocab_size=vocab_size, tie_word_embeddings=False)
    audio = _audio_config(Path(audio_dir), int(text["hidden_size"]))
    return StepAudio2Config(audio_encoder_config=audio, text_config=text, audio_patch_token_id=audio_patch_token_id)


def map_encoder_names(tensors: Dict[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Our "encoder.*" tensors from a Qwen2-Audio state dict (its other tensors are ignored)."""
    for prefix in ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in tensors:
            break
    else:
        raise ValueError(f"no Qwen2-Audio encoder tensors found (looked for conv1.weight under prefixes "
                         f"{list(ENCODER_PREFIXES)})")
    wanted = {}
    for theirs, ours in ENCODER_NAMES.items():
        for i in range(num_layers) if "{i}" in theirs else [None]:
            wanted[prefix + theirs.format(i=i)] = "encoder." + ours.format(i=i)
    missing = [k for k in wanted if k not in tensors]
    pattern = re.compile(re.escape(prefix) + r"(conv|embed_positions|layers|layer_norm)")
    unused = sorted(k for k in tensors if pattern.match(k) and k not in wanted)
    if missing or unused:
        raise ValueError(f"the Qwen2-Audio encoder does not match the config: missing tensors {missing}, "
                         f"unmapped tensors {unused}")
    return {ours: tensors[theirs] for theirs, ours in wanted.items()}


def grow_rows(weight_VH: torch.Tensor, num_kept: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Rows [0, num_kept) of weight, then rows drawn from N(mean, std) of those rows, per dimension."""
    kept = weight_VH[:num_kept].float()
    mean_H, std_H = kept.mean(dim=0), kept.std(dim=0)
    new = mean_H + std_H * torch.randn(num_rows - num_kept, kept.shape[1], generator=generator)
    return torch.cat([weight_VH[:num_kept], new.to(weight_VH.dtype)])


def init_from_parts(qwen_dir: Union[str, Path], audio_dir: Union[str, Path], tokenizer: Any,
                    config: Union[str, StepAudio2Config, None] = None, dtype: Optional[torch.dtype] = None,
                    seed: int = 0) -> StepAudio2ForCausalLM:
    """Step-Audio 2 with Qwen2.5's decoder, Qwen2-Audio's encoder and a fresh adapter, sized to `tokenizer`.

    tokenizer: a Qwen2 tokenizer extended with data.text_tokenizer.extend_qwen2_tokenizer (rows below its first
    added id are the decoder's text rows). config: None derives the sizes from the folders (vocabulary:
    the tokenizer rounded up to 512, 158720 for the release's layout); a preset name or a config is checked
    against the folders. dtype: None keeps the decoder's stored dtype. Built on the meta device, so the
    weights are in memory once.
    """
    from data.text_tokenizer import first_extension_id, special_ids

    qwen_dir, audio_dir = Path(qwen_dir), Path(audio_dir)
    patch_id = special_ids(tokenizer).audio_patch
    vocab_size = padded_vocab_size(len(tokenizer), VOCAB_MULTIPLE)
    derived = parts_config(qwen_dir, audio_dir, vocab_size, patch_id)
    if config is None:
        config = derived
    else:
        if isinstance(config, str):
            config = preset_config(config, vocab_size=vocab_size, audio_patch_token_id=patch_id)
        _check_sizes(config, derived)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"config vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")

    decoder = read_safetensors_folder(qwen_dir)
    if "lm_head.weight" not in decoder:  # tied embeddings (the small Qwen2.5 sizes) store one matrix
        decoder["lm_head.weight"] = decoder["model.embed_tokens.weight"]
    num_text_rows = first_extension_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if decoder[name].shape[0] < num_text_rows:
            raise ValueError(f"{qwen_dir}: {name} has {decoder[name].shape[0]} rows, fewer than the tokenizer's "
                             f"{num_text_rows} text tokens")
        decoder[name] = grow_rows(decoder[name], num_text_rows, config.vocab_size, gen)
    state = {k: v for k, v in decoder.items() if k.startswith(("model.", "lm_head."))}
    state.update(map_encoder_names(read_safetensors_folder(audio_dir), config.audio_encoder_config.n_audio_layer))
    enc = config.audio_encoder_config
    torch.manual_seed(seed)
    adapter = Adaptor(enc.n_audio_state, enc.llm_dim, enc.kernel_size, enc.adapter_stride, ADAPTER_HIDDEN)
    state.update({f"adapter.{k}": v for k, v in adapter.state_dict().items()})
    dtype = dtype or decoder["model.embed_tokens.weight"].dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    config.torch_dtype = str(dtype).replace("torch.", "")

    with torch.device("meta"):
        model = StepAudio2ForCausalLM(config)
    expected = model.state_dict()
    missing = [n for n in expected if n not in state]
    unexpected = sorted(n for n in state if n not in expected)
    wrong = [f"{n} {tuple(state[n].shape)} != {tuple(t.shape)}" for n, t in expected.items()
             if n in state and state[n].shape != t.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the parts do not fill the model: missing tensors {missing}, unexpected tensors "
                         f"{unexpected}, shape mismatches {wrong}")
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=model.model.config)
    return model


def _check_sizes(config: StepAudio2Config, derived: StepAudio2Config) -> None:
    checks = {f"audio_encoder_config.{k}": (getattr(config.audio_encoder_config, k),
                                            getattr(derived.audio_encoder_config, k))
              for k in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "llm_dim")}
    checks.update({f"text_config.{k}": (config.text_config.get(k), derived.text_config.get(k))
                   for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads")})
    for key, (want, have) in checks.items():
        if want != have:
            raise ValueError(f"config {key}={want} but the part folders have {have}")

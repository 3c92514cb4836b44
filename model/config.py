"""Configuration of the Step-Audio 2 model: the dataclasses behind config.json and the named presets.

A loaded config.json keeps every key it had (known or not), so load -> save reproduces it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from data.vocab import AUDIO_PATCH, REFERENCE_EOS_IDS, REFERENCE_IDS, REFERENCE_VOCAB_SIZE

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

# The released config has no key for this; its code writes audio features after <audio_start> (151688),
# i.e. at the <audio_patch> rows our templates emit.
REFERENCE_AUDIO_PATCH_TOKEN_ID = REFERENCE_IDS[AUDIO_PATCH]
MODEL_TYPE = "step_audio_2"
ARCHITECTURES = ["StepAudio2ForCausalLM"]
# The adapter's hidden width is a literal in the released code, not a config key.
ADAPTER_HIDDEN = 2048
# Without these a config.json would silently build a model of the wrong shape from Qwen2's defaults.
REQUIRED_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads")


# Every text_config key StepFun's config class reads. It asserts num_attention_groups == num_key_value_heads
# and defaults absent keys to values of its own (4 groups, 8192 positions, ...), not Qwen2's: an export
# writes them all (see StepAudio2Config.to_dict). It also adds 151643, 151645, 151665 to any eos_token_id.
STEPFUN_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_attention_groups", "num_key_value_heads", "hidden_act", "max_position_embeddings",
                     "initializer_range", "rms_norm_eps", "rope_theta", "rope_scaling", "eos_token_id")
# StepFun's default for num_attention_groups: a config without the key is read with 4 key/value groups.
STEPFUN_DEFAULT_ATTENTION_GROUPS = 4


def _text_config(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 max_positions: int, rope_theta: float, eos_token_ids: Optional[List[int]]) -> Dict[str, Any]:
    text = {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_attention_groups": kv_heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
            "max_position_embeddings": max_positions, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
            "rope_theta": rope_theta, "rope_scaling": None, "tie_word_embeddings": False,
            "use_sliding_window": False, "attention_dropout": 0.0}
    if eos_token_ids is not None:
        text["eos_token_id"] = list(eos_token_ids)
    return text


def _reference_text_config() -> Dict[str, Any]:
    return _text_config(REFERENCE_VOCAB_SIZE, 3584, 18944, 28, 28, 4, 16384, 1e6, list(REFERENCE_EOS_IDS))


def stepfun_text_config(text: Dict[str, Any], complete: bool) -> Dict[str, Any]:
    """text_config as StepFun's code must read it to build the decoder ours builds (a copy).

    complete=True writes every key of STEPFUN_TEXT_KEYS our decoder has a value for (Qwen2's default where
    the dict has none); complete=False (a config read from a file, whose keys are kept as they were) adds only
    num_attention_groups, and only where StepFun's default of 4 would not match the key/value heads.
    """
    text = copy.deepcopy(dict(text))
    qwen = Qwen2Config(**{k: v for k, v in text.items() if k != "model_type"})
    kv_heads = qwen.num_key_value_heads
    if "num_attention_groups" not in text and (complete or kv_heads != STEPFUN_DEFAULT_ATTENTION_GROUPS):
        text["num_attention_groups"] = kv_heads
    if not complete:
        return text
    rope = dict(qwen.rope_parameters or {})
    effective = {"num_key_value_heads": kv_heads, "hidden_act": qwen.hidden_act,
                 "max_position_embeddings": qwen.max_position_embeddings,
                 "initializer_range": qwen.initializer_range, "rms_norm_eps": qwen.rms_norm_eps,
                 "rope_theta": rope.get("rope_theta")}
    for key, value in effective.items():
        text.setdefault(key, value)
    if "rope_scaling" not in text and "rope_parameters" not in text:
        text["rope_scaling"] = None  # plain RoPE: StepFun's default too, written so both read the same
    return text


@dataclass
class AudioEncoderConfig:
    """Audio encoder (Whisper-large-v3 shape in the release) and adapter sizes."""

    n_mels: int = 128
    """Mel bins of the input features."""
    n_audio_ctx: int = 1500
    """Rows of the positional embedding: the most encoder frames (50 Hz, after conv2) one chunk may have."""
    n_audio_state: int = 1280
    """Encoder width."""
    n_audio_head: int = 20
    """Encoder attention heads."""
    n_audio_layer: int = 32
    """Encoder residual attention blocks."""
    llm_dim: int = 3584
    """Adapter output width; must equal the decoder's hidden_size."""
    kernel_size: int = 3
    """Kernel of the adapter's downsampling conv (padding is fixed at 1)."""
    adapter_stride: int = 2
    """Stride of the adapter's downsampling conv: 25 Hz encoder frames -> 12.5 Hz audio tokens."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Keys of a loaded audio_encoder_config this code does not use, kept so a save writes them back."""


@dataclass
class StepAudio2Config:
    """The whole model: encoder + adapter sizes, the Qwen2 decoder's kwargs, and the audio patch id."""

    audio_encoder_config: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    """Encoder and adapter sizes."""
    text_config: Dict[str, Any] = field(default_factory=_reference_text_config)
    """Keyword arguments of transformers.Qwen2Config, as config.json stores them (default: the release's)."""
    audio_patch_token_id: int = REFERENCE_AUDIO_PATCH_TOKEN_ID
    """Token id whose embedding rows receive the adapter outputs, in order."""
    torch_dtype: str = "bfloat16"
    """Dtype the weights are stored in (config.json's torch_dtype)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Top-level config.json keys this code does not use (model_type, architectures, ...), kept verbatim."""
    json_keys: List[str] = field(default_factory=list)
    """Top-level keys of the config.json this was read from, in order (empty for a built config): a save
    writes exactly these keys (plus audio_patch_token_id once it differs from the reference), so an
    export has the source's keys and no others."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for a config that cannot build a working model."""
        missing = [k for k in REQUIRED_TEXT_KEYS if k not in self.text_config]
        if missing:
            raise ValueError(f"text_config is missing required key(s) {missing}")
        hidden = self.text_config["hidden_size"]
        if self.audio_encoder_config.llm_dim != hidden:
            raise ValueError(f"audio_encoder_config.llm_dim={self.audio_encoder_config.llm_dim} must equal "
                             f"text_config.hidden_size={hidden}")
        vocab = self.text_config["vocab_size"]
        if not 0 <= self.audio_patch_token_id < vocab:
            raise ValueError(f"audio_patch_token_id={self.audio_patch_token_id} is outside the vocabulary "
                             f"[0, {vocab})")
        groups, kv_heads = self.text_config.get("num_attention_groups"), self.qwen2_config().num_key_value_heads
        if groups is not None and groups != kv_heads:
            raise ValueError(f"text_config.num_attention_groups={groups} must equal num_key_value_heads={kv_heads} "
                             f"(StepFun's config asserts it)")
        enc = self.audio_encoder_config
        if enc.n_audio_state % enc.n_audio_head:
            raise ValueError(f"audio_encoder_config.n_audio_state={enc.n_audio_state} is not divisible by "
                             f"n_audio_head={enc.n_audio_head}")

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    def qwen2_config(self, attn_implementation: str = "sdpa") -> Qwen2Config:
        """The decoder's transformers config with the given attention kernel (see model.lalm.resolve_attention)."""
        kwargs = copy.deepcopy(dict(self.text_config))
        kwargs.pop("model_type", None)
        kwargs["attn_implementation"] = attn_implementation
        return Qwen2Config(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """config.json content in StepFun's layout."""
        enc = self.audio_encoder_config
        audio = {f.name: getattr(enc, f.name) for f in fields(enc) if f.name != "extra"}
        audio.update(copy.deepcopy(dict(enc.extra)))
        out: Dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": list(ARCHITECTURES)}
        out.update(copy.deepcopy(dict(self.extra)))
        out["audio_encoder_config"] = audio
        out["text_config"] = stepfun_text_config(self.text_config, complete=not self.json_keys)
        # Newer transformers write the dtype as "dtype"; keep whichever name the source used.
        dtype_key = "dtype" if "dtype" in self.json_keys and "torch_dtype" not in self.json_keys else "torch_dtype"
        out[dtype_key] = self.torch_dtype
        if self.audio_patch_token_id != REFERENCE_AUDIO_PATCH_TOKEN_ID or "audio_patch_token_id" in self.json_keys:
            out["audio_patch_token_id"] = self.audio_patch_token_id
        if not self.json_keys:
            return out
        ordered = {k: out.pop(k) for k in self.json_keys if k in out}
        if "audio_patch_token_id" in out:
            ordered["audio_patch_token_id"] = out.pop("audio_patch_token_id")
        return ordered

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "StepAudio2Config":
        """Parse config.json content; a missing required key raises ValueError naming it."""
        for key in ("audio_encoder_config", "text_config"):
            if key not in d:
                raise ValueError(f"config is missing required key '{key}'")
            if not isinstance(d[key], dict):
                raise ValueError(f"config key '{key}' must be a mapping, got {type(d[key]).__name__}")
        audio_in = dict(d["audio_encoder_config"])
        known = [f.name for f in fields(AudioEncoderConfig) if f.name != "extra"]
        for key in known:
            if key not in audio_in:
                raise ValueError(f"config is missing required key 'audio_encoder_config.{key}'")
        audio = AudioEncoderConfig(**{k: audio_in.pop(k) for k in known}, extra=audio_in)
        rest = {k: v for k, v in d.items()
                if k not in ("audio_encoder_config", "text_config", "torch_dtype", "dtype", "audio_patch_token_id")}
        return cls(audio_encoder_config=audio, text_config=copy.deepcopy(dict(d["text_config"])),
                   audio_patch_token_id=int(d.get("audio_patch_token_id", REFERENCE_AUDIO_PATCH_TOKEN_ID)),
                   torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16"))), extra=copy.deepcopy(rest),
                   json_keys=list(d))


# name -> (encoder state, heads, layers; decoder hidden, intermediate, layers, heads, kv heads,
#          max positions, rope theta; default vocab, dtype)
_PRESETS = {
    "tiny": (32, 2, 2, 64, 128, 2, 4, 2, 2048, 10000.0, 512, "float32"),
    "demo": (256, 4, 4, 256, 768, 4, 4, 2, 2048, 10000.0, 1024, "float32"),
    "mini": (1280, 20, 32, 3584, 18944, 28, 28, 4, 16384, 1e6, REFERENCE_VOCAB_SIZE, "bfloat16"),
}


def padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """The embedding rows for a tokenizer of `num_tokens`: rounded up to a multiple (matmul-friendly shapes;
    the rows past the tokenizer are never produced by it). Built from Qwen parts the multiple is 512."""
    if num_tokens < 1 or multiple < 1:
        raise ValueError(f"padded_vocab_size({num_tokens}, {multiple}): expected positive numbers")
    return -(-num_tokens // multiple) * multiple


def preset_config(name: str, vocab_size: Optional[int] = None, audio_patch_token_id: Optional[int] = None,
                  eos_token_ids: Optional[List[int]] = None) -> StepAudio2Config:
    """A named model size: "tiny" (tests), "demo" (CPU ASR in minutes) or "mini" (the release's shape).

    The small presets put <audio_patch> at the last id unless told otherwise; "mini" uses 151690.
    eos_token_ids: text_config's eos_token_id (default: the release's list for "mini", none for the small
    presets, whose tokenizer an export takes them from: see model.checkpoint.save_stepfun).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset '{name}'; valid presets: {sorted(_PRESETS)}")
    (state, head, layer, hidden, inter, n_layers, heads, kv, max_pos, theta, default_vocab,
     dtype) = _PRESETS[name]
    vocab = default_vocab if vocab_size is None else vocab_size
    if audio_patch_token_id is None:
        audio_patch_token_id = REFERENCE_AUDIO_PATCH_TOKEN_ID if name == "mini" else vocab - 1
    audio = AudioEncoderConfig(n_mels=128, n_audio_ctx=1500, n_audio_state=state, n_audio_head=head,
                               n_audio_layer=layer, llm_dim=hidden, kernel_size=3, adapter_stride=2)
    if eos_token_ids is None and name == "mini":
        eos_token_ids = list(REFERENCE_EOS_IDS)
    text = _text_config(vocab, hidden, inter, n_layers, heads, kv, max_pos, theta, eos_token_ids)
    return StepAudio2Config(audio_encoder_config=audio, text_config=text,
                            audio_patch_token_id=audio_patch_token_id, torch_dtype=dtype)

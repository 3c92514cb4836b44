"""LoRA as a transform: peft adapters put into a built model from outside, and the adapter's peft files.

The model keeps its class and attribute names (peft's inject_adapter_in_model, not a PeftModel wrapper),
so the loop, evaluation and generation treat it like any model. Audio-token rows of the embeddings and
lm_head train through peft's trainable tokens: a small [rows, hidden] delta beside a frozen base, so the
text rows cannot move (no weight decay or optimizer state touches them) and the adapter file stays small.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from train.config import LoraConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel.from_pretrained expects the names a PeftModel wrapper gives: this prefix on ours.
PEFT_PREFIX = "base_model.model."


def target_regex(cfg: LoraConfig) -> str:
    """The module names LoRA wraps, as one regex peft matches against whole names."""
    parts = []
    if cfg.target_modules:
        parts.append(r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(cfg.target_modules) + ")")
    if cfg.adapter:
        parts.append(r"adapter\.(linear1|linear2)")
    return "(" + "|".join(parts) + ")"


def audio_rows(first_audio_code: int, num_audio_codes: int) -> List[int]:
    """Ids of <audio_0> .. <audio_N> (the last one is the audio pad)."""
    return list(range(first_audio_code, first_audio_code + num_audio_codes + 1))


def peft_config(cfg: LoraConfig, audio_token_ids: Optional[List[int]] = None):
    """peft's LoraConfig for our model; audio_token_ids is needed when cfg.train_audio_rows."""
    import peft

    trainable_tokens = None
    if cfg.train_audio_rows:
        if not audio_token_ids:
            raise ValueError("lora.train_audio_rows=true needs the tokenizer's audio code ids; none were given")
        trainable_tokens = {"embed_tokens": list(audio_token_ids), "lm_head": list(audio_token_ids)}
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=target_regex(cfg), trainable_token_indices=trainable_tokens,
                           base_model_name_or_path=cfg.init_from)


def apply_lora(model: torch.nn.Module, cfg: LoraConfig,
               audio_token_ids: Optional[List[int]] = None) -> torch.nn.Module:
    """Puts LoRA (and the trainable audio rows) into model in place; only those parameters require grad."""
    import peft

    model = peft.inject_adapter_in_model(peft_config(cfg, audio_token_ids), model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora: no layer matched target_modules={cfg.target_modules} adapter={cfg.adapter}")
    return model


def adapter_state_dict(model: torch.nn.Module, full_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapter's tensors out of a LoRA model's full state dict, under the names peft's files use."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=full_state, save_embedding_layers=False)
    return {PEFT_PREFIX + name: t.detach().cpu().contiguous() for name, t in state.items()}


def save_adapter(model: torch.nn.Module, full_state: Dict[str, torch.Tensor], out_dir: Union[str, Path]) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(out_dir))
    save_file(adapter_state_dict(model, full_state), str(out_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def load_adapter(model: torch.nn.Module, folder: Union[str, Path]) -> None:
    """Fills the LoRA model's adapter weights from a peft adapter folder (save_adapter's files); ValueError
    naming the folder when its tensors do not match the adapters the model has."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"lora.adapter_init {folder}: no {ADAPTER_WEIGHTS_NAME} there (a LoRA run's RUN_DIR/adapter)")
    state = {name.removeprefix(PEFT_PREFIX): t for name, t in load_file(str(path)).items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"lora.adapter_init {folder} holds tensors this run's adapters do not have, e.g. "
                         f"{unexpected[:3]} (are lora.r / lora.target_modules the same as when it was trained?)")


class adapters_disabled:
    """`with adapters_disabled(model):` forwards of a LoRA model run as its frozen base: every peft layer
    (LoRA linears, trainable audio rows) passes its input through the base weights alone. RL's reference
    policy for a fresh adapter, without a second copy of the model. Nothing is disabled for a model
    without peft layers."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.requires_grad: Dict[torch.nn.Parameter, bool] = {}

    def __enter__(self):
        # peft's switch also changes requires_grad of the adapter weights: put back exactly what was there.
        self.requires_grad = {p: p.requires_grad for layer in self.layers for p in layer.parameters()}
        for layer in self.layers:
            layer.enable_adapters(False)
        return self

    def __exit__(self, *exc) -> bool:
        for layer in self.layers:
            layer.enable_adapters(True)
        for param, flag in self.requires_grad.items():
            param.requires_grad_(flag)
        return False

"""Hugging Face configuration of a Step-Audio 2 model folder (stepaudio2-train remote code).

Every export of the stepaudio2-train framework ships this file and modeling_step_audio_2.py beside its
config.json, so `AutoConfig` / `AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)` load it.
It reads the config.json of StepFun's layout: `audio_encoder_config` (encoder and adapter sizes),
`text_config` (the Qwen2 decoder) and `audio_patch_token_id` (rows that receive the audio features).
Self-contained: it imports only transformers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

from transformers import PretrainedConfig, Qwen2Config

# The released model's encoder and adapter sizes, for a config.json that leaves a key out.
AUDIO_ENCODER_DEFAULTS = {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 1280, "n_audio_head": 20,
                          "n_audio_layer": 32, "llm_dim": 3584, "kernel_size": 3, "adapter_stride": 2}
# The released model writes audio features at these rows (<audio_patch>); its config.json has no key for it.
DEFAULT_AUDIO_PATCH_TOKEN_ID = 151690
# The adapter's hidden width: a constant of the released code, not a config key.
ADAPTER_HIDDEN = 2048


class StepAudio2Config(PretrainedConfig):
    """Step-Audio 2: a Whisper-style audio encoder and a conv + MLP adapter feeding a Qwen2 decoder."""

    model_type = "step_audio_2"
    # The decoder's config is a sub-config: the attention kernel chosen at load time reaches it.
    sub_configs = {"text_config": Qwen2Config}

    def __init__(self, audio_encoder_config: Optional[Dict[str, Any]] = None,
                 text_config: Union[Dict[str, Any], Qwen2Config, None] = None,
                 audio_patch_token_id: int = DEFAULT_AUDIO_PATCH_TOKEN_ID, **kwargs: Any):
        audio = dict(AUDIO_ENCODER_DEFAULTS)
        audio.update(audio_encoder_config or {})
        if isinstance(text_config, Qwen2Config):
            text = text_config
        else:
            text = Qwen2Config(**{k: v for k, v in (text_config or {}).items() if k != "model_type"})
        groups = getattr(text, "num_attention_groups", None)
        if groups is not None and groups != text.num_key_value_heads:
            raise ValueError(f"text_config.num_attention_groups={groups} must equal num_key_value_heads="
                             f"{text.num_key_value_heads}")
        if audio["llm_dim"] != text.hidden_size:
            raise ValueError(f"audio_encoder_config.llm_dim={audio['llm_dim']} must equal text_config.hidden_size="
                             f"{text.hidden_size}")
        self.audio_encoder_config = audio
        self.text_config = text
        self.audio_patch_token_id = int(audio_patch_token_id)
        super().__init__(**kwargs)

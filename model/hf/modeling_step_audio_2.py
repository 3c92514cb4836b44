"""Hugging Face modeling of a Step-Audio 2 model folder (stepaudio2-train remote code).

The same parameter names as StepFun's release and the same forward as stepaudio2-train's own model: the
audio encoder turns each zero-padded mel chunk [n_mels, F] into 25 Hz features, the adapter into 12.5 Hz
rows, and those rows replace, in order, the embeddings of the `audio_patch_token_id` tokens before the Qwen2
decoder runs. Each chunk's features are computed as if the chunk were alone, whatever its batch-mates.

    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
    out = model(input_ids, mels=mels_NMF, mel_lengths=frames_N)      # or model.generate(..., mels=, mel_lengths=)

Self-contained: it imports only torch, transformers and the configuration file beside it.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_step_audio_2 import ADAPTER_HIDDEN, StepAudio2Config


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table [length, channels]: sines then cosines of geometric frequencies."""
    log_step = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_step * torch.arange(channels // 2, dtype=torch.float64))
    time_TC = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(time_TC), torch.cos(time_TC)], dim=1).float()


class SinusoidEmbedding(nn.Embedding):
    """The encoder's positional table: an nn.Embedding (StepFun's parameter name), not trained."""


class EncoderAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x_BTC: torch.Tensor, keep_B11T: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = (proj(x_BTC).view(B, T, self.n_head, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y_BHTD = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_B11T)
        return self.out(y_BHTD.transpose(1, 2).reshape(B, T, C))


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = EncoderAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x_BTC: torch.Tensor, keep_B11T: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.attn_ln(x_BTC), keep_B11T)
        return x_BTC + self.mlp(self.mlp_ln(x_BTC))


class AudioEncoder(nn.Module):
    """100 Hz mel -> 25 Hz features (Whisper-large-v3 shape in the release)."""

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.n_ctx = n_ctx
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = SinusoidEmbedding(n_ctx, n_state)
        self.positional_embedding.weight.requires_grad_(False)
        self.blocks = nn.ModuleList([EncoderBlock(n_state, n_head) for _ in range(n_layer)])
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(n_state)

    def forward(self, mels_BMT: torch.Tensor, mel_lengths_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features [B, T', C] and their valid lengths [B] of zero-padded mels with true lengths F.

        The release computes a padded batch as if the padding were audio; zeroing conv1 beyond F and the
        pooled frames beyond a chunk's own length gives, in a batch, what it computes for the chunk alone.
        The 2 trailing mel frames are padding (x_len = F - 2): conv2 frame j attends if j < ceil(x_len / 2).
        """
        T = mels_BMT.shape[-1]
        if bool(((mel_lengths_B < 3) | (mel_lengths_B > T)).any()):
            raise ValueError(f"mel_lengths must lie in [3, {T}] (the padded mel length), got {mel_lengths_B.tolist()}")
        frames_T = torch.arange(T, device=mels_BMT.device)
        x_BCT = F.gelu(self.conv1(mels_BMT.to(self.conv1.weight.dtype)))
        x_BCT = x_BCT * (frames_T[None, :] < mel_lengths_B[:, None])[:, None, :].to(x_BCT.dtype)
        x_BTC = F.gelu(self.conv2(x_BCT)).transpose(1, 2)
        T2 = x_BTC.shape[1]
        if T2 > self.n_ctx:
            raise ValueError(f"a mel of {T} frames gives {T2} encoder positions, more than n_audio_ctx={self.n_ctx}; "
                             f"split audio into chunks of at most 25 s")
        attended_B = (mel_lengths_B - 2 + 1) // 2
        alone_B = (mel_lengths_B + 1) // 2 // 2
        keep_B11T = (torch.arange(T2, device=x_BTC.device)[None, :] < attended_B[:, None])[:, None, None, :]
        x_BTC = x_BTC + self.positional_embedding.weight[:T2].to(x_BTC.dtype)
        for block in self.blocks:
            x_BTC = block(x_BTC, keep_B11T)
        x_BTC = self.after_norm(self.avg_pooler(x_BTC.transpose(1, 2)).transpose(1, 2))
        pooled_T = torch.arange(x_BTC.shape[1], device=x_BTC.device)
        x_BTC = x_BTC * (pooled_T[None, :] < alone_B[:, None])[:, :, None].to(x_BTC.dtype)
        return x_BTC, attended_B // 2


class Adaptor(nn.Module):
    """Downsampling conv then a two-layer MLP into the decoder's embedding space (25 Hz -> 12.5 Hz)."""

    def __init__(self, n_state: int, n_hidden: int, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv = nn.Conv1d(n_state, n_state, kernel_size, stride, padding=1)
        self.linear1 = nn.Linear(n_state, ADAPTER_HIDDEN)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(ADAPTER_HIDDEN, n_hidden)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return (lengths_B + 2 - self.kernel_size) // self.stride + 1

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_BTC = F.gelu(self.conv(x_BTC.transpose(1, 2))).transpose(1, 2)
        return self.linear2(self.relu(self.linear1(x_BTC)))


class StepAudio2PreTrainedModel(PreTrainedModel):
    config_class = StepAudio2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "EncoderBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only for weights a folder lacks (from_config, or a partial folder): every export holds them all.
        if isinstance(module, SinusoidEmbedding):
            if not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight.copy_(sinusoids(*module.weight.shape).to(module.weight.dtype))
        else:
            super()._init_weights(module)


class StepAudio2ForCausalLM(StepAudio2PreTrainedModel, GenerationMixin):
    def __init__(self, config: StepAudio2Config):
        super().__init__(config)
        enc = config.audio_encoder_config
        self.encoder = AudioEncoder(enc["n_mels"], enc["n_audio_ctx"], enc["n_audio_state"], enc["n_audio_head"],
                                    enc["n_audio_layer"])
        self.adapter = Adaptor(enc["n_audio_state"], enc["llm_dim"], enc["kernel_size"], enc["adapter_stride"])
        self.model = Qwen2Model(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def encode_audio(self, mels: torch.Tensor, mel_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Adapter outputs [N, T, hidden] and their valid lengths [N] of N zero-padded mel chunks [N, n_mels, F]."""
        feats_NTC, lengths_N = self.encoder(mels, mel_lengths.to(device=mels.device, dtype=torch.long))
        return self.adapter(feats_NTC), self.adapter.output_lengths(lengths_N)

    def embed_with_audio(self, input_ids: torch.Tensor, mels: Optional[torch.Tensor] = None,
                         mel_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings [B, T, H] with the k-th audio patch row (row-major) holding the k-th valid adapter
        output (chunk-major): chunks are listed in the order their patch rows appear."""
        embeds_BTH = self.model.embed_tokens(input_ids)
        if mels is None:
            return embeds_BTH
        if mel_lengths is None:
            mel_lengths = torch.full(mels.shape[:1], mels.shape[-1], dtype=torch.long, device=mels.device)
        feats_NTH, lengths_N = self.encode_audio(mels, mel_lengths)
        is_patch_BT = input_ids == self.config.audio_patch_token_id
        valid_NT = torch.arange(feats_NTH.shape[1], device=feats_NTH.device)[None, :] < lengths_N[:, None]
        if int(is_patch_BT.sum()) != int(valid_NT.sum()):
            raise ValueError(f"audio patch count mismatch: input_ids hold {int(is_patch_BT.sum())} audio patch rows "
                             f"(id {self.config.audio_patch_token_id}) but the audio gives {int(valid_NT.sum())} "
                             f"adapter outputs (per chunk {lengths_N.tolist()})")
        embeds_BTH = embeds_BTH.clone()
        embeds_BTH[is_patch_BT] = feats_NTH[valid_NT].to(embeds_BTH.dtype)
        return embeds_BTH

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[Any] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, mels: Optional[torch.Tensor] = None,
                mel_lengths: Optional[torch.Tensor] = None, logits_to_keep: Union[int, torch.Tensor] = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] of input_ids [B, T] with the audio chunks mels [N, n_mels, F] (true lengths
        mel_lengths [N], default F) written into the audio patch rows. labels: next-token loss, -100 ignored."""
        if inputs_embeds is None:
            if mels is None and past_key_values_empty(past_key_values) and \
                    bool((input_ids == self.config.audio_patch_token_id).any()):
                raise ValueError(f"input_ids hold audio patch rows (id {self.config.audio_patch_token_id}) but no "
                                 f"mels were given")
            inputs_embeds = self.embed_with_audio(input_ids, mels, mel_lengths)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden_BTH = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_BTH = hidden_BTH[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_BTH
        else:
            hidden_BTH = hidden_BTH[:, logits_to_keep]
        logits = self.lm_head(hidden_BTH)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Optional[Any] = None,
                                      mels: Optional[torch.Tensor] = None,
                                      mel_lengths: Optional[torch.Tensor] = None, **kwargs: Any) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        # The audio belongs to the prompt: encoded once, on the step that fills the cache.
        if past_key_values_empty(past_key_values):
            inputs["mels"], inputs["mel_lengths"] = mels, mel_lengths
        return inputs


def past_key_values_empty(past_key_values: Any) -> bool:
    """Whether no token has been cached yet (the prompt's step)."""
    if past_key_values is None:
        return True
    if hasattr(past_key_values, "get_seq_length"):
        return past_key_values.get_seq_length() == 0
    return False

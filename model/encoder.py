"""The audio encoder (Whisper-style, 100 Hz mel -> 25 Hz features) and the adapter (-> 12.5 Hz LLM rows).

Parameter names match StepFun's release. Batched chunks give the same features as one chunk alone.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from model.checks import check


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table [length, channels] in float32: sines then cosines of geometric
    frequencies.

    Computed in float64 numpy, not with torch constructors: under deepspeed.zero.Init those (torch.arange
    ...) make bf16 tensors, where positions past 256 are no longer exact integers."""
    assert channels % 2 == 0
    log_step = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_step * np.arange(channels // 2, dtype=np.float64))
    time_TC = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    table_TC = np.concatenate([np.sin(time_TC), np.cos(time_TC)], axis=1).astype(np.float32)
    return torch.from_numpy(table_TC)


class SinusoidEmbedding(nn.Embedding):
    """An nn.Embedding (so the weight keeps StepFun's name) initialised to Whisper's sinusoids.

    The fill happens in reset_parameters, which nn.Embedding calls inside its own __init__: that is
    before deepspeed.zero.Init partitions the weight, and a no-op on the meta device. The table is made in
    float32 (see sinusoids) and rounded once, by the copy, to the weight's dtype.
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            table = sinusoids(self.num_embeddings, self.embedding_dim)
            self.weight.copy_(table.to(device=self.weight.device, dtype=self.weight.dtype))


class EncoderAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x_BTC: torch.Tensor, keep_B11T: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = (proj(x_BTC).view(B, T, self.n_head, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y_BHTD = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_B11T)
        return self.out(y_BHTD.transpose(1, 2).reshape(B, T, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = EncoderAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x_BTC: torch.Tensor, keep_B11T: Optional[torch.Tensor]) -> torch.Tensor:
        x_BTC = x_BTC + self.attn(self.attn_ln(x_BTC), keep_B11T)
        return x_BTC + self.mlp(self.mlp_ln(x_BTC))


def encoder_lengths(mel_lengths_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attended conv2 frames, valid pooled frames, pooled frames of the chunk alone) per chunk.

    The reference drops the 2 padding mel frames (x_len = F - 2) and lets conv2 frame j attend only if
    it is one of the first ceil(x_len / 2).
    """
    x_len = mel_lengths_B - 2
    attended = (x_len + 1) // 2
    return attended, attended // 2, (mel_lengths_B + 1) // 2 // 2


# Fresh frontend convs are drawn with He-normal weights times this gain. PyTorch's default init leaves
# their output ~100x weaker than the sinusoidal positional table added right after, so a from-scratch
# encoder's output is >99% position and the decoder learns to ignore the audio (the demo then sits on
# its language-model plateau). With this gain the audio content is about as strong as the position.
FRONTEND_INIT_GAIN = 3.0


class FrontendConv(nn.Conv1d):
    """A Conv1d of the encoder frontend with the initialisation above (names and shapes unchanged).

    The init lives in reset_parameters, which nn.Conv1d calls inside its own __init__, so it also works
    under deepspeed.zero.Init (before partitioning) and on the meta device (a no-op there).
    """

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        with torch.no_grad():
            self.weight.mul_(FRONTEND_INIT_GAIN)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.n_ctx = n_ctx
        self.conv1 = FrontendConv(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = FrontendConv(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = SinusoidEmbedding(n_ctx, n_state)
        self.positional_embedding.weight.requires_grad_(False)
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(n_state)
        self.gradient_checkpointing = False

    def forward(self, mels_BMT: torch.Tensor, mel_lengths_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features [B, T', C] and valid lengths [B] (25 Hz) of zero-padded mels with true lengths F.

        The reference computes a padded batch as if the padding were audio, so a chunk's last frames
        would depend on its batch-mates. Zeroing conv1 beyond F and pooled frames beyond the chunk's
        own length reproduces, in a batch, exactly what the reference computes for the chunk alone.
        """
        T = mels_BMT.shape[-1]
        check(((mel_lengths_B >= 3) & (mel_lengths_B <= T)).all(),
              lambda: f"mel_lengths must lie in [3, {T}] (the padded mel length), got {mel_lengths_B.tolist()}")
        frames_T = torch.arange(T, device=mels_BMT.device)
        x_BCT = F.gelu(self.conv1(mels_BMT.to(self.conv1.weight.dtype)))
        x_BCT = x_BCT * (frames_T[None, :] < mel_lengths_B[:, None])[:, None, :].to(x_BCT.dtype)
        x_BTC = F.gelu(self.conv2(x_BCT)).transpose(1, 2)
        T2 = x_BTC.shape[1]
        if T2 > self.n_ctx:
            raise ValueError(f"a mel of {T} frames gives {T2} encoder positions, more than n_audio_ctx="
                             f"{self.n_ctx}; split audio into chunks of at most 25 s")
        attended_B, valid_B, alone_B = encoder_lengths(mel_lengths_B)
        keep_B11T = (torch.arange(T2, device=x_BTC.device)[None, :] < attended_B[:, None])[:, None, None, :]
        x_BTC = x_BTC + self.positional_embedding.weight[:T2].to(x_BTC.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x_BTC = torch.utils.checkpoint.checkpoint(block, x_BTC, keep_B11T, use_reentrant=False)
            else:
                x_BTC = block(x_BTC, keep_B11T)
        x_BTC = self.avg_pooler(x_BTC.transpose(1, 2)).transpose(1, 2)
        x_BTC = self.after_norm(x_BTC)
        pooled_T = torch.arange(x_BTC.shape[1], device=x_BTC.device)
        x_BTC = x_BTC * (pooled_T[None, :] < alone_B[:, None])[:, :, None].to(x_BTC.dtype)
        return x_BTC, valid_B


class Adaptor(nn.Module):
    """Downsampling conv then a two-layer MLP into the decoder's embedding space."""

    def __init__(self, n_state: int, n_hidden: int, kernel_size: int = 3, stride: int = 2,
                 adapter_hidden: int = 2048):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv = nn.Conv1d(n_state, n_state, kernel_size, stride, padding=1)
        self.linear1 = nn.Linear(n_state, adapter_hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(adapter_hidden, n_hidden)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return (lengths_B + 2 * 1 - self.kernel_size) // self.stride + 1

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x_BTC = F.gelu(self.conv(x_BTC.transpose(1, 2))).transpose(1, 2)
        return self.linear2(self.relu(self.linear1(x_BTC)))

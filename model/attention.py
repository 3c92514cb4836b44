"""Packed rows at the cost of their samples without flash-attention: the decoder kernel "varlen_sdpa".

Registered with transformers' attention interface. For ordinary batches and KV-cache decoding it is PyTorch
SDPA (same masks, same kernel); given a VarlenLayout (packed rows, from model.lalm.packed_attention) each
sample attends causally within itself, samples of similar length stacked into one SDPA call, so a row of
samples of lengths L_i costs about sum(L_i^2) instead of the row's T^2 under a block-diagonal mask (CPU,
demo preset, 1 thread: 2.8x less attention time forward and backward; `python -m model.bench_attention`).
FlexAttention's document mask was the other candidate: torch 2.14 has no FlexAttention backward on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "varlen_sdpa"
# Decoder kernels whose packed rows cost what their samples cost (attention FLOPs per sample, not per row).
VARLEN_KERNELS = ("flash_attention_2", VARLEN_SDPA)
# Sequences go into one padded SDPA call with the longest of them while they hold at least this share of its
# length: at most 1 / 0.8^2 = 1.56x the attention of the shortest, and a handful of calls per layer (each call
# is a parallel region, which costs more than its arithmetic for short samples on a busy CPU).
GROUP_MIN_SHARE = 0.8


@dataclass(frozen=True)
class VarlenLayout:
    """How varlen_sdpa computes a packed batch, built once per forward (all layers share it).

    The batch, flattened row after row to N positions, holds sequences (each packed sample, and a row's
    padding as one of its own). Sequences of similar length are right-padded to the longest of their group
    and stacked; `gather` [P] gives the flattened position each of the P padded slots reads (a padded slot
    reads its sequence's last token: under the causal mask no real query sees it), `take` [N] the slot
    holding each position's output, `groups` the (sequences, padded length) of each group, in slot order."""
    gather: torch.Tensor
    take: torch.Tensor
    groups: Tuple[Tuple[int, int], ...]

    @property
    def num_positions(self) -> int:
        return self.take.numel()


def segment_lengths(cu_seq_lens: torch.Tensor) -> Tuple[int, ...]:
    """Lengths of the flattened batch's sequences from flash-style boundaries [0, ..., B * T] (host ints; a
    tensor on a GPU costs one sync here, so the collate's host copy is the one to pass)."""
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2:
        raise ValueError(f"cu_seq_lens must be 1-D [S + 1] boundaries, got shape {tuple(cu_seq_lens.shape)}")
    return tuple(int(n) for n in cu_seq_lens.diff().tolist())


def varlen_layout(lengths: Sequence[int], device: Optional[torch.device] = None,
                  min_share: float = GROUP_MIN_SHARE) -> VarlenLayout:
    """The VarlenLayout of sequences of `lengths` (positive, back to back), its index tensors on `device`."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"varlen_layout got sequence lengths {list(lengths)[:8]}: expected at least one, all >= 1")
    lengths_S = torch.tensor(lengths, dtype=torch.long)
    starts_S = lengths_S.cumsum(0) - lengths_S
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    gathers, groups, members = [], [], []
    for i in order + [None]:
        if members and (i is None or lengths[i] < min_share * lengths[members[0]]):
            padded = lengths[members[0]]
            idx = torch.tensor(members)
            offset_GL = torch.minimum(torch.arange(padded)[None, :], lengths_S[idx, None] - 1)
            gathers.append((starts_S[idx, None] + offset_GL).reshape(-1))
            groups.append((len(members), padded))
            members = []
        if i is not None:
            members.append(i)
    gather = torch.cat(gathers)
    # Each position's slot: the first slot reading it (the clamped padding slots come after it in a sequence).
    take = torch.full((int(lengths_S.sum()),), -1, dtype=torch.long)
    slots = torch.arange(gather.numel())
    take.scatter_reduce_(0, gather, slots, reduce="amin", include_self=False)
    return VarlenLayout(gather.to(device), take.to(device), tuple(groups))


def varlen_sdpa_forward(module: torch.nn.Module, query_BHTD: torch.Tensor, key_BKTD: torch.Tensor,
                        value_BKTD: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                        varlen_layout: Optional[VarlenLayout] = None, **kwargs):
    """transformers' attention-function signature; returns ([B, T, heads, head_dim], None) like SDPA's.

    varlen_layout (packed rows, from model.lalm.packed_attention): each sequence attends causally within
    itself, group by group; attention_mask is then ignored (the caller passes none). Without it: SDPA."""
    if varlen_layout is None:
        return sdpa_attention_forward(module, query_BHTD, key_BKTD, value_BKTD, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    B, heads, T, head_dim = query_BHTD.shape
    if varlen_layout.num_positions != B * T:
        raise ValueError(f"varlen_layout covers {varlen_layout.num_positions} positions but the batch holds "
                         f"{B} x {T} = {B * T}: expected the layout of this batch's segments")
    if sliding_window is not None:
        raise ValueError(f"{VARLEN_SDPA} does not implement sliding-window attention (sliding_window="
                         f"{sliding_window}); use sdpa or flash_attention_2")
    kv_heads = key_BKTD.shape[1]
    # [B, heads, T, D] -> [B * T, heads, D] (a view of the projections' [B, T, heads, D] layout), then the
    # padded slots of every group at once: one gather per tensor forward, one scatter-add backward.
    gather = varlen_layout.gather
    query_PHD = query_BHTD.transpose(1, 2).reshape(B * T, heads, head_dim).index_select(0, gather)
    key_PKD = key_BKTD.transpose(1, 2).reshape(B * T, kv_heads, -1).index_select(0, gather)
    value_PKD = value_BKTD.transpose(1, 2).reshape(B * T, kv_heads, -1).index_select(0, gather)
    sizes = [count * padded for count, padded in varlen_layout.groups]
    outs = []
    for (count, padded), q, k, v in zip(varlen_layout.groups, query_PHD.split(sizes), key_PKD.split(sizes),
                                        value_PKD.split(sizes)):
        # [count * padded, heads, D] -> [count, heads, padded, D]
        q, k, v = (t.view(count, padded, t.shape[1], -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                             enable_gqa=kv_heads != heads)
        outs.append(out.transpose(1, 2).reshape(count * padded, heads, -1))
    return torch.cat(outs).index_select(0, varlen_layout.take).view(B, T, heads, -1), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
# Unpacked batches and decoding build exactly the masks SDPA gets.
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)

"""Decoding with the KV cache (one prefill with the audio spliced in, then one token per step), greedy or
sampled (temperature, top-p), batched with left padding; and splitting a TA4 stream into text and audio codes.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch

from model.lalm import StepAudio2ForCausalLM


def _pick(logits_BV: torch.Tensor, temperature: float, top_p: float,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature <= 0.0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
        sorted_BV = sorted_BV.masked_fill(outside_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: StepAudio2ForCausalLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             mels: Optional[torch.Tensor] = None, mel_lengths: Optional[torch.Tensor] = None,
             max_new_tokens: int = 64, stop_token_ids: Iterable[int] = (), temperature: float = 0.0,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             stop_check_every: int = 8, include_stop: bool = False) -> List[List[int]]:
    """New token ids per prompt of input_ids [B, T] (left-padded; attention_mask marks real tokens).

    temperature 0 is greedy; otherwise sampling from softmax(logits / temperature), restricted to the top-p
    nucleus, drawn from `generator` (seed it for repeatable output). A stop token ends its row and is not
    returned (include_stop: it is, as the row's last token; RL trains on it). mels hold the audio chunks of
    all rows in row order.

    Tokens and the rows' done flags stay on the model's device; the host looks at them only every
    `stop_check_every` steps (has every row stopped?) and once at the end, so a GPU never waits for the host
    per token. Steps taken after the last row stopped are discarded: the output does not depend on it (when
    sampling they still draw from `generator`, so a generator shared by later calls moves on further).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if stop_check_every < 1:
        raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
    B, device = input_ids.shape[0], input_ids.device
    mask_BT = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    if bool((mask_BT[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: attention_mask has a 0 in its last column")
    stops = torch.tensor(sorted(set(int(t) for t in stop_token_ids)), dtype=input_ids.dtype, device=device)
    positions_BT = (mask_BT.cumsum(dim=-1) - 1).clamp(min=0)
    out = model(input_ids, attention_mask=mask_BT, mels=mels, mel_lengths=mel_lengths, position_ids=positions_BT,
                use_cache=True)
    next_pos_B1 = positions_BT[:, -1:] + 1
    # <audio_patch> only marks where input audio goes: chosen as output, the next step would need audio
    # that does not exist, so it is never generated.
    patch_id = getattr(getattr(model, "config", None), "audio_patch_token_id", None)
    tokens_BN = torch.zeros(B, max_new_tokens, dtype=input_ids.dtype, device=device)
    kept_BN = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # generated before its row stopped
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits_BV = out.logits[:, -1].clone()
        if patch_id is not None:
            logits_BV[:, patch_id] = float("-inf")
        token_B = _pick(logits_BV, temperature, top_p, generator)
        before_B = done_B.clone() if include_stop else None
        done_B |= torch.isin(token_B, stops)
        tokens_BN[:, step] = token_B
        kept_BN[:, step] = ~(before_B if include_stop else done_B)
        if step == max_new_tokens - 1 or (step + 1) % stop_check_every == 0 and bool(done_B.all()):
            break
        mask_BT = torch.cat([mask_BT, torch.ones_like(mask_BT[:, :1])], dim=1)
        out = model(token_B[:, None].to(input_ids.dtype), attention_mask=mask_BT, position_ids=next_pos_B1,
                    past_key_values=out.past_key_values, use_cache=True)
        next_pos_B1 = next_pos_B1 + 1
    # One copy to the host. A row's kept tokens are a prefix: done_B never turns back to False.
    tokens_BN, kept_BN = tokens_BN.cpu(), kept_BN.cpu()
    return [row[kept].tolist() for row, kept in zip(tokens_BN, kept_BN)]


def greedy_generate(model: StepAudio2ForCausalLM, input_ids: torch.Tensor, mels: Optional[torch.Tensor] = None,
                    mel_lengths: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                    stop_token_ids: Iterable[int] = ()) -> List[int]:
    """New token ids after one prompt input_ids [1, T], greedy; a stop token ends generation and is not returned."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, T], got input_ids of shape {tuple(input_ids.shape)}")
    return generate(model, input_ids, mels=mels, mel_lengths=mel_lengths, max_new_tokens=max_new_tokens,
                    stop_token_ids=stop_token_ids)[0]


def split_ta4(token_ids: Iterable[int], audio_start_id: int, first_audio_code_id: int,
              num_audio_codes: int) -> Tuple[List[int], List[int]]:
    """(text ids, audio codes) of a generated stream, as the release decodes it.

    Text is every id below <audio_start> (so <tts_start>, <tts_pad> and friends drop out); an audio code is
    id - first_audio_code_id for ids at or above <audio_0>, dropping the audio pad (code num_audio_codes).
    """
    text: List[int] = []
    codes: List[int] = []
    for token in token_ids:
        if token < audio_start_id:
            text.append(token)
        elif token >= first_audio_code_id and token - first_audio_code_id < num_audio_codes:
            codes.append(token - first_audio_code_id)
    return text, codes

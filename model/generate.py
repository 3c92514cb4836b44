"""Greedy decoding with the KV cache: one prefill with the audio spliced in, then one token per step."""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from model.lalm import StepAudio2ForCausalLM


@torch.no_grad()
def greedy_generate(model: StepAudio2ForCausalLM, input_ids: torch.Tensor, mels: Optional[torch.Tensor] = None,
                    mel_lengths: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                    stop_token_ids: Iterable[int] = ()) -> List[int]:
    """New token ids after the prompt input_ids [1, T]; a stop token ends generation and is not returned."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, T], got input_ids of shape {tuple(input_ids.shape)}")
    stops = set(int(t) for t in stop_token_ids)
    out = model(input_ids, mels=mels, mel_lengths=mel_lengths, use_cache=True)
    new_tokens: List[int] = []
    while len(new_tokens) < max_new_tokens:
        token = int(out.logits[0, -1].argmax())
        if token in stops:
            break
        new_tokens.append(token)
        if len(new_tokens) == max_new_tokens:
            break
        step_ids = torch.tensor([[token]], dtype=input_ids.dtype, device=input_ids.device)
        out = model(step_ids, past_key_values=out.past_key_values, use_cache=True)
    return new_tokens

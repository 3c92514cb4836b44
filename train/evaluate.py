"""ASR evaluation: greedy transcripts of held-out samples and their word error rate.

Every rank decodes the same samples (under ZeRO-3 each forward is a collective, so all ranks must take
the same number of steps); rank 0 reports.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List

import jiwer
import torch

from data.loader import iter_eval_samples
from data.tokenizer import SpecialIds
from model.generate import greedy_generate


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces: WER counts words, not formatting."""
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split())


@torch.no_grad()
def evaluate_asr(model: torch.nn.Module, tok, ids: SpecialIds, shards: List[str], instruction: str,
                 max_samples: int, max_new_tokens: int, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    was_training = model.training
    model.eval()
    refs, hyps, keys = [], [], []
    try:
        for sample in iter_eval_samples(shards, tok, ids, instruction, max_samples=max_samples):
            prompt = torch.tensor([sample["prompt_ids"]], dtype=torch.long)
            new_ids = greedy_generate(model, prompt, mels=sample["mels"].to(dtype),
                                      mel_lengths=sample["mel_lengths"], max_new_tokens=max_new_tokens,
                                      stop_token_ids=(ids.end_of_text, ids.eot))
            hyps.append(normalize_text(tok.decode(new_ids, skip_special_tokens=True)))
            refs.append(normalize_text(sample["text"]))
            keys.append(sample["key"])
    finally:
        model.train(was_training)
    if not refs:
        raise ValueError(f"eval.shards {shards} yielded no samples")
    wer = jiwer.wer(refs, hyps)  # an empty hypothesis counts as deletions of every reference word
    return {"wer": float(wer), "num_samples": len(refs),
            "examples": [{"key": k, "ref": r, "hyp": h} for k, r, h in list(zip(keys, refs, hyps))[:3]]}

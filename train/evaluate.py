"""Held-out metrics of a curriculum stage: ASR word error rate, teacher-forced audio-code accuracy of
speech answers (TTS, spoken dialogue), and BLEU of text answers (speech translation).

Every rank evaluates the same samples (under ZeRO-3 each forward is a collective, so all ranks must take
the same number of steps); rank 0 reports.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import jiwer
import sacrebleu
import torch
import torch.nn.functional as F

from data.batching import pad_mels
from data.loader import iter_eval_samples, iter_rendered
from data.templates import IGNORE_INDEX
from data.tokenizer import SpecialIds
from model.generate import greedy_generate

logger = logging.getLogger(__name__)

METRICS = ("wer", "code_accuracy", "bleu")
_NUM_EXAMPLES = 3
_EXAMPLE_CODES = 16  # codes shown per code_accuracy example


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
            "examples": [{"key": k, "ref": r, "hyp": h} for k, r, h in list(zip(keys, refs, hyps))[:_NUM_EXAMPLES]]}


# ------------------------------------------------------------------------------ labelled samples

def _mels(chunks: List[torch.Tensor], dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    mels, lengths = pad_mels(chunks)
    return (None if mels is None else mels.to(dtype)), lengths


def code_hits(logits_TV: torch.Tensor, labels_T: torch.Tensor, first_code: int, num_codes: int) -> tuple:
    """(correct, total, summed NLL) of next-token predictions at the label positions that hold audio codes
    (not the audio pad): position t predicts labels[t + 1], as in the model's loss."""
    pred_logits, target = logits_TV[:-1].float(), labels_T[1:]
    is_code = (target >= first_code) & (target < first_code + num_codes)
    if not bool(is_code.any()):
        return 0, 0, 0.0
    logits, target = pred_logits[is_code], target[is_code]
    correct = int((logits.argmax(-1) == target).sum())
    return correct, int(is_code.sum()), float(F.cross_entropy(logits, target, reduction="sum"))


def _first_answer(labels: List[int]) -> Tuple[int, int]:
    """[start, end) of the first labelled run: the answer that follows the prompt input_ids[:start]."""
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return start, end


@torch.no_grad()
def _code_accuracy(model, tok, ids: SpecialIds, shards: List[str], instruction: str, max_samples: int,
                   dtype: torch.dtype) -> Dict[str, Any]:
    """Share of labelled audio-code positions (the audio pad excluded) whose next-token argmax is right,
    over all positions of the first `max_samples` samples that have any; one forward pass per sample."""
    correct, total, nll, num_samples, examples = 0, 0, 0.0, 0, []
    first = ids.first_audio_code
    for sample in iter_rendered(shards, tok, ids, instruction):
        if num_samples >= max_samples:
            break
        labels_T = torch.tensor(sample["labels"])
        targets_T = labels_T[1:]  # position t predicts labels[t + 1]
        is_code_T = (targets_T >= first) & (targets_T < first + ids.num_audio_codes)
        if not bool(is_code_T.any()):  # known from the labels: no forward pass spent on it
            logger.warning("code_accuracy skips %s: its answer holds no audio codes", sample["key"])
            continue
        mels, mel_lengths = _mels(sample["mels"], dtype)
        logits_TV = model(torch.tensor([sample["input_ids"]]), mels=mels, mel_lengths=mel_lengths).logits[0].cpu()
        hits, codes, nll_sum = code_hits(logits_TV, labels_T, first, ids.num_audio_codes)
        correct, total, nll, num_samples = correct + hits, total + codes, nll + nll_sum, num_samples + 1
        if len(examples) < _NUM_EXAMPLES:
            def shown(ids_T: torch.Tensor) -> str:
                return " ".join(str(int(i) - first) for i in ids_T[:_EXAMPLE_CODES])
            examples.append({"key": sample["key"], "ref": shown(targets_T[is_code_T]),
                             "hyp": shown(logits_TV[:-1].argmax(dim=-1)[is_code_T])})
    if total == 0:
        raise ValueError(f"eval.shards {shards} hold no sample with audio codes in its answer (run data.tokenize "
                         f"on them, or pick another metric)")
    return {"value": correct / total, "nll": nll / total, "num_codes": total, "num_samples": num_samples,
            "examples": examples}


@torch.no_grad()
def _bleu(model, tok, ids: SpecialIds, shards: List[str], instruction: str, max_samples: int,
          max_new_tokens: int, dtype: torch.dtype) -> Dict[str, Any]:
    """sacrebleu corpus BLEU (0-100) of greedy answers against each sample's first labelled answer."""
    refs, hyps, keys = [], [], []
    for sample in iter_rendered(shards, tok, ids, instruction):
        if len(refs) >= max_samples:
            break
        start, end = _first_answer(sample["labels"])
        prompt = sample["input_ids"][:start]
        # Audio spans after the answer (a later turn) are not part of the prompt, nor their mels.
        mels, mel_lengths = _mels(sample["mels"][:prompt.count(ids.audio_start)], dtype)
        new_ids = greedy_generate(model, torch.tensor([prompt]), mels=mels, mel_lengths=mel_lengths,
                                  max_new_tokens=max_new_tokens, stop_token_ids=(ids.end_of_text, ids.eot))
        hyps.append(tok.decode(new_ids, skip_special_tokens=True).strip())
        refs.append(tok.decode(sample["labels"][start:end], skip_special_tokens=True).strip())
        keys.append(sample["key"])
    if not refs:
        raise ValueError(f"eval.shards {shards} yielded no samples")
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    return {"value": float(bleu), "num_samples": len(refs),
            "examples": [{"key": k, "ref": r, "hyp": h} for k, r, h in list(zip(keys, refs, hyps))[:_NUM_EXAMPLES]]}


def run_eval(metric: str, model: torch.nn.Module, tok, ids: SpecialIds, shards: List[str], instruction: str,
             max_samples: int, max_new_tokens: int, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """{"metric", "value", "num_samples", "examples": [{"key", "ref", "hyp"}]} of `metric` on the first
    `max_samples` usable held-out samples of `shards`: "wer" (ASR, greedy, 0-1), "code_accuracy"
    (speech answers, teacher-forced, 0-1; also "nll", the codes' mean negative log-likelihood, and
    "num_codes") or "bleu" (text answers, greedy, 0-100)."""
    if metric not in METRICS:
        raise ValueError(f"unknown eval metric {metric!r}: expected one of {list(METRICS)}")
    if metric == "wer":
        result = evaluate_asr(model, tok, ids, shards, instruction, max_samples, max_new_tokens, dtype)
        return {"metric": metric, "value": result["wer"], "num_samples": result["num_samples"],
                "examples": result["examples"]}
    was_training = model.training
    model.eval()
    try:
        if metric == "code_accuracy":
            result = _code_accuracy(model, tok, ids, shards, instruction, max_samples, dtype)
        else:
            result = _bleu(model, tok, ids, shards, instruction, max_samples, max_new_tokens, dtype)
    finally:
        model.train(was_training)
    return {"metric": metric, **result}

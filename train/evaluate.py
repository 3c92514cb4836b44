"""Held-out metrics of a curriculum stage: ASR word error rate, teacher-forced audio-code accuracy of
speech answers (TTS, spoken dialogue), BLEU of text answers (speech translation), and the voice metrics of
train.eval_voice: paralinguistic accuracy per attribute, and speaker similarity of spoken answers to the clip
their prompt carries (timbre from retrieved audio).

The usable samples are split across ranks (rank r takes the r-th, (r + W)-th, ... of them), run in
batches on the model's device, and every rank's per-sample results are gathered before the metric is
computed: every rank returns the same result, whatever the number of ranks and the batch size. No forward
here is a collective; under ZeRO-3 evaluate inside train.engine.inference_model (parameters gathered once,
DeepSpeed's module hooks off), where a rank with fewer samples or shorter answers simply finishes first and
waits in the final gather.
"""
from __future__ import annotations

import logging
import re
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import jiwer
import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.loading.batching import pad_mels
from data.loading.loader import iter_eval_samples, iter_rendered
from data.tasks.pieces import IGNORE_INDEX
from data.text_tokenizer import SpecialIds
from model.generate import generate
from train import eval_voice
from train.engine import to_device

logger = logging.getLogger(__name__)

METRICS = ("wer", "code_accuracy", "bleu", "paralinguistic", "speaker_similarity")
_NUM_EXAMPLES = 3
_EXAMPLE_CODES = 16  # codes shown per code_accuracy example


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces: WER counts words, not formatting."""
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split())


def code_hits(logits_TV: torch.Tensor, labels_T: torch.Tensor, first_code: int, num_codes: int) -> tuple:
    """(correct, total, summed NLL) of next-token predictions at the label positions that hold audio codes
    (not the audio pad): position t predicts labels[t + 1], as in the model's loss."""
    pred_logits, target = logits_TV[:-1], labels_T[1:]
    is_code = (target >= first_code) & (target < first_code + num_codes)
    if not bool(is_code.any()):
        return 0, 0, 0.0
    # Only the code rows go to fp32: [T, vocab] in fp32 would be the largest tensor of the evaluation.
    logits, target = pred_logits[is_code].float(), target[is_code]
    correct = int((logits.argmax(-1) == target).sum())
    return correct, int(is_code.sum()), float(F.cross_entropy(logits, target, reduction="sum"))


def _first_answer(labels: List[int]) -> Tuple[int, int]:
    """[start, end) of the first labelled run: the answer that follows the prompt input_ids[:start]."""
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return start, end


# --------------------------------------------------------------------------------- usable samples
# Each yields {"key", "ids" (the model's input), "mels" (chunks [128, F] in order), ...} for the first
# max_samples usable samples in file order. Every rank reads them all, so all agree on the numbering.

def _asr_samples(shards, tok, ids: SpecialIds, instruction: str, max_samples: int) -> Iterator[Dict[str, Any]]:
    for s in iter_eval_samples(shards, tok, ids, instruction, max_samples=max_samples):
        chunks = [m[:, :n] for m, n in zip(s["mels"], s["mel_lengths"].tolist())]
        yield {"key": s["key"], "ids": s["prompt_ids"], "mels": chunks, "ref": normalize_text(s["text"])}


def _code_samples(shards, tok, ids: SpecialIds, instruction: str, max_samples: int) -> Iterator[Dict[str, Any]]:
    first, produced = ids.first_audio_code, 0
    for s in iter_rendered(shards, tok, ids, instruction):
        if produced >= max_samples:
            return
        targets = s["labels"][1:]  # position t predicts labels[t + 1]
        if not any(first <= t < first + ids.num_audio_codes for t in targets):
            logger.warning("code_accuracy skips %s: its answer holds no audio codes", s["key"])
            continue  # known from the labels: no forward pass spent on it
        produced += 1
        yield {"key": s["key"], "ids": s["input_ids"], "mels": s["mels"], "labels": s["labels"]}


def _bleu_samples(shards, tok, ids: SpecialIds, instruction: str, max_samples: int) -> Iterator[Dict[str, Any]]:
    for s in islice(iter_rendered(shards, tok, ids, instruction), max(max_samples, 0)):
        start, end = _first_answer(s["labels"])
        prompt = s["input_ids"][:start]
        # Audio spans after the answer (a later turn) are not part of the prompt, nor their mels.
        yield {"key": s["key"], "ids": prompt, "mels": s["mels"][:prompt.count(ids.audio_start)],
               "ref": tok.decode(s["labels"][start:end], skip_special_tokens=True).strip()}


_SAMPLES = {"wer": _asr_samples, "code_accuracy": _code_samples, "bleu": _bleu_samples,
            "paralinguistic": eval_voice.paralinguistic_samples, "speaker_similarity": eval_voice.speaker_samples}


# ------------------------------------------------------------------------------------------ batches

def _inputs(batch: List[Dict[str, Any]], pad_id: int, left: bool, device: torch.device, dtype: torch.dtype):
    """(input_ids [B, T], attention_mask [B, T], mels [N, 128, F], mel_lengths [N]) on `device`, the rows
    padded on the left (generation) or the right, the mels in `dtype`; no audio: mels and mel_lengths None."""
    T = max(len(s["ids"]) for s in batch)
    ids_BT = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(len(batch), T, dtype=torch.long)
    for b, s in enumerate(batch):
        cols = slice(T - len(s["ids"]), T) if left else slice(0, len(s["ids"]))
        ids_BT[b, cols] = torch.tensor(s["ids"], dtype=torch.long)
        mask_BT[b, cols] = 1
    mels, mel_lengths = pad_mels([m for s in batch for m in s["mels"]])
    if mels is not None:
        mels, mel_lengths = to_device(mels.to(dtype), device), to_device(mel_lengths, device)
    return to_device(ids_BT, device), to_device(mask_BT, device), mels, (None if mels is None else mel_lengths)


def _generated_ids(model, batch, ids: SpecialIds, max_new_tokens: int, device, dtype,
                   stops: Tuple[int, ...]) -> List[List[int]]:
    """Greedy new ids of a batch of prompts (left-padded, generated together), each up to its first stop."""
    ids_BT, mask_BT, mels, mel_lengths = _inputs(batch, ids.end_of_text, True, device, dtype)
    return generate(model, ids_BT, mask_BT, mels, mel_lengths, max_new_tokens=max_new_tokens, stop_token_ids=stops)


def _generated(model, batch, tok, ids: SpecialIds, max_new_tokens: int, device, dtype) -> List[str]:
    """Greedy text answers of a batch of prompts, decoded."""
    new_ids = _generated_ids(model, batch, ids, max_new_tokens, device, dtype, (ids.end_of_text, ids.eot))
    return [tok.decode(row, skip_special_tokens=True) for row in new_ids]


def _teacher_forced(model, batch, ids: SpecialIds, device, dtype) -> List[Dict[str, Any]]:
    """Code hits of each sample of a batch from one forward pass over the right-padded rows."""
    ids_BT, _, mels, mel_lengths = _inputs(batch, ids.end_of_text, False, device, dtype)
    # Right padding under causal attention: no real position sees the padding, so no mask is needed.
    logits_BTV = model(ids_BT, mels=mels, mel_lengths=mel_lengths).logits
    first, out = ids.first_audio_code, []
    for s, logits_TV in zip(batch, logits_BTV):
        logits_TV = logits_TV[:len(s["ids"])]
        labels_T = torch.tensor(s["labels"], dtype=torch.long).to(device, non_blocking=True)
        correct, total, nll = code_hits(logits_TV, labels_T, first, ids.num_audio_codes)
        record = {"correct": correct, "total": total, "nll": nll}
        if s["index"] < _NUM_EXAMPLES:
            targets_T = labels_T[1:]
            is_code_T = (targets_T >= first) & (targets_T < first + ids.num_audio_codes)

            def shown(ids_T: torch.Tensor) -> str:
                return " ".join(str(int(i) - first) for i in ids_T[:_EXAMPLE_CODES].tolist())
            record.update(ref=shown(targets_T[is_code_T]), hyp=shown(logits_TV[:-1].argmax(dim=-1)[is_code_T]))
        out.append(record)
    return out


def _batches(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def _check_group(world_size: int) -> None:
    if world_size > 1 and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size):
        raise ValueError(f"world_size={world_size} needs an initialised process group of that many ranks")


def _gather(records: List[Dict[str, Any]], world_size: int) -> List[Dict[str, Any]]:
    """Every rank's records, in sample order, on every rank."""
    if world_size > 1:
        parts: List[Optional[List[Dict[str, Any]]]] = [None] * world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def _model_device_dtype(model: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)  # stand-in models in tests may have none
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype if param.is_floating_point() else torch.float32


# ------------------------------------------------------------------------------------------ metrics

def _summary(metric: str, records: List[Dict[str, Any]], shards: List[str]) -> Dict[str, Any]:
    if metric == "paralinguistic":
        return eval_voice.paralinguistic_summary(records, shards)
    if metric == "speaker_similarity":
        return eval_voice.speaker_summary(records, shards)
    examples = [{"key": r["key"], "ref": r["ref"], "hyp": r["hyp"]} for r in records[:_NUM_EXAMPLES]]
    if metric == "code_accuracy":
        total = sum(r["total"] for r in records)
        if total == 0:
            raise ValueError(f"eval.shards {shards} hold no sample with audio codes in its answer (run "
                             f"data.codes on them, or pick another metric)")
        return {"value": sum(r["correct"] for r in records) / total, "nll": sum(r["nll"] for r in records) / total,
                "num_codes": total, "num_samples": len(records), "examples": examples}
    if not records:
        raise ValueError(f"eval.shards {shards} yielded no samples")
    refs, hyps = [r["ref"] for r in records], [r["hyp"] for r in records]
    if metric == "wer":
        value = jiwer.wer(refs, hyps)  # an empty hypothesis counts as deletions of every reference word
    else:
        value = sacrebleu.corpus_bleu(hyps, [refs]).score
    return {"value": float(value), "num_samples": len(records), "examples": examples}


@torch.no_grad()
def run_eval(metric: str, model: torch.nn.Module, tok, ids: SpecialIds, shards: List[str], instruction: str,
             max_samples: int, max_new_tokens: int, dtype: Optional[torch.dtype] = None, *,
             device: Optional[torch.device] = None, rank: int = 0, world_size: int = 1, batch_size: int = 8,
             beat: Optional[Callable[[], None]] = None, speaker_model: Optional[str] = None,
             vocoder: Optional[str] = None) -> Dict[str, Any]:
    """{"metric", "value", "num_samples", "examples": [{"key", "ref", "hyp"}]} of `metric` on the first
    `max_samples` usable held-out samples of `shards`: "wer" (ASR, greedy, 0-1), "code_accuracy"
    (speech answers, teacher-forced, 0-1; also "nll", the codes' mean negative log-likelihood, and
    "num_codes"), "bleu" (text answers, greedy, 0-100), "paralinguistic" (answers about the voice, greedy,
    matched to each attribute's labels: the mean of the per-attribute accuracies, 0-1; also "attributes",
    see train.eval_voice.paralinguistic_summary) or "speaker_similarity" (spoken answers, greedy, decoded by
    `vocoder` (default: the codec named in the shards' tokenizer.json) and compared by the `speaker_model`
    encoder (default train.eval_voice.DEFAULT_SPEAKER_MODEL) with the clip in the prompt: mean cosine, see
    train.eval_voice.speaker_summary).

    Every one of `world_size` ranks calls it (a collective when world_size > 1: the results are gathered
    with torch.distributed) and gets the same result; this rank (`rank`) runs samples rank, rank +
    world_size, ... in batches of `batch_size`, on `device` with mels in `dtype` (default: the device and
    dtype of the model's parameters) and calls `beat` (e.g. Watchdog.beat) after each batch. Under ZeRO-3
    call it inside train.engine.inference_model: each forward would otherwise gather the model again, and
    the ranks, which take different numbers of forward steps, would hang in those gathers.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown eval metric {metric!r}: expected one of {list(METRICS)}")
    if batch_size < 1:
        raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _check_group(world_size)
    model_device, model_dtype = _model_device_dtype(model)
    device = model_device if device is None else torch.device(device)
    dtype = model_dtype if dtype is None else dtype
    scorer = eval_voice.SpeakerScorer(shards, speaker_model, vocoder) if metric == "speaker_similarity" else None
    samples = ({**s, "index": i} for i, s in enumerate(_SAMPLES[metric](shards, tok, ids, instruction, max_samples)))
    records: List[Dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(islice(samples, rank, None, world_size), batch_size):
            if metric == "code_accuracy":
                results = _teacher_forced(model, batch, ids, device, dtype)
            elif scorer is not None:
                stops = (ids.end_of_text, ids.eot, ids.tts_end)
                results = scorer.score(batch, _generated_ids(model, batch, ids, max_new_tokens, device, dtype, stops),
                                       ids, tok)
            else:
                clean = normalize_text if metric == "wer" else str.strip
                results = [{"ref": s["ref"], "hyp": clean(hyp), **{k: s[k] for k in ("refs", "task") if k in s}}
                           for s, hyp in zip(batch, _generated(model, batch, tok, ids, max_new_tokens, device, dtype))]
            records += [{"index": s["index"], "key": s["key"], **r} for s, r in zip(batch, results)]
            if beat is not None:
                beat()
    finally:
        model.train(was_training)
    return {"metric": metric, **_summary(metric, _gather(records, world_size), shards)}

"""Rollouts: answers sampled from the policy for a batch of prompts, and the training batch built from them.

A prompt batch comes from the loader with data.render=prompt (right-padded rows, the record's metadata in
batch["meta"]). Each prompt is answered num_generations times by batched KV-cache decoding (left-padded,
temperature and top-p, stopping on <|EOT|>, or <|endoftext|> in the base format), with the policy's parameters gathered once for
the whole rollout under ZeRO-3 (train.engine.inference_model): no forward inside gathers anything, so no
collective runs while ranks decode and a rank whose answers end early simply finishes first.
The answers then become ordinary right-padded training rows (prompt + answer, labels on the answer and its
stop token), collated by data.loading.batching like any batch: the log-probabilities, values and losses of the
RL step are computed on them through the same engines as supervised training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from data.loading.batching import collate
from data.tasks.pieces import IGNORE_INDEX
from model.generate import generate, split_ta4
from train.engine import inference_model

# Step-Audio 2's audio codes (CosyVoice 2 S3 tokens, and the demo's k-means codes) run at 25 Hz.
AUDIO_CODES_PER_S = 25.0


@dataclass
class RolloutSample:
    """One answer, as reward functions see it."""
    key: str
    """The prompt record's key."""
    meta: Dict[str, Any]
    """The prompt record's JSON (reference text, style, speaker, ...)."""
    prompt_ids: List[int]
    answer_ids: List[int]
    """The generated tokens, the stop token included when the answer ended by itself."""
    finished: bool
    """The answer ended with a stop token (not cut at rl.max_new_tokens)."""
    text_ids: List[int] = field(default_factory=list)
    """The answer's text tokens (TA4 split)."""
    audio_codes: List[int] = field(default_factory=list)
    """The answer's audio codes (0-based code values, the audio pad dropped)."""
    text: str = ""
    """The answer's text, decoded."""
    group: int = 0
    """Index of the prompt within the rollout batch: the answers of one prompt share it."""

    @property
    def audio_s(self) -> float:
        return len(self.audio_codes) / AUDIO_CODES_PER_S


@dataclass
class Rollout:
    """A rollout batch: B prompts x n answers, rows in prompt-major order (the n answers of prompt 0 first)."""
    samples: List[RolloutSample]
    rows: List[Dict[str, Any]]
    """Per answer: the training sample (key, input_ids, labels, mels, num_audio_s) that collate() takes."""
    generated_tokens: int
    generation_s: float


def prompt_rows(batch: Dict[str, Any], audio_start_id: int) -> List[Dict[str, Any]]:
    """The prompts of a right-padded prompt batch, one dict each: key, meta, input_ids (unpadded), mels
    (its own [128, F] chunks: a row has one chunk per <audio_start> it holds), num_audio_s."""
    ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
    mels, lengths = batch.get("mels"), batch.get("mel_lengths")
    metas = batch.get("meta") or [{} for _ in range(ids_BT.shape[0])]
    rows, chunk = [], 0
    for b in range(ids_BT.shape[0]):
        ids = ids_BT[b, : int(mask_BT[b].sum())].tolist()
        n_chunks = sum(1 for t in ids if t == audio_start_id)
        row_mels = [mels[i, :, : int(lengths[i])] for i in range(chunk, chunk + n_chunks)] if n_chunks else []
        chunk += n_chunks
        rows.append({"key": batch["keys"][b], "meta": metas[b], "input_ids": ids, "mels": row_mels,
                     "num_audio_s": sum(m.shape[1] for m in row_mels) / 100.0})
    if mels is not None and chunk != mels.shape[0]:
        raise ValueError(f"prompt batch: its rows hold {chunk} audio spans but it has {mels.shape[0]} mel chunks")
    return rows


def left_padded(prompts: List[List[int]], pad_id: int) -> tuple:
    """(input_ids [B, T], attention_mask [B, T]) with every prompt's tokens at the right end."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    return ids, mask


def answer_rows(prompts: List[Dict[str, Any]], answers: List[List[int]], num_generations: int) -> List[Dict[str, Any]]:
    """Training samples (prompt + answer, labels on the answer only) in prompt-major order."""
    rows = []
    for i, answer in enumerate(answers):
        p = prompts[i // num_generations]
        rows.append({"key": p["key"], "input_ids": p["input_ids"] + answer,
                     "labels": [IGNORE_INDEX] * len(p["input_ids"]) + list(answer), "mels": p["mels"],
                     "num_audio_s": p["num_audio_s"]})
    return rows


def answer_mask(batch: Dict[str, Any]) -> torch.Tensor:
    """[B, T] 1 on the answer tokens of a collated rollout batch (where token_logprobs count)."""
    return (batch["labels"] != IGNORE_INDEX).to(torch.float32)


@torch.no_grad()
def sample_answers(engine, prompts: List[Dict[str, Any]], ids, tok, num_generations: int, max_new_tokens: int,
                   temperature: float, top_p: float, generator: Optional[torch.Generator],
                   batch_size: Optional[int] = None) -> Rollout:
    """num_generations sampled answers to each prompt, decoded on engine's device with its parameters gathered
    once (a collective: every rank calls it). batch_size: rows decoded together (default: all of them)."""
    # A speech answer ends <tts_end><|EOT|> (data.tasks.pieces.speech_answer), a base-format ASR answer with
    # <|endoftext|>: stopping at <tts_end> would leave out the <|EOT|> the answer must learn to end with.
    stops = [ids.eot, ids.end_of_text]
    flat = [p for p in prompts for _ in range(num_generations)]
    device, dtype = engine.device, engine.compute_dtype
    answers: List[List[int]] = []
    start = time.perf_counter()
    module = engine.module
    was_training = module.training
    with inference_model(engine) as model:
        model.eval()
        step = batch_size or len(flat)
        for lo in range(0, len(flat), step):
            part = flat[lo: lo + step]
            input_ids, attention_mask = left_padded([p["input_ids"] for p in part], ids.end_of_text)
            chunks = [m for p in part for m in p["mels"]]
            mels = mel_lengths = None
            if chunks:
                from data.loading.batching import pad_mels

                mels, mel_lengths = pad_mels(chunks)
                mels, mel_lengths = mels.to(device=device, dtype=dtype), mel_lengths.to(device)
            answers += generate(model, input_ids.to(device), attention_mask.to(device), mels=mels,
                                mel_lengths=mel_lengths, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                                temperature=temperature, top_p=top_p, generator=generator, include_stop=True)
    module.train(was_training)
    elapsed = time.perf_counter() - start
    samples = []
    for i, answer in enumerate(answers):
        p = flat[i]
        text_ids, codes = split_ta4(answer, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
        text_ids = [t for t in text_ids if t not in (ids.eot, ids.bot, ids.end_of_text)]
        samples.append(RolloutSample(key=p["key"], meta=p["meta"], prompt_ids=p["input_ids"], answer_ids=answer,
                                     finished=bool(answer) and answer[-1] in stops, text_ids=text_ids,
                                     audio_codes=codes, text=tok.decode(text_ids), group=i // num_generations))
    rows = answer_rows(prompts, answers, num_generations)
    return Rollout(samples=samples, rows=rows, generated_tokens=sum(len(a) for a in answers), generation_s=elapsed)


def collate_rows(rows: List[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """A training batch of rollout rows (data.loading.batching.collate: right-padded, counts on the host)."""
    return collate(rows, pad_id)

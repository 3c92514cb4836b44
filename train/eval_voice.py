"""Held-out metrics about the voice, for train.evaluate: paralinguistic understanding (accuracy per attribute
of answers about a heard voice, matched to the attribute's label set) and timbre following (speaker
similarity of a spoken answer to the audio clip its prompt carries, e.g. the one an audio search returned).
"""
from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data.audio import read_audio_bytes
from data.loading.samples import SkipSample, render_raw
from data.loading.shard_reader import read_shard, resolve_shards
from data.tasks import AUDIO, CODES
from data.tasks.speech import PARA_QUESTIONS, para_question
from data.tasks.pieces import IGNORE_INDEX, TemplateError
from data.text_tokenizer import SpecialIds

logger = logging.getLogger(__name__)

# The label sets answers are matched against, per attribute; the references found in the held-out samples
# join them (so a corpus with its own labels, e.g. emotions, needs nothing here).
PARA_LABELS = {"gender": ("male", "female"), "speed": ("slow", "normal", "fast"),
               "pitch": ("low", "normal", "high")}
PARA_TASKS = ("para_qa", "para_caption")
# speaker_similarity: where `python -m train.speaker_encoder fit` (and `make voice-demo`) writes the speaker encoder.
DEFAULT_SPEAKER_MODEL = "runs/speaker/speaker.pt"
MIN_ANSWER_CODES = 8  # a shorter spoken answer has no voice to measure; it scores 0


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _rendered(shards: List[str], tok, ids: SpecialIds, instruction: str, with_answer: bool
              ) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(raw sample, render_raw's dict with "meta") of every usable sample of `shards`, in file order; a sample
    that cannot be rendered is skipped with a warning naming it and why."""
    for path in resolve_shards(shards):
        for raw in read_shard(path):
            try:
                yield raw, render_raw(raw, tok, ids, instruction, max_audio_s=None, with_answer=with_answer,
                                      keep_meta=True)
            except SkipSample as skip:
                logger.warning("evaluation skips %s:%s: %s", os.path.basename(path), raw.get("__key__"), skip)


# ------------------------------------------------------------------------------------ paralinguistic

def para_references(key: str, task: str, meta: Dict[str, Any]) -> List[Tuple[str, str]]:
    """[(attribute, label)] a paralinguistic record's answer is scored on: a para_qa record's one asked
    attribute (its own "question"/"answer" pair needs an "attribute" field), a para_caption record's every
    attribute field. TemplateError naming the key when there is nothing to score."""
    if task == "para_caption":
        refs = [(name, str(meta[name])) for name in PARA_QUESTIONS if name in meta]
        if not refs:
            raise TemplateError("missing_field", f"sample {key!r}: a caption with no attribute field "
                                                 f"({', '.join(PARA_QUESTIONS)}) has nothing to score")
        return refs
    question, answer = para_question(key, meta)
    if "question" in meta or "answer" in meta:
        attribute = meta.get("attribute")
        if not isinstance(attribute, str) or not attribute:
            raise TemplateError("missing_field", f"sample {key!r} has its own question and answer but its field "
                                                 f"'attribute' is {attribute!r}: expected the attribute asked about")
        return [(attribute, answer)]
    return [(next(name for name, q in PARA_QUESTIONS.items() if q == question), answer)]


def paralinguistic_samples(shards, tok, ids: SpecialIds, instruction: str, max_samples: int
                           ) -> Iterator[Dict[str, Any]]:
    produced = 0
    for _, s in _rendered(shards, tok, ids, instruction, with_answer=False):
        if produced >= max_samples:
            return
        if s["task"] not in PARA_TASKS:
            logger.warning("paralinguistic skips %s: task %s is not one of %s", s["key"], s["task"], PARA_TASKS)
            continue
        try:
            refs = para_references(s["key"], s["task"], s["meta"])
        except TemplateError as e:
            logger.warning("paralinguistic skips %s: %s", s["key"], e)
            continue
        produced += 1
        yield {"key": s["key"], "ids": s["input_ids"], "mels": s["mels"], "task": s["task"], "refs": refs,
               "ref": "; ".join(f"{name}: {label}" for name, label in refs)}


def match_label(answer: str, labels: Sequence[str]) -> Optional[str]:
    """The one label of `labels` that `answer` names as whole words (case and punctuation aside); None when
    it names none or several ("male" is not found in "female")."""
    padded = f" {_words(answer)} "
    named = [label for label in labels if f" {_words(label)} " in padded]
    return named[0] if len(named) == 1 else None


def _caption_part(caption: str, attribute: str) -> str:
    """What a caption says after "<attribute>:" up to the sentence's end ("" when it says nothing)."""
    found = re.search(rf"\b{re.escape(attribute)}\s*:\s*([^.]*)", caption, flags=re.IGNORECASE)
    return found.group(1) if found else ""


def paralinguistic_summary(records: List[Dict[str, Any]], shards: List[str]) -> Dict[str, Any]:
    """value: the mean over attributes of each attribute's accuracy (every attribute weighs the same, as
    benchmarks of this kind average their dimensions); "attributes": {name: {accuracy, num_answers}};
    "micro_accuracy" over every scored answer; "unmatched": the share naming no label or several."""
    if not records:
        raise ValueError(f"eval.shards {shards} hold no paralinguistic sample (tasks {', '.join(PARA_TASKS)} with "
                         f"attribute fields such as {', '.join(PARA_QUESTIONS)})")
    labels = {name: list(PARA_LABELS.get(name, ())) for r in records for name, _ in r["refs"]}
    for r in records:
        for name, label in r["refs"]:
            if _words(label) not in map(_words, labels[name]):
                labels[name].append(label)
    hits: Dict[str, List[bool]] = {name: [] for name in sorted(labels)}
    unmatched = 0
    for r in records:
        for name, label in r["refs"]:
            said = _caption_part(r["hyp"], name) if r["task"] == "para_caption" else r["hyp"]
            picked = match_label(said, labels[name])
            unmatched += picked is None
            hits[name].append(picked is not None and _words(picked) == _words(label))
    accuracy = {name: sum(h) / len(h) for name, h in hits.items()}
    num_answers = sum(len(h) for h in hits.values())
    return {"value": sum(accuracy.values()) / len(accuracy),
            "attributes": {name: {"accuracy": accuracy[name], "num_answers": len(hits[name])} for name in hits},
            "micro_accuracy": sum(sum(h) for h in hits.values()) / num_answers, "unmatched": unmatched / num_answers,
            "num_samples": len(records),
            "examples": [{"key": r["key"], "ref": r["ref"], "hyp": r["hyp"]} for r in records[:3]]}


# ------------------------------------------------------------------------------------- speaker similarity

def _last_answer_start(labels: List[int]) -> int:
    """Where the last labelled run begins (the final answer, after e.g. a tool call and its result); 0
    without labels."""
    start = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def speaker_samples(shards, tok, ids: SpecialIds, instruction: str, max_samples: int) -> Iterator[Dict[str, Any]]:
    """Samples whose final answer is speech and whose record holds an audio clip (`flac`) with its codes: the
    prompt up to that answer's <tts_start>, the clip (16 kHz), its codes and the reference answer's codes."""
    produced = 0
    for raw, s in _rendered(shards, tok, ids, instruction, with_answer=True):
        if produced >= max_samples:
            return
        key, labels = s["key"], s["labels"]
        start = _last_answer_start(labels)
        prompt = s["input_ids"][:start]
        why = ("its final answer is not speech" if not prompt or prompt[-1] != ids.tts_start else
               f"it has no audio clip ({AUDIO})" if AUDIO not in raw else
               f"its clip has no codes ({CODES}: run data.codes on eval.shards)" if CODES not in raw else None)
        clip_codes = [] if why else np.load(io.BytesIO(raw[CODES]), allow_pickle=False).reshape(-1).tolist()
        if not why and len(clip_codes) < MIN_ANSWER_CODES:
            why = f"its clip has {len(clip_codes)} codes, under {MIN_ANSWER_CODES}: too short to tell its voice"
        if why:  # decided on every rank alike: each reads every sample
            logger.warning("speaker_similarity skips %s: %s", key, why)
            continue
        answer = [t - ids.first_audio_code for t in labels[start:]
                  if ids.first_audio_code <= t < ids.first_audio_code + ids.num_audio_codes]
        produced += 1
        yield {"key": key, "ids": prompt, "mels": s["mels"][:prompt.count(ids.audio_start)],
               "clip": read_audio_bytes(raw[AUDIO], f"{key}.{AUDIO}"), "clip_codes": clip_codes,
               "ref_codes": answer, "text": s["text"], "speaker": s["meta"].get("speaker")}


def vocoder_spec(shards: List[str]) -> str:
    """The codec that made the shards' codes, as data.codes recorded it (tokenizer.json "spec")."""
    from data.shards import local_shard_paths
    from data.codes.encode import read_tokenizer_record
    local_shard_paths(shards, "speaker_similarity", "reads its codec from the tokenizer.json beside the shards")
    folders = sorted({os.path.dirname(p) for p in resolve_shards(shards)})
    specs = {(read_tokenizer_record(f) or {}).get("spec") for f in folders}
    if len(specs) != 1 or not isinstance(next(iter(specs)), str):
        raise ValueError(f"eval.shards {shards}: their tokenizer.json files name the codecs {sorted(map(str, specs))}; "
                         f"speaker_similarity needs the one codec that made their codes (run data.codes on them, "
                         f"or pass vocoder=)")
    return specs.pop()


class SpeakerScorer:
    """Decodes spoken answers with the shards' codec and compares their voice with the clip's, by
    model.speaker's encoder; every waveform compared has gone through the same codec."""

    def __init__(self, shards: List[str], speaker_model: Optional[str] = None, vocoder: Optional[str] = None):
        from model.speaker import SpeakerEncoder
        from model.vocoder import load_vocoder
        speaker_model = speaker_model or DEFAULT_SPEAKER_MODEL
        if not os.path.isfile(speaker_model):
            raise ValueError(f"speaker_similarity needs a speaker encoder at {speaker_model!r}: train one with "
                             f"`python -m train.speaker_encoder fit {speaker_model}`")
        self.encoder = SpeakerEncoder.load(speaker_model)
        spec = vocoder or vocoder_spec(shards)
        try:
            self.vocoder = load_vocoder(spec)
        except (ValueError, OSError) as exc:
            raise ValueError(f"speaker_similarity cannot decode the codes of {shards} with {spec!r}: {exc}") from None

    def embed_codes(self, codes: Sequence[int]) -> Optional[torch.Tensor]:
        """Unit speaker embedding of the codes' speech; None under MIN_ANSWER_CODES usable codes."""
        codes = [int(c) for c in codes if int(c) < getattr(self.vocoder, "num_codes", 1 << 30)]
        if len(codes) < MIN_ANSWER_CODES:
            return None
        return self.encoder.embed([self.vocoder.codes_to_wave(codes).float()], self.vocoder.sample_rate)[0]

    def score(self, batch: List[Dict[str, Any]], new_ids: List[List[int]], ids: SpecialIds, tok
              ) -> List[Dict[str, Any]]:
        """One record per sample of a batch and the ids its prompt generated."""
        from model.generate import split_ta4
        out = []
        for s, row in zip(batch, new_ids):
            text, codes = split_ta4(row, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
            answer, clip, ref = (self.embed_codes(c) for c in (codes, s["clip_codes"], s["ref_codes"]))
            if clip is None:  # codes the codec does not know
                raise ValueError(f"sample {s['key']!r}: its clip's codes are not codes of the codec "
                                 f"({getattr(self.vocoder, 'num_codes', '?')} codes)")
            similarity = _cos(answer, clip)
            out.append({"similarity": similarity, "similarity_raw_clip": _cos(answer, self.encoder.embed([s["clip"]],
                                                                                                   16000)[0]),
                        "reference": _cos(ref, clip), "num_codes": len(codes), "speaker": s["speaker"],
                        "answer_emb": None if answer is None else answer.tolist(), "clip_emb": clip.tolist(),
                        "ref": s["text"], "hyp": f"{tok.decode(text, skip_special_tokens=True).strip()} "
                                                 f"[{len(codes)} codes, similarity {similarity:.3f}]"})
        return out


def _cos(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """Cosine of two embeddings; 0 where one is missing (speech too short to measure)."""
    return 0.0 if a is None or b is None else float(F.cosine_similarity(a, b, dim=0))


def speaker_summary(records: List[Dict[str, Any]], shards: List[str]) -> Dict[str, Any]:
    """value: mean cosine between each answer's voice and its clip's (both through the codec; an answer
    too short to measure counts 0); "similarity_raw_clip": the same against the clip as recorded;
    "reference": what the reference answers score (the data's ceiling); "other_voices": answers against the
    clips of the other speakers (the chance level; None without "speaker" fields or measurable answers)."""
    if not records:
        raise ValueError(f"eval.shards {shards} hold no sample with a spoken final answer and an audio clip with "
                         f"codes (e.g. task timbre_search after data.codes)")
    def mean(values: List[float]) -> float:
        return sum(values) / len(values) if values else float("nan")
    others = []
    for r in records:
        if r["answer_emb"] is None or r["speaker"] is None:
            continue
        clips = [o["clip_emb"] for o in records if o["speaker"] is not None and o["speaker"] != r["speaker"]]
        if clips:
            others.append(float((torch.tensor(clips) @ torch.tensor(r["answer_emb"])).mean()))
    return {"value": mean([r["similarity"] for r in records]),
            "similarity_raw_clip": mean([r["similarity_raw_clip"] for r in records]),
            "reference": mean([r["reference"] for r in records]), "other_voices": mean(others) if others else None,
            "num_too_short": sum(r["answer_emb"] is None for r in records),
            "mean_codes": mean([float(r["num_codes"]) for r in records]), "num_samples": len(records),
            "examples": [{"key": r["key"], "ref": r["ref"], "hyp": r["hyp"]} for r in records[:3]]}

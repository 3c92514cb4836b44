"""One raw sample (a tar's members by extension) made usable: its JSON, audio decoded to 16 kHz and cut into
128-bin log-mel chunks, its audio codes, then rendered by its task's template into token ids and labels
(render_raw; render_pair for a chosen and a rejected answer). A sample that cannot be used raises SkipSample
with the reason the loader counts it under.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torchaudio

from data.audio import AudioError, decode_audio
from data.features import SAMPLE_RATE, log_mel, num_audio_tokens, split_chunks
from data.tasks import ANSWERS, DEFAULT_TASK, TASKS, RenderOptions, Sample
from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION, IGNORE_INDEX, TemplateError
from data.text_tokenizer import SpecialIds


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the stats key, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# data.audio's reasons -> our stats keys; anything else it rejects is "bad_audio".
_AUDIO_REASONS = {"non-finite samples": "non_finite_audio", "empty audio": "too_short"}


def _parse_meta(raw: Dict[str, Any], max_audio_s: Optional[float]) -> Dict[str, Any]:
    """The record's JSON object, or SkipSample with the reason."""
    if "__error__" in raw:
        raise SkipSample(raw.get("__reason__", "bad_shard"), raw["__error__"])
    if "json" not in raw:
        raise SkipSample("missing_json")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SkipSample("bad_json") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json")
    duration_s = meta.get("duration_s")
    # The metadata's duration lets a long sample be dropped before paying for its decode.
    if max_audio_s is not None and isinstance(duration_s, (int, float)) and duration_s > max_audio_s:
        raise SkipSample("too_long")
    return meta


def _decode_member(raw: Dict[str, Any], member: str, max_audio_s: Optional[float]) -> torch.Tensor:
    """16 kHz waveform of an audio member ("flac", "target.flac"; a ".wav" of the same name also does)."""
    audio = raw.get(member)
    if audio is None and member.endswith("flac"):
        audio = raw.get(member[:-4] + "wav")
    if audio is None:
        raise SkipSample("missing_audio", f"no member {member!r}")
    try:
        wave_T, sample_rate = decode_audio(audio, f"{sample_name(raw)}.{member}")
    except AudioError as e:
        raise SkipSample(_AUDIO_REASONS.get(e.reason.split(" (")[0], "bad_audio")) from None
    except Exception:  # whatever else a decoder throws at odd bytes costs one sample, not the run
        raise SkipSample("bad_audio") from None
    if sample_rate != SAMPLE_RATE:
        wave_T = torchaudio.functional.resample(wave_T, sample_rate, SAMPLE_RATE)
    if max_audio_s is not None and len(wave_T) > max_audio_s * SAMPLE_RATE:
        raise SkipSample("too_long")
    return wave_T


def _read_codes(raw: Dict[str, Any], member: str) -> np.ndarray:
    """The 1-D integer audio codes in a `.npy` member; missing -> "missing_codes", unreadable -> "bad_codes"."""
    if member not in raw:
        raise SkipSample("missing_codes", f"no member {member!r} (run data.codes on the shards)")
    try:
        codes = np.load(io.BytesIO(raw[member]), allow_pickle=False)
    except Exception:  # any broken .npy costs one sample
        raise SkipSample("bad_codes", f"{member!r} is not a .npy array") from None
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise SkipSample("bad_codes", f"{member!r} holds {codes.dtype} {codes.shape}: expected 1-D integers")
    return codes


def _chunk_mels(wave_T: torch.Tensor) -> List[torch.Tensor]:
    """Log-mel [128, F] per 25 s chunk; a tail chunk too short for one audio token is dropped."""
    mels = [log_mel(chunk) for chunk in split_chunks(wave_T)]
    mels = [m for m in mels if num_audio_tokens(m.shape[1]) >= 1]
    if not mels:
        raise SkipSample("too_short")
    return mels


def _record(raw: Dict[str, Any], max_audio_s: Optional[float], default_task: str,
            force_task: Optional[str]) -> Tuple[Dict[str, Any], str, Any]:
    """(the record's JSON, its task name, the Task), or SkipSample with the reason."""
    meta = _parse_meta(raw, max_audio_s)
    name = force_task or meta.get("task", default_task)
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise SkipSample("unknown_task", f"task {name!r} is not one of {sorted(TASKS)}")
    return meta, name, task


def _members(members, meta: Dict[str, Any]) -> List[str]:
    try:
        return members(meta)
    except TemplateError as e:
        raise SkipSample(e.reason, str(e)) from None


def _inputs(raw: Dict[str, Any], meta: Dict[str, Any], task, code_members: List[str],
            max_audio_s: Optional[float], min_audio_s: float) -> Tuple[Sample, Dict[str, List[torch.Tensor]], float]:
    """(the Sample a template renders, {audio member: log-mel per chunk}, seconds of audio decoded): the
    codes members named and every audio member the task reads; SkipSample with the reason if one is unusable."""
    sample = Sample(raw["__key__"], meta)
    audio_members = _members(task.audio, meta)
    duration_s = meta.get("duration_s")
    if audio_members and isinstance(duration_s, (int, float)) and duration_s < min_audio_s:
        raise SkipSample("too_short")  # by the metadata, before paying for the decode
    # Codes first: a record waiting for data.codes is skipped without decoding its audio.
    sample.codes = {m: _read_codes(raw, m) for m in code_members}
    waves = {m: _decode_member(raw, m, max_audio_s) for m in audio_members}
    num_audio_s = sum(len(wave_T) for wave_T in waves.values()) / SAMPLE_RATE
    if audio_members and num_audio_s < min_audio_s:
        raise SkipSample("too_short")
    mels = {m: _chunk_mels(wave_T) for m, wave_T in waves.items()}
    sample.mel_frames = {m: [x.shape[1] for x in chunks] for m, chunks in mels.items()}
    return sample, mels, num_audio_s


def _render_task(task, sample: Sample, tok, ids: SpecialIds, options: RenderOptions):
    try:
        return task.render(sample, tok, ids, options)
    except TemplateError as e:
        raise SkipSample(e.reason, str(e)) from None


def render_raw(raw: Dict[str, Any], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
               max_audio_s: Optional[float] = None, with_answer: bool = True, default_task: str = DEFAULT_TASK,
               force_task: Optional[str] = None, min_audio_s: float = 0.0, answer: str = "chosen",
               keep_meta: bool = False) -> Dict[str, Any]:
    """Render a raw sample with its record's task (or `force_task`); SkipSample with the reason if it cannot.

    Returns {key, task, text, mels: [128, F] per chunk, num_audio_s, input_ids, labels}, plus "meta" (the
    record's JSON and its "key") with `keep_meta`. with_answer=False renders the prompt: labels all -100,
    and of the codes only those the prompt reads (Task.prompt_codes) are needed. `answer` picks a paired
    task's answer (RenderOptions.answer).
    """
    meta, name, task = _record(raw, max_audio_s, default_task, force_task)
    code_members = _members(task.codes if with_answer else task.prompt_codes, meta)
    sample, mels, num_audio_s = _inputs(raw, meta, task, code_members, max_audio_s, min_audio_s)
    rendered = _render_task(task, sample, tok, ids, RenderOptions(instruction, with_answer, answer))
    # A prompt carries no loss, whatever a template labels.
    labels = rendered.labels if with_answer else [IGNORE_INDEX] * len(rendered.input_ids)
    out = {"key": raw["__key__"], "task": name, "text": meta.get("text", ""),
           "mels": [m for member in rendered.audio for m in mels[member]], "num_audio_s": num_audio_s,
           "input_ids": rendered.input_ids, "labels": labels}
    if keep_meta:
        out["meta"] = {**meta, "key": raw["__key__"]}
    return out


def render_pair(raw: Dict[str, Any], tok, ids: SpecialIds, instruction: str = DEFAULT_ASR_INSTRUCTION,
                max_audio_s: Optional[float] = None, default_task: str = DEFAULT_TASK,
                force_task: Optional[str] = None, min_audio_s: float = 0.0) -> Dict[str, Any]:
    """A record of a paired task rendered with its chosen and with its rejected answer, as one sample:
    {key, task, text, meta (the record's JSON and "key"), pair: [chosen, rejected]}, each of the two
    {key, input_ids, labels, mels, num_audio_s} like render_raw's dict (the prompt's audio is decoded once
    and heard by both). SkipSample("not_a_pair") for a record whose task is not paired or that lacks an answer.
    """
    meta, name, task = _record(raw, max_audio_s, default_task, force_task)
    if not task.paired:
        raise SkipSample("not_a_pair", f"task {name!r} renders one answer, not a chosen and a rejected one")
    code_members = _members(task.codes, meta)
    sample, mels, num_audio_s = _inputs(raw, meta, task, code_members, max_audio_s, min_audio_s)
    rows = []
    for answer in ANSWERS:
        rendered = _render_task(task, sample, tok, ids, RenderOptions(instruction, True, answer))
        rows.append({"key": raw["__key__"], "input_ids": rendered.input_ids, "labels": rendered.labels,
                     "mels": [m for member in rendered.audio for m in mels[member]], "num_audio_s": num_audio_s})
    return {"key": raw["__key__"], "task": name, "text": meta.get("text", ""),
            "meta": {**meta, "key": raw["__key__"]}, "pair": rows}


def sample_name(raw: Dict[str, Any]) -> str:
    return f"{os.path.basename(raw['__url__'])}:{raw['__key__']}"

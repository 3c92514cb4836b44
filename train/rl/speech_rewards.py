"""Reward functions for spoken answers, named in rl.rewards as `train.rl.speech_rewards:NAME` with their
paths in `args`: the requested speaking style (a classifier over the answer's decoded mel), speaking rate
(closed form), intelligibility (the answer decoded and transcribed by an ASR export), a guard against
degenerate audio, and speaker similarity to a reference voice. Each returns one float in [0, 1] per answer.

Models and codecs are loaded once per process (cached by path). The requested style and words come from the
prompt record (`meta`): the demo's dialogue records carry "style" ("slowly", "quickly", "in a high voice")
and the words as the assistant turn's text; a record's top-level "text" wins when it has one.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from train.rl.rule_rewards import word_error_rate
from train.rl.rollout import AUDIO_CODES_PER_S

# Requested styles as the classifier's classes (model.style.STYLES); data.tools.demo.STYLES' strings included.
STYLE_CLASSES = {"normal": "normal", "neutral": "normal", "slow": "slow", "slowly": "slow", "fast": "fast",
                 "quick": "fast", "quickly": "fast", "high": "high", "in a high voice": "high", "high pitch": "high",
                 "low": "low", "in a low voice": "low", "low pitch": "low", "whisper": "whisper",
                 "whispering": "whisper", "in a whisper": "whisper"}
_AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")


# ------------------------------------------------------------------------------------- the record

def requested_style(meta: Dict[str, Any], field: str = "style") -> str:
    """The classifier class a record asks for: its `field` mapped by STYLE_CLASSES; "normal" without one."""
    value = meta.get(field)
    if value is None or value == "":
        return "normal"
    style = STYLE_CLASSES.get(str(value).strip().lower())
    if style is None:
        raise ValueError(f"record {meta.get('key', '?')!r}: {field}={value!r} is not a known style (expected one of "
                         f"{sorted(STYLE_CLASSES)})")
    return style


def requested_words(meta: Dict[str, Any], field: str = "text") -> str:
    """The words an answer should say: the record's `field`, else its last assistant turn's text."""
    value = meta.get(field)
    if isinstance(value, str):
        return value
    for turn in reversed(meta.get("messages") or []):
        if isinstance(turn, dict) and turn.get("role") == "assistant" and isinstance(turn.get("text"), str):
            return turn["text"]
    raise ValueError(f"record {meta.get('key', '?')!r} has no {field!r} field and no assistant turn with text: "
                     f"nothing says which words were asked for")


# ----------------------------------------------------------------------------- codecs and models

@functools.lru_cache(maxsize=4)
def _vocoder(spec: str):
    from model.vocoder import load_vocoder
    if ":" not in spec:
        spec = f"kmeans:{spec}"
    return load_vocoder(spec)


def codes_to_mel(codes: Sequence[int], spec: str) -> torch.Tensor:
    """The log-mel [128, F] at 100 Hz that an answer's codes stand for: a k-means codec's centroid frames
    directly (no waveform needed), any other vocoder's waveform through data.features.log_mel."""
    vocoder = _vocoder(spec)
    tokenizer = getattr(vocoder, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.decode_features(list(codes))
    from data.features import log_mel
    return log_mel(codes_to_wave16k(codes, spec))


def codes_to_wave16k(codes: Sequence[int], spec: str) -> torch.Tensor:
    """The answer's waveform at 16 kHz through the vocoder `spec` (kmeans:FILE.pt or token2wav:MODULE:ATTR)."""
    import torchaudio
    vocoder = _vocoder(spec)
    wave_T = vocoder.codes_to_wave(list(codes)).float()
    if vocoder.sample_rate != 16000:
        wave_T = torchaudio.functional.resample(wave_T, vocoder.sample_rate, 16000)
    return wave_T


@functools.lru_cache(maxsize=2)
def _classifier(path: str):
    from model.style import StyleClassifier
    return StyleClassifier.load(path)


@functools.lru_cache(maxsize=2)
def _asr(path: str, device: str):
    from data.text_tokenizer import load_tokenizer, special_ids
    from model.checkpoint import load_stepfun
    tok = load_tokenizer(path)
    return load_stepfun(path, device=device).eval(), tok, special_ids(tok)


@functools.lru_cache(maxsize=2)
def _speaker(path: str):
    from model.speaker import SpeakerEncoder
    return SpeakerEncoder.load(path)


@functools.lru_cache(maxsize=4)
def _reference_embedding(speaker_model: str, folder: str) -> torch.Tensor:
    from data.audio import read_audio
    if not os.path.isdir(folder):
        raise ValueError(f"speaker_similarity references={folder!r}: no such folder (expected recordings of the voice)")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(_AUDIO_EXTENSIONS))
    if not paths:
        raise ValueError(f"speaker_similarity references={folder!r}: no {'/'.join(_AUDIO_EXTENSIONS)} files in it")
    return _speaker(speaker_model).embed([read_audio(p) for p in paths], 16000).mean(0)


# -------------------------------------------------------------------------------------- rewards

def style(samples, classifier: str, codes: str, field: str = "style", min_codes: int = 8) -> List[float]:
    """P(requested style) under the style classifier (`python -m train.style_classifier fit`, trained with
    the same `codes`) of the answer's decoded mel; 0 for an answer with fewer than `min_codes` codes."""
    model = _classifier(classifier)
    wanted = [requested_style(s.meta, field) for s in samples]
    unknown = sorted(set(wanted) - set(model.styles))
    if unknown:
        raise ValueError(f"style reward: classifier {classifier} has no class {unknown} (it knows {model.styles})")
    rows = [i for i, s in enumerate(samples) if len(s.audio_codes) >= min_codes]
    probs = model.probabilities([codes_to_mel(samples[i].audio_codes, codes) for i in rows]) if rows else None
    out = [0.0] * len(samples)
    for j, i in enumerate(rows):
        out[i] = float(probs[j, model.styles.index(wanted[i])])
    return out


def speaking_rate(samples, normal_s_per_word: float = 0.34, slow: float = 1.4, fast: float = 1.4,
                  tolerance: float = 1.2, falloff: float = 1.5, field: str = "text", style_field: str = "style"
                  ) -> List[float]:
    """Seconds of audio (codes / 25) per word asked for, against the requested style's target: at least
    `slow` x normal_s_per_word for slow, at most normal_s_per_word / `fast` for fast, within a factor
    `tolerance` of normal_s_per_word for every other style. 1 on target, falling linearly in log time to 0 at a
    factor `falloff` beyond it; 0 without audio.

    Defaults: the demo's answer voice (espeak en-us+m3 at 175 wpm) takes 0.34 s per word of whole render, its
    "slowly" 1.62x that and "quickly" 1/1.52x: espeak's own renders score 1."""
    if not (normal_s_per_word > 0 and slow >= 1 and fast >= 1 and tolerance >= 1 and falloff > 1):
        raise ValueError(f"speaking_rate: expected normal_s_per_word > 0, slow, fast, tolerance >= 1 and falloff > 1, "
                         f"got {normal_s_per_word}, {slow}, {fast}, {tolerance}, {falloff}")
    out = []
    for s in samples:
        words = len(requested_words(s.meta, field).split())
        wanted = requested_style(s.meta, style_field)
        if not s.audio_codes or words == 0:
            out.append(0.0)
            continue
        per_word = len(s.audio_codes) / AUDIO_CODES_PER_S / words
        low, high = {"slow": (normal_s_per_word * slow, math.inf), "fast": (0.0, normal_s_per_word / fast)}.get(
            wanted, (normal_s_per_word / tolerance, normal_s_per_word * tolerance))
        miss = math.log(low / per_word) if per_word < low else math.log(per_word / high) if per_word > high else 0.0
        out.append(max(0.0, 1.0 - miss / math.log(falloff)))
    return out


def transcribe(waves: Sequence[torch.Tensor], asr_model: str, device: str = "cpu", max_new_tokens: int = 64,
               batch_size: int = 8, instruction: Optional[str] = None) -> List[str]:
    """Greedy transcripts of 16 kHz waveforms by an ASR export (StepFun layout, tokenizer inside), prompted as
    train.evaluate prompts ASR: instruction, one audio span per 25 s chunk, then the transcript."""
    from data.loading.batching import pad_mels
    from data.features import log_mel, num_audio_tokens, split_chunks
    from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION, render_asr
    from model.generate import generate
    model, tok, ids = _asr(asr_model, device)
    dtype = next(model.parameters()).dtype
    out: List[str] = []
    for first in range(0, len(waves), batch_size):
        prompts, mels = [], []
        for wave_T in waves[first:first + batch_size]:
            chunks = [m for m in (log_mel(c) for c in split_chunks(wave_T)) if num_audio_tokens(m.shape[1]) >= 1]
            prompts.append(render_asr("", [m.shape[1] for m in chunks], tok, ids,
                                      instruction or DEFAULT_ASR_INSTRUCTION, with_answer=False).input_ids)
            mels += chunks
        width = max(len(p) for p in prompts)
        ids_BT = torch.full((len(prompts), width), ids.end_of_text, dtype=torch.long)
        mask_BT = torch.zeros_like(ids_BT)
        for b, p in enumerate(prompts):  # left-padded, as generate expects
            ids_BT[b, width - len(p):] = torch.tensor(p)
            mask_BT[b, width - len(p):] = 1
        mels_NMF, lengths_N = pad_mels(mels)
        with torch.no_grad():
            new_ids = generate(model, ids_BT.to(device), mask_BT.to(device), mels_NMF.to(device, dtype),
                               lengths_N.to(device), max_new_tokens=max_new_tokens,
                               stop_token_ids=(ids.end_of_text, ids.eot))
        out += [tok.decode(row, skip_special_tokens=True) for row in new_ids]
    return out


def intelligibility(samples, asr_model: str, codes: str, field: str = "text", sharpness: float = 3.0,
                    device: str = "cpu", max_new_tokens: int = 64, batch_size: int = 8, min_codes: int = 8,
                    instruction: Optional[str] = None) -> List[float]:
    """1 - tanh(sharpness x WER) of the ASR transcript of the answer's audio (decoded by the vocoder `codes`)
    against the words asked for (CosyVoice 2's RL reward); 0 for an answer with fewer than `min_codes` codes."""
    rows = [i for i, s in enumerate(samples) if len(s.audio_codes) >= min_codes]
    texts = transcribe([codes_to_wave16k(samples[i].audio_codes, codes) for i in rows], asr_model, device,
                       max_new_tokens, batch_size, instruction) if rows else []
    out = [0.0] * len(samples)
    for i, text in zip(rows, texts):
        out[i] = 1.0 - math.tanh(sharpness * word_error_rate(text, requested_words(samples[i].meta, field)))
    return out


def _ramp(value: float, good: float, bad: float) -> float:
    """1 at `good` or better, 0 at `bad` or worse, linear between (either direction)."""
    t = (value - good) / (bad - good)
    return float(min(1.0, max(0.0, 1.0 - t)))


@functools.lru_cache(maxsize=4)
def _silent_codes(spec: str, silence_db: float) -> torch.Tensor:
    """[num_codes] bool: codes whose centroid frame's total power is `silence_db` below the loudest centroid's."""
    tokenizer = getattr(_vocoder(spec), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"audio_guard codes={spec!r}: silence needs a k-means codec (kmeans:FILE.pt)")
    energy_K = torch.logsumexp((tokenizer.centroids_KM * 4.0 - 4.0) * math.log(10.0), dim=1) / math.log(10.0)
    return energy_K < energy_K.max() - silence_db / 10.0


def audio_guard(samples, codes: Optional[str] = None, min_codes: int = 10, max_run_s: float = 0.8,
                min_distinct_share: float = 0.25, max_silence_share: float = 0.4, silence_db: float = 40.0
                ) -> List[float]:
    """1 for clean audio, towards 0 for the artefacts a style reward could be won by; the product of:

    - length: 0 below `min_codes` codes (an answer without audio scores 0);
    - the longest run of one code: 1 up to `max_run_s` seconds, 0 at 3x that (a held code is a frozen frame);
    - distinct codes / codes: 1 from `min_distinct_share`, 0 at a quarter of it (loops of a few codes);
    - with a k-means `codes` file, the share of silent codes (centroid power `silence_db` below the codebook's
      loudest): 1 up to `max_silence_share`, 0 at 0.9 (silence wins "slow" for free).

    Calibrated on espeak renders of the demo voice through a 256-code k-means codec: all styles, slow
    included, score 1 (see the README's figures)."""
    silent = _silent_codes(codes, silence_db) if codes else None
    out = []
    for s in samples:
        c = list(s.audio_codes)
        if len(c) < min_codes:
            out.append(0.0)
            continue
        run = best = 1
        for a, b in zip(c, c[1:]):
            run = run + 1 if a == b else 1
            best = max(best, run)
        score = _ramp(best / AUDIO_CODES_PER_S, max_run_s, 3 * max_run_s)
        score *= _ramp(len(set(c)) / len(c), min_distinct_share, min_distinct_share / 4)
        if silent is not None:
            if max(c) >= len(silent) or min(c) < 0:
                raise ValueError(f"audio_guard: sample {s.key!r} has codes {min(c)}..{max(c)}, outside the codec "
                                 f"{codes} (0..{len(silent) - 1})")
            score *= _ramp(float(silent[torch.tensor(c)].float().mean()), max_silence_share, 0.9)
        out.append(score)
    return out


def speaker_similarity(samples, speaker_model: str, references: str, codes: str, min_codes: int = 8
                       ) -> List[float]:
    """Cosine (clipped at 0) between the answer's voice and the mean voice of the recordings under
    `references`, by model.speaker's encoder (`python -m train.speaker_encoder fit`); 0 for an answer with fewer than
    `min_codes` codes. For a custom-voice run: the answer should still sound like the user's speaker."""
    reference = _reference_embedding(speaker_model, references)
    encoder = _speaker(speaker_model)
    out = []
    for s in samples:
        if len(s.audio_codes) < min_codes:
            out.append(0.0)
            continue
        emb = encoder.embed([codes_to_wave16k(s.audio_codes, codes)], 16000)[0]
        out.append(max(0.0, float(torch.nn.functional.cosine_similarity(emb, reference, dim=0))))
    return out

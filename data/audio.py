"""Audio I/O: read any soundfile-readable file or blob as 16 kHz mono float32, and the FLAC bytes in shards.

Every audio problem a user can cause (missing, unreadable, empty, non-finite) is an AudioError naming
the file, so corpus tools can reject the sample with a reason instead of crashing.
"""
from __future__ import annotations

import io
import os

import numpy as np
import soundfile as sf
import torch
import torchaudio

from data.features import SAMPLE_RATE


class AudioError(ValueError):
    """An audio file or blob that cannot be used; `reason` is the short problem, `path` the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{reason}: {path}")
        self.path = path
        self.reason = reason


def _why(exc: Exception) -> str:
    # libsndfile's own words ("Format not recognised.") without the path it repeats.
    return str(getattr(exc, "error_string", "") or exc).rstrip(".")


def _to_mono_T(samples_TC: np.ndarray, name: str) -> torch.Tensor:
    if samples_TC.shape[0] == 0:
        raise AudioError(name, "empty audio (no samples)")
    if not np.isfinite(samples_TC).all():
        raise AudioError(name, "non-finite samples (NaN or inf)")
    return torch.from_numpy(samples_TC.mean(axis=1, dtype=np.float32))


def read_audio(path: str) -> torch.Tensor:
    """The file at `path` as float32 mono 16 kHz [T]: channels averaged, resampled if needed."""
    if not os.path.isfile(path):
        raise AudioError(path, "file not found")
    try:
        samples_TC, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(path, f"unreadable audio ({_why(exc)})") from None
    wave_T = _to_mono_T(samples_TC, path)
    if sample_rate != SAMPLE_RATE:
        wave_T = torchaudio.functional.resample(wave_T, sample_rate, SAMPLE_RATE)
    return wave_T


def encode_flac(wave_T: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> bytes:
    """FLAC (PCM_16) bytes of a mono float waveform in [-1, 1]; values outside are clipped.

    We quantise to int16 ourselves (x * 32768, rounded) because that is the exact inverse of how
    soundfile reads 16-bit audio as float: a 16-bit source survives read -> encode -> decode unchanged.
    """
    if wave_T.dim() != 1:
        raise ValueError(f"encode_flac expects a mono waveform [T], got shape {tuple(wave_T.shape)}")
    pcm_T = np.clip(np.round(wave_T.detach().cpu().double().numpy() * 32768.0), -32768, 32767)
    buffer = io.BytesIO()
    sf.write(buffer, pcm_T.astype(np.int16), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_audio(data: bytes, name: str = "<audio bytes>") -> tuple[torch.Tensor, int]:
    """Decode an audio blob (FLAC, WAV, ...) to (float32 mono [T], its sample rate); no resampling.

    `name` (e.g. the shard and sample key) only goes into the error message.
    """
    try:
        samples_TC, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(name, f"unreadable audio ({_why(exc)})") from None
    return _to_mono_T(samples_TC, name), sample_rate


def read_audio_bytes(data: bytes, name: str = "<audio bytes>") -> torch.Tensor:
    """An in-memory audio file (e.g. a Hugging Face Audio cell) as float32 mono 16 kHz [T], like read_audio."""
    wave_T, sample_rate = decode_audio(data, name)
    if sample_rate != SAMPLE_RATE:
        wave_T = torchaudio.functional.resample(wave_T, sample_rate, SAMPLE_RATE)
    return wave_T

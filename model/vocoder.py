"""Audio codes -> waveform: the `Vocoder` interface, a built-in k-means vocoder (centroid mel, Griffin-Lim) so
a demo model can be heard, and a wrapper for a user-supplied token2wav such as CosyVoice 2's.

`load_vocoder("kmeans:FILE.pt" | "token2wav:MODULE:ATTR")` builds one from a command-line spec.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torchaudio

from data.audio import decode_audio
from data.codes.tokenizers import KMEANS_FRAMES_PER_CODE, KMeansTokenizer
from data.features import HOP, N_FFT, N_MELS, SAMPLE_RATE

# Samples of output per code: each code is 4 mel frames of 160 samples (10 ms) at 16 kHz.
KMEANS_SAMPLES_PER_CODE = KMEANS_FRAMES_PER_CODE * HOP


@runtime_checkable
class Vocoder(Protocol):
    """Turns a stream of audio codes (0..num_codes-1, no pad) into a mono waveform at `sample_rate`."""
    sample_rate: int

    def codes_to_wave(self, codes: Sequence[int]) -> torch.Tensor:
        """Float32 mono waveform [T] of the codes."""
        ...


@functools.lru_cache(maxsize=2)
def _mel_pinv_FM(n_mels: int) -> torch.Tensor:
    # The filters are 128 x 201, so power mel -> power spectrum is underdetermined; the pseudo-inverse
    # gives the least-energy spectrum, which spreads each band's power over its filter.
    # Same filters as data.features.log_mel (Slaney scale and norm, 0-8 kHz).
    fb_FM = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE,
                                                  norm="slaney", mel_scale="slaney")
    return torch.linalg.pinv(fb_FM.T.double()).float()


class KMeansVocoder:
    """Codes of a k-means tokenizer -> centroid log-mel frames -> power spectrum -> Griffin-Lim at 16 kHz.

    The output has exactly 640 samples (4 frames of 160) per code. It sounds robotic: each code is the
    mean of its cluster, and phase is estimated, but words and pitch contours come through.
    """
    sample_rate = SAMPLE_RATE

    def __init__(self, kmeans_tokenizer_file: str, n_iter: int = 32):
        self.tokenizer = KMeansTokenizer.load(kmeans_tokenizer_file)
        if self.tokenizer.centroids_KM.shape[1] != N_MELS:
            raise ValueError(f"{kmeans_tokenizer_file}: centroids have {self.tokenizer.centroids_KM.shape[1]} mel "
                             f"bins, the k-means vocoder expects {N_MELS}")
        self.num_codes = self.tokenizer.num_codes
        self.n_iter = n_iter

    def mel_to_power_FT(self, log_mel_MT: torch.Tensor) -> torch.Tensor:
        """Power spectrum [201, T] of a log-mel in data.features.log_mel's scale ((log10 p + 4) / 4)."""
        power_mel_MT = torch.pow(10.0, log_mel_MT.float() * 4.0 - 4.0)
        return (_mel_pinv_FM(log_mel_MT.shape[0]) @ power_mel_MT).clamp_min(0.0)

    def codes_to_wave(self, codes: Sequence[int]) -> torch.Tensor:
        codes_N = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes_N.size == 0:
            return torch.zeros(0)
        power_FT = self.mel_to_power_FT(self.tokenizer.decode_features(codes_N))
        # log_mel's frame i is centred on sample 160 i; a centred STFT of 160 F samples has F + 1 frames, so
        # one repeated last frame makes F frames come back as exactly 160 F samples, aligned as they went in.
        power_FT = torch.cat([power_FT, power_FT[:, -1:]], dim=1)
        # rand_init=False: the same codes give the same waveform on every run.
        wave_T = torchaudio.functional.griffinlim(
            power_FT, torch.hann_window(N_FFT), N_FFT, HOP, N_FFT, power=2.0, n_iter=self.n_iter, momentum=0.99,
            length=codes_N.size * KMEANS_SAMPLES_PER_CODE, rand_init=False)
        peak = float(wave_T.abs().max())
        # log_mel keeps absolute level, so the wave comes back near the input's loudness; only tame clipping.
        return wave_T / peak * 0.95 if peak > 0.95 else wave_T


class Token2WavVocoder:
    """Wraps a user's `token2wav(codes, prompt_wav) -> wav bytes | waveform` (we never import CosyVoice).

    With Step-Audio 2's released code on the path (its token2wav.py wraps CosyVoice 2's flow + HiFT):

        from token2wav import Token2wav                        # the release's own module
        from model.vocoder import Token2WavVocoder
        vocoder = Token2WavVocoder(Token2wav("Step-Audio-2-mini/token2wav"), prompt_wav="voice.wav",
                                   sample_rate=24000)
        wave_T = vocoder.codes_to_wave(codes)

    or on the command line `--vocoder token2wav:MODULE:ATTR --prompt-wav voice.wav`, where MODULE.ATTR is a
    zero-argument factory returning that callable. The codes must be the S3 tokenizer's (6561 codes); a
    k-means model's codes mean nothing to it. `bytes` results are decoded (their own rate wins over
    `sample_rate`); arrays or tensors are taken as mono at `sample_rate`.
    """

    def __init__(self, token2wav: Callable[[list, Any], Any], prompt_wav: Optional[str] = None,
                 sample_rate: int = 24000):
        if not callable(token2wav):
            raise ValueError(f"token2wav must be callable (codes, prompt_wav) -> wav, got {type(token2wav).__name__}")
        self.token2wav = token2wav
        self.prompt_wav = prompt_wav
        self.sample_rate = sample_rate

    def codes_to_wave(self, codes: Sequence[int]) -> torch.Tensor:
        out = self.token2wav([int(c) for c in codes], self.prompt_wav)
        if isinstance(out, (bytes, bytearray)):
            wave_T, self.sample_rate = decode_audio(bytes(out), name="token2wav output")
            return wave_T
        wave = torch.as_tensor(np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out,
                                          dtype=np.float32))
        if wave.dim() == 2 and 1 in wave.shape:
            wave = wave.reshape(-1)
        if wave.dim() != 1:
            raise ValueError(f"token2wav returned shape {tuple(wave.shape)}: expected wav bytes or a mono waveform")
        return wave


def _token2wav(rest: str, prompt_wav: Optional[str]) -> Vocoder:
    if rest.count(":") != 1 or not all(rest.split(":")):
        raise ValueError("expected token2wav:MODULE:ATTR")
    module_name, attr = rest.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {module_name}.{attr} ({exc})") from None
    return Token2WavVocoder(factory(), prompt_wav=prompt_wav)


def _kmeans(rest: str, prompt_wav: Optional[str]) -> Vocoder:
    if not rest:
        raise ValueError("expected kmeans:FILE.pt")
    return KMeansVocoder(rest)


# NAME -> (the spec after "NAME:", prompt_wav) -> Vocoder. A new vocoder is a class and one entry here.
VOCODERS: Dict[str, Callable[[str, Optional[str]], Vocoder]] = {"kmeans": _kmeans, "token2wav": _token2wav}


def load_vocoder(spec: str, prompt_wav: Optional[str] = None) -> Vocoder:
    """A vocoder from "NAME:..." of VOCODERS: "kmeans:FILE.pt" or "token2wav:MODULE:ATTR" (ATTR() returns a
    token2wav callable)."""
    name, _, rest = spec.partition(":")
    if name not in VOCODERS:
        raise ValueError(f"vocoder spec {spec!r}: expected one of {', '.join(f'{n}:...' for n in VOCODERS)} "
                         f"('kmeans:FILE.pt' or 'token2wav:MODULE:ATTR')")
    try:
        return VOCODERS[name](rest, prompt_wav)
    except ValueError as exc:
        raise ValueError(f"vocoder {spec!r}: {exc}") from None

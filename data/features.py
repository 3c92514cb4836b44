"""The Step-Audio 2 audio frontend: 16 kHz waveform -> 128-bin log-mel, and the audio token count.

Every number here must match the released model's frontend (see shared/reference/step-audio-2.md);
they live in this one file so a correction is one edit.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torchaudio

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
# The public code right-pads every waveform with 479 zero samples before the STFT and drops the
# last STFT frame; both change the frame count and therefore the number of audio tokens.
RIGHT_PAD_SAMPLES = 479
# Long audio is cut into chunks of at most 25 s; each chunk is its own audio span.
CHUNK_SAMPLES = 25 * SAMPLE_RATE


@functools.lru_cache(maxsize=4)
def _mel_filters_MF(n_mels: int) -> torch.Tensor:
    # Slaney-normalised Slaney-scale filters, as librosa.filters.mel(sr=16000, n_fft=400) builds them.
    fb_FM = torchaudio.functional.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1, f_min=0.0, f_max=SAMPLE_RATE / 2, n_mels=n_mels,
        sample_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return fb_FM.T.contiguous()


@functools.lru_cache(maxsize=4)
def _mel_filters_sparse_MF(n_mels: int) -> torch.Tensor:
    # 394 of the 25,728 filter weights are non-zero: a sparse product is about twice as fast on CPU.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return _mel_filters_MF(n_mels).to_sparse_csr()


@functools.lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT)


def mel_frames(num_samples: int) -> int:
    """Number of mel frames `log_mel` returns for a waveform of `num_samples` samples."""
    return (num_samples + RIGHT_PAD_SAMPLES) // HOP


def log_mel(wave_T: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """Log-mel features [n_mels, F] of one mono 16 kHz chunk (float32), exactly as the reference."""
    if wave_T.dim() != 1:
        raise ValueError(f"log_mel expects a mono waveform [T], got shape {tuple(wave_T.shape)}")
    wave_T = torch.nn.functional.pad(wave_T.float(), (0, RIGHT_PAD_SAMPLES))
    stft = torch.stft(wave_T, N_FFT, HOP, window=_window(), return_complex=True)
    stft = stft[..., :-1]
    power_FT = stft.real.square() + stft.imag.square()  # |z|^2 without the square root abs() takes
    mel_MT = torch.sparse.mm(_mel_filters_sparse_MF(n_mels), power_FT)
    log_MT = torch.clamp(mel_MT, min=1e-10).log10()
    log_MT = torch.maximum(log_MT, log_MT.max() - 8.0)
    return (log_MT + 4.0) / 4.0


def num_audio_tokens(num_mel_frames: int) -> int:
    """Audio tokens (adapter outputs, 12.5 Hz) for a chunk of `num_mel_frames` frames.

    The reference formula: conv2 and the average pool each halve the 100 Hz frames (on the
    length minus the 2 padding frames), then the adapter's conv (k=3, s=2, p=1) halves again.
    """
    enc = (num_mel_frames - 2 + 1) // 2 // 2
    return (enc + 2 * 1 - 3) // 2 + 1


def split_chunks(wave_T: torch.Tensor) -> list[torch.Tensor]:
    """Cut a waveform into chunks of at most 25 s, as the reference does before the frontend."""
    return [wave_T[i:i + CHUNK_SAMPLES] for i in range(0, max(len(wave_T), 1), CHUNK_SAMPLES)]

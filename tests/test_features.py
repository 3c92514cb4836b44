"""The audio frontend matches the reference: log-mel values and audio token counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from data.features import (CHUNK_SAMPLES, RIGHT_PAD_SAMPLES, SAMPLE_RATE, log_mel, mel_frames,
                           num_audio_tokens, split_chunks)


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    # A chirp under a slow envelope plus a little noise: energy across many mel bins, with dynamics.
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chirp = torch.sin(2 * torch.pi * (200 + 900 * t) * t) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t))
    return (0.3 * chirp + 0.01 * torch.randn(len(t), generator=g)).float()


@pytest.mark.parametrize("seconds", [0.37, 1.0, 3.2])
def test_log_mel_equals_whisper_feature_extractor(seconds):
    wave = _speechlike(seconds)
    ours = log_mel(wave)
    extractor = WhisperFeatureExtractor(feature_size=128)
    # The reference rule: right-pad 479 zeros, then the usual Whisper log-mel (which drops the last frame).
    padded = np.pad(wave.numpy(), (0, RIGHT_PAD_SAMPLES))
    ref = extractor(padded, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]
    assert ours.shape == (128, mel_frames(len(wave)))
    assert (ours - ref[:, : ours.shape[1]]).abs().max().item() < 1e-4


@pytest.mark.parametrize("seconds,tokens", [(1, 13), (10, 125), (25, 313)])
def test_audio_token_counts_match_the_reference(seconds, tokens):
    frames = log_mel(torch.zeros(seconds * SAMPLE_RATE)).shape[1]
    assert frames == mel_frames(seconds * SAMPLE_RATE)
    assert num_audio_tokens(frames) == tokens


def test_long_audio_is_cut_into_25_second_chunks():
    wave = torch.zeros(60 * SAMPLE_RATE)
    chunks = split_chunks(wave)
    assert [len(c) for c in chunks] == [CHUNK_SAMPLES, CHUNK_SAMPLES, 10 * SAMPLE_RATE]


def test_log_mel_rejects_stereo():
    with pytest.raises(ValueError, match=r"mono waveform \[T\], got shape \(2, 16000\)"):
        log_mel(torch.zeros(2, SAMPLE_RATE))

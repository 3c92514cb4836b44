"""A small speaker-embedding net (band-limited log-mel -> dilated convs -> mean+std pooling -> 64-d unit
vector), its file, and `similarity` of two sets of recordings. Fitted on espeak-ng voices by
`python -m train.speaker_encoder fit`.

All audio is compared at 8 kHz (0-4 kHz): the asterisk recordings are telephone band, so a wider band
would let bandwidth alone tell them from anything else. Trained on synthetic voices only: it measures how
alike two voices sound to a net that learned to tell espeak voices apart, not human judgement.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from data.files import load_versioned, save_versioned

SPEAKER_FORMAT = "stepaudio2.speaker_encoder"
SPEAKER_VERSION = 1
BAND_RATE = 8000  # every input is resampled to this before its mel: 0-4 kHz, the telephone band
HOP = 80  # 10 ms at 8 kHz
_TRIM_LOG = math.log(10.0) * 3.5  # frames 35 dB below the loudest are silence, not voice


def speaker_features(wave_T: torch.Tensor, sample_rate: int, n_mels: int = 40) -> torch.Tensor:
    """Log-mel [n_mels, F] of the voiced frames, 0-4 kHz at 100 frames/s, shifted to zero mean (so level
    does not count)."""
    if wave_T.dim() != 1 or wave_T.numel() < sample_rate // 10:
        raise ValueError(f"speaker_features expects a mono waveform [T] of at least 0.1 s, got shape "
                         f"{tuple(wave_T.shape)} at {sample_rate} Hz")
    wave_T = wave_T.float()
    if sample_rate != BAND_RATE:
        wave_T = torchaudio.functional.resample(wave_T, sample_rate, BAND_RATE)
    mel = torchaudio.transforms.MelSpectrogram(BAND_RATE, n_fft=256, win_length=200, hop_length=HOP, f_min=60.0,
                                               f_max=3800.0, n_mels=n_mels)
    log_MF = (mel(wave_T) + 1e-6).log()
    energy_F = log_MF.logsumexp(0)
    voiced = energy_F > energy_F.max() - _TRIM_LOG
    log_MF = log_MF[:, voiced] if int(voiced.sum()) >= 10 else log_MF
    return log_MF - log_MF.mean()


class SpeakerNet(nn.Module):
    """Features [B, n_mels, F] -> unit embeddings [B, dim]; `classes` rows score them (training only)."""

    def __init__(self, n_mels: int = 40, channels: int = 128, dim: int = 64, num_classes: int = 0):
        super().__init__()
        layers, width = [], n_mels
        for kernel, dilation in ((5, 1), (3, 2), (3, 3), (1, 1)):
            layers += [nn.Conv1d(width, channels, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2),
                       nn.BatchNorm1d(channels), nn.ReLU()]
            width = channels
        self.frames = nn.Sequential(*layers)
        self.project = nn.Linear(2 * channels, dim)
        self.classes = nn.Parameter(torch.randn(num_classes, dim) * 0.1) if num_classes else None

    def forward(self, feats_BMF: torch.Tensor) -> torch.Tensor:
        h_BCF = self.frames(feats_BMF)
        stats_BC2 = torch.cat([h_BCF.mean(-1), (h_BCF.var(-1, unbiased=False) + 1e-5).sqrt()], dim=-1)
        return F.normalize(self.project(stats_BC2), dim=-1)


class SpeakerEncoder:
    """A trained SpeakerNet with its feature settings: `embed` recordings, `similarity` of two sets."""

    def __init__(self, net: SpeakerNet, config: dict):
        self.net, self.config = net.eval(), config

    @torch.no_grad()
    def embed(self, waves: Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """Unit embeddings [N, dim], one per recording (each whole, in its own forward)."""
        out = [self.net(speaker_features(w, sample_rate, self.config["n_mels"])[None]) for w in waves]
        return torch.cat(out) if out else torch.zeros(0, self.config["dim"])

    def similarity(self, waves_a: Sequence[torch.Tensor], waves_b: Sequence[torch.Tensor],
                   sample_rate: int = 16000, sample_rate_b: Optional[int] = None) -> float:
        """Cosine of the two sets' mean embeddings: 1 = the same voice to this net, near 0 = unrelated."""
        if not waves_a or not waves_b:
            raise ValueError(f"similarity needs recordings on both sides, got {len(waves_a)} and {len(waves_b)}")
        mean_a = self.embed(waves_a, sample_rate).mean(0)
        mean_b = self.embed(waves_b, sample_rate_b or sample_rate).mean(0)
        return float(F.cosine_similarity(mean_a, mean_b, dim=0))

    def save(self, path: str) -> None:
        state = {k: v for k, v in self.net.state_dict().items() if k != "classes"}
        save_versioned(path, SPEAKER_FORMAT, SPEAKER_VERSION, config=self.config, state=state)

    @classmethod
    def load(cls, path: str) -> "SpeakerEncoder":
        blob = load_versioned(path, SPEAKER_FORMAT, SPEAKER_VERSION, "speaker encoder",
                              "python -m train.speaker_encoder fit")
        cfg = blob["config"]
        net = SpeakerNet(cfg["n_mels"], cfg["channels"], cfg["dim"])
        net.load_state_dict(blob["state"])
        return cls(net, cfg)


if __name__ == "__main__":  # the command moved with the training code; an old script must not pass silently
    sys.exit("error: `python -m model.speaker fit` is now `python -m train.speaker_encoder fit` (same options)")

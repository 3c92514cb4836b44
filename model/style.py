"""A small speaking-style classifier (normal / slow / fast / high / low pitch / whisper) over log-mel
frames, as data.features.log_mel gives them or as a k-means tokenizer's codes decode to, and its file.

Style is a property of the whole utterance, so the net pools over time: per-step features (the mel less its
mean, its change, the energy, and a harmonic-sieve pitch map read from the mel's low bins) -> dilated convs
-> mean and std over the speech steps, plus a few global rate and pitch statistics (speech-step share,
envelope modulation rate, spectral flux, sieve F0) -> class logits. Everything runs at 25 Hz (4 mel frames
averaged), the rate of the audio codes, so a render and its codes' decoded mel look alike. Fitted by
`python -m train.style_classifier fit`.
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence, Tuple

import torch
import torchaudio
from torch import nn

from data.files import load_versioned, save_versioned

STYLE_FORMAT = "stepaudio2.style_classifier"
STYLE_VERSION = 1
STYLES = ("normal", "slow", "fast", "high", "low", "whisper")
FRAMES_PER_STEP = 4  # 100 Hz log-mel frames averaged into one 25 Hz step (one audio code's span)
STEPS_PER_S = 25.0
_SAMPLE_RATE, _N_FFT = 16000, 400  # data.features' frontend
# Below 1 kHz the 128 Slaney bins are narrower than the 40 Hz FFT bins, so the mel still holds the FFT bins
# there, and with them the harmonics of voices above about 100 Hz; higher up the bins smear them.
_SIEVE_MAX_HZ = 1000.0
_F0_MIN_HZ, _F0_MAX_HZ, _F0_CANDIDATES = 60.0, 420.0, 48
_SPEECH_DB = 30.0  # a step within 30 dB of the loudest one is speech
_MIN_STEPS = 4


@functools.lru_cache(maxsize=2)
def _mel_to_low_fft_KM(n_mels: int) -> torch.Tensor:
    """[FFT bins below _SIEVE_MAX_HZ, n_mels]: the least-squares inverse of the mel filters, restricted to the
    low bins, where the mel is the FFT bins themselves (each one repeated) and this recovers them."""
    fb_FM = torchaudio.functional.melscale_fbanks(_N_FFT // 2 + 1, 0.0, _SAMPLE_RATE / 2, n_mels, _SAMPLE_RATE,
                                                  norm="slaney", mel_scale="slaney")
    low = int(_SIEVE_MAX_HZ / (_SAMPLE_RATE / _N_FFT)) + 1
    return torch.linalg.pinv(fb_FM.T.double()).float()[:low]


def f0_candidates_hz() -> torch.Tensor:
    """The sieve's candidate fundamentals, log-spaced from 60 to 420 Hz."""
    return torch.logspace(math.log10(_F0_MIN_HZ), math.log10(_F0_MAX_HZ), _F0_CANDIDATES)


@functools.lru_cache(maxsize=1)
def _sieve_KB() -> torch.Tensor:
    """[candidates, low FFT bins]: for each candidate F0, + the mean of the (interpolated) bins at its
    harmonics below _SIEVE_MAX_HZ, - the mean at the points halfway between them. Applied to a step's log
    power it is high where the harmonic comb fits; a sub-octave's extra teeth land in troughs and an
    octave-up's gaps on peaks, so the true F0 wins."""
    bin_hz = _SAMPLE_RATE / _N_FFT
    num_bins = int(_SIEVE_MAX_HZ / bin_hz) + 1

    def interp_row(freqs: torch.Tensor) -> torch.Tensor:
        row = torch.zeros(num_bins)
        for f in freqs.tolist():
            j, w = int(f // bin_hz), (f % bin_hz) / bin_hz
            row[j] += 1 - w
            if j + 1 < num_bins:
                row[j + 1] += w
        return row / max(len(freqs), 1)

    rows = []
    for f0 in f0_candidates_hz().tolist():
        harmonics = torch.arange(1, int((_SIEVE_MAX_HZ - bin_hz) / f0) + 1, dtype=torch.float32) * f0
        rows.append(interp_row(harmonics) - interp_row(harmonics - f0 / 2))
    return torch.stack(rows)


def pitch_sieve(log_power_MN: torch.Tensor) -> torch.Tensor:
    """[candidates, N] harmonic-comb scores (natural-log power units) of mel steps given as log10 power."""
    power_BN = (_mel_to_low_fft_KM(log_power_MN.shape[0]) @ torch.pow(10.0, log_power_MN)).clamp_min(1e-10)
    log_BN = power_BN.log()
    log_BN = torch.maximum(log_BN, log_BN.amax(0, keepdim=True) - 8 * math.log(10.0))
    return _sieve_KB() @ log_BN


def pooled_steps(mel_MF: torch.Tensor) -> torch.Tensor:
    """A log-mel [M, F] at 100 Hz -> [M, F // 4] at 25 Hz (the mean of each 4 frames, as the codes take it)."""
    if mel_MF.dim() != 2:
        raise ValueError(f"expected a log-mel [n_mels, frames], got shape {tuple(mel_MF.shape)}")
    n = mel_MF.shape[1] // FRAMES_PER_STEP
    return mel_MF[:, :n * FRAMES_PER_STEP].reshape(mel_MF.shape[0], n, FRAMES_PER_STEP).mean(-1)


def style_features(mel_MF: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frames [C, N], speech [N] bool, global stats [G]) of a log-mel [128, F] in log_mel's scale
    ((log10 power + 4) / 4) at 100 Hz. Level does not count.

    frames: the mel less its mean over the speech steps, its step-to-step change, the log energy below the
    loudest step, and the pitch sieve's score per candidate F0 (a difference of log powers: level-free).
    stats: speech-step share, envelope modulation centroid (Hz) and its share of 3-8 Hz energy, mean spectral
    flux over speech steps, the median and spread (octaves) of the sieve's F0 over voiced steps, the median
    sieve score (voicing strength) and the voiced share of the speech steps."""
    x_MN = pooled_steps(mel_MF.float())
    if x_MN.shape[1] < _MIN_STEPS:
        raise ValueError(f"style_features needs at least {_MIN_STEPS * FRAMES_PER_STEP} mel frames "
                         f"({_MIN_STEPS / STEPS_PER_S:.2f} s), got {mel_MF.shape[1]}")
    log_power_MN = x_MN * 4.0 - 4.0  # log10 power
    energy_N = torch.logsumexp(log_power_MN * math.log(10.0), dim=0) / math.log(10.0)  # log10 of total power
    top = float(energy_N.max())
    speech_N = energy_N > top - _SPEECH_DB / 10.0
    if int(speech_N.sum()) < 2:
        speech_N = torch.ones_like(speech_N)
    # The mean spectrum of the speech steps is mostly the voice (its formants, its recording), not its style:
    # taking it out (as cepstral mean normalisation does) made held-out voices 2-3 points more accurate.
    x_MN = x_MN - x_MN[:, speech_N].mean(1, keepdim=True)
    delta_MN = torch.diff(x_MN, dim=1, prepend=x_MN[:, :1])
    sieve_KN = pitch_sieve(log_power_MN)
    energy_rel_N = (energy_N - top).clamp_min(-6.0)
    frames = torch.cat([x_MN, delta_MN, energy_rel_N[None], sieve_KN / 3.0], dim=0)
    return frames, speech_N, _global_stats(energy_rel_N, delta_MN, sieve_KN, speech_N)


def _global_stats(energy_N: torch.Tensor, delta_MN: torch.Tensor, sieve_KN: torch.Tensor,
                  speech_N: torch.Tensor) -> torch.Tensor:
    # The envelope between the first and last speech step: leading/trailing silence says nothing of rate.
    idx = speech_N.nonzero().flatten()
    env_N = energy_N[int(idx[0]):int(idx[-1]) + 1]
    env_N = env_N - env_N.mean()
    n_fft = max(64, 1 << (len(env_N) - 1).bit_length())
    spec = torch.fft.rfft(env_N * torch.hann_window(len(env_N), periodic=False), n=n_fft).abs().square()
    freqs = torch.fft.rfftfreq(n_fft, d=1.0 / STEPS_PER_S)
    band = (freqs >= 1.0) & (freqs <= 12.0)
    mod_centroid = float((spec[band] * freqs[band]).sum() / spec[band].sum().clamp_min(1e-9))
    syllabic = float(spec[(freqs >= 3.0) & (freqs <= 8.0)].sum() / spec[band].sum().clamp_min(1e-9))
    flux = float(delta_MN[:, speech_N].abs().mean())
    score_N, best_N = sieve_KN.max(0)
    voiced = speech_N & (score_N > 0.5)
    if int(voiced.sum()) >= 2:
        log2_f0 = torch.log2(f0_candidates_hz()[best_N[voiced]])
        f0_median = float(log2_f0.median())
        f0_spread = float(torch.quantile(log2_f0, 0.75) - torch.quantile(log2_f0, 0.25))
    else:  # no harmonic step (a whisper): no pitch; the mean candidate stands in
        f0_median, f0_spread = float(torch.log2(f0_candidates_hz()).mean()), 0.0
    return torch.tensor([float(speech_N.float().mean()), mod_centroid, syllabic, flux, f0_median, f0_spread,
                         float(score_N[speech_N].median()), float(voiced.float().sum() / speech_N.float().sum())])


NUM_STATS = 8


class StyleNet(nn.Module):
    """frames [B, C, N] (speech mask [B, N]) + stats [B, G] -> logits [B, num_classes]."""

    def __init__(self, in_channels: int, num_stats: int = NUM_STATS, channels: int = 96,
                 num_classes: int = len(STYLES), dropout: float = 0.2):
        super().__init__()
        layers, width = [], in_channels
        for kernel, dilation in ((3, 1), (3, 2), (3, 4), (3, 8)):  # about 1.2 s of context
            layers += [nn.Conv1d(width, channels, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2),
                       nn.BatchNorm1d(channels), nn.ReLU()]
            width = channels
        self.frames = nn.Sequential(*layers)
        self.stats = nn.Sequential(nn.Linear(num_stats, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * channels + 32, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, frames_BCN: torch.Tensor, mask_BN: torch.Tensor, stats_BG: torch.Tensor) -> torch.Tensor:
        h_BCN = self.frames(frames_BCN)
        w_B1N = mask_BN.float()[:, None]
        count_B1 = w_B1N.sum(-1).clamp_min(1.0)
        mean_BC = (h_BCN * w_B1N).sum(-1) / count_B1
        var_BC = ((h_BCN - mean_BC[..., None]).square() * w_B1N).sum(-1) / count_B1
        pooled = torch.cat([mean_BC, (var_BC + 1e-5).sqrt(), self.stats(stats_BG)], dim=-1)
        return self.head(pooled)


def batch_features(feats: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], norm: dict
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a list of style_features outputs into (frames [B, C, N], mask [B, N], stats [B, G]), the stats
    standardised with the training set's `norm` ({"mean": [G], "std": [G]})."""
    width = max(f.shape[1] for f, _, _ in feats)
    frames = torch.zeros(len(feats), feats[0][0].shape[0], width)
    mask = torch.zeros(len(feats), width, dtype=torch.bool)
    for b, (f, speech, _) in enumerate(feats):
        frames[b, :, :f.shape[1]] = f
        mask[b, :f.shape[1]] = speech
    stats = torch.stack([s for _, _, s in feats])
    stats = (stats - torch.tensor(norm["mean"])) / torch.tensor(norm["std"])
    return frames, mask, stats


class StyleClassifier:
    """A trained StyleNet with its class names and stats normalisation: `probabilities` of log-mels."""

    def __init__(self, net: StyleNet, config: dict):
        self.net, self.config = net.eval(), config
        self.styles: List[str] = list(config["styles"])

    @torch.no_grad()
    def probabilities(self, mels: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
        """[N, num_styles] class probabilities, one row per log-mel [128, F] (100 Hz, log_mel's scale)."""
        out = []
        for i in range(0, len(mels), batch_size):
            feats = [style_features(m) for m in mels[i:i + batch_size]]
            out.append(self.net(*batch_features(feats, self.config["norm"])).softmax(-1))
        return torch.cat(out) if out else torch.zeros(0, len(self.styles))

    def save(self, path: str) -> None:
        save_versioned(path, STYLE_FORMAT, STYLE_VERSION, config=self.config, state=self.net.state_dict())

    @classmethod
    def load(cls, path: str) -> "StyleClassifier":
        blob = load_versioned(path, STYLE_FORMAT, STYLE_VERSION, "style classifier",
                              "python -m train.style_classifier fit")
        cfg = blob["config"]
        net = StyleNet(cfg["in_channels"], cfg["num_stats"], cfg["channels"], len(cfg["styles"]))
        net.load_state_dict(blob["state"])
        return cls(net, cfg)

"""Audio tokenizers: 16 kHz waveform -> 1-D discrete codes at 25 Hz (k-means over log-mel, CosyVoice 2 S3).

`load_audio_tokenizer("kmeans:FILE.pt" | "s3:FILE.onnx")` builds one; `audio_tokenizer_hash` names the
exact weights, so shards can record which tokenizer made their codes and the loader can check it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torchaudio

from data.features import SAMPLE_RATE, log_mel
from data.files import load_versioned, save_versioned
from data.shards import file_sha256

KMEANS_FORMAT = "stepaudio2.kmeans_audio_tokenizer"
KMEANS_VERSION = 1
# log_mel gives 100 frames/s; the mean of 4 consecutive frames is one code, the 25 Hz of S3 codes.
KMEANS_FRAMES_PER_CODE = 4
S3_NUM_CODES = 6561  # FSQ, 3^8 levels
S3_FRAME_RATE_HZ = 25
# S3 v2 was trained on at most 30 s; 30 s is 750 codes exactly, so chunks join without a seam in the rate.
S3_MAX_CHUNK_SAMPLES = 30 * SAMPLE_RATE
_HEX_RE = re.compile(r"[0-9a-f]{12,64}")


class AudioTokenizer:
    """What data.codes needs of a tokenizer; subclasses set the four attributes."""
    name: str
    sample_rate: int = SAMPLE_RATE
    frame_rate_hz: float
    num_codes: int

    def hash(self) -> str:
        """sha256 hex of what decides the codes (weights or model file)."""
        raise NotImplementedError

    def encode(self, wave_T: torch.Tensor) -> np.ndarray:
        """Codes [N] (int16 or int32, in 0..num_codes-1) of one mono waveform at `sample_rate`."""
        raise NotImplementedError

    def encode_batch(self, waves: List[torch.Tensor]) -> List[np.ndarray]:
        return [self.encode(wave_T) for wave_T in waves]

    def record(self) -> dict:
        """What tokenizer.json stores beside the shards."""
        return {"name": self.name, "hash": self.hash(), "num_codes": self.num_codes,
                "frame_rate_hz": self.frame_rate_hz}


def _code_dtype(num_codes: int):
    return np.int16 if num_codes <= np.iinfo(np.int16).max + 1 else np.int32


def _check_wave(wave_T: torch.Tensor) -> torch.Tensor:
    if not isinstance(wave_T, torch.Tensor) or wave_T.dim() != 1:
        shape = tuple(wave_T.shape) if hasattr(wave_T, "shape") else type(wave_T).__name__
        raise ValueError(f"encode expects a mono waveform tensor [T], got {shape}")
    return wave_T.float()


# ---------------------------------------------------------------------------------------------- k-means

def pooled_mel_NM(wave_T: torch.Tensor) -> torch.Tensor:
    """data.features.log_mel averaged over each 4 frames: [mel_frames(T) // 4, 128], one row per code."""
    mel_MF = log_mel(_check_wave(wave_T))
    num = mel_MF.shape[1] // KMEANS_FRAMES_PER_CODE
    return mel_MF[:, :num * KMEANS_FRAMES_PER_CODE].reshape(mel_MF.shape[0], num, -1).mean(-1).T.contiguous()


def _sq_dist_NK(x_NM: torch.Tensor, c_KM: torch.Tensor) -> torch.Tensor:
    # float64: ties between centroids must break the same way on every run.
    x, c = x_NM.double(), c_KM.double()
    return (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)


def fit_kmeans(features_NM: torch.Tensor, num_codes: int, seed: int = 0, iterations: int = 30,
               progress: Optional[Callable[[int, float], None]] = None) -> torch.Tensor:
    """Centroids [num_codes, M] of k-means++ seeding then Lloyd iterations; a pure function of its inputs.

    `progress(iteration, mean squared distance)` is called after each iteration. Stops early when no
    assignment changes. An emptied cluster takes the point farthest from its centroid.
    """
    num_frames = features_NM.shape[0]
    if num_codes < 2:
        raise ValueError(f"num_codes={num_codes}: expected at least 2")
    if num_frames < num_codes:
        raise ValueError(f"k-means with {num_codes} codes needs at least {num_codes} frames, the corpus gave "
                         f"{num_frames} (25 frames per second of audio)")
    x_NM = features_NM.double()
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(num_frames, (1,), generator=gen))]
    closest_N = _sq_dist_NK(x_NM, x_NM[chosen]).squeeze(1).clamp_min(0)
    for _ in range(1, num_codes):
        weights = closest_N if closest_N.sum() > 0 else torch.ones_like(closest_N)
        pick = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(pick)
        closest_N = torch.minimum(closest_N, _sq_dist_NK(x_NM, x_NM[pick:pick + 1]).squeeze(1).clamp_min(0))
    centroids_KM = x_NM[chosen].clone()
    assign_N = None
    for it in range(iterations):
        dist_NK = _sq_dist_NK(x_NM, centroids_KM)
        new_assign_N = dist_NK.argmin(1)
        inertia = float(dist_NK.gather(1, new_assign_N[:, None]).clamp_min(0).mean())
        if assign_N is not None and torch.equal(new_assign_N, assign_N):
            break
        assign_N = new_assign_N
        counts_K = torch.bincount(assign_N, minlength=num_codes)
        sums_KM = torch.zeros_like(centroids_KM).index_add_(0, assign_N, x_NM)
        filled = counts_K > 0
        centroids_KM[filled] = sums_KM[filled] / counts_K[filled, None]
        point_dist_N = dist_NK.gather(1, assign_N[:, None]).squeeze(1)
        for k in torch.nonzero(~filled).flatten().tolist():
            far = int(point_dist_N.argmax())
            centroids_KM[k] = x_NM[far]
            point_dist_N[far] = -1.0
        if progress is not None:
            progress(it + 1, inertia)
    return centroids_KM.float()


class KMeansTokenizer(AudioTokenizer):
    """Nearest centroid of 4-frame means of the project's 128-bin log-mel: 25 Hz, `num_codes` codes.

    File layout (torch.save of a dict, loadable with weights_only=True):
      format "stepaudio2.kmeans_audio_tokenizer", version 1,
      centroids_KM: float32 [num_codes, 128], row k = the mean log-mel frame of code k, in the scale of
        data.features.log_mel ((log10(power) clamped to max-8, +4) / 4), 128 Slaney mel bins 0-8 kHz;
        a vocoder gets a 100 Hz mel from codes by repeating each row 4 times (`decode_features`),
      config: {num_codes, n_mels, frames_per_code, frame_rate_hz, sample_rate, seed, iterations, num_frames}.
    """
    name = "kmeans"
    frame_rate_hz = SAMPLE_RATE / 160 / KMEANS_FRAMES_PER_CODE

    def __init__(self, centroids_KM: torch.Tensor, config: Optional[dict] = None):
        if centroids_KM.dim() != 2 or centroids_KM.shape[0] < 2:
            raise ValueError(f"k-means centroids must be [num_codes >= 2, n_mels], got {tuple(centroids_KM.shape)}")
        self.centroids_KM = centroids_KM.float().contiguous()
        self.num_codes = centroids_KM.shape[0]
        self.config = {"num_codes": self.num_codes, "n_mels": centroids_KM.shape[1],
                       "frames_per_code": KMEANS_FRAMES_PER_CODE, "frame_rate_hz": self.frame_rate_hz,
                       "sample_rate": SAMPLE_RATE, **(config or {})}

    @classmethod
    def load(cls, path: str) -> "KMeansTokenizer":
        blob = load_versioned(path, KMEANS_FORMAT, KMEANS_VERSION, "k-means tokenizer", "python -m data.codes fit")
        return cls(blob["centroids_KM"], blob.get("config"))

    def save(self, path: str) -> None:
        save_versioned(path, KMEANS_FORMAT, KMEANS_VERSION, centroids_KM=self.centroids_KM, config=self.config)

    def hash(self) -> str:
        # The centroids and the framing decide the codes; training details (seed, corpus size) do not.
        digest = hashlib.sha256(json.dumps([KMEANS_FORMAT, KMEANS_VERSION, KMEANS_FRAMES_PER_CODE,
                                            list(self.centroids_KM.shape)]).encode())
        digest.update(self.centroids_KM.numpy().tobytes())
        return digest.hexdigest()

    def encode(self, wave_T: torch.Tensor) -> np.ndarray:
        feats_NM = pooled_mel_NM(wave_T)
        if feats_NM.shape[0] == 0:
            return np.zeros(0, dtype=_code_dtype(self.num_codes))
        codes_N = _sq_dist_NK(feats_NM, self.centroids_KM).argmin(1)
        return codes_N.numpy().astype(_code_dtype(self.num_codes))

    def decode_features(self, codes_N) -> torch.Tensor:
        """Log-mel [128, 4 N] at 100 Hz: each code's centroid held for its 4 frames."""
        codes = torch.as_tensor(np.asarray(codes_N, dtype=np.int64))
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must be in 0..{self.num_codes - 1}, got {int(codes.min())}..{int(codes.max())}")
        return self.centroids_KM[codes].repeat_interleave(KMEANS_FRAMES_PER_CODE, 0).T.contiguous()


# -------------------------------------------------------------------------------------------------- S3

@functools.lru_cache(maxsize=1)
def _s3_filters_MF() -> torch.Tensor:
    return torchaudio.functional.melscale_fbanks(201, 0.0, SAMPLE_RATE / 2, 128, SAMPLE_RATE,
                                                 norm="slaney", mel_scale="slaney").T.contiguous()


def s3_log_mel(wave_T: torch.Tensor) -> torch.Tensor:
    """[128, T // 160] Whisper-style log-mel, the S3 frontend: centred STFT, no right pad (unlike log_mel)."""
    stft = torch.stft(wave_T.float(), 400, 160, window=torch.hann_window(400), return_complex=True)
    log_MF = (_s3_filters_MF() @ stft[..., :-1].abs() ** 2).clamp_min(1e-10).log10()
    return (torch.maximum(log_MF, log_MF.max() - 8.0) + 4.0) / 4.0


def state_dict_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class S3Tokenizer(AudioTokenizer):
    """CosyVoice 2's S3Tokenizer v2 (25 Hz, 6561 codes) around any model with its interface:
    `model.quantize(mel_BMF [B, 128, F], mel_len_B) -> (codes_BN, code_len_B)`.

    `from_onnx` loads the real one with the `s3tokenizer` package; tests inject a stand-in model.
    Audio longer than 30 s is cut into 30 s chunks, each quantised on its own, codes concatenated.
    """
    name = "s3_v2"
    frame_rate_hz = S3_FRAME_RATE_HZ
    num_codes = S3_NUM_CODES

    def __init__(self, model, weights_hash: Optional[str] = None,
                 mel_fn: Callable[[torch.Tensor], torch.Tensor] = s3_log_mel, batch_size: int = 16,
                 device: str = "cpu"):
        self.model, self.mel_fn, self.batch_size, self.device = model, mel_fn, batch_size, device
        self._hash = weights_hash or state_dict_hash(model)

    @classmethod
    def from_onnx(cls, path: str, device: str = "cpu", batch_size: int = 16) -> "S3Tokenizer":
        if not os.path.isfile(path):
            raise ValueError(f"S3 tokenizer file {path!r} does not exist: expected CosyVoice 2's "
                             "speech_tokenizer_v2.onnx")
        try:
            import s3tokenizer
        except ImportError:
            raise ImportError("the S3 audio tokenizer needs the s3tokenizer package: pip install s3tokenizer") from None
        # load_model picks v1 or v2 from the file name; naming the architecture ourselves avoids that.
        model = s3tokenizer.S3TokenizerV2("speech_tokenizer_v2_25hz")
        model.init_from_onnx(path)
        model = model.to(device).eval()
        return cls(model, file_sha256(path), lambda wave_T: s3tokenizer.log_mel_spectrogram(wave_T, n_mels=128),
                   batch_size, device)

    def hash(self) -> str:
        return self._hash

    def encode(self, wave_T: torch.Tensor) -> np.ndarray:
        return self.encode_batch([wave_T])[0]

    def encode_batch(self, waves: List[torch.Tensor]) -> List[np.ndarray]:
        chunks, owner = [], []
        for i, wave_T in enumerate(waves):
            wave_T = _check_wave(wave_T)
            for start in range(0, len(wave_T), S3_MAX_CHUNK_SAMPLES):
                chunks.append(wave_T[start:start + S3_MAX_CHUNK_SAMPLES])
                owner.append(i)
        pieces: List[List[np.ndarray]] = [[] for _ in waves]
        for first in range(0, len(chunks), self.batch_size):
            batch = chunks[first:first + self.batch_size]
            for i, codes in zip(owner[first:first + len(batch)], self._quantize(batch)):
                pieces[i].append(codes)
        return [np.concatenate(p).astype(np.int16) if p else np.zeros(0, np.int16) for p in pieces]

    def _quantize(self, chunks: List[torch.Tensor]) -> List[np.ndarray]:
        mels = [self.mel_fn(chunk) for chunk in chunks]
        lengths_B = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
        mel_BMF = torch.zeros(len(mels), mels[0].shape[0], int(lengths_B.max()))
        for b, mel_MF in enumerate(mels):
            mel_BMF[b, :, :mel_MF.shape[1]] = mel_MF
        with torch.inference_mode():
            codes_BN, code_len_B = self.model.quantize(mel_BMF.to(self.device), lengths_B.to(self.device))
        codes_BN, code_len_B = codes_BN.cpu(), code_len_B.cpu()
        out = [codes_BN[b, :int(code_len_B[b])].numpy() for b in range(len(mels))]
        for codes in out:
            if codes.size and (codes.min() < 0 or codes.max() >= S3_NUM_CODES):
                raise ValueError(f"S3 model gave codes {int(codes.min())}..{int(codes.max())}: expected "
                                 f"0..{S3_NUM_CODES - 1}")
        return out


# ------------------------------------------------------------------------------------------- by name

@dataclass(frozen=True)
class TokenizerKind:
    """How a spec `NAME:FILE` becomes a tokenizer: a new audio tokenizer is a class and one register call."""
    load: Callable[[str], AudioTokenizer]
    """FILE -> the tokenizer."""
    file_hash: Callable[[str], str]
    """FILE -> the hash shards record (cheap: no model runtime needed where it can be avoided)."""
    suffix: Optional[str] = None
    """A bare path ending in this selects the kind (the default kind is the first registered without one)."""


AUDIO_TOKENIZERS: Dict[str, TokenizerKind] = {}


def register_audio_tokenizer(name: str, kind: TokenizerKind) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"audio tokenizer name {name!r}: expected lowercase letters, digits and _")
    AUDIO_TOKENIZERS[name] = kind


register_audio_tokenizer("kmeans", TokenizerKind(KMeansTokenizer.load, lambda path: KMeansTokenizer.load(path).hash()))
register_audio_tokenizer("s3", TokenizerKind(S3Tokenizer.from_onnx, file_sha256, suffix=".onnx"))


def _expected() -> str:
    return ", ".join(f"{name}:FILE" for name in AUDIO_TOKENIZERS)


def _split_spec(spec: str) -> Tuple[str, str]:
    name, sep, path = spec.partition(":")
    if sep and name in AUDIO_TOKENIZERS:
        return name, path
    by_suffix = next((n for n, k in AUDIO_TOKENIZERS.items() if k.suffix and spec.endswith(k.suffix)), None)
    return by_suffix or next(n for n, k in AUDIO_TOKENIZERS.items() if not k.suffix), spec


def load_audio_tokenizer(spec: str) -> AudioTokenizer:
    """`NAME:FILE` of a registered kind (kmeans:FILE.pt, s3:FILE.onnx), or a bare path (its suffix picks the
    kind: .onnx is S3, anything else k-means)."""
    name, path = _split_spec(spec)
    if not os.path.isfile(path):
        raise ValueError(f"audio tokenizer {spec!r}: no file {path!r} (expected one of {_expected()})")
    return AUDIO_TOKENIZERS[name].load(path)


def audio_tokenizer_hash(spec: str) -> str:
    """The hash a tokenizer spec names: a tokenizer file's hash (no s3tokenizer package needed), or the
    spec itself when it is a hex hash (12 to 64 digits, compared as a prefix)."""
    name, path = _split_spec(spec)
    if os.path.isfile(path):
        return AUDIO_TOKENIZERS[name].file_hash(path)
    if _HEX_RE.fullmatch(spec):
        return spec
    raise ValueError(f"audio tokenizer {spec!r}: expected a tokenizer hash (12-64 lowercase hex digits) or an "
                     f"existing tokenizer file ({_expected()})")

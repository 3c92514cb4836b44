"""The speaking-style classifier's espeak-ng corpus, its training and held-out report, and the espeak style
figures (speaking time per word, median F0) raw and through a k-means codec.

    python -m train.style_classifier fit OUT.pt [--codes kmeans:F.pt] [--voices N]
    python -m train.style_classifier figures [--codes kmeans:F.pt] [--fit-codes OUT.pt]

`fit` renders many espeak voices (accent x variant, each with its own base pitch and speed) saying demo
sentences in six styles, trains model.style's classifier on them (through the codec when --codes is given:
wave -> codes -> the codes' decoded mel, what a policy's codes become) and writes OUT.pt and OUT.json: accuracy,
per-class accuracy and confusion matrix on voices of held-out accents AND held-out variants saying held-out
sentences, the same for the training voices on held-out sentences, and for the demo's own voice and style
settings (by default the demo's answer voice is among the training voices: the reward judges that voice;
the held-out voices stay held out). Synthetic speech only: "high" means espeak's -p 85-99, not a human
judgement, and pitch classes are relative to a voice's own register, which one utterance of an unknown voice
cannot always tell.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from data.tools.demo import STYLES as DEMO_STYLES
from data.tools.demo import TTS_VOICE, espeak_binary, make_sentences
from data.files import atomic_path
from data.tools.voice import ESPEAK_ACCENTS, ESPEAK_VARIANTS
from model.style import NUM_STATS, STYLES, StyleClassifier, StyleNet, batch_features, style_features

HELDOUT_ACCENTS = ("en-gb-scotland", "en-029")
HELDOUT_VARIANTS = tuple(ESPEAK_VARIANTS[-10:])  # as train.speaker_encoder holds them out
FEMALE_VARIANTS = {"f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "aunty", "belinda", "grandma", "linda",
                   "steph", "steph2"}
# The demo's dialogue styles (data.tools.demo.STYLES) as classifier classes.
DEMO_STYLE_CLASSES = {"slowly": "slow", "quickly": "fast", "in a high voice": "high"}
_HELDOUT_TEXT_SEED = 900_001


# ---------------------------------------------------------------------------------------------- corpus

def style_voices(num: int, seed: int, heldout: bool) -> List[dict]:
    """`num` distinct voices {name, accent, variant, pitch, speed}: accent x variant pairs of the held-out
    accents and variants (heldout=True) or of neither, each with a base pitch 35-65 and speed 150-200 wpm."""
    accents = [a for a in ESPEAK_ACCENTS if (a in HELDOUT_ACCENTS) == heldout]
    variants = [v for v in ESPEAK_VARIANTS if (v in HELDOUT_VARIANTS) == heldout]
    pool = [(a, v) for a in accents for v in variants]
    if num > len(pool):
        raise ValueError(f"{num} {'held-out' if heldout else 'training'} voices asked for, only {len(pool)} "
                         f"accent x variant pairs exist")
    rng = random.Random(seed)
    return [{"name": f"{a}+{v}", "accent": a, "variant": v, "pitch": rng.randrange(35, 66),
             "speed": rng.randrange(150, 201)} for a, v in rng.sample(pool, num)]


def style_setting(voice: dict, style: str, rng: random.Random) -> dict:
    """espeak-ng settings {voice, pitch, speed} of `voice` speaking in `style`: slow 0.55-0.7x and fast
    1.4-1.7x its speed (the demo: 110 and 260 against 175), high -p 85-99 (the demo: 90), low -p 0-15, whisper
    the whisper variant of its gender with its own pitch and speed."""
    voice_name, pitch, speed = f"{voice['accent']}+{voice['variant']}", voice["pitch"], voice["speed"]
    if style == "slow":
        speed = round(speed * rng.uniform(0.55, 0.7))
    elif style == "fast":
        speed = round(speed * rng.uniform(1.4, 1.7))
    elif style == "high":
        pitch = rng.randrange(85, 100)
    elif style == "low":
        pitch = rng.randrange(0, 16)
    elif style == "whisper":
        voice_name = f"{voice['accent']}+{'whisperf' if voice['variant'] in FEMALE_VARIANTS else 'whisper'}"
    elif style != "normal":
        raise ValueError(f"style {style!r}: expected one of {list(STYLES)}")
    return {"voice": voice_name, "pitch": pitch, "speed": speed}


def style_utterances(voices: Sequence[dict], sentences: Sequence[str], per_style: int, seed: int) -> List[dict]:
    """Each voice says `per_style` sentences (drawn from `sentences`) in each style: {text, style, speaker,
    voice, pitch, speed}."""
    if per_style > len(sentences):
        raise ValueError(f"each voice is to say {per_style} different sentences per style, but only "
                         f"{len(sentences)} sentences were given")
    rng = random.Random(seed)
    out = []
    for v in voices:
        for style in STYLES:
            for text in rng.sample(list(sentences), per_style):
                out.append({"text": text, "style": style, "speaker": v["name"], **style_setting(v, style, rng)})
    return out


def render(folder: str, utterances: Sequence[dict], workers: int = 2) -> List[dict]:
    """Speak each utterance into FOLDER (files named by content: a re-run reuses them); adds "audio"."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for u in utterances:
        name = hashlib.sha1(f"{u['voice']}|{u['pitch']}|{u['speed']}|{u['text']}".encode()).hexdigest()[:16]
        out.append({**u, "audio": os.path.join(folder, name + ".wav")})
    todo = {r["audio"]: r for r in out if not os.path.isfile(r["audio"])}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each thread waits on one espeak process
        list(pool.map(_speak, todo.values()))
    return out


def _speak(u: dict) -> None:
    # A killed run must not leave a half file that a re-run would reuse; espeak-ng wants a .wav name.
    with atomic_path(u["audio"], suffix=".tmp.wav") as tmp:
        proc = subprocess.run([espeak_binary(), "-v", u["voice"], "-p", str(u["pitch"]), "-s", str(u["speed"]),
                               "-w", tmp, u["text"]], capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not os.path.isfile(tmp):
            raise RuntimeError(f"espeak-ng failed for {u['voice']!r} -p {u['pitch']} -s {u['speed']}: "
                               f"{proc.stderr.strip()}")


def codec_mel(wave_T: torch.Tensor, tokenizer) -> torch.Tensor:
    """What a wave becomes through a k-means codec: its codes' decoded log-mel [128, 4 N] (centroid frames)."""
    return tokenizer.decode_features(tokenizer.encode(wave_T))


def utterance_mels(records: Sequence[dict], tokenizer=None) -> List[torch.Tensor]:
    """Log-mels [128, F] of the records' audio: the render's own (tokenizer None) or its codes' decoded mel."""
    from data.audio import read_audio
    from data.features import log_mel
    waves = (read_audio(r["audio"]) for r in records)
    return [log_mel(w) if tokenizer is None else codec_mel(w, tokenizer) for w in waves]


# ----------------------------------------------------------------------------------------- training

def fit_style_classifier(mels: Sequence[torch.Tensor], labels: Sequence[str], steps: int = 600,
                         batch_size: int = 32, lr: float = 2e-3, channels: int = 96, seed: int = 0,
                         log_every: int = 0) -> StyleClassifier:
    """Train a StyleNet on log-mels with style labels (cross-entropy; each step a random batch, each
    utterance randomly cut to 60-100% of its length so no exact length is learned); a pure function of its
    inputs and seed."""
    unknown = sorted(set(labels) - set(STYLES))
    if unknown:
        raise ValueError(f"style labels {unknown}: expected some of {list(STYLES)}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    feats = [style_features(m) for m in mels]
    stats = torch.stack([s for _, _, s in feats])
    norm = {"mean": stats.mean(0).tolist(), "std": stats.std(0).clamp_min(1e-3).tolist()}
    target = torch.tensor([STYLES.index(x) for x in labels])
    net = StyleNet(feats[0][0].shape[0], NUM_STATS, channels, len(STYLES))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(1, steps + 1):
        pick = [rng.randrange(len(feats)) for _ in range(batch_size)]
        loss = F.cross_entropy(net(*batch_features([_cut(feats[i], rng) for i in pick], norm)), target[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"style net step {step}/{steps}: loss {loss.item():.3f}", file=sys.stderr)
    config = {"styles": list(STYLES), "in_channels": feats[0][0].shape[0], "num_stats": NUM_STATS,
              "channels": channels, "norm": norm, "steps": steps, "seed": seed, "num_utterances": len(mels)}
    return StyleClassifier(net, config)


def _cut(feat, rng: random.Random):
    frames, speech, stats = feat
    n = frames.shape[1]
    keep = max(4, round(n * rng.uniform(0.6, 1.0)))
    start = rng.randrange(n - keep + 1)
    return frames[:, start:start + keep], speech[start:start + keep], stats


def style_report(classifier: StyleClassifier, mels: Sequence[torch.Tensor], labels: Sequence[str],
                 voices: Optional[Sequence[str]] = None) -> dict:
    """Accuracy, per-class accuracy and the confusion matrix (rows: true style, columns: predicted); with
    `voices` (one name per utterance) also the accuracy of each voice."""
    pred = classifier.probabilities(mels).argmax(-1).tolist()
    names = classifier.styles
    confusion = [[0] * len(names) for _ in names]
    for y, p in zip(labels, pred):
        confusion[names.index(y)][p] += 1
    per_class = {n: round(row[i] / sum(row), 4) for i, (n, row) in enumerate(zip(names, confusion)) if sum(row)}
    correct = sum(confusion[i][i] for i in range(len(names)))
    report = {"utterances": len(labels), "accuracy": round(correct / len(labels), 4),
              "per_class": per_class, "confusion": {"rows_true_cols_predicted": names, "matrix": confusion}}
    if voices is not None:
        hits: Dict[str, List[int]] = {}
        for v, y, p in zip(voices, labels, pred):
            hits.setdefault(v, []).append(int(names.index(y) == p))
        report["per_voice"] = {v: round(sum(h) / len(h), 4) for v, h in sorted(hits.items())}
    return report


# ------------------------------------------------------------------------------------ espeak figures

def median_f0_hz(wave_T: torch.Tensor, sample_rate: int = 16000, fmin: float = 60.0, fmax: float = 400.0,
                 threshold: float = 0.35) -> float:
    """Median F0 (Hz) over the voiced 10 ms steps of a waveform, by YIN: the cumulative-mean-normalised
    difference of a 20 ms window against itself shifted by each lag (40 ms frames), its first dip below
    `threshold` in the 60-400 Hz lags (then that dip's minimum); a frame is voiced when it has such a dip and
    its energy is within 30 dB of the loudest. nan without voiced frames (a whisper, or vocoded speech
    whose periodicity was lost)."""
    hop, width = sample_rate // 100, int(0.04 * sample_rate)
    half = width // 2
    if wave_T.numel() < width:
        return float("nan")
    frames_NW = wave_T.float().unfold(0, width, hop)
    frames_NW = frames_NW - frames_NW.mean(-1, keepdim=True)
    loud_N = frames_NW.square().sum(-1) > frames_NW.square().sum(-1).max() * 1e-3
    # d(t) = sum_{j < half} (x_j - x_{j+t})^2 = e(0..half) + e(t..t+half) - 2 sum_{j < half} x_j x_{j+t}
    cum_NW = F.pad(frames_NW.square().cumsum(-1), (1, 0))
    lags = torch.arange(half)
    cross_NL = torch.fft.irfft(torch.fft.rfft(frames_NW, n=2 * width)
                               * torch.fft.rfft(frames_NW[:, :half], n=2 * width).conj(), n=2 * width)[:, :half]
    d_NL = cum_NW[:, half:half + 1] + cum_NW[:, lags + half] - cum_NW[:, lags] - 2 * cross_NL
    cmnd_NL = torch.ones_like(d_NL)
    cmnd_NL[:, 1:] = d_NL[:, 1:] * lags[1:] / d_NL[:, 1:].cumsum(-1).clamp_min(1e-12)
    lo, hi = int(sample_rate / fmax), min(int(sample_rate / fmin), half - 1)
    region_NL = cmnd_NL[:, lo:hi + 1]
    f0s = []
    for n in torch.nonzero(loud_N & (region_NL.min(-1).values < threshold)).flatten().tolist():
        k = int((region_NL[n] < threshold).float().argmax())
        while k + 1 < region_NL.shape[1] and region_NL[n, k + 1] < region_NL[n, k]:
            k += 1
        f0s.append(sample_rate / (lo + k))
    return float(torch.tensor(f0s).median()) if f0s else float("nan")


def speech_span_s(wave_T: torch.Tensor, sample_rate: int = 16000, floor_db: float = 35.0) -> float:
    """Seconds from the first to the last 10 ms frame within `floor_db` of the loudest (pauses between words
    count, leading and trailing silence do not)."""
    hop = sample_rate // 100
    n = wave_T.numel() // hop
    if n == 0:
        return 0.0
    energy_N = wave_T[:n * hop].float().reshape(n, hop).square().mean(-1)
    idx = torch.nonzero(energy_N > energy_N.max() * 10 ** (-floor_db / 10)).flatten()
    return (int(idx[-1]) - int(idx[0]) + 1) / 100.0 if idx.numel() else 0.0


def espeak_figures(sentences: Sequence[str], folder: str, vocoders: Dict[str, object], workers: int = 2) -> dict:
    """The demo voice's own styles (data.tools.demo.STYLES, plus normal) on `sentences`: speech seconds per word
    and median F0 per style, raw and through each vocoder ({name: Vocoder}); the slow/quick time ratio and
    the high/normal F0 ratio."""
    from data.audio import read_audio
    styles = {"normal": {"speed": 175, "pitch": 50}, **DEMO_STYLES}
    utts = [{"text": t, "style": s, "voice": TTS_VOICE, **st} for s, st in styles.items() for t in sentences]
    records = render(folder, utts, workers)
    waves = {"raw": [read_audio(r["audio"]) for r in records]}
    for name, vocoder in vocoders.items():
        tokenizer = vocoder.tokenizer
        waves[name] = [vocoder.codes_to_wave(tokenizer.encode(w)) for w in waves["raw"]]
    out = {}
    for name, ws in waves.items():
        per_style = {}
        for s in styles:
            rows = [(w, r) for w, r in zip(ws, records) if r["style"] == s]
            per_word = [speech_span_s(w) / len(r["text"].split()) for w, r in rows]
            f0 = [median_f0_hz(w) for w, _ in rows]
            f0 = [x for x in f0 if not math.isnan(x)]
            per_style[s] = {"s_per_word": round(sum(per_word) / len(per_word), 4),
                            "median_f0_hz": round(float(torch.tensor(f0).median()), 1) if f0 else None}
        high, normal = per_style["in a high voice"]["median_f0_hz"], per_style["normal"]["median_f0_hz"]
        out[name] = {"styles": per_style,
                     "slow_over_quick_s_per_word": round(per_style["slowly"]["s_per_word"]
                                                         / per_style["quickly"]["s_per_word"], 3),
                     "high_over_normal_f0": round(high / normal, 3) if high and normal else None}
    return out


# ------------------------------------------------------------------------------------------------- CLI

def _tokenizer(spec: Optional[str]):
    if not spec:
        return None
    from data.codes.tokenizers import KMeansTokenizer
    kind, _, path = spec.partition(":")
    if kind != "kmeans" or not path:
        raise SystemExit(f"error: --codes {spec!r}: expected kmeans:FILE.pt (a k-means tokenizer, whose codes "
                         f"decode to mel frames)")
    return KMeansTokenizer.load(path)


def _fit_main(args) -> int:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tokenizer = _tokenizer(args.codes)
    train_texts = make_sentences(args.texts, args.seed)
    test_texts = make_sentences(args.heldout_texts, args.seed + _HELDOUT_TEXT_SEED, exclude=frozenset(train_texts))
    train_voices = style_voices(args.voices, args.seed, heldout=False)
    test_voices = style_voices(args.heldout_voices, args.seed + 1, heldout=True)
    corpus = os.path.join(args.work, "espeak_styles")
    utterances = style_utterances(train_voices, train_texts, args.per_style, args.seed)
    if args.answer_voice:  # the voice the reward will judge, at the demo's default pitch and speed
        accent, _, variant = args.answer_voice.partition("+")
        answer = {"name": args.answer_voice, "accent": accent, "variant": variant, "pitch": 50, "speed": 175}
        utterances += style_utterances([answer], train_texts, args.answer_voice_texts, args.seed + 4)
    train = render(corpus, utterances, args.workers)
    sets = {"heldout_voices_and_texts": style_utterances(test_voices, test_texts, args.heldout_per_style,
                                                         args.seed + 2),
            "training_voices_heldout_texts": style_utterances(train_voices[:args.heldout_voices], test_texts,
                                                              args.heldout_per_style, args.seed + 3),
            "demo_voice_heldout_texts": _demo_utterances(test_texts)}
    sets = {k: render(corpus, v, args.workers) for k, v in sets.items()}
    t_render = time.time() - t0
    classifier = fit_style_classifier(utterance_mels(train, tokenizer), [r["style"] for r in train], steps=args.steps,
                                      seed=args.seed, log_every=max(args.steps // 5, 1))
    classifier.config.update({"codes": args.codes, "heldout_accents": list(HELDOUT_ACCENTS),
                              "heldout_variants": list(HELDOUT_VARIANTS)})
    classifier.save(args.out)
    report = {"train": {"voices": len(train_voices), "answer_voice": args.answer_voice or None,
                        "texts": len(train_texts), "utterances": len(train)},
              "codes": args.codes or "none (the renders' own log-mel)"}
    for name, records in sets.items():
        report[name] = style_report(classifier, utterance_mels(records, tokenizer), [r["style"] for r in records],
                                    [r["speaker"] for r in records])
    report["seconds"] = {"render": round(t_render, 1), "total": round(time.time() - t0, 1)}
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"config": classifier.config, **report}, f, indent=1)
    for name in sets:
        r = report[name]
        print(f"{name}: accuracy {r['accuracy']:.3f} on {r['utterances']} utterances; per class "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["per_class"].items()))
        print("  confusion (rows true, columns predicted: " + " ".join(STYLES) + ")")
        for style_name, row in zip(STYLES, r["confusion"]["matrix"]):
            print(f"  {style_name:>8} " + " ".join(f"{n:4d}" for n in row))
    print(f"wrote {args.out} and its .json; {report['seconds']}")
    return 0


def _demo_utterances(texts: Sequence[str]) -> List[dict]:
    """The demo's answer voice in its dialogue styles and at its default (normal)."""
    settings = {"normal": {"speed": 175, "pitch": 50},
                **{DEMO_STYLE_CLASSES[k]: v for k, v in DEMO_STYLES.items()}}
    return [{"text": t, "style": s, "speaker": TTS_VOICE, "voice": TTS_VOICE, **st}
            for s, st in settings.items() for t in texts]


def _figures_main(args) -> int:
    from data.audio import read_audio
    from data.codes.tokenizers import KMeansTokenizer, fit_kmeans, pooled_mel_NM
    from model.vocoder import KMeansVocoder
    torch.set_num_threads(args.threads)
    t0 = time.time()
    vocoders = {}
    if args.codes:
        _tokenizer(args.codes)  # the spec's own check
        vocoders[args.codes] = KMeansVocoder(args.codes.partition(":")[2])
    if args.fit_codes:
        texts = make_sentences(args.texts, args.seed)
        if args.codec_voices:  # many voices in all six styles
            utts = style_utterances(style_voices(args.codec_voices, args.seed, heldout=False), texts, 1, args.seed)
            corpus = f"{args.codec_voices} espeak voices x {len(STYLES)} styles x 1 of {len(texts)} sentences"
        else:  # the demo's answer voice in the demo's styles, each sentence in one of them
            settings = [{"speed": 175, "pitch": 50}, *DEMO_STYLES.values()]
            utts = [{"text": t, "voice": TTS_VOICE, **settings[i % len(settings)]} for i, t in enumerate(texts)]
            corpus = f"{TTS_VOICE} in normal + data.tools.demo.STYLES, {len(texts)} sentences"
        records = render(os.path.join(args.work, "espeak_codec"), utts, args.workers)
        frames = torch.cat([pooled_mel_NM(read_audio(r["audio"])) for r in records])
        KMeansTokenizer(fit_kmeans(frames, args.num_codes, seed=args.seed), {"corpus": corpus}).save(args.fit_codes)
        vocoders[f"kmeans:{args.fit_codes}"] = KMeansVocoder(args.fit_codes)
    sentences = make_sentences(args.sentences, args.seed + _HELDOUT_TEXT_SEED)
    report = espeak_figures(sentences, os.path.join(args.work, "espeak_demo_styles"), vocoders, args.workers)
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.style_classifier", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="train on espeak styles, report on held-out voices and texts, save")
    p.add_argument("out", help="file to write, e.g. runs/style/style.pt (figures go to the .json beside it)")
    p.add_argument("--codes", default=None, help="kmeans:FILE.pt: train and test on the codes' decoded mels")
    p.add_argument("--voices", type=int, default=160, help="training voices (accent x variant, own pitch and speed)")
    p.add_argument("--heldout-voices", type=int, default=20, help="voices of held-out accents and variants")
    p.add_argument("--texts", type=int, default=60, help="training sentences")
    p.add_argument("--heldout-texts", type=int, default=20, help="held-out sentences")
    p.add_argument("--per-style", type=int, default=1, help="sentences each training voice says in each style")
    p.add_argument("--heldout-per-style", type=int, default=2, help="sentences each held-out voice says per style")
    p.add_argument("--answer-voice", default=TTS_VOICE,
                   help="also train on this voice (the demo's answer voice by default; '' for none), -p 50 -s 175")
    p.add_argument("--answer-voice-texts", type=int, default=10, help="sentences it says in each style")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--work", default="runs/style", help="folder for the espeak renders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="espeak processes at once")
    f = sub.add_parser("figures", help="the demo voice's styles: time per word and F0, raw and through codecs")
    f.add_argument("--codes", default=None, help="kmeans:FILE.pt to measure")
    f.add_argument("--fit-codes", default=None, help="fit a k-means codec, save it here and measure it too")
    f.add_argument("--num-codes", type=int, default=256)
    f.add_argument("--codec-voices", type=int, default=0, help="--fit-codes on this many espeak voices in all six "
                   "styles (0: on the demo's answer voice in the demo's styles)")
    f.add_argument("--texts", type=int, default=200, help="sentences --fit-codes fits on")
    f.add_argument("--sentences", type=int, default=8, help="held-out sentences measured per style")
    f.add_argument("--work", default="runs/style")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    return _fit_main(args) if args.command == "fit" else _figures_main(args)


if __name__ == "__main__":
    sys.exit(main())

"""The speaker encoder's (model.speaker) espeak-ng training corpus, its training, and its held-out report.

    python -m train.speaker_encoder fit OUT.pt [--asterisk DIR --transcripts FILE]

trains it on espeak-ng voices (CPU, about a minute), validates it on voices kept out of training (and on
the asterisk recordings if given), and writes OUT.pt and OUT.json with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from data.audio import read_audio
from data.features import SAMPLE_RATE
from data.tools.voice import ESPEAK_VARIANTS, espeak_speakers, read_transcribed_folder, speak_voices
from model.speaker import BAND_RATE, SpeakerEncoder, SpeakerNet, speaker_features

# ---------------------------------------------------------------------------------------------- corpus

def espeak_voice_sets(folder: str, speakers: int, heldout_speakers: int, heldout_variants: int, per_speaker: int,
                      seed: int) -> Tuple[List[dict], List[dict], List[str]]:
    """Training and validation recordings ({audio, speaker, text, ...}, spoken into FOLDER) and the variants
    held out. Whole variants (timbres) are held out, so validation voices are ones the net never heard."""
    held_variants = ESPEAK_VARIANTS[-heldout_variants:]
    train_spk = espeak_speakers(speakers, seed=seed, variants=ESPEAK_VARIANTS[:-heldout_variants])
    test_spk = espeak_speakers(heldout_speakers, seed=seed + 1, variants=held_variants)
    train = speak_voices(folder, train_spk, per_speaker, seed=seed)
    test = speak_voices(folder, test_spk, per_speaker, seed=seed + 7)
    return train, test, held_variants


# ----------------------------------------------------------------------------------------- training

def _crop(feats_MF: torch.Tensor, frames: int, rng: random.Random) -> torch.Tensor:
    if feats_MF.shape[1] < frames:  # a short one is looped: pooling statistics stay those of the voice
        feats_MF = feats_MF.repeat(1, -(-frames // feats_MF.shape[1]))
    start = rng.randrange(feats_MF.shape[1] - frames + 1)
    return feats_MF[:, start:start + frames]


def fit_speaker_encoder(waves: Sequence[torch.Tensor], labels: Sequence[str], sample_rate: int, steps: int = 600,
                        batch_size: int = 64, crop_frames: int = 120, lr: float = 3e-3, seed: int = 0,
                        channels: int = 128, dim: int = 64, n_mels: int = 40, margin: float = 0.2,
                        scale: float = 20.0, log_every: int = 0) -> SpeakerEncoder:
    """Train a SpeakerNet to tell the labels apart (additive-margin softmax on cosines, random crops of
    `crop_frames` 10 ms frames); a pure function of its inputs and seed."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(f"a speaker encoder needs at least 2 speakers to tell apart, got {names}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    feats = [speaker_features(w, sample_rate, n_mels) for w in waves]
    target = torch.tensor([names.index(x) for x in labels])
    net = SpeakerNet(n_mels, channels, dim, num_classes=len(names))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(1, steps + 1):
        pick = [rng.randrange(len(feats)) for _ in range(batch_size)]
        batch_BMF = torch.stack([_crop(feats[i], crop_frames, rng) for i in pick])
        cos_BK = net(batch_BMF) @ F.normalize(net.classes, dim=-1).T
        y_B = target[pick]
        loss = F.cross_entropy(scale * (cos_BK - margin * F.one_hot(y_B, len(names))), y_B)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"speaker net step {step}/{steps}: loss {loss.item():.3f}", file=sys.stderr)
    config = {"n_mels": n_mels, "channels": channels, "dim": dim, "band_rate": BAND_RATE, "steps": steps,
              "seed": seed, "num_speakers": len(names), "num_utterances": len(waves)}
    return SpeakerEncoder(net, config)


# ------------------------------------------------------------------------------------------ validation

def equal_error_rate(same: Sequence[float], different: Sequence[float]) -> float:
    """The rate at which a threshold on the score wrongly rejects same-voice pairs as often as it wrongly
    accepts different-voice pairs (0 = perfect separation, 0.5 = chance)."""
    if not same or not different:
        raise ValueError(f"an equal error rate needs both kinds of pairs, got {len(same)} same, {len(different)} "
                         f"different")
    best = 1.0
    for threshold in sorted(set(same) | set(different)):
        miss = sum(s < threshold for s in same) / len(same)
        false_accept = sum(d >= threshold for d in different) / len(different)
        best = min(best, max(miss, false_accept))
    return best


def pair_scores(emb_ND: torch.Tensor, labels: Sequence[str]) -> Dict[str, List[float]]:
    """Cosines of every pair of single recordings, split into same-label and different-label pairs."""
    cos_NN = emb_ND @ emb_ND.T
    same, diff = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            (same if labels[i] == labels[j] else diff).append(float(cos_NN[i, j]))
    return {"same": same, "different": diff}


def voice_report(emb_ND: torch.Tensor, labels: Sequence[str]) -> dict:
    """Utterance-pair EER and mean cosines, and the set-level figure `similarity` gives: each voice's
    first half of recordings against its own second half vs against other voices' second halves."""
    scores = pair_scores(emb_ND, labels)
    halves = {}
    for name in sorted(set(labels)):
        rows = [i for i, x in enumerate(labels) if x == name]
        if len(rows) >= 2:
            halves[name] = (emb_ND[rows[:len(rows) // 2]].mean(0), emb_ND[rows[len(rows) // 2:]].mean(0))
    set_same = [float(F.cosine_similarity(a, b, dim=0)) for a, b in halves.values()]
    set_diff = [float(F.cosine_similarity(halves[x][0], halves[y][1], dim=0)) for x in halves for y in halves if x != y]
    def mean(xs: List[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")
    return {"num_voices": len(set(labels)), "num_recordings": len(labels),
            "pair_eer": equal_error_rate(scores["same"], scores["different"]),
            "pair_cos_same": mean(scores["same"]), "pair_cos_different": mean(scores["different"]),
            "set_cos_same": mean(set_same), "set_cos_different": mean(set_diff),
            "set_cos_different_max": max(set_diff) if set_diff else float("nan"),
            "set_eer": equal_error_rate(set_same, set_diff) if set_same and set_diff else float("nan")}


def asterisk_report(encoder: SpeakerEncoder, root: str, transcripts: str, espeak_waves: Sequence[torch.Tensor],
                    espeak_labels: Sequence[str], num: int) -> dict:
    """Allison's recordings, half against half, vs Allison against each held-out espeak voice."""
    corpus = read_transcribed_folder(root, transcripts)
    paths = [c.audio for c in corpus.candidates][::max(1, len(corpus.candidates) // num)][:num]
    allison = [read_audio(p) for p in paths]
    half = len(allison) // 2
    self_sim = encoder.similarity(allison[:half], allison[half:], SAMPLE_RATE)
    others = [encoder.similarity(allison[:half], [w for w, x in zip(espeak_waves, espeak_labels) if x == name],
                                 SAMPLE_RATE) for name in sorted(set(espeak_labels))]
    return {"recordings": len(allison), "allison_vs_allison": self_sim,
            "allison_vs_espeak_mean": sum(others) / len(others), "allison_vs_espeak_max": max(others)}


# ------------------------------------------------------------------------------------------------- CLI

def _fit_main(args) -> int:
    if args.asterisk and not args.transcripts:
        raise SystemExit("error: --asterisk needs --transcripts (core-sounds-en.txt.gz)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train, test, held_variants = espeak_voice_sets(os.path.join(args.work, "espeak_voices"), args.speakers,
                                                   args.heldout_speakers, args.heldout_variants, args.per_speaker,
                                                   args.seed)
    train_waves = [read_audio(r["audio"]) for r in train]
    encoder = fit_speaker_encoder(train_waves, [r["speaker"] for r in train], SAMPLE_RATE, steps=args.steps,
                                  seed=args.seed, log_every=max(args.steps // 5, 1))
    encoder.config["heldout_variants"] = held_variants
    encoder.save(args.out)
    test_waves = [read_audio(r["audio"]) for r in test]
    test_emb = encoder.embed(test_waves, SAMPLE_RATE)
    report = {"train": {"speakers": args.speakers, "recordings": len(train)},
              "heldout_espeak": voice_report(test_emb, [r["speaker"] for r in test])}
    if args.asterisk:
        report["asterisk"] = asterisk_report(encoder, args.asterisk, args.transcripts, test_waves,
                                             [r["speaker"] for r in test], args.asterisk_utts)
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"config": encoder.config, **report}, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.speaker_encoder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="train on espeak voices, validate on held-out voices, save")
    p.add_argument("out", help="file to write, e.g. runs/speaker/speaker.pt (figures go to the .json beside it)")
    p.add_argument("--work", default="runs/speaker", help="folder for the generated espeak recordings")
    p.add_argument("--speakers", type=int, default=160, help="espeak voices to train on")
    p.add_argument("--heldout-speakers", type=int, default=24, help="voices of held-out variants to validate on")
    p.add_argument("--heldout-variants", type=int, default=10, help="espeak variants never used in training")
    p.add_argument("--per-speaker", type=int, default=6, help="recordings per voice")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--asterisk", default=None, help="asterisk sounds folder, for the Allison figures")
    p.add_argument("--transcripts", default=None, help="its core-sounds-en.txt(.gz)")
    p.add_argument("--asterisk-utts", type=int, default=40)
    args = parser.parse_args(argv)
    return _fit_main(args)


if __name__ == "__main__":
    sys.exit(main())

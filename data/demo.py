"""A tiny real-speech corpus spoken by espeak-ng: `python -m data.demo OUT_DIR` -> wavs + JSONL manifests.

Sentences follow one template over a small vocabulary, so a tiny model can learn to transcribe them;
held-out sentences are new combinations of the same words, spoken by the same voices.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import AbstractSet, Optional

# One list per slot of "<number> <adjective> <noun>s <verb> the <colour> <object>".
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
ADJECTIVES = ["quiet", "happy", "tiny", "brave", "lazy", "clever", "angry", "gentle", "noisy", "proud",
              "sleepy", "wild"]
NOUNS = ["cat", "dog", "bird", "frog", "horse", "farmer", "robot", "teacher", "doctor", "painter", "singer",
         "sailor"]  # all take a plain "s" plural
VERBS = ["paint", "push", "find", "follow", "watch", "clean", "carry", "visit", "draw", "kick", "lift",
         "open"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink", "grey",
           "silver"]
OBJECTS = ["table", "chair", "box", "door", "car", "boat", "ball", "house", "window", "bottle", "lamp",
           "kite"]
SLOTS = (NUMBERS, ADJECTIVES, NOUNS, VERBS, COLOURS, OBJECTS)

VOICES = ["en-us+m3", "en+f2", "en-us+m1", "en+f4", "en-gb+m2"]
SPEEDS_WPM = range(150, 191)  # espeak's default is 175 words per minute
_HELDOUT_SEED_OFFSET = 1_000_003


def make_sentences(n: int, seed: int, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    """`n` distinct template sentences, none in `exclude`, deterministic in `seed`.

    Each slot draws from a shuffled deck of its words, so every word is used once before any repeats:
    n >= 12 sentences cover the whole vocabulary.
    """
    rng = random.Random(seed)
    decks: list[list[str]] = [[] for _ in SLOTS]

    def draw(slot: int) -> str:
        if not decks[slot]:
            decks[slot] = rng.sample(SLOTS[slot], len(SLOTS[slot]))
        return decks[slot].pop()

    sentences: list[str] = []
    seen = set(exclude)
    for _ in range(100 * n + 100):
        if len(sentences) == n:
            break
        number, adjective, noun, verb, colour, obj = (draw(slot) for slot in range(len(SLOTS)))
        sentence = f"{number} {adjective} {noun}s {verb} the {colour} {obj}"
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    if len(sentences) < n:
        raise ValueError(f"could only make {len(sentences)} of {n} distinct sentences")
    return sentences


ESPEAK_DEFAULT_PATH = "/usr/bin/espeak-ng"  # where Debian installs it, in case PATH is bare


def espeak_binary() -> str:
    path = shutil.which("espeak-ng") or (ESPEAK_DEFAULT_PATH if os.path.isfile(ESPEAK_DEFAULT_PATH) else None)
    if path is None:
        raise RuntimeError("espeak-ng not found: apt-get install espeak-ng")
    return path


def speak(text: str, voice: str, path: str, speed: int = 175) -> None:
    """Speak `text` with espeak-ng voice `voice` at `speed` words/minute into WAV `path` (22.05 kHz)."""
    tmp_path = f"{path}.tmp.wav"  # a killed run must not leave a half file that a re-run would reuse
    proc = subprocess.run([espeak_binary(), "-v", voice, "-s", str(speed), "-w", tmp_path, text],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(tmp_path):
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}, speed {speed}, text {text!r}: "
                           f"{proc.stderr.strip() or proc.stdout.strip() or f'exit code {proc.returncode}'}")
    os.replace(tmp_path, path)


def _records(split: str, sentences: list[str], seed: int) -> list[dict]:
    rng = random.Random(f"{split}-{seed}")
    records = []
    for i, text in enumerate(sentences):
        voice, speed = VOICES[i % len(VOICES)], rng.choice(SPEEDS_WPM)
        # Named by content, so a re-run with other arguments never reuses a wav that says something else.
        name = hashlib.sha1(f"{voice}|{speed}|{text}".encode()).hexdigest()[:16]
        records.append({"id": f"{split}-{i:05d}", "audio": f"wav/{name}.wav", "text": text,
                        "speaker": voice, "language": "en", "speed": speed})
    return records


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)


def make_demo(out_dir: str, num_train: int = 400, num_heldout: int = 40, seed: int = 0,
              workers: int = 2) -> dict[str, list[dict]]:
    """Speak the demo corpus into OUT_DIR/wav and write train.jsonl and heldout.jsonl; returns the records."""
    espeak_binary()
    train = make_sentences(num_train, seed)
    heldout = make_sentences(num_heldout, seed + _HELDOUT_SEED_OFFSET, exclude=frozenset(train))
    splits = {"train": _records("train", train, seed), "heldout": _records("heldout", heldout, seed)}
    os.makedirs(os.path.join(out_dir, "wav"), exist_ok=True)
    todo = [r for records in splits.values() for r in records
            if not os.path.exists(os.path.join(out_dir, r["audio"]))]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each thread waits on one espeak process
        list(pool.map(lambda r: speak(r["text"], r["speaker"], os.path.join(out_dir, r["audio"]), r["speed"]),
                      todo))
    for split, records in splits.items():
        _write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), records)
    total = num_train + num_heldout
    print(f"data.demo: {num_train} train + {num_heldout} held-out sentences, {len(VOICES)} voices, "
          f"{len(todo)} spoken, {total - len(todo)} reused -> {out_dir}", file=sys.stderr)
    return splits


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for wav/, train.jsonl and heldout.jsonl")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-heldout", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        make_demo(args.out_dir, args.num_train, args.num_heldout, args.seed)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

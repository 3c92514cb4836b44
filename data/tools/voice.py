"""One speaker's recordings -> tokenized TTS shards for a custom-voice LoRA, and an espeak corpus of many
voices for training a speaker embedding:

    python -m data.tools.voice DIR OUT_DIR --speaker NAME --audio-tokenizer kmeans:F.pt [--transcripts FILE]
        [--heldout N]

DIR holds audio files with a .txt/.lab transcript beside each (as `data.corpus.prepare folder`), or the
transcripts come from one file of `name: text` lines (the asterisk-core-sounds form; `;` starts a comment,
a name may hold a subfolder like `digits/1`, gzip is read as such; a bad line is rejected by itself, named).
OUT_DIR gets raw/{train,heldout} (data.corpus.prepare's shards, 16 kHz FLAC) and train/ and heldout/ (the same with
audio codes, data.codes's output), so a killed run resumes where either left off. voice.json sums up
counts and rejects.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from data.tools.demo import espeak_binary, make_sentences
from data.files import atomic_path, atomic_write
from data.corpus.formats import AUDIO_EXTENSIONS, Candidate, Corpus, PrepareError, Reject, read_folder, read_lines
from data.corpus.prepare import prepare
from data.shards import sanitize_key
from data.codes.encode import tokenize_shards

SUMMARY_NAME = "voice.json"
# "[ascending tones]", "at [@]", "(1 second of silence)": descriptions of the sound, not words spoken.
_BRACKETED_RE = re.compile(r"\[[^\]]*\]")
_DESCRIPTION_RE = re.compile(r"\(.*\)")


# ------------------------------------------------------------------------------------- transcripts

def read_transcripts(path: str) -> Tuple[Dict[str, Tuple[str, int]], List[Reject]]:
    """({name: (text, line number)}, rejects) of a `name: text` file (gzip if it ends in .gz); `;` lines and
    blank lines are skipped. The text is kept as written; `spoken_text` strips the sound descriptions later.

    A bad line (not UTF-8, not `name: text`, a name transcribed before: the first line counts) is a Reject
    naming the file and line; the other lines are kept. A file with no line at all is a PrepareError."""
    out: Dict[str, Tuple[str, int]] = {}
    rejects: List[Reject] = []
    lines = read_lines(path)
    for line_no, line, bad in lines:
        where = {"file": path, "line": line_no}
        line = line.strip()
        if bad is not None:
            rejects.append(Reject(line_no, where, None, str(bad), bad.kind))
            continue
        if not line or line.startswith(";"):
            continue
        name, sep, text = line.partition(":")
        name = name.strip()
        if not sep or not name or " " in name:
            rejects.append(Reject(line_no, where, None, f"{line[:60]!r} is not a transcript line: expected "
                                  f"'name: text' (e.g. 'digits/1: one')", "not a transcript line"))
        elif name in out:
            rejects.append(Reject(line_no, where, None, f"{name!r} is transcribed twice (first on line "
                                  f"{out[name][1]})", "repeated name"))
        else:
            out[name] = (" ".join(text.split()), line_no)
    if not out and not rejects:
        raise PrepareError(f"transcripts file {path!r} holds no 'name: text' line")
    return out, rejects


def spoken_text(text: str) -> str:
    """The words of a transcript: [bracketed] notes dropped; a transcript that is one (parenthesised)
    description says nothing ("" comes back)."""
    if _DESCRIPTION_RE.fullmatch(text.strip()):
        return ""
    return " ".join(_BRACKETED_RE.sub(" ", text).split())


def read_transcribed_folder(root: str, transcripts: str) -> Corpus:
    """Audio files under `root` named by a transcripts file: `name` is root/name + an audio extension.

    Rejects: a bad line of the transcripts file (named by file and line), a name without an audio file, a
    transcript with no words in it, an audio file that no line names; each is listed with its reason."""
    if not os.path.isdir(root):
        raise PrepareError(f"audio folder {root!r} does not exist")
    texts, rejects = read_transcripts(transcripts)
    candidates = []
    named = set()
    for name, (text, order) in texts.items():
        path = next((os.path.join(root, name + ext) for ext in AUDIO_EXTENSIONS
                     if os.path.isfile(os.path.join(root, name + ext))), None)
        rel = name if path is None else os.path.relpath(path, root).replace(os.sep, "/")
        named.add(rel)
        where = {"file": rel}
        words = spoken_text(text)
        if path is None:
            rejects.append(Reject(order, where, None, f"no audio file: expected {os.path.join(root, name)} with "
                                  f"one of {', '.join(AUDIO_EXTENSIONS)}", "no audio file"))
        elif not words:
            rejects.append(Reject(order, where, rel, f"transcript {text!r} names no spoken words", "no speech"))
        else:
            candidates.append(Candidate(order, where, sanitize_key(name), {"text": words}, rel, path))
    last_line = max([order for _, order in texts.values()] + [r.order for r in rejects], default=0)
    for order, rel in enumerate(_audio_files(root), start=last_line + 1):
        if rel not in named:
            rejects.append(Reject(order, {"file": rel}, rel, f"no transcript: {transcripts} has no line "
                                  f"'{os.path.splitext(rel)[0]}: ...'", "no transcript"))
    rejects.sort(key=lambda r: r.order)
    return Corpus("folder", root, candidates, rejects, identity=f"transcripts={os.path.abspath(transcripts)}",
                  unit="audio file")


def _audio_files(root: str) -> List[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in sorted(files)
                  if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith(".")]
    return found


def speaker_corpus(root: str, speaker: str, transcripts: Optional[str] = None, task: str = "tts") -> Corpus:
    """The folder's recordings as records of one `speaker` for `task`."""
    if not speaker or not speaker.strip():
        raise PrepareError("--speaker must name the speaker (it goes into every record), got an empty name")
    corpus = read_transcribed_folder(root, transcripts) if transcripts else read_folder(root)
    corpus.candidates = [replace(c, record={**c.record, "speaker": speaker, "task": task}) for c in corpus.candidates]
    corpus.identity += f";speaker={speaker};task={task}"
    return corpus


def split_heldout(corpus: Corpus, num_heldout: int) -> Tuple[Corpus, Corpus]:
    """(train, held-out): the `num_heldout` candidates whose keys hash lowest are held out, so the split
    depends on neither file order nor which other files exist. Rejects stay with train."""
    if not 0 <= num_heldout < len(corpus.candidates):
        raise PrepareError(f"--heldout {num_heldout}: expected 0 <= N < {len(corpus.candidates)} (the usable "
                           f"recordings in {corpus.source})")
    ranked = sorted(corpus.candidates, key=lambda c: hashlib.sha1(c.key.encode()).hexdigest())
    held = {c.key for c in ranked[:num_heldout]}
    train = replace(corpus, candidates=[c for c in corpus.candidates if c.key not in held])
    heldout = replace(corpus, candidates=[c for c in corpus.candidates if c.key in held], rejects=[])
    return train, heldout


def prepare_voice(root: str, out_dir: str, speaker: str, audio_tokenizer: str, transcripts: Optional[str] = None,
                  num_heldout: int = 20, shard_size: int = 200, workers: int = 2, progress: bool = True,
                  task: str = "tts") -> dict:
    """Shards of one speaker with audio codes in OUT_DIR/train and OUT_DIR/heldout; returns voice.json."""
    corpus = speaker_corpus(root, speaker, transcripts, task)
    train, heldout = split_heldout(corpus, num_heldout)
    summary = {"speaker": speaker, "source": os.path.abspath(root), "transcripts": transcripts,
               "audio_tokenizer": audio_tokenizer, "splits": {}}
    for split, part in (("train", train), ("heldout", heldout)):
        if not part.candidates:
            continue
        raw_dir, split_dir = os.path.join(out_dir, "raw", split), os.path.join(out_dir, split)
        prepare(part, raw_dir, shard_size, workers, progress)
        tokenized = tokenize_shards([raw_dir], audio_tokenizer, split_dir, workers, progress)[0]
        summary["splits"][split] = {"shards": split_dir, "num_samples": tokenized["index"]["num_samples"],
                                    "duration_s": tokenized["index"]["total_duration_s"],
                                    "keys": [c.key for c in part.candidates] if split == "heldout" else None,
                                    # data.codes's index keeps prepare's rejects and adds its own
                                    "rejects": tokenized["index"]["rejects"]}
    summary["num_rejects"] = sum(len(s["rejects"]) for s in summary["splits"].values())
    atomic_write(os.path.join(out_dir, SUMMARY_NAME), json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"data.tools.voice: {speaker}: " + ", ".join(f"{s} {v['num_samples']} samples ({v['duration_s']:.0f} s)"
                                                for s, v in summary["splits"].items())
          + f"; {summary['num_rejects']} rejected (listed in {os.path.join(out_dir, SUMMARY_NAME)})", file=sys.stderr)
    return summary


# ------------------------------------------------------------------------- many espeak voices

# espeak-ng voice variants (the part after "+"); speakers are (accent, variant, pitch, speed).
ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "adam", "Alex",
                   "Alicia", "Andrea", "Andy", "Annie", "aunty", "belinda", "benjamin", "boris", "caleb", "david",
                   "ed", "edward", "Gene", "grandma", "grandpa", "iven", "iven2", "john", "klatt", "klatt2",
                   "klatt3", "Lee", "linda", "max", "Michael", "Mike", "norbert", "paul", "quincy", "rob", "robert",
                   "sandro", "shelby", "steph", "steph2", "travis", "victor", "zac", "Jacky", "Hugo", "Denis"]


def espeak_speakers(num: int, seed: int = 0, variants: Optional[List[str]] = None) -> List[dict]:
    """`num` distinct espeak speakers {name, voice, pitch, speed}, drawn from `variants` (default: all)."""
    rng = random.Random(seed)
    pool = [(a, v) for a in ESPEAK_ACCENTS for v in (variants or ESPEAK_VARIANTS)]
    if num > len(pool):
        raise ValueError(f"{num} espeak speakers asked for, only {len(pool)} accent x variant pairs exist")
    out = []
    for accent, variant in rng.sample(pool, num):
        pitch, speed = rng.randrange(25, 76), rng.randrange(140, 201)
        out.append({"name": f"{accent}+{variant}-p{pitch}", "voice": f"{accent}+{variant}", "pitch": pitch,
                    "speed": speed})
    return out


def speak_voices(out_dir: str, speakers: List[dict], per_speaker: int, seed: int = 0,
                 workers: int = 2) -> List[dict]:
    """Each speaker says `per_speaker` different demo sentences into OUT_DIR; returns {audio, speaker, text}.

    Files are named by content, so a second call with the same speakers reuses them."""
    os.makedirs(out_dir, exist_ok=True)
    sentences = make_sentences(len(speakers) * per_speaker, seed)
    records = []
    for i, spk in enumerate(speakers):
        for j in range(per_speaker):
            text = sentences[i * per_speaker + j]
            name = hashlib.sha1(f"{spk['voice']}|{spk['pitch']}|{spk['speed']}|{text}".encode()).hexdigest()[:16]
            records.append({"audio": os.path.join(out_dir, name + ".wav"), "speaker": spk["name"], "text": text,
                            "voice": spk["voice"], "pitch": spk["pitch"], "speed": spk["speed"]})
    todo = [r for r in records if not os.path.isfile(r["audio"])]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each thread waits on one espeak process
        list(pool.map(_speak_pitched, todo))
    return records


def _speak_pitched(record: dict) -> None:
    # data.tools.demo.speak has no pitch; a speaker's pitch is part of who it is here.
    with atomic_path(record["audio"], suffix=".tmp.wav") as tmp:  # espeak-ng wants a .wav name
        proc = subprocess.run([espeak_binary(), "-v", record["voice"], "-p", str(record["pitch"]), "-s",
                               str(record["speed"]), "-w", tmp, record["text"]], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0 or not os.path.isfile(tmp):
            raise RuntimeError(f"espeak-ng failed for voice {record['voice']!r}: {proc.stderr.strip()}")


# ----------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tools.voice", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder of one speaker's audio files (searched recursively)")
    parser.add_argument("out_dir", help="folder for raw/, train/, heldout/ and voice.json")
    parser.add_argument("--speaker", required=True, help="the speaker's name, stored in every record")
    parser.add_argument("--audio-tokenizer", required=True, help="kmeans:FILE.pt or s3:FILE.onnx")
    parser.add_argument("--transcripts", default=None, help="one file of 'name: text' lines (gzip ok) instead "
                        "of a .txt/.lab beside each audio file")
    parser.add_argument("--heldout", type=int, default=20, help="recordings kept out of training (chosen by a "
                        "hash of their names)")
    parser.add_argument("--task", default="tts", help="task stored in each record (default tts)")
    parser.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    parser.add_argument("--workers", type=int, default=2, help="decoding / tokenizing processes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        prepare_voice(args.dir, args.out_dir, args.speaker, args.audio_tokenizer, args.transcripts, args.heldout,
                      args.shard_size, args.workers, not args.no_progress, args.task)
    except ValueError as exc:  # PrepareError and a bad tokenizer spec both
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

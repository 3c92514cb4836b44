"""A tiny real-speech corpus spoken by espeak-ng for the demo curriculum: `python -m data.tools.demo OUT_DIR`
-> OUT_DIR/wav/ and OUT_DIR/<task>/{train,heldout}.jsonl for ASR, TTS, S2TT (English speech -> German
text), styled spoken dialogue (conversations for `data.corpus.prepare conversations`) and paralinguistic
questions (the voice's gender, speed and pitch), plus texts.jsonl, every text the templates will write, for
`data.text_tokenizer build`. OUT_DIR/{train,heldout}.jsonl repeat the ASR manifests. On request (`--tasks
timbre`): speech in a retrieved voice (task timbre_search: the found clip and the answer in one voice).

Sentences follow one template over a small vocabulary, so a tiny model can learn them; held-out
sentences (shared by all tasks) are new combinations of the same words, in none of the training sets.
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
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple

from data.files import atomic_path, atomic_write

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
DEFAULT_PITCH = 50  # espeak's
HELDOUT_SEED_OFFSET = 1_000_003


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


def speak(text: str, voice: str, path: str, speed: int = 175, pitch: int = DEFAULT_PITCH) -> None:
    """Speak `text` with espeak-ng voice `voice` at `speed` words/minute and `pitch` (0-99) into WAV `path`
    (22.05 kHz)."""
    # -p only when asked for: a voice variant ("+f2") brings its own pitch.
    pitch_args = [] if pitch == DEFAULT_PITCH else ["-p", str(pitch)]
    # A killed run must not leave a half file that a re-run would reuse; espeak-ng wants a .wav name.
    with atomic_path(path, suffix=".tmp.wav") as tmp_path:
        proc = subprocess.run([espeak_binary(), "-v", voice, "-s", str(speed), *pitch_args, "-w", tmp_path, text],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(tmp_path):
            raise RuntimeError(f"espeak-ng failed for voice {voice!r}, speed {speed}, text {text!r}: "
                               f"{proc.stderr.strip() or proc.stdout.strip() or f'exit code {proc.returncode}'}")


# ------------------------------------------------------------------------------------ translation

# English -> German word by word, with the endings the template's two noun phrases need: a strong plural
# adjective after the number ("zwei ruhige Katzen") and an accusative object after "the" ("den roten
# Tisch", "die rote Tür", "das rote Auto").
GERMAN_NUMBERS = dict(zip(NUMBERS, ["zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn",
                                    "elf", "zwölf"]))
GERMAN_ADJECTIVES = dict(zip(ADJECTIVES, ["ruhig", "glücklich", "winzig", "mutig", "faul", "klug", "wütend",
                                          "sanft", "laut", "stolz", "müde", "wild"]))
GERMAN_NOUNS = dict(zip(NOUNS, ["Katzen", "Hunde", "Vögel", "Frösche", "Pferde", "Bauern", "Roboter", "Lehrer",
                                "Ärzte", "Maler", "Sänger", "Seeleute"]))  # plurals
GERMAN_VERBS = dict(zip(VERBS, ["malen", "schieben", "finden", "verfolgen", "beobachten", "putzen", "tragen",
                                "besuchen", "zeichnen", "treten", "heben", "öffnen"]))
GERMAN_COLOURS = dict(zip(COLOURS, ["rot", "grün", "blau", "gelb", "lila", "orange", "schwarz", "weiß", "braun",
                                    "rosa", "grau", "silbern"]))
_UNINFLECTED_COLOURS = {"lila", "orange", "rosa"}
GERMAN_OBJECTS = dict(zip(OBJECTS, [("Tisch", "m"), ("Stuhl", "m"), ("Kiste", "f"), ("Tür", "f"), ("Auto", "n"),
                                    ("Boot", "n"), ("Ball", "m"), ("Haus", "n"), ("Fenster", "n"),
                                    ("Flasche", "f"), ("Lampe", "f"), ("Drachen", "m")]))
_ACCUSATIVE = {"m": ("den", "en"), "f": ("die", "e"), "n": ("das", "e")}  # article, weak adjective ending


def translate_to_german(sentence: str) -> str:
    """The German of one template sentence: "two quiet cats paint the red table" -> "zwei ruhige Katzen
    malen den roten Tisch"."""
    words = sentence.split()
    if len(words) != 7 or words[4] != "the" or not words[2].endswith("s"):
        raise ValueError(f"{sentence!r} is not a demo template sentence")
    number, adjective, nouns, verb, _, colour, obj = words
    noun, gender = GERMAN_OBJECTS[obj]
    article, ending = _ACCUSATIVE[gender]
    colour_de = GERMAN_COLOURS[colour]
    colour_de = colour_de if colour_de in _UNINFLECTED_COLOURS else _inflect(colour_de, ending)
    return " ".join([GERMAN_NUMBERS[number], _inflect(GERMAN_ADJECTIVES[adjective], "e"),
                     GERMAN_NOUNS[nouns[:-1]], GERMAN_VERBS[verb], article, colour_de, noun])


def _inflect(stem: str, ending: str) -> str:
    return stem + (ending[1:] if stem.endswith("e") else ending)  # "müde" + "e" -> "müde"


# ----------------------------------------------------------------------------------------- records

TTS_VOICE = "en-us+m3"  # the one voice the model learns to speak with (TTS and dialogue answers)
# How a dialogue request asks for its answer, and the espeak settings that deliver it.
STYLES = {"slowly": {"speed": 110, "pitch": DEFAULT_PITCH}, "quickly": {"speed": 260, "pitch": DEFAULT_PITCH},
          "in a high voice": {"speed": 175, "pitch": 90}}
DIALOGUE_SYSTEM = "Say what you are asked to say, in the way you are asked to say it."
TARGET_LANGUAGE = "German"
TASK_NAMES = ("asr", "tts", "s2tt", "dialogue", "para", "timbre")
DEFAULT_TASKS = TASK_NAMES[:-1]  # what the demo curriculum trains; timbre on request
TASK_SEEDS = {"tts": 101, "s2tt": 202, "dialogue": 303, "para": 404, "timbre": 505}  # own training sentences
# Paralinguistic labels the demo can produce: a voice's gender (from espeak's variant), and speed and pitch
# as espeak settings (pitch relative to the voice's own).
VOICE_GENDERS = {voice: "male" if "+m" in voice else "female" for voice in VOICES}
PARA_SPEEDS = {"slow": 120, "normal": 175, "fast": 240}  # words per minute
PARA_PITCHES = {"low": 20, "normal": DEFAULT_PITCH, "high": 85}
PARA_ATTRIBUTES = ("gender", "speed", "pitch")


def spoken_wav(text: str, voice: str, speed: int, pitch: int = DEFAULT_PITCH) -> dict:
    """An utterance to speak. Named by content (ASR names as in earlier versions), so a re-run with other
    arguments never reuses a wav that says something else."""
    spec = f"{voice}|{speed}|{text}" if pitch == DEFAULT_PITCH else f"{voice}|{speed}|{pitch}|{text}"
    return {"text": text, "voice": voice, "speed": speed, "pitch": pitch,
            "path": f"wav/{hashlib.sha1(spec.encode()).hexdigest()[:16]}.wav"}


# Each builder returns (records, utterances); record audio paths are relative to OUT_DIR/<task>/.

def _asr(split: str, sentences: List[str], seed: int) -> Tuple[List[dict], List[dict]]:
    rng = random.Random(f"{split}-{seed}")
    records, wavs = [], []
    for i, text in enumerate(sentences):
        wav = spoken_wav(text, VOICES[i % len(VOICES)], rng.choice(SPEEDS_WPM))
        records.append({"id": f"{split}-{i:05d}", "audio": "../" + wav["path"], "text": text,
                        "speaker": wav["voice"], "language": "en", "speed": wav["speed"]})
        wavs.append(wav)
    return records, wavs


def _tts(split: str, sentences: List[str], seed: int) -> Tuple[List[dict], List[dict]]:
    wavs = [spoken_wav(text, TTS_VOICE, 175) for text in sentences]
    return [{"id": f"tts-{split}-{i:05d}", "audio": "../" + wav["path"], "text": wav["text"], "speaker": TTS_VOICE,
             "language": "en", "task": "tts"} for i, wav in enumerate(wavs)], wavs


def _s2tt(split: str, sentences: List[str], seed: int) -> Tuple[List[dict], List[dict]]:
    records, wavs = _asr(split, sentences, seed + TASK_SEEDS["s2tt"])
    return [{**r, "id": f"s2tt-{r['id']}", "translation": translate_to_german(r["text"]),
             "target_language": TARGET_LANGUAGE, "task": "s2tt"} for r in records], wavs


def dialogue_request(sentence: str, style: str) -> str:
    return f"say {sentence} {style}"


def dialogue_records(split: str, sentences: List[str], seed: int) -> Tuple[List[dict], List[dict]]:
    """Conversations: a spoken request in one of the demo voices, a speech answer in TTS_VOICE delivered
    as asked. The style stays out of the system prompt: the model must hear it in the request."""
    rng = random.Random(f"dialogue-{split}-{seed}")
    styles = list(STYLES)
    records, wavs = [], []
    for i, text in enumerate(sentences):
        style = styles[i % len(styles)]
        request = spoken_wav(dialogue_request(text, style), VOICES[i % len(VOICES)], rng.choice(SPEEDS_WPM))
        answer = spoken_wav(text, TTS_VOICE, **STYLES[style])
        records.append({"id": f"dialogue-{split}-{i:05d}", "style": style, "language": "en", "messages": [
            {"role": "system", "text": DIALOGUE_SYSTEM},
            {"role": "user", "audio": "../" + request["path"]},
            {"role": "assistant", "text": text, "audio": "../" + answer["path"]}]})
        wavs += [request, answer]
    return records, wavs


def _para(split: str, sentences: List[str], seed: int) -> Tuple[List[dict], List[dict]]:
    """Paralinguistic QA: each sentence spoken once (voice, speed and pitch drawn), asked about each of
    PARA_ATTRIBUTES in a record of its own (task para_qa, "ask" names the attribute)."""
    rng = random.Random(f"para-{split}-{seed}")
    records, wavs = [], []
    for i, text in enumerate(sentences):
        voice, speed, pitch = VOICES[i % len(VOICES)], rng.choice(list(PARA_SPEEDS)), rng.choice(list(PARA_PITCHES))
        wav = spoken_wav(text, voice, PARA_SPEEDS[speed], PARA_PITCHES[pitch])
        labels = {"gender": VOICE_GENDERS[voice], "speed": speed, "pitch": pitch}
        records += [{"id": f"para-{split}-{i:05d}-{ask}", "audio": "../" + wav["path"], "text": text, "speaker": voice,
                     "language": "en", "task": "para_qa", **labels, "ask": ask} for ask in PARA_ATTRIBUTES]
        wavs.append(wav)
    return records, wavs


def voice_description(voice: str) -> str:
    """How a timbre request names an espeak voice: "en-us+m3" -> "the American male voice m3"."""
    language, _, variant = voice.partition("+")
    accent, gender = "American" if language == "en-us" else "British", "male" if variant.startswith("m") else "female"
    return f"the {accent} {gender} voice {variant}"


def _timbre(split: str, sentences: List[str], seed: int) -> Tuple[List[dict], List[dict]]:
    """Speech in a retrieved voice (task timbre_search): the voice named in the request, the clip the search
    finds (that voice saying the next sentence of the split) and the answer in the same voice."""
    records, wavs = [], []
    for i, text in enumerate(sentences):
        voice = VOICES[i % len(VOICES)]
        clip, answer = spoken_wav(sentences[(i + 1) % len(sentences)], voice, 175), spoken_wav(text, voice, 175)
        records.append({"id": f"timbre-{split}-{i:05d}", "audio": "../" + clip["path"],
                        "target_audio": "../" + answer["path"], "text": text, "query": voice_description(voice),
                        "speaker": voice, "language": "en", "task": "timbre_search"})
        wavs += [clip, answer]
    return records, wavs


_BUILDERS = {"asr": _asr, "tts": _tts, "s2tt": _s2tt, "dialogue": dialogue_records, "para": _para, "timbre": _timbre}


def _template_texts(tasks: Sequence[str]) -> List[str]:
    """The fixed texts the chat templates write around the demo data (system prompts, role headers, the
    paralinguistic questions and labels, the audio-search tool)."""
    from data.tasks.dialogue import DIALOGUE_SYSTEM as DEFAULT_SYSTEM
    from data.tasks.speech import PARA_QA_SYSTEM, PARA_QUESTIONS, TTS_SYSTEM
    from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION
    texts = [DEFAULT_ASR_INSTRUCTION, TTS_SYSTEM, f"Translate the speech into {TARGET_LANGUAGE}.", DEFAULT_SYSTEM,
             DIALOGUE_SYSTEM, "system\n", "human\n", "assistant\n"]
    if "para" in tasks:
        texts += [PARA_QA_SYSTEM, *(PARA_QUESTIONS[a] for a in PARA_ATTRIBUTES), *VOICE_GENDERS.values(),
                  *PARA_SPEEDS, *PARA_PITCHES]
    if "timbre" in tasks:
        from data.tasks.chat import tool_schemas_text
        from data.tasks.timbre import AUDIO_SEARCH_SCHEMA, TIMBRE_SYSTEM
        texts += [TIMBRE_SYSTEM, "tool_json_schemas\n" + tool_schemas_text([AUDIO_SEARCH_SCHEMA]), "input\n"]
    return texts


def _record_texts(task: str, records: List[dict]) -> List[str]:
    """Texts a task's records add beyond their sentences: translations, timbre requests and tool calls."""
    if task == "s2tt":
        return [r["translation"] for r in records]
    if task == "timbre":
        from data.tasks.chat import tool_call_text
        from data.tasks.timbre import AUDIO_SEARCH_TOOL, timbre_request
        return [t for r in records for t in (timbre_request(r["text"], r["query"]),
                                             tool_call_text(AUDIO_SEARCH_TOOL, {"query": r["query"]}))]
    return []


def _write_jsonl(path: str, records: List[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def make_demo(out_dir: str, num_train: int = 400, num_heldout: int = 40, seed: int = 0, workers: int = 2,
              tasks: Sequence[str] = ("asr",), num_task_train: Optional[Dict[str, int]] = None
              ) -> Dict[str, Dict[str, List[dict]]]:
    """Speak the corpus of `tasks` into OUT_DIR/wav and write OUT_DIR/<task>/{train,heldout}.jsonl (ASR
    also as OUT_DIR/{train,heldout}.jsonl) and OUT_DIR/texts.jsonl; returns {task: {split: records}}.

    ASR trains on `num_train` sentences, every other task on num_task_train[task] (default: 3/4 of
    num_train for TTS and S2TT, 1/2 for dialogue and timbre, 1/4 for para, which asks three questions of
    each); all tasks hold out the same `num_heldout` sentences.
    """
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown or not tasks:
        raise ValueError(f"tasks {list(tasks)}: expected some of {list(TASK_NAMES)}")
    sizes = {"asr": num_train, "tts": num_train * 3 // 4, "s2tt": num_train * 3 // 4, "dialogue": num_train // 2,
             "para": num_train // 4, "timbre": num_train // 2, **(num_task_train or {})}
    espeak_binary()
    asr_train = make_sentences(num_train, seed)
    heldout = make_sentences(num_heldout, seed + HELDOUT_SEED_OFFSET, exclude=frozenset(asr_train))
    splits: Dict[str, Dict[str, List[dict]]] = {}
    wavs: Dict[str, dict] = {}
    texts = _template_texts(tasks)
    for task in TASK_NAMES:
        if task not in tasks:
            continue
        train = asr_train if task == "asr" else make_sentences(sizes[task], seed + TASK_SEEDS[task],
                                                               exclude=frozenset(heldout))
        splits[task] = {}
        for split, sentences in (("train", train), ("heldout", heldout)):
            records, spoken = _BUILDERS[task](split, sentences, seed)
            splits[task][split] = records
            wavs.update((w["path"], w) for w in spoken)
            texts += sentences + [w["text"] for w in spoken]
            texts += _record_texts(task, records)
    os.makedirs(os.path.join(out_dir, "wav"), exist_ok=True)
    todo = [w for path, w in wavs.items() if not os.path.exists(os.path.join(out_dir, path))]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each thread waits on one espeak process
        list(pool.map(lambda w: speak(w["text"], w["voice"], os.path.join(out_dir, w["path"]), w["speed"],
                                      w["pitch"]), todo))
    for task, by_split in splits.items():
        os.makedirs(os.path.join(out_dir, task), exist_ok=True)
        for split, records in by_split.items():
            _write_jsonl(os.path.join(out_dir, task, f"{split}.jsonl"), records)
            if task == "asr":  # the layout of earlier versions: audio relative to OUT_DIR
                _write_jsonl(os.path.join(out_dir, f"{split}.jsonl"),
                             [{**r, "audio": r["audio"][len("../"):]} for r in records])
    _write_jsonl(os.path.join(out_dir, "texts.jsonl"), [{"text": t} for t in dict.fromkeys(texts)])
    counts = ", ".join(f"{task} {len(s['train'])}+{len(s['heldout'])}" for task, s in splits.items())
    print(f"data.tools.demo: {counts} train+held-out, {len(VOICES)} voices, {len(todo)} spoken, "
          f"{len(wavs) - len(todo)} reused -> {out_dir}", file=sys.stderr)
    return splits


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for wav/, <task>/{train,heldout}.jsonl and texts.jsonl")
    parser.add_argument("--num-train", type=int, default=400, help="ASR training sentences")
    parser.add_argument("--num-heldout", type=int, default=40, help="held-out sentences (every task)")
    for task in TASK_NAMES[1:]:
        share = {"dialogue": "1/2", "timbre": "1/2", "para": "1/4"}.get(task, "3/4")
        parser.add_argument(f"--num-{task}", type=int, default=None,
                            help=f"{task} training {'clips' if task == 'para' else 'samples'} (default: {share} "
                                 f"of --num-train)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated tasks to make, of {','.join(TASK_NAMES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes at once")
    args = parser.parse_args(argv)
    sizes = {task: getattr(args, f"num_{task}") for task in TASK_NAMES[1:] if getattr(args, f"num_{task}") is not None}
    try:
        make_demo(args.out_dir, args.num_train, args.num_heldout, args.seed, args.workers,
                  [t for t in args.tasks.split(",") if t], sizes)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

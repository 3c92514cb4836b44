"""The custom-voice demo: LoRA a TTS-capable demo model on the one real human voice of the Debian package
asterisk-core-sounds-en-wav ("Allison") and measure how close its speech comes to hers, before and after.

    python -m train.voice_demo --base BASE_EXPORT --out runs/voice_demo [--audio-tokenizer kmeans:F.pt]
        [--speaker-model runs/speaker/speaker.pt] [dotted.key=value overrides for the LoRA run]

Steps: the recordings -> tokenized shards (data.tools.voice); TTS of the held-out transcripts with the base
(model.generate + KMeansVocoder); `python -m train recipes/lora/custom_voice_demo.yaml` in a subprocess;
the adapter merged; TTS again. Similarity is model.speaker's (trained on espeak voices only), shown beside
references that say what its numbers mean; teacher-forced TTS code accuracy on the held-out recordings
is the second figure. Everything goes to OUT/report.json.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile
import torch

from data.audio import decode_audio, read_audio
from data.tools.demo import VOICES, speak
from data.features import SAMPLE_RATE
from data.shards import local_shard_paths, read_samples
from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.pieces import DEFAULT_ASR_INSTRUCTION
from data.tasks.base import CODES
from data.text_tokenizer import SpecialIds, load_tokenizer, special_ids
from data.tools.voice import prepare_voice
from model.checkpoint import load_stepfun
from model.generate import generate, split_ta4
from model.lalm import StepAudio2ForCausalLM
from model.speaker import SpeakerEncoder
from model.vocoder import KMeansVocoder
from train.evaluate import run_eval

ASTERISK_DIR = "/usr/share/asterisk/sounds/en"
ASTERISK_TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
RECIPE = "recipes/lora/custom_voice_demo.yaml"
SPEAKER = "allison"


# ----------------------------------------------------------------------------------------- records

def read_records(folder: str, limit: Optional[int] = None) -> List[dict]:
    """{key, text, codes, wave} of a tokenized shard folder's samples, in file order."""
    out: List[dict] = []
    for path in local_shard_paths([folder], "train.voice_demo"):
        members: Dict[str, Dict[str, bytes]] = {}
        for key, sample in read_samples(path):
            members.setdefault(key, {}).update(sample)
        for key, m in members.items():
            wave_T, rate = decode_audio(m["flac"], f"{path}:{key}")
            assert rate == SAMPLE_RATE, "data.corpus.prepare writes 16 kHz"
            out.append({"key": key, "text": json.loads(m["json"])["text"], "wave": wave_T,
                        "codes": np.load(io.BytesIO(m[CODES]), allow_pickle=False)})
            if limit is not None and len(out) >= limit:
                return out
    return out


# ------------------------------------------------------------------------------------- measuring

def code_accuracy(model: StepAudio2ForCausalLM, tok, ids: SpecialIds, folder: str, max_samples: int) -> dict:
    """Teacher-forced accuracy and mean NLL of the audio codes of the TTS answers in a shard folder."""
    result = run_eval("code_accuracy", model, tok, ids, [folder], DEFAULT_ASR_INSTRUCTION, max_samples, 0)
    return {"accuracy": result["value"], "nll": result["nll"], "num_codes": result["num_codes"]}


@torch.no_grad()
def synthesize(model: StepAudio2ForCausalLM, tok, ids: SpecialIds, vocoder: KMeansVocoder, texts: Sequence[str],
               max_new_tokens: int = 300, temperature: float = 0.7, seed: int = 0, batch_size: int = 8) -> tuple:
    """(waves, stats): the model's TA4 speech for each text, vocoded; codes the vocoder lacks are dropped."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    waves, num_codes, dropped, unfinished = [], [], 0, 0
    stops = [ids.eot, ids.end_of_text, ids.tts_end]
    for first in range(0, len(texts), batch_size):
        prompts = [TASKS["tts"].render(Sample(f"t{i}", {"text": t}), tok, ids, RenderOptions(with_answer=False)
                                       ).input_ids for i, t in enumerate(texts[first:first + batch_size])]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[ids.end_of_text] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        for new in generate(model, input_ids, mask, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                            temperature=temperature, top_p=0.95 if temperature > 0 else 1.0, generator=gen):
            unfinished += len(new) == max_new_tokens
            _, codes = split_ta4(new, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
            kept = [c for c in codes if c < vocoder.num_codes]
            dropped += len(codes) - len(kept)
            num_codes.append(len(kept))
            waves.append(vocoder.codes_to_wave(kept))
    return waves, {"mean_codes": float(np.mean(num_codes)), "dropped_codes": dropped,
                   "hit_max_new_tokens": unfinished}


def measure(encoder: SpeakerEncoder, target: Sequence[torch.Tensor], candidates: Dict[str, Sequence[torch.Tensor]],
            sample_rate: int = SAMPLE_RATE) -> Dict[str, float]:
    """Similarity of each candidate set of recordings to the target set; recordings under 0.2 s (nothing
    to hear) are left out, and a set with none left scores NaN."""
    def usable(waves: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [w for w in waves if w.numel() >= sample_rate // 5]
    out = {}
    for name, waves in candidates.items():
        waves = usable(waves)
        out[name] = encoder.similarity(waves, usable(target), sample_rate) if waves else float("nan")
    return out


# ------------------------------------------------------------------------------------------ the demo

def _default_base() -> Optional[str]:
    found = sorted(glob.glob("runs/demo/curriculum/stages/*-tts/export"))
    return found[-1] if found else None


def _speaker_encoder(path: str) -> SpeakerEncoder:
    if not os.path.isfile(path):
        subprocess.run([sys.executable, "-m", "train.speaker_encoder", "fit", path, "--asterisk", ASTERISK_DIR,
                        "--transcripts", ASTERISK_TRANSCRIPTS], check=True)
    return SpeakerEncoder.load(path)


def _espeak_references(out_dir: str, texts: Sequence[str]) -> Dict[str, List[torch.Tensor]]:
    """The held-out texts spoken by each espeak voice of the demo corpus (what the base was taught)."""
    os.makedirs(out_dir, exist_ok=True)
    refs = {}
    for voice in VOICES:
        paths = [os.path.join(out_dir, f"{voice.replace('+', '_')}-{i:03d}.wav") for i in range(len(texts))]
        for text, path in zip(texts, paths):
            if not os.path.isfile(path):
                speak(text, voice, path)
        refs[voice] = [read_audio(p) for p in paths]
    return refs


def run_demo(base: str, out: str, audio_tokenizer: str, speaker_model: str, overrides: Sequence[str] = (),
             num_heldout: int = 24, temperature: float = 0.7, max_new_tokens: int = 300) -> dict:
    t0 = time.time()
    torch.manual_seed(0)
    encoder = _speaker_encoder(speaker_model)
    data_dir = os.path.join(out, "data")
    prepare_voice(ASTERISK_DIR, data_dir, SPEAKER, audio_tokenizer, ASTERISK_TRANSCRIPTS, num_heldout,
                  progress=False)
    heldout = read_records(os.path.join(data_dir, "heldout"))
    allison = [r["wave"] for r in heldout]
    texts = [r["text"] for r in heldout]
    vocoder = KMeansVocoder(audio_tokenizer.partition(":")[2] if audio_tokenizer.startswith("kmeans:")
                            else audio_tokenizer)
    tok = load_tokenizer(base)
    ids = special_ids(tok)
    if vocoder.num_codes > ids.num_audio_codes:
        raise ValueError(f"--audio-tokenizer {audio_tokenizer} has {vocoder.num_codes} codes, the base {base} "
                         f"only {ids.num_audio_codes} audio tokens")
    espeak = _espeak_references(os.path.join(out, "espeak_ref"), texts)
    references = measure(encoder, allison, {
        "allison_train_recordings": [r["wave"] for r in read_records(os.path.join(data_dir, "train"),
                                                                     limit=num_heldout)],
        "allison_through_codec": [vocoder.codes_to_wave(r["codes"]) for r in heldout],
        **{f"espeak {v}": waves for v, waves in espeak.items()},
        **{f"espeak {v} through codec": [vocoder.codes_to_wave(vocoder.tokenizer.encode(w)) for w in waves]
           for v, waves in espeak.items()}})
    report: dict = {"base": base, "audio_tokenizer": audio_tokenizer, "heldout": len(heldout),
                    "speaker_model": speaker_model, "references": references}
    validation = os.path.splitext(speaker_model)[0] + ".json"  # train.speaker_encoder fit's own figures
    if os.path.isfile(validation):
        with open(validation, encoding="utf-8") as f:
            report["speaker_model_validation"] = {k: v for k, v in json.load(f).items() if k != "config"}

    def evaluate(model: StepAudio2ForCausalLM, tag: str) -> None:
        waves, stats = synthesize(model, tok, ids, vocoder, texts, max_new_tokens, temperature)
        report[tag] = {"similarity": measure(encoder, allison, {"tts": waves})["tts"], **stats,
                       "code_accuracy": code_accuracy(model, tok, ids, os.path.join(data_dir, "heldout"), len(heldout))}
        soundfile.write(os.path.join(out, f"{tag}_example.wav"), waves[0].numpy(), vocoder.sample_rate)
        print(f"voice_demo [{tag}] similarity {report[tag]['similarity']:.3f}, code accuracy "
              f"{report[tag]['code_accuracy']['accuracy']:.3f}", file=sys.stderr)

    evaluate(load_stepfun(base).float(), "before")
    run_dir = os.path.join(out, "lora")
    subprocess.run([sys.executable, "-m", "train", RECIPE, f"run_dir={run_dir}", f"lora.init_from={base}",
                    f"data.tokenizer={base}", f"data.shards=[{os.path.join(data_dir, 'train')}]",
                    f"data.audio_tokenizer={audio_tokenizer}", *overrides], check=True)
    from train.merge_lora import merged_model
    evaluate(merged_model(load_stepfun(base).float(), os.path.join(run_dir, "adapter")), "after")
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    rows = [(f"{name} vs Allison held-out", value) for name, value in report["references"].items()]
    rows += [(f"TTS {tag} LoRA vs Allison held-out", report[tag]["similarity"]) for tag in ("before", "after")]
    lines = [f"{'speaker similarity (cosine, model.speaker)':<58} value", "-" * 64]
    lines += [f"{name:<58} {value:6.3f}" for name, value in rows]
    lines += ["", f"{'held-out TTS code accuracy (teacher-forced)':<58} before  after"]
    for key in ("accuracy", "nll"):
        lines.append(f"{'code ' + key:<58} {report['before']['code_accuracy'][key]:6.3f} "
                     f"{report['after']['code_accuracy'][key]:6.3f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.voice_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=_default_base(), help="TTS-capable StepFun-layout export (default: the "
                        "demo curriculum's runs/demo/curriculum/stages/*-tts/export)")
    parser.add_argument("--out", default="runs/voice_demo", help="folder for data, the LoRA run and report.json")
    parser.add_argument("--audio-tokenizer", default="kmeans:runs/demo/kmeans.pt", help="the base's k-means "
                        "tokenizer (codes and vocoder)")
    parser.add_argument("--speaker-model", default="runs/speaker/speaker.pt", help="model.speaker file; trained "
                        "(about a minute) when missing")
    parser.add_argument("--heldout", type=int, default=24, help="Allison recordings kept out of training")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the TTS")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for the LoRA recipe")
    args = parser.parse_args(argv)
    if not args.base or not os.path.isfile(os.path.join(args.base, "config.json")):
        parser.error(f"--base {args.base!r} is not a model export (no config.json); run `make demo` first or name a "
                     "TTS-capable export")
    if not os.path.isdir(ASTERISK_DIR):
        parser.error(f"{ASTERISK_DIR} is missing: apt-get install asterisk-core-sounds-en-wav")
    run_demo(args.base, args.out, args.audio_tokenizer, args.speaker_model, args.overrides, args.heldout,
             args.temperature, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())

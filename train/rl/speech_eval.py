"""The held-out measurement of a styled spoken-dialogue model (the demo's "say SENTENCE STYLE"), used before
and after RL and on the SFT starting point: new spoken requests, the model's answers, and what they are.

    python -m train.rl.speech_eval MODEL_DIR --codes kmeans:FILE.pt [--asr ASR_EXPORT] [--reference REF_DIR]
        --out DIR [--sentences 8] [--max-new-tokens N] [--temperature 0] [--json]

Per answer: audio seconds (codes at 25 Hz), speech span (energy-based, on the vocoder's wave) per requested
word, median F0, distinct-codes share, whether it stopped by itself; with --asr the transcript's WER and the
requested words it contains; with --reference the exact per-token KL(model || reference) over the vocabulary.
Per style and overall: the slow/quick time-per-word ratio, the high-voice F0 over the mean F0 of the slow and
quick answers, stop rate, word hit rate, distinct codes, KL; beside them the same figures of espeak's own
renders of the same answers (raw, and through the codes), which are what the demo corpus taught.
None of these is an RL reward here: speaking time comes from the wave's energy and F0 from YIN, not from the
style classifier or the code count the rewards use.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from data.audio import encode_flac, read_audio
from data.loading.batching import pad_mels
from data.tools.demo import (DEFAULT_PITCH, HELDOUT_SEED_OFFSET, STYLES, TASK_SEEDS, TTS_VOICE, dialogue_records,
                             make_sentences, speak, spoken_wav)
from data.files import atomic_write
from data.loading.samples import render_raw
from model.generate import generate, split_ta4
from train.rl.rollout import AUDIO_CODES_PER_S, left_padded
from train.rl.rule_rewards import _words, word_error_rate
from train.rl.speech_rewards import _vocoder, codes_to_wave16k, transcribe
from train.style_classifier import median_f0_hz, speech_span_s

EVAL_SEED = 4_200_017  # none of data.tools.demo's sentence seeds (0 + 101 ... 505, 1_000_003) nor style_classifier's
NORMAL = {"speed": 175, "pitch": DEFAULT_PITCH}  # espeak's default delivery: the "normal" of the F0 ratio
SLOW, QUICK, HIGH = "slowly", "quickly", "in a high voice"


# ------------------------------------------------------------------------------------------ requests

def demo_sentences(num_train: int = 400, num_heldout: int = 40, seed: int = 0) -> frozenset:
    """A superset of every sentence `python -m data.tools.demo` (make_demo) trains or holds out with these
    arguments: the ASR and held-out sentences exactly as make_demo draws them, and for every task seed in
    data.tools.demo.TASK_SEEDS the first 2 x num_train sentences of that task's draw. make_sentences' output for n
    is a prefix of its output for any larger n, so this covers any task size up to twice num_train."""
    asr_train = make_sentences(num_train, seed)
    heldout = make_sentences(num_heldout, seed + HELDOUT_SEED_OFFSET, exclude=frozenset(asr_train))
    out = set(asr_train) | set(heldout)
    for task_seed in TASK_SEEDS.values():
        out.update(make_sentences(2 * num_train, seed + task_seed, exclude=frozenset(heldout)))
    return frozenset(out)


def heldout_requests(out_dir: str, num_sentences: int = 8, seed: int = EVAL_SEED, styles: Sequence[str] = tuple(STYLES),
                     exclude: Optional[frozenset] = None, workers: int = 2,
                     sentences: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Each of `num_sentences` new sentences asked for in each style: records {key, text, style, request_wav,
    request_text, request_voice, request_speed, espeak_wav (espeak's own answer: TTS_VOICE in the style's
    settings), normal_wav (TTS_VOICE at its default), record (the conversation as data.tools.demo writes it)}.
    The requests are built by data.tools.demo's own dialogue builder (its voices, speeds and wording); the sentences
    are none of `exclude` (default: demo_sentences() for make_demo's default sizes), or exactly `sentences`
    when given (e.g. training sentences in styles they were not trained in). WAVs are named by content under
    out_dir as data.tools.demo names them: a re-run reuses them."""
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"styles {list(styles)}: expected some of {list(STYLES)}")
    if num_sentences < 1:
        raise ValueError(f"num_sentences={num_sentences}: expected at least 1")
    if sentences is None:
        sentences = make_sentences(num_sentences, seed, exclude=demo_sentences() if exclude is None else exclude)
    # dialogue_records gives sample i the style STYLES[i % 3]: each sentence repeated once per style asks for all three.
    repeated = [s for s in sentences for _ in STYLES]
    records, wavs = dialogue_records("eval", repeated, seed)
    normal = {s: spoken_wav(s, TTS_VOICE, **NORMAL) for s in sentences}
    todo = {w["path"]: w for w in [*wavs, *normal.values()] if not os.path.isfile(os.path.join(out_dir, w["path"]))}
    os.makedirs(os.path.join(out_dir, "wav"), exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each thread waits on one espeak process
        list(pool.map(lambda w: speak(w["text"], w["voice"], os.path.join(out_dir, w["path"]), w["speed"],
                                      w["pitch"]), todo.values()))
    out = []
    for r, spoken in zip(records, wavs[::2]):  # dialogue_records lists each record's request, then its answer
        if r["style"] not in styles:
            continue
        user, assistant = r["messages"][1], r["messages"][2]
        text = assistant["text"]
        out.append({"key": r["id"], "text": text, "style": r["style"], "request_text": spoken["text"],
                    "request_voice": spoken["voice"], "request_speed": spoken["speed"],
                    "request_wav": os.path.join(out_dir, user["audio"][len("../"):]),
                    "espeak_wav": os.path.join(out_dir, assistant["audio"][len("../"):]),
                    "normal_wav": os.path.join(out_dir, normal[text]["path"]), "record": r})
    return out


def render_prompt(request: Dict[str, Any], tok, ids) -> Dict[str, Any]:
    """The dialogue prompt of a request as the demo's dialogue stage renders it (data.corpus.prepare conversations
    -> a shard sample -> task dialogue, prompt only): {input_ids, mels (per 25 s chunk)}."""
    meta = {**request["record"], "messages": [
        {"role": "system", "text": request["record"]["messages"][0]["text"]},
        {"role": "user", "audio": "turn1.flac"},
        {"role": "assistant", "text": request["text"], "codes": "turn2.codes.npy"}]}
    raw = {"__key__": request["key"], "__url__": request["request_wav"], "json": json.dumps(meta).encode(),
           "turn1.flac": encode_flac(read_audio(request["request_wav"]))}
    try:
        rendered = render_raw(raw, tok, ids, with_answer=False, force_task="dialogue")
    except Exception as exc:  # data.loading.samples.SkipSample's reasons, or whatever else fails
        raise ValueError(f"request {request['key']!r}: its prompt does not render ({exc})") from None
    return {"input_ids": rendered["input_ids"], "mels": rendered["mels"]}


# ------------------------------------------------------------------------------------------- answers

@dataclass
class Answer:
    """One answer to one request."""
    key: str
    style: str
    text_asked: str
    """The words the request asked for."""
    prompt_ids: List[int]
    answer_ids: List[int]
    """The generated tokens up to and including the first stop token (all of them without one)."""
    stopped: bool
    """It ended with <|EOT|> (or <|endoftext|>) by itself, before the token limit."""
    text: str
    """Its text side (TA4), decoded."""
    audio_codes: List[int]
    sample: int = 0
    """Which of num_samples answers to its request."""
    mels: List[torch.Tensor] = field(default_factory=list, repr=False)
    """The prompt's audio chunks (for the reference model's forward)."""
    logprobs_TV: Optional[torch.Tensor] = field(default=None, repr=False)
    """The model's log-softmax at each answer token's position [len(answer_ids), V] (for the exact KL)."""
    wave: Optional[torch.Tensor] = field(default=None, repr=False)
    """16 kHz audio to measure instead of the codes' vocoded wave (espeak's own renders)."""


def make_answer(request: Dict[str, Any], prompt_ids: List[int], answer_ids: Sequence[int], tok, ids,
                sample: int = 0) -> Answer:
    """An Answer of generated tokens: cut after the first stop token, split into text and audio codes."""
    stops = (ids.eot, ids.end_of_text)
    answer_ids = list(answer_ids)
    end = next((i for i, t in enumerate(answer_ids) if t in stops), None)
    if end is not None:
        answer_ids = answer_ids[:end + 1]
    text_ids, codes = split_ta4(answer_ids, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
    text_ids = [t for t in text_ids if t not in (ids.eot, ids.bot, ids.end_of_text)]
    return Answer(key=request["key"], style=request["style"], text_asked=request["text"], prompt_ids=list(prompt_ids),
                  answer_ids=answer_ids, stopped=end is not None, text=tok.decode(text_ids), audio_codes=codes,
                  sample=sample)


@torch.no_grad()
def answer(model, tok, ids, requests: Sequence[Dict[str, Any]], max_new_tokens: int = 300, temperature: float = 0.0,
           seed: int = 0, num_samples: int = 1, batch_size: int = 8, top_p: float = 1.0,
           keep_logprobs: bool = False) -> List[Answer]:
    """num_samples answers to each request (request-major), by batched KV-cache decoding with left padding:
    greedy at temperature 0, else sampled from a generator seeded with `seed`. keep_logprobs: also the
    model's own (temperature 1) log-softmax at every answer position, for measure()'s KL to a reference
    (float32 [tokens, vocabulary] per answer on the host: small for the demo's ~1.4k ids, about 250 MB per
    400-token answer at the release's 158k)."""
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples={num_samples}, max_new_tokens={max_new_tokens}: expected both >= 1")
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    prompts = [render_prompt(r, tok, ids) for r in requests]
    flat = [(r, p, k) for r, p in zip(requests, prompts) for k in range(num_samples)]
    out: List[Answer] = []
    for lo in range(0, len(flat), batch_size):
        part = flat[lo:lo + batch_size]
        input_ids, mask = left_padded([p["input_ids"] for _, p, _ in part], ids.end_of_text)
        mels, lengths = pad_mels([m for _, p, _ in part for m in p["mels"]])
        new = generate(model, input_ids.to(device), mask.to(device),
                       mels=None if mels is None else mels.to(device, dtype), mel_lengths=lengths.to(device),
                       max_new_tokens=max_new_tokens, stop_token_ids=[ids.eot, ids.end_of_text],
                       temperature=temperature, top_p=top_p, generator=generator, include_stop=True)
        for (r, p, k), tokens in zip(part, new):
            a = make_answer(r, p["input_ids"], tokens, tok, ids, sample=k)
            a.mels = p["mels"]
            out.append(a)
    if keep_logprobs:
        for a, lp in zip(out, answer_logprobs(model, out, batch_size)):
            a.logprobs_TV = lp
    return out


@torch.no_grad()
def answer_logprobs(model, answers: Sequence[Answer], batch_size: int = 8) -> List[torch.Tensor]:
    """log-softmax [len(answer_ids), V] (float32, CPU) of `model` at each answer token's position, the prompt
    and the answer teacher-forced (left-padded rows, positions counted from each row's first real token)."""
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    out: List[torch.Tensor] = []
    for lo in range(0, len(answers), batch_size):
        part = answers[lo:lo + batch_size]
        # Any id pads: padding is masked out. The first row's first token is one the vocabulary has.
        input_ids, mask = left_padded([a.prompt_ids + a.answer_ids for a in part], part[0].prompt_ids[0])
        mels, lengths = pad_mels([m for a in part for m in a.mels])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits_BTV = model(input_ids.to(device), attention_mask=mask.to(device),
                           mels=None if mels is None else mels.to(device, dtype), mel_lengths=lengths.to(device),
                           position_ids=positions.to(device)).logits
        width = input_ids.shape[1]
        for b, a in enumerate(part):
            n = len(a.answer_ids)  # token t is predicted at position t - 1
            out.append(torch.log_softmax(logits_BTV[b, width - n - 1:width - 1].float(), -1).cpu())
    return out


# ----------------------------------------------------------------------------------------- measuring

def distinct_share(codes: Sequence[int]) -> float:
    """Distinct codes / codes (nan without codes): 1/len for one code held, near 1 for varied speech."""
    return len(set(codes)) / len(codes) if codes else float("nan")


def word_hits(transcript: str, asked: str) -> int:
    """How many of the asked-for words the transcript holds (as a multiset: a word asked twice counts twice
    only if heard twice; case and punctuation ignored)."""
    return sum((Counter(_words(asked)) & Counter(_words(transcript))).values())


def measure(answers: Sequence[Answer], requests: Sequence[Dict[str, Any]], codes_spec: Optional[str],
            asr_model: Optional[str] = None, reference_model=None, device: str = "cpu", asr_max_new_tokens: int = 48,
            batch_size: int = 8) -> Dict[str, Any]:
    """{"answers": per-answer figures, "summary": summarize(...)}. The audio measured is an answer's `wave`
    when set, else its codes through the vocoder `codes_spec` (codes the vocoder lacks are dropped and
    counted). KL (with reference_model; needs answers from answer(keep_logprobs=True)) is the exact
    KL(model || reference) over the vocabulary at each answer position, averaged over the answer's tokens;
    "kl_sampled" beside it is the mean log-ratio of the tokens the answer holds."""
    by_key = {r["key"]: r for r in requests}
    missing = sorted({a.key for a in answers} - set(by_key))
    if missing:
        raise ValueError(f"answers to requests {missing[:3]} that are not among the {len(requests)} requests given")
    num_codes = getattr(_vocoder(codes_spec), "num_codes", None) if codes_spec else None
    waves, rows = [], []
    for a in answers:
        codes = [c for c in a.audio_codes if num_codes is None or c < num_codes]
        if a.wave is not None:
            wave = a.wave
        elif codes_spec is None:
            raise ValueError(f"answer {a.key!r} has codes but no wave, and no codes_spec says how to decode them")
        else:
            wave = codes_to_wave16k(codes, codes_spec) if codes else torch.zeros(0)
        words = len(by_key[a.key]["text"].split())
        span = speech_span_s(wave) if wave.numel() else 0.0
        audio_s = len(a.audio_codes) / AUDIO_CODES_PER_S if a.wave is None else wave.numel() / 16000
        f0 = median_f0_hz(wave) if wave.numel() else float("nan")
        waves.append(wave)
        rows.append({"key": a.key, "style": a.style, "sample": a.sample, "stopped": a.stopped,
                     "answer_tokens": len(a.answer_ids), "text": a.text, "audio_codes": len(a.audio_codes),
                     "dropped_codes": len(a.audio_codes) - len(codes), "audio_s": round(audio_s, 3),
                     "speech_span_s": round(span, 3), "s_per_word": round(span / words, 4), "words_asked": words,
                     "median_f0_hz": None if math.isnan(f0) else round(f0, 1),
                     "distinct_codes_share": None if not a.audio_codes else round(distinct_share(a.audio_codes), 4)})
    if asr_model is not None:
        heard = [i for i, w in enumerate(waves) if w.numel() >= 1600]  # 0.1 s: shorter has nothing to transcribe
        texts = transcribe([waves[i] for i in heard], asr_model, device, asr_max_new_tokens, batch_size)
        transcripts = dict(zip(heard, texts))
        for i, row in enumerate(rows):
            asked = by_key[row["key"]]["text"]
            row["transcript"] = transcripts.get(i, "")
            row["wer"] = round(word_error_rate(row["transcript"], asked), 4)
            row["words_hit"] = word_hits(row["transcript"], asked)
    if reference_model is not None:
        if any(a.logprobs_TV is None for a in answers):
            raise ValueError("KL to the reference needs the model's own log-probabilities: answer(..., "
                             "keep_logprobs=True)")
        for row, a, lq in zip(rows, answers, answer_logprobs(reference_model, answers, batch_size)):
            lp = a.logprobs_TV
            kl_T = (lp.exp() * (lp - lq)).sum(-1)
            token = torch.tensor(a.answer_ids, dtype=torch.long)[:, None]
            row["kl_tokens"] = len(a.answer_ids)
            row["kl"] = round(float(kl_T.mean()), 5) if len(a.answer_ids) else None
            row["kl_sampled"] = round(float((lp.gather(1, token) - lq.gather(1, token)).mean()), 5) \
                if len(a.answer_ids) else None
    return {"answers": rows, "summary": summarize(rows)}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _median(values) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    return float(torch.tensor(values).median()) if values else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per style: mean speech seconds per requested word, mean audio seconds, median of the answers' median
    F0, stop rate, distinct codes, and (when measured) WER, word hit rate and KL; overall the same, and
    slow_over_quick_s_per_word, high_over_slow_quick_f0 (the high-voice F0 over the mean of the slow and quick
    answers' F0, whichever of the two has one: the demo asks for no normal style). KL per token is weighted by
    tokens (every answer token counts the same)."""
    def figures(rs) -> Dict[str, Any]:
        out = {"answers": len(rs), "stop_rate": _round(_mean([float(r["stopped"]) for r in rs]), 4),
               "s_per_word": _round(_mean([r["s_per_word"] for r in rs]), 4),
               "audio_s": _round(_mean([r["audio_s"] for r in rs]), 3),
               "median_f0_hz": _round(_median([r["median_f0_hz"] for r in rs]), 1),
               "distinct_codes_share": _round(_mean([r["distinct_codes_share"] for r in rs]), 4),
               "without_audio": sum(r["audio_codes"] == 0 and r["audio_s"] == 0 for r in rs)}
        if rs and "wer" in rs[0]:
            asked = sum(r["words_asked"] for r in rs)
            out.update(wer=_round(_mean([r["wer"] for r in rs]), 4), words_hit=sum(r["words_hit"] for r in rs),
                       words_asked=asked, word_hit_rate=round(sum(r["words_hit"] for r in rs) / asked, 4))
        if rs and "kl" in rs[0]:
            tokens = sum(r["kl_tokens"] for r in rs)
            out["kl_per_token"] = _round(sum((r["kl"] or 0.0) * r["kl_tokens"] for r in rs) / tokens, 5) \
                if tokens else None
        return out

    styles = {s: figures([r for r in rows if r["style"] == s]) for s in dict.fromkeys(r["style"] for r in rows)}
    out = {"all": figures(rows), "styles": styles}
    get = lambda style, key: styles.get(style, {}).get(key)  # noqa: E731
    out["slow_over_quick_s_per_word"] = _ratio(get(SLOW, "s_per_word"), get(QUICK, "s_per_word"))
    others = [get(SLOW, "median_f0_hz"), get(QUICK, "median_f0_hz")]
    others = [x for x in others if x is not None]
    out["high_over_slow_quick_f0"] = _ratio(get(HIGH, "median_f0_hz"), sum(others) / len(others) if others else None)
    return out


def _round(x: Optional[float], digits: int) -> Optional[float]:
    return None if x is None else round(x, digits)


def espeak_answers(requests: Sequence[Dict[str, Any]], codes_spec: Optional[str] = None, normal: bool = False
                   ) -> List[Answer]:
    """espeak's own answers to the requests (what the demo corpus taught) as Answers: its render as the wave
    (codes_spec None) or its codes through the codec (the best a model on these codes can sound); with
    `normal` the plain default delivery of each request's sentence instead."""
    tokenizer = getattr(_vocoder(codes_spec), "tokenizer", None) if codes_spec else None
    if codes_spec and tokenizer is None:
        raise ValueError(f"codes {codes_spec!r}: espeak through the codes needs a k-means codec (kmeans:FILE.pt)")
    out = []
    for r in requests:
        wave = read_audio(r["normal_wav" if normal else "espeak_wav"])
        codes = tokenizer.encode(wave).tolist() if tokenizer is not None else []
        out.append(Answer(key=r["key"], style="normal" if normal else r["style"], text_asked=r["text"],
                          prompt_ids=[], answer_ids=[], stopped=True, text=r["text"], audio_codes=codes,
                          wave=None if tokenizer is not None else wave))
    return out


def espeak_reference(requests: Sequence[Dict[str, Any]], codes_spec: Optional[str] = None,
                     asr_model: Optional[str] = None) -> Dict[str, Any]:
    """summarize() of espeak's own answers, plus high_over_normal_f0 (against espeak's default delivery of
    the same sentences, the issue's "normal"): raw, and through the codes when codes_spec is given. With
    `asr_model` also what it hears of them (WER, word hit rate): the most a model's answers can score there."""
    unique = list({r["text"]: r for r in requests}.values())
    out = {}
    for name, spec in (("espeak", None), ("espeak_through_codes", codes_spec)):
        if name != "espeak" and spec is None:
            continue
        summary = measure(espeak_answers(requests, spec), requests, spec, asr_model)["summary"]
        normal = measure(espeak_answers(unique, spec, normal=True), unique, spec)["summary"]["all"]
        summary["normal_median_f0_hz"] = normal["median_f0_hz"]
        summary["high_over_normal_f0"] = _ratio(summary["styles"].get(HIGH, {}).get("median_f0_hz"),
                                                normal["median_f0_hz"])
        out[name] = summary
    return out


def write_wavs(answers: Sequence[Answer], out_dir: str, codes_spec: str, limit: int = 5) -> List[str]:
    """The first `limit` answers' audio as 16 kHz WAVs OUT_DIR/<key>[-<sample>].wav; returns the paths."""
    import soundfile
    os.makedirs(out_dir, exist_ok=True)
    num_codes = getattr(_vocoder(codes_spec), "num_codes", None)
    paths = []
    for a in list(answers)[:limit]:
        codes = [c for c in a.audio_codes if num_codes is None or c < num_codes]
        wave = a.wave if a.wave is not None else codes_to_wave16k(codes, codes_spec) if codes else torch.zeros(0)
        path = os.path.join(out_dir, f"{a.key}{f'-{a.sample}' if a.sample else ''}.wav")
        soundfile.write(path, wave.numpy(), 16000)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- CLI

def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(report: Dict[str, Any]) -> str:
    """The headline figures beside espeak's (the issue's goals in the last column), then the model's figures
    per style."""
    columns = {"model": report["model"], **report.get("espeak", {})}
    headline = [("slow/quick speech s per word", "slow_over_quick_s_per_word", ">= 1.5"),
                ("high / (slow, quick) F0", "high_over_slow_quick_f0", ">= 1.15"),
                ("high / normal F0", "high_over_normal_f0", ""),
                ("stop rate", ("all", "stop_rate"), ">= 0.95"),
                ("word hit rate", ("all", "word_hit_rate"), ">= SFT's"),
                ("distinct codes share", ("all", "distinct_codes_share"), ""),
                ("KL / token to reference", ("all", "kl_per_token"), "")]
    lines = [f"{'':<30}" + "".join(f"{name:>22}" for name in columns) + f"{'goal':>10}"]
    for label, key, goal in headline:
        cells = [summary.get(key) if isinstance(key, str) else summary[key[0]].get(key[1])
                 for summary in columns.values()]
        if any(c is not None for c in cells):
            lines.append(f"{label:<30}" + "".join(f"{_cell(c):>22}" for c in cells) + f"{goal:>10}")
    keys = [("answers", "answers"), ("stop_rate", "stopped"), ("s_per_word", "s/word"), ("audio_s", "audio s"),
            ("median_f0_hz", "F0 Hz"), ("distinct_codes_share", "distinct"), ("wer", "WER"),
            ("word_hit_rate", "words hit"), ("kl_per_token", "KL/token")]
    model = report["model"]
    rows = {**model["styles"], "all": model["all"]}
    keys = [(k, label) for k, label in keys if any(r.get(k) is not None for r in rows.values())]
    lines += ["", f"{'model, per style':<30}" + "".join(f"{label:>10}" for _, label in keys)]
    lines += [f"{style:<30}" + "".join(f"{_cell(r.get(k)):>10}" for k, _ in keys) for style, r in rows.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.rl.speech_eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the styled-dialogue model export (StepFun layout, tokenizer inside)")
    parser.add_argument("--codes", required=True, help="kmeans:FILE.pt: the model's audio codes and vocoder")
    parser.add_argument("--asr", default=None, help="an ASR export (the demo's ASR stage) for WER and word hits")
    parser.add_argument("--reference", default=None, help="a model export to measure the KL to (the SFT model)")
    parser.add_argument("--out", required=True, help="folder for the requests' WAVs, answer WAVs, speech_eval.json")
    parser.add_argument("--sentences", type=int, default=8, help="new sentences, each asked for in every style")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the new sentences")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of sampling (temperature > 0)")
    parser.add_argument("--num-samples", type=int, default=1, help="answers per request")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--wavs", type=int, default=5, help="answers written as WAVs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    args = parser.parse_args(argv)
    for path, flag in ((args.model, "MODEL_DIR"), (args.reference, "--reference"), (args.asr, "--asr")):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            parser.error(f"{flag} {path!r} is not a model export (no config.json)")
    if not args.codes.startswith("kmeans:") or not os.path.isfile(args.codes.partition(":")[2]):
        parser.error(f"--codes {args.codes!r}: expected kmeans:FILE.pt naming an existing file")
    from data.text_tokenizer import load_tokenizer, special_ids
    from model.checkpoint import load_stepfun
    t0 = time.time()
    tok = load_tokenizer(args.model)
    ids = special_ids(tok)
    if _vocoder(args.codes).num_codes > ids.num_audio_codes:
        parser.error(f"--codes {args.codes} has {_vocoder(args.codes).num_codes} codes, the model only "
                     f"{ids.num_audio_codes} audio tokens")
    requests = heldout_requests(os.path.join(args.out, "requests"), args.sentences, args.seed)
    model = load_stepfun(args.model).float().to(args.device).eval()
    answers = answer(model, tok, ids, requests, args.max_new_tokens, args.temperature, args.sample_seed,
                     args.num_samples, args.batch_size, keep_logprobs=args.reference is not None)
    del model
    reference = load_stepfun(args.reference).float().to(args.device).eval() if args.reference else None
    measured = measure(answers, requests, args.codes, args.asr, reference, args.device, batch_size=args.batch_size)
    report = {"model": measured["summary"], "espeak": espeak_reference(requests, args.codes, args.asr),
              "settings": {"model_dir": args.model, "codes": args.codes, "asr": args.asr, "reference": args.reference,
                           "sentences": args.sentences, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "num_samples": args.num_samples,
                           "kl": "exact KL(model || reference) over the vocabulary per answer token, token-weighted"},
              "requests": [{k: r[k] for k in ("key", "text", "style", "request_text", "request_voice",
                                               "request_speed")} for r in requests],
              "answers": measured["answers"],
              "wavs": write_wavs(answers, os.path.join(args.out, "wavs"), args.codes, args.wavs)}
    report["seconds"] = round(time.time() - t0, 1)
    path = os.path.join(args.out, "speech_eval.json")
    atomic_write(path, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else format_table(report) + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

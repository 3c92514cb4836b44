"""`make rlhf-demo`: RLHF on the demo's styled spoken dialogue, shown on held-out requests.

    python -m train.rlhf_demo [--demo runs/demo] [--out runs/rlhf_demo] [--seeds 3] [--steps 30]
        [--ppo-steps 15] [--dpo-steps 30] [--best-of 4] [--runs grpo,placebo,ppo,dpo] [key=value ...]

After `make demo`. The policy is the demo curriculum's styled-dialogue export; its requests are spoken
("say SENTENCE slowly / quickly / in a high voice") and its answers are speech (k-means codes). Steps, each
skipped when its result exists (a rerun continues where the last one stopped):

1. The style reward's classifier (train.style_classifier fit, trained through the demo's codec) -> OUT/style.pt.
2. Training runs of recipes/demo/rlhf.yaml (python -m train, one process each): GRPO with seeds 0..S-1; a
   placebo (seed 0, rl.placebo=true: the same rewards dealt to the wrong answers); PPO (seed 0, fewer steps);
   DPO (seed 0) on preference pairs of the training requests (chosen: espeak's answer in the requested style,
   rejected: the same words in another style), tokenized with the demo's codec. Extra key=value arguments
   override the recipe in every run.
3. The held-out measurement (train.rl.speech_eval) of: the SFT model (greedy); best-of-N from it (N sampled
   answers per request, the one the reward scores highest kept: what RL must beat without training); every
   run's export (greedy). Requests: new sentences in each style, and training sentences in a style they were
   never trained in (an unseen combination). Beside each: the reward and its components, the KL per token to
   the SFT model, the ASR export's transcript, and WAVs of five requests before (SFT) and after (GRPO seed 0).
4. OUT/report.json, and OUT/report.md with the figures side by side.

The measures of step 3 are not the reward: time per word comes from the energy of the decoded wave and F0
from a pitch tracker, where the reward uses a classifier and an ASR model.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from data.tools.demo import STYLES, TTS_VOICE, speak
from data.files import atomic_write
from train.rl.rollout import RolloutSample
from train.rl.speech_eval import (Answer, answer, espeak_reference, heldout_requests, measure, summarize,
                                  write_wavs)

RECIPE = "recipes/demo/rlhf.yaml"
REWARD_WEIGHTS = {"style": 1.0, "words": 1.0, "guard": 0.5}  # as in RECIPE; rewards_override() writes them


def demo_paths(demo: Path) -> Dict[str, Any]:
    stages = demo / "curriculum" / "stages"
    return {"sft": stages / "3-dialogue" / "export", "asr": stages / "0-asr" / "export",
            "codes": f"kmeans:{demo / 'kmeans.pt'}", "kmeans": demo / "kmeans.pt",
            "prompts": demo / "shards" / "dialogue" / "train", "corpus": demo / "corpus" / "dialogue" / "train.jsonl"}


def check_demo(paths: Dict[str, Any]) -> None:
    missing = [str(paths[k]) for k in ("sft", "asr", "kmeans", "prompts", "corpus") if not Path(paths[k]).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing: run `make demo` first (train.rlhf_demo starts from "
                         f"the demo curriculum's styled-dialogue export)")


def rewards_override(paths: Dict[str, Any], style_model: Path) -> str:
    codes = paths["codes"]
    parts = [f'{{name: style, weight: {REWARD_WEIGHTS["style"]}, function: "train.rl.speech_rewards:style", '
             f'args: {{classifier: "{style_model}", codes: "{codes}"}}}}',
             f'{{name: words, weight: {REWARD_WEIGHTS["words"]}, function: "train.rl.speech_rewards:intelligibility", '
             f'args: {{asr_model: "{paths["asr"]}", codes: "{codes}"}}}}',
             f'{{name: guard, weight: {REWARD_WEIGHTS["guard"]}, function: "train.rl.speech_rewards:audio_guard", '
             f'args: {{codes: "{codes}"}}}}']
    return "rl.rewards=[" + ", ".join(parts) + "]"


def _run(cmd: List[str], log: Path) -> None:
    """A step as its own process (its threads and memory end with it); its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[rlhf-demo] {' '.join(cmd[1:])[:160]} ... (log: {log})", flush=True)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"error: step failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {log} (end)\n{tail}")
    print(f"[rlhf-demo]   done in {time.time() - t0:.0f} s", flush=True)


def fit_style(out: Path, paths: Dict[str, Any], voices: int, steps: int) -> Path:
    target = out / "style.pt"
    if not target.is_file():
        _run([sys.executable, "-m", "train.style_classifier", "fit", str(target), "--codes", paths["codes"],
              "--voices", str(voices), "--steps", str(steps), "--work", str(out / "style_work")],
             out / "logs" / "style.log")
    return target


# ------------------------------------------------------------------------------------------ preference pairs

def preference_pairs(out: Path, paths: Dict[str, Any], limit: int, seed: int = 0) -> Path:
    """OUT/pairs/shards: the first `limit` training requests, chosen = the corpus's answer (espeak in the
    requested style), rejected = the same words spoken in another style (rendered here), with codes."""
    folder = out / "pairs"
    shards = folder / "shards"
    if (shards / "index.json").is_file():
        return shards
    corpus = Path(paths["corpus"])
    base = corpus.parent
    rng = random.Random(seed)
    lines = []
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    for r in records:
        system, user, assistant = r["messages"]
        other = rng.choice([s for s in STYLES if s != r["style"]])
        rejected = folder / "wav" / f"{r['id']}-{other.replace(' ', '_')}.wav"
        if not rejected.is_file():
            speak(assistant["text"], TTS_VOICE, str(rejected), **STYLES[other])
        lines.append({"id": r["id"], "style": r["style"], "text": assistant["text"],
                      "messages": [system, {"role": "user", "audio": str((base / user["audio"]).resolve())}],
                      "chosen": {"text": assistant["text"], "audio": str((base / assistant["audio"]).resolve())},
                      "rejected": {"text": assistant["text"], "audio": str(rejected.resolve())},
                      "rejected_style": other})
    jsonl = folder / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    py = sys.executable
    _run([py, "-m", "data.corpus.prepare", "preferences", str(jsonl), str(shards), "--workers", "1", "--no-progress"],
         out / "logs" / "pairs_prepare.log")
    _run([py, "-m", "data.codes", str(shards), "--tokenizer", paths["codes"], "--workers", "1", "--no-progress"],
         out / "logs" / "pairs_tokenize.log")
    return shards


# ---------------------------------------------------------------------------------------------- the runs

def planned_runs(args: argparse.Namespace, pairs: Optional[Path]) -> Dict[str, List[str]]:
    """{run name: overrides of RECIPE}."""
    wanted = set(args.runs.split(","))
    runs: Dict[str, List[str]] = {}
    if "grpo" in wanted:
        for seed in range(args.seeds):
            runs[f"grpo-seed{seed}"] = [f"seed={seed}", f"max_steps={args.steps}"]
    if "placebo" in wanted:
        runs["grpo-placebo"] = ["seed=0", f"max_steps={args.steps}", "rl.placebo=true"]
    if "ppo" in wanted:
        runs["ppo"] = ["seed=0", "kind=ppo", f"max_steps={args.ppo_steps}", "rl.num_generations=1",
                       "data.batch_size=8", "rl.epochs=2", "rl.num_minibatches=2", "rl.critic_lr=1e-4",
                       "rl.critic_warmup_steps=2", "rl.kl_in_reward=true"]
    if "dpo" in wanted and pairs is not None:
        runs["dpo"] = ["seed=0", "kind=dpo", f"max_steps={args.dpo_steps}", f"data.shards=[{pairs}]",
                       "data.task=preference", "rl.beta=0.1", "optim.lr=5e-6"]
    return runs


def train_run(name: str, overrides: List[str], out: Path, common: List[str]) -> Path:
    run_dir = out / name
    export = run_dir / "export"
    if not (export / "config.json").is_file():
        _run([sys.executable, "-m", "train", RECIPE, f"run_dir={run_dir}", *common, *overrides],
             out / "logs" / f"{name}.log")
    return export


# --------------------------------------------------------------------------------------------- measuring

def unseen_combinations(out_dir: Path, paths: Dict[str, Any], num: int) -> List[Dict[str, Any]]:
    """Training sentences asked for in a style they were never trained in (the corpus asks each training
    sentence in one style): request records like heldout_requests'."""
    corpus = [json.loads(line) for line in Path(paths["corpus"]).read_text(encoding="utf-8").splitlines()
              if line.strip()]
    trained = {r["messages"][2]["text"]: r["style"] for r in corpus}
    sentences = list(trained)[:num]
    # heldout_requests builds requests in every style for given sentences; keep the untrained styles.
    requests = heldout_requests(str(out_dir), len(sentences), sentences=sentences)
    return [{**r, "key": f"unseen-{r['key']}"} for r in requests if trained[r["text"]] != r["style"]]


def reward_scores(answers: Sequence[Answer], requests: Sequence[Dict[str, Any]], paths: Dict[str, Any],
                  style_model: Path) -> Dict[str, List[float]]:
    """The training reward of each answer (components and the weighted total), as the runs computed it."""
    from train.rl import speech_rewards as R

    by_key = {r["key"]: r for r in requests}
    samples = [RolloutSample(key=a.key, meta={"style": a.style, "text": by_key[a.key]["text"]},
                             prompt_ids=a.prompt_ids, answer_ids=a.answer_ids, finished=a.stopped,
                             audio_codes=a.audio_codes, text=a.text) for a in answers]
    parts = {"style": R.style(samples, classifier=str(style_model), codes=paths["codes"]),
             "words": R.intelligibility(samples, asr_model=str(paths["asr"]), codes=paths["codes"]),
             "guard": R.audio_guard(samples, codes=paths["codes"])}
    total = [sum(REWARD_WEIGHTS[k] * parts[k][i] for k in parts) if samples[i].finished else 0.0
             for i in range(len(samples))]  # rl.truncated_reward: 0 for an answer that never ended
    return {**parts, "total": total}


def evaluate(name: str, model_dir: Path, requests: Sequence[Dict[str, Any]], paths: Dict[str, Any],
             style_model: Path, reference, tok, ids, args: argparse.Namespace, out: Path,
             best_of: int = 1) -> Dict[str, Any]:
    """The held-out figures of one model (best_of > 1: the best of that many sampled answers per request by
    the reward, from this model)."""
    from model.checkpoint import load_stepfun

    model = load_stepfun(model_dir).float().eval()
    if best_of > 1:
        sampled = answer(model, tok, ids, requests, args.max_new_tokens, temperature=1.0, seed=args.sample_seed,
                         num_samples=best_of, batch_size=args.batch_size, keep_logprobs=True)
        scored = reward_scores(sampled, requests, paths, style_model)
        best = [max(range(k, k + best_of), key=lambda i: scored["total"][i]) for k in range(0, len(sampled), best_of)]
        answers = [sampled[i] for i in best]
        rewards = {name: [values[i] for i in best] for name, values in scored.items()}  # not scored again
    else:
        answers = answer(model, tok, ids, requests, args.max_new_tokens, batch_size=args.batch_size,
                         keep_logprobs=True)
        rewards = reward_scores(answers, requests, paths, style_model)
    del model
    measured = measure(answers, requests, paths["codes"], str(paths["asr"]), reference, batch_size=args.batch_size)
    summary = measured["summary"]
    summary["reward"] = {k: round(sum(v) / len(v), 4) for k, v in rewards.items()}
    for group in ("heldout", "unseen"):
        rows = [row for row, a in zip(measured["answers"], answers)
                if a.key.startswith("unseen-") == (group == "unseen")]
        if rows:
            summary[group] = summarize(rows)
    wavs = write_wavs([a for a in answers if not a.key.startswith("unseen-")], str(out / "wavs" / name),
                      paths["codes"], limit=args.wavs)
    for i, row in enumerate(measured["answers"]):
        row.update({f"reward_{k}": round(v[i], 4) for k, v in rewards.items()})
    return {"model": str(model_dir), "best_of": best_of, "summary": summary, "answers": measured["answers"],
            "wavs": wavs}


# ------------------------------------------------------------------------------------------------ report

_HEADLINE = [("slow/quick s per word", ("heldout", "slow_over_quick_s_per_word"), ">= 1.5"),
             ("high/(slow,quick) F0", ("heldout", "high_over_slow_quick_f0"), ">= 1.15"),
             ("stop rate", ("all", "stop_rate"), ">= 0.95"),
             ("word hit rate", ("all", "word_hit_rate"), ">= SFT"),
             ("WER", ("all", "wer"), ""),
             ("distinct codes share", ("all", "distinct_codes_share"), ""),
             ("KL/token to SFT", ("all", "kl_per_token"), ""),
             ("reward", ("reward", "total"), ""),
             ("  style", ("reward", "style"), ""),
             ("  words", ("reward", "words"), ""),
             ("  guard", ("reward", "guard"), ""),
             ("unseen: slow/quick", ("unseen", "slow_over_quick_s_per_word"), ""),
             ("unseen: high/(slow,quick)", ("unseen", "high_over_slow_quick_f0"), "")]


def _get(summary: Dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def format_report(report: Dict[str, Any]) -> str:
    """A markdown table: the headline figures of every model beside espeak's own answers and the goals."""
    models = report["models"]
    names = list(models)
    espeak = report.get("espeak", {}).get("espeak", {})
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| measure | " + " | ".join(names) + " | espeak | goal |", "|---" * (len(names) + 3) + "|"]
    for label, path, goal in _HEADLINE:
        cells = [_get(models[n]["summary"], path) for n in names]
        if all(c is None for c in cells):
            continue
        # espeak's summary is of the held-out requests only: its figures sit at the top level.
        ref = _get(espeak, path[1:] if path[0] == "heldout" else path) if path[0] in ("heldout", "all") else None
        lines.append(f"| {label} | " + " | ".join(fmt(c) for c in cells) + f" | {fmt(ref)} | {goal} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.rlhf_demo", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the recipe, for every run")
    parser.add_argument("--demo", default="runs/demo", help="what `make demo` wrote")
    parser.add_argument("--out", default="runs/rlhf_demo")
    parser.add_argument("--runs", default="grpo,placebo,ppo,dpo", help="which runs (comma-separated)")
    parser.add_argument("--seeds", type=int, default=3, help="GRPO seeds")
    parser.add_argument("--steps", type=int, default=30, help="GRPO (and placebo) steps")
    parser.add_argument("--ppo-steps", type=int, default=15)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=120, help="preference pairs for DPO")
    parser.add_argument("--best-of", type=int, default=4, help="N of the best-of-N comparator (0: none)")
    parser.add_argument("--sentences", type=int, default=8, help="new held-out sentences, each in every style")
    parser.add_argument("--unseen", type=int, default=4, help="training sentences asked in untrained styles")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--wavs", type=int, default=5)
    parser.add_argument("--style-voices", type=int, default=40, help="espeak voices the style classifier learns")
    parser.add_argument("--style-steps", type=int, default=400)
    args = parser.parse_args(argv)
    t0 = time.time()
    demo, out = Path(args.demo), Path(args.out)
    paths = demo_paths(demo)
    check_demo(paths)
    out.mkdir(parents=True, exist_ok=True)
    style_model = fit_style(out, paths, args.style_voices, args.style_steps)
    pairs = preference_pairs(out, paths, args.pairs) if "dpo" in args.runs.split(",") else None
    common = [f"model.init_from={paths['sft']}", f"data.tokenizer={paths['sft']}",
              f"data.shards=[{paths['prompts']}]", f"data.audio_tokenizer={paths['codes']}",
              rewards_override(paths, style_model), *args.overrides]
    exports = {name: train_run(name, overrides, out, common)
               for name, overrides in planned_runs(args, pairs).items()}
    t_train = time.time() - t0

    from data.text_tokenizer import load_tokenizer, special_ids
    from model.checkpoint import load_stepfun

    torch.manual_seed(0)
    tok = load_tokenizer(str(paths["sft"]))
    ids = special_ids(tok)
    requests = heldout_requests(str(out / "requests"), args.sentences)
    if args.unseen:
        requests += unseen_combinations(out / "requests", paths, args.unseen)
    reference = load_stepfun(paths["sft"]).float().eval()
    models: Dict[str, Any] = {}
    plan = [("sft", paths["sft"], 1)] + ([(f"sft-best-of-{args.best_of}", paths["sft"], args.best_of)]
                                         if args.best_of > 1 else []) + [(n, e, 1) for n, e in exports.items()]
    for name, folder, best_of in plan:
        t = time.time()
        models[name] = evaluate(name, Path(folder), requests, paths, style_model, reference, tok, ids, args, out,
                                best_of=best_of)
        print(f"[rlhf-demo] measured {name} in {time.time() - t:.0f} s", flush=True)
    report = {"models": models, "espeak": espeak_reference([r for r in requests if not r["key"].startswith("unseen-")],
                                                           paths["codes"]),
              "requests": [{k: r[k] for k in ("key", "text", "style")} for r in requests],
              "settings": {**{k: v for k, v in vars(args).items()}, "recipe": RECIPE, "rewards": REWARD_WEIGHTS},
              "seconds": {"training": round(t_train, 1), "total": round(time.time() - t0, 1)}}
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    table = format_report(report)
    atomic_write(out / "report.md", f"# make rlhf-demo\n\n{table}\n\n{report['seconds']}\n")
    print(table)
    print(f"[rlhf-demo] wrote {out / 'report.json'} and report.md in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

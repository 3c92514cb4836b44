"""`make rlhf-demo`: RLHF on the demo's styled spoken dialogue, shown on held-out requests.

    python -m train.rlhf_demo [--demo runs/demo] [--out runs/rlhf_demo] [--seeds 3] [--steps 40]
        [--ppo-steps 15] [--dpo-steps 30] [--best-of 4] [--samples 2] [--jobs 2] [--runs grpo,placebo,ppo,dpo]
        [key=value ...]

After `make demo`. The policy is the demo curriculum's styled-dialogue export; its requests are spoken
("say SENTENCE slowly / quickly / in a high voice") and its answers are speech (k-means codes). Steps, each
skipped when its result exists (a rerun continues where the last one stopped):

1. The style reward's classifier (train.style_classifier fit, trained through the demo's codec) -> OUT/style.pt.
2. Training runs of recipes/demo/rlhf.yaml (python -m train, one process each, --jobs at once): GRPO with
   seeds 0..S-1; a placebo (seed 0, rl.placebo=true: the same rewards dealt to the wrong answers); PPO (seed 0,
   fewer steps); DPO (seed 0) on preference pairs of the training requests (chosen: espeak's answer in the
   requested style, rejected: the same words in another style), tokenized with the demo's codec. The reward
   (reward_specs) is the same in every run. Extra key=value arguments override the recipe in every run.
3. The held-out measurement (train.rl.speech_eval) of: the SFT model; best-of-N from it (N sampled answers per
   request, the one the reward scores highest kept: what RL must beat without training); every run's export.
   Each model answers greedily, and --samples times per new request at the runs' temperature (1): the
   policy RL trained, which greedy decoding shows only by its most likely answer. Requests: new sentences in
   each style, and training sentences in a style they were never trained in (an unseen combination). Beside
   each: the reward and its components, the KL per token to the SFT model, the ASR export's transcript, and
   WAVs of five requests before (SFT) and after (GRPO seed 0). espeak's own answers are measured the same
   way, raw and through the codec: what a model taught by them can reach.
4. OUT/report.json, and OUT/report.md with the figures side by side.

The measures of step 3 are not the reward: time per word comes from the energy of the decoded wave and F0
from a pitch tracker, where the reward uses a classifier, the count of codes and an ASR model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from data.tools.demo import STYLES, TTS_VOICE, speak
from data.files import atomic_write
from train.rl.rollout import RolloutSample
from train.rl.speech_eval import (Answer, answer, espeak_reference, heldout_requests, measure, summarize,
                                  write_wavs)

RECIPE = "recipes/demo/rlhf.yaml"
# 1 - tanh(WORDS_SHARPNESS x WER): CosyVoice 2's 3 is flat where the demo's SFT answers sit (WER ~0.8: 0.02 +- 0.015,
# no signal for GRPO's group baseline); 1 keeps a slope there (0.34 at WER 0.8, 0.46 at 0.6).
WORDS_SHARPNESS = 1.0


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


def reward_specs(paths: Dict[str, Any], style_model: Path) -> List[Dict[str, Any]]:
    """The demo's reward, as rl.rewards entries (name, weight, function, args): every run trains on it and
    reward_scores() scores the held-out answers with it."""
    codes = paths["codes"]
    return [{"name": "style", "weight": 1.0, "function": "train.rl.speech_rewards:style",
             "args": {"classifier": str(style_model), "codes": codes}},
            {"name": "rate", "weight": 1.0, "function": "train.rl.speech_rewards:speaking_rate", "args": {}},
            {"name": "words", "weight": 1.0, "function": "train.rl.speech_rewards:intelligibility",
             "args": {"asr_model": str(paths["asr"]), "codes": codes, "sharpness": WORDS_SHARPNESS}},
            {"name": "guard", "weight": 0.5, "function": "train.rl.speech_rewards:audio_guard",
             "args": {"codes": codes}}]


def rewards_override(specs: Sequence[Dict[str, Any]]) -> str:
    """`rl.rewards=[...]` for the command line (JSON is YAML flow syntax)."""
    return "rl.rewards=" + json.dumps(list(specs))


def _run(cmd: List[str], log: Path, threads: Optional[int] = None) -> None:
    """A step as its own process (its threads and memory end with it); its output goes to `log`. `threads`:
    its OMP_NUM_THREADS, unless the caller's environment sets one."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[rlhf-demo] {' '.join(cmd[1:])[:160]} ... (log: {log})", flush=True)
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"error: step failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {log} (end)\n{tail}")
    print(f"[rlhf-demo]   {log.stem} done in {time.time() - t0:.0f} s", flush=True)


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
                       "rl.critic_warmup_steps=2", "rl.kl_in_reward=true", "optim.lr=2e-5"]  # 4 updates a step
    if "dpo" in wanted and pairs is not None:
        runs["dpo"] = ["seed=0", "kind=dpo", f"max_steps={args.dpo_steps}", f"data.shards=[{pairs}]",
                       "data.task=preference", "rl.beta=0.1", "optim.lr=5e-6"]
    return runs


def train_run(name: str, overrides: List[str], out: Path, common: List[str], threads: Optional[int] = None) -> Path:
    run_dir = out / name
    export = run_dir / "export"
    if not (export / "config.json").is_file():
        _run([sys.executable, "-m", "train", RECIPE, f"run_dir={run_dir}", *common, *overrides],
             out / "logs" / f"{name}.log", threads)
    return export


def train_all(runs: Dict[str, List[str]], out: Path, common: List[str], jobs: int) -> Dict[str, Path]:
    """Every run, `jobs` at a time, the cores shared out among them: {name: export}. The first failure stops
    the runs not yet started and is raised (a run already going finishes; a rerun skips what is done)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # each thread waits on one training process
        futures = {name: pool.submit(train_run, name, overrides, out, common, threads)
                   for name, overrides in runs.items()}
        try:
            for future in as_completed(futures.values()):
                future.result()
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise
    return {name: future.result() for name, future in futures.items()}


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


def reward_scores(answers: Sequence[Answer], requests: Sequence[Dict[str, Any]],
                  specs: Sequence[Dict[str, Any]]) -> Dict[str, List[float]]:
    """The training reward of each answer (components and the weighted total), as the runs computed it."""
    from train.rl.rewards import import_function

    by_key = {r["key"]: r for r in requests}
    samples = [RolloutSample(key=a.key, meta={"style": a.style, "text": by_key[a.key]["text"]},
                             prompt_ids=a.prompt_ids, answer_ids=a.answer_ids, finished=a.stopped,
                             audio_codes=a.audio_codes, text=a.text) for a in answers]
    parts = {spec["name"]: [float(v) for v in import_function(spec["function"])(samples, **spec["args"])]
             for spec in specs}
    weights = {spec["name"]: spec["weight"] for spec in specs}
    total = [sum(weights[k] * parts[k][i] for k in parts) if samples[i].finished else 0.0
             for i in range(len(samples))]  # rl.truncated_reward: 0 for an answer that never ended
    return {**parts, "total": total}


def evaluate(name: str, model_dir: Path, requests: Sequence[Dict[str, Any]], paths: Dict[str, Any],
             specs: Sequence[Dict[str, Any]], reference, tok, ids, args: argparse.Namespace, out: Path,
             best_of: int = 1) -> Dict[str, Any]:
    """The held-out figures of one model (best_of > 1: the best of that many sampled answers per request by
    the reward, from this model)."""
    from model.checkpoint import load_stepfun

    model = load_stepfun(model_dir).float().eval()
    if best_of > 1:
        sampled = answer(model, tok, ids, requests, args.max_new_tokens, temperature=1.0, seed=args.sample_seed,
                         num_samples=best_of, batch_size=args.batch_size, keep_logprobs=True)
        scored = reward_scores(sampled, requests, specs)
        best = [max(range(k, k + best_of), key=lambda i: scored["total"][i]) for k in range(0, len(sampled), best_of)]
        answers = [sampled[i] for i in best]
        rewards = {name: [values[i] for i in best] for name, values in scored.items()}  # not scored again
    else:
        answers = answer(model, tok, ids, requests, args.max_new_tokens, batch_size=args.batch_size,
                         keep_logprobs=True)
        rewards = reward_scores(answers, requests, specs)
    sampled = None
    if args.samples > 0 and best_of == 1:
        sampled = sampled_figures(model, [r for r in requests if not r["key"].startswith("unseen-")], paths,
                                  specs, tok, ids, args)
    del model
    measured = measure(answers, requests, paths["codes"], str(paths["asr"]), reference, batch_size=args.batch_size)
    summary = measured["summary"]
    summary["reward"] = {k: round(sum(v) / len(v), 4) for k, v in rewards.items()}
    for group in ("heldout", "unseen"):
        rows = [row for row, a in zip(measured["answers"], answers)
                if a.key.startswith("unseen-") == (group == "unseen")]
        if rows:
            summary[group] = summarize(rows)
    if sampled is not None:
        summary["sampled"] = sampled
    wavs = write_wavs([a for a in answers if not a.key.startswith("unseen-")], str(out / "wavs" / name),
                      paths["codes"], limit=args.wavs)
    for i, row in enumerate(measured["answers"]):
        row.update({f"reward_{k}": round(v[i], 4) for k, v in rewards.items()})
    return {"model": str(model_dir), "best_of": best_of, "summary": summary, "answers": measured["answers"],
            "wavs": wavs}


def sampled_figures(model, requests: Sequence[Dict[str, Any]], paths: Dict[str, Any],
                    specs: Sequence[Dict[str, Any]], tok, ids, args: argparse.Namespace) -> Dict[str, Any]:
    """The held-out figures of `args.samples` answers per request sampled at the runs' temperature (1): the
    policy RL trained, where greedy decoding shows only its most likely answer. Same seed for every model."""
    answers = answer(model, tok, ids, requests, args.max_new_tokens, temperature=1.0, seed=args.sample_seed + 1,
                     num_samples=args.samples, batch_size=args.batch_size)
    rewards = reward_scores(answers, requests, specs)
    summary = measure(answers, requests, paths["codes"], str(paths["asr"]), batch_size=args.batch_size)["summary"]
    summary["reward"] = {k: round(sum(v) / len(v), 4) for k, v in rewards.items()}
    return summary


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
             ("  rate", ("reward", "rate"), ""),
             ("  words", ("reward", "words"), ""),
             ("  guard", ("reward", "guard"), ""),
             ("sampled: slow/quick s per word", ("sampled", "slow_over_quick_s_per_word"), ""),
             ("sampled: high/(slow,quick) F0", ("sampled", "high_over_slow_quick_f0"), ""),
             ("sampled: stop rate", ("sampled", "all", "stop_rate"), ""),
             ("sampled: word hit rate", ("sampled", "all", "word_hit_rate"), ""),
             ("sampled: distinct codes share", ("sampled", "all", "distinct_codes_share"), ""),
             ("sampled: reward", ("sampled", "reward", "total"), ""),
             ("sampled:   style", ("sampled", "reward", "style"), ""),
             ("sampled:   rate", ("sampled", "reward", "rate"), ""),
             ("sampled:   words", ("sampled", "reward", "words"), ""),
             ("unseen: slow/quick", ("unseen", "slow_over_quick_s_per_word"), ""),
             ("unseen: high/(slow,quick)", ("unseen", "high_over_slow_quick_f0"), "")]


def _get(summary: Dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def format_report(report: Dict[str, Any]) -> str:
    """A markdown table: the headline figures of every model beside espeak's own answers (raw, and through
    the demo's codec when measured) and the goals."""
    models = report["models"]
    names = list(models)
    refs = [(label, report.get("espeak", {}).get(key)) for label, key in
            (("espeak", "espeak"), ("espeak via codes", "espeak_through_codes"))]
    refs = [(label, summary) for label, summary in refs if summary is not None] or [("espeak", {})]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| measure | " + " | ".join(names + [label for label, _ in refs]) + " | goal |",
             "|---" * (len(names) + len(refs) + 2) + "|"]
    for label, path, goal in _HEADLINE:
        cells = [_get(models[n]["summary"], path) for n in names]
        if all(c is None for c in cells):
            continue
        # espeak's summary is of the held-out requests only: its figures sit at the top level.
        for _, espeak in refs:
            cells.append(_get(espeak, path[1:] if path[0] == "heldout" else path)
                         if path[0] in ("heldout", "all") else None)
        lines.append(f"| {label} | " + " | ".join(fmt(c) for c in cells) + f" | {goal} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.rlhf_demo", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the recipe, for every run")
    parser.add_argument("--demo", default="runs/demo", help="what `make demo` wrote")
    parser.add_argument("--out", default="runs/rlhf_demo")
    parser.add_argument("--runs", default="grpo,placebo,ppo,dpo", help="which runs (comma-separated)")
    parser.add_argument("--seeds", type=int, default=3, help="GRPO seeds")
    parser.add_argument("--steps", type=int, default=40, help="GRPO (and placebo) steps")
    parser.add_argument("--ppo-steps", type=int, default=15)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=120, help="preference pairs for DPO")
    parser.add_argument("--best-of", type=int, default=4, help="N of the best-of-N comparator (0: none)")
    parser.add_argument("--sentences", type=int, default=8, help="new held-out sentences, each in every style")
    parser.add_argument("--unseen", type=int, default=4, help="training sentences asked in untrained styles")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=2,
                        help="answers per held-out request sampled at temperature 1 from each model (0: greedy only)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at once (each one process)")
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
    specs = reward_specs(paths, style_model)
    pairs = preference_pairs(out, paths, args.pairs) if "dpo" in args.runs.split(",") else None
    common = [f"model.init_from={paths['sft']}", f"data.tokenizer={paths['sft']}",
              f"data.shards=[{paths['prompts']}]", f"data.audio_tokenizer={paths['codes']}",
              rewards_override(specs), *args.overrides]
    exports = train_all(planned_runs(args, pairs), out, common, args.jobs)
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
        models[name] = evaluate(name, Path(folder), requests, paths, specs, reference, tok, ids, args, out,
                                best_of=best_of)
        print(f"[rlhf-demo] measured {name} in {time.time() - t:.0f} s", flush=True)
    report = {"models": models, "espeak": espeak_reference([r for r in requests if not r["key"].startswith("unseen-")],
                                                           paths["codes"], str(paths["asr"])),
              "requests": [{k: r[k] for k in ("key", "text", "style")} for r in requests],
              "settings": {**{k: v for k, v in vars(args).items()}, "recipe": RECIPE, "rewards": specs},
              "seconds": {"training": round(t_train, 1), "total": round(time.time() - t0, 1)}}
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    table = format_report(report)
    atomic_write(out / "report.md", f"# make rlhf-demo\n\n{table}\n\n{report['seconds']}\n")
    print(table)
    print(f"[rlhf-demo] wrote {out / 'report.json'} and report.md in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m train.report RUN_DIR [--out DIR]`: PNG plots and a markdown summary (REPORT.md) of a run, or of
a curriculum (RUN_DIR/curriculum.json and RUN_DIR/stages/*/metrics.jsonl), read from its metrics.jsonl files.

Plots, each written when its metrics were logged: loss.png (loss per task, "loss/<task>", else "loss"),
lr.png, throughput.png (tokens/s, and MFU below it), eval_<metric>.png (each "eval/<metric>_<tag>" across
the stages), rl.png (reward, its components and KL). A curriculum's stages follow one another on one step axis,
with their boundaries marked. REPORT.md: per stage steps, tokens, wall time, tokens/s, MFU, final loss and
each evaluation metric at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

CURRICULUM_NAME = "curriculum.json"  # train.curriculum.SUMMARY_NAME (not imported: that pulls in torch)
METRICS_NAME = "metrics.jsonl"
REPORT_NAME = "REPORT.md"
_EVAL_KEY = re.compile(r"^eval/(.+)_(start|end|step\d+)$")
# Evaluation extras that count rather than measure (code_accuracy's num_codes): neither plotted nor reported.
_COUNT = re.compile(r"(^|_)num_[a-z]+$")
_STAGE_DIR = re.compile(r"^(\d+)-(.+)$")


@dataclass
class Stage:
    """One run's records: a plain run, or a curriculum stage."""
    name: str
    run_dir: Path
    records: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    """Its curriculum.json entry (steps, tokens, wall_s, metric, eval_start, eval_end, status); {} for a plain run."""
    offset: int = 0
    """Steps of the stages before it: its step s is step offset + s on the report's axis."""


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, in order; a line that does not parse (cut off by a kill) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _stage_folders(run_dir: Path) -> Dict[int, Path]:
    folders = {}
    for path in (run_dir / "stages").glob("*/"):
        match = _STAGE_DIR.match(path.name)
        if match and path.is_dir():
            folders[int(match.group(1))] = path
    return folders


def load_run(run_dir: Path) -> Tuple[List[Stage], bool]:
    """(stages, is_curriculum): a curriculum's stages in order (from curriculum.json, plus stage folders it does
    not list yet), or the plain run in run_dir as one stage."""
    run_dir = Path(run_dir)
    folders = _stage_folders(run_dir)
    summary_path = run_dir / CURRICULUM_NAME
    if not summary_path.is_file() and not folders:
        if not (run_dir / METRICS_NAME).is_file():
            raise ValueError(f"{run_dir}: no {METRICS_NAME}, {CURRICULUM_NAME} or stages/ folder: expected a run "
                             "folder of python -m train")
        return [Stage(run_dir.resolve().name, run_dir, read_metrics(run_dir / METRICS_NAME))], False
    entries: Dict[int, Dict[str, Any]] = {}
    if summary_path.is_file():
        for entry in json.loads(summary_path.read_text(encoding="utf-8")).get("stages", []):
            entries[int(entry["index"])] = entry
    stages, offset = [], 0
    for index in sorted(set(entries) | set(folders)):
        entry = entries.get(index, {})
        # The folder under RUN_DIR, not the summary's run_dir: the run may have been copied from elsewhere.
        folder = folders.get(index) or run_dir / "stages" / f"{index}-{entry.get('name', index)}"
        name = entry.get("name") or _STAGE_DIR.match(folder.name).group(2)
        metrics = folder / METRICS_NAME
        stage = Stage(name, folder, read_metrics(metrics) if metrics.is_file() else [], entry, offset)
        stages.append(stage)
        offset += stage_stats(stage)["steps"] or 0
    return stages, True


def series(stage: Stage, key: str) -> Tuple[List[float], List[float]]:
    """(steps on the report's axis, values) of a numeric metric in a stage's records."""
    xs, ys = [], []
    for record in stage.records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not record.get("done"):
            xs.append(stage.offset + record["step"])
            ys.append(float(value))
    return xs, ys


def _last(stage: Stage, key: str) -> Optional[float]:
    values = series(stage, key)[1]
    return values[-1] if values else None


def _mean(stage: Stage, key: str) -> Optional[float]:
    values = series(stage, key)[1]
    return sum(values) / len(values) if values else None


def eval_values(stage: Stage) -> Dict[str, Dict[str, float]]:
    """{metric: {tag: value}} from the stage's "eval/<metric>_<tag>" keys (tags start, end, stepN), else from
    its curriculum.json entry (metric, eval_start, eval_end)."""
    out: Dict[str, Dict[str, float]] = {}
    for record in stage.records:
        for key, value in record.items():
            match = _EVAL_KEY.match(key)
            if match and isinstance(value, (int, float)) and not _COUNT.search(match.group(1)):
                out.setdefault(match.group(1), {})[match.group(2)] = float(value)
    metric = stage.summary.get("metric")
    if not out and metric:
        tags = {tag: stage.summary[f"eval_{tag}"] for tag in ("start", "end")
                if isinstance(stage.summary.get(f"eval_{tag}"), (int, float))}
        if tags:
            out[metric] = tags
    return out


def stage_stats(stage: Stage) -> Dict[str, Any]:
    """steps, tokens, wall_s (curriculum.json's entry, else the run's closing "done" line, else its last
    lines), tokens_per_s and mfu (means over the log lines), final loss and per-task losses, eval, status."""
    done = next((r for r in reversed(stage.records) if r.get("done")), {})
    logged = [r for r in stage.records if not r.get("done")]
    times = [r["time"] for r in stage.records if isinstance(r.get("time"), (int, float))]

    def pick(summary_key: str, done_key: str, fallback):
        for value in (stage.summary.get(summary_key), done.get(done_key)):
            if isinstance(value, (int, float)):
                return value
        return fallback

    steps = pick("steps", "final_step", max((r["step"] for r in logged), default=None))
    tokens = pick("tokens", "tokens", _last(stage, "tokens"))
    wall_s = pick("wall_s", "wall_s", times[-1] - times[0] if len(times) > 1 else None)
    tasks = sorted({k[len("loss/"):] for r in stage.records for k in r if k.startswith("loss/")})
    status = stage.summary.get("status") or ("done" if done else "running" if stage.records else "pending")
    return {"steps": int(steps) if steps is not None else None, "tokens": int(tokens) if tokens is not None else None,
            "wall_s": wall_s, "tokens_per_s": _mean(stage, "tokens_per_s"), "mfu": _mean(stage, "mfu"),
            "loss": _last(stage, "loss"), "task_losses": {t: _last(stage, f"loss/{t}") for t in tasks},
            "eval": eval_values(stage), "status": status}


# ------------------------------------------------------------------------------------------------ plots

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("python -m train.report needs matplotlib: pip install -e . (it is pinned in "
                           "pyproject.toml)") from None
    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    return plt


def _mark_stages(ax, stages: List[Stage], curriculum: bool) -> None:
    if not curriculum:
        return
    for stage in stages:
        ax.axvline(stage.offset, color="0.6", linestyle=":", linewidth=0.8)
        ax.text(stage.offset, 1.0, f" {stage.name}", transform=ax.get_xaxis_transform(), fontsize=7,
                va="top", ha="left", color="0.35")


def _plot_keys(ax, stages: List[Stage], keys, curriculum: bool, log_y: bool = False) -> bool:
    """Each key's series across the stages in one colour; False when none was logged. keys: a list, or a
    function of a stage giving that stage's keys."""
    keys_of = keys if callable(keys) else (lambda stage: keys)
    every = sorted({key for stage in stages for key in keys_of(stage)})
    colours = {key: f"C{i % 10}" for i, key in enumerate(every)}
    labelled, values = set(), []
    for stage in stages:
        for key in keys_of(stage):
            xs, ys = series(stage, key)
            if not xs:
                continue
            ax.plot(xs, ys, color=colours[key], linewidth=1.2, marker="." if len(xs) < 30 else None,
                    label=None if key in labelled else key)
            labelled.add(key)
            values += ys
    if values:
        _mark_stages(ax, stages, curriculum)
        ax.set_xlabel("step" if not curriculum else "step (stages in order)")
        ax.grid(alpha=0.3)
        if log_y and min(values) > 0:
            ax.set_yscale("log")
        if len(labelled) > 1:
            ax.legend(fontsize=8)
    return bool(values)


def _loss_keys(stage: Stage) -> List[str]:
    """A stage's per-task losses ("loss/<task>") when it logged them, else its "loss"."""
    tasks = sorted({k for r in stage.records for k in r if k.startswith("loss/")})
    return tasks or ["loss"]


def _keys(stages: List[Stage], predicate) -> List[str]:
    return sorted({k for stage in stages for r in stage.records for k, v in r.items()
                   if predicate(k) and isinstance(v, (int, float)) and not isinstance(v, bool)})


def write_plots(stages: List[Stage], curriculum: bool, out_dir: Path) -> List[Path]:
    """The PNG files (module doc) for the metrics the stages logged; returns their paths."""
    plt = _pyplot()
    written: List[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    panels = [("loss.png", "training loss", _loss_keys, True), ("lr.png", "learning rate", ["lr"], False)]
    for name, title, keys, log_y in panels:
        fig, ax = plt.subplots(figsize=(8, 4))
        if _plot_keys(ax, stages, keys, curriculum, log_y):
            ax.set_title(title)
            save(fig, name)
        else:
            plt.close(fig)

    throughput = [(["tokens_per_s"], "tokens/s (all devices)"), (["mfu"], "MFU")]
    throughput = [(k, t) for k, t in throughput if _keys(stages, lambda key, k=k: key in k)]
    if throughput:
        fig, axes = plt.subplots(len(throughput), 1, figsize=(8, 3.2 * len(throughput)), squeeze=False)
        for ax, (keys, title) in zip(axes[:, 0], throughput):
            _plot_keys(ax, stages, keys, curriculum)
            ax.set_title(title)
        save(fig, "throughput.png")

    metrics = sorted({m for stage in stages for m in eval_values(stage)})
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(8, 4))
        xs, ys, labels = [], [], []
        for stage in stages:
            values = eval_values(stage).get(metric, {})
            steps = {"start": 0, "end": stage_stats(stage)["steps"] or 0}
            for tag, value in values.items():
                step = steps[tag] if tag in steps else int(tag[len("step"):])
                xs.append(stage.offset + step)
                ys.append(value)
                labels.append(f"{stage.name} {tag}")
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", color="C0")
        for i in order:
            ax.annotate(f"{ys[i]:.3g}", (xs[i], ys[i]), textcoords="offset points", xytext=(0, 5), fontsize=7,
                        ha="center")
        _mark_stages(ax, stages, curriculum)
        ax.margins(y=0.15)
        ax.set_title(f"held-out {metric}")
        ax.set_xlabel("step" if not curriculum else "step (stages in order)")
        ax.grid(alpha=0.3)
        save(fig, f"eval_{re.sub(r'[^A-Za-z0-9_.-]', '_', metric)}.png")

    rl = [(_keys(stages, lambda k: k == "reward" or k.startswith("reward/") and k.endswith("_mean")), "reward"),
          (_keys(stages, lambda k: k == "kl"), "KL to the reference")]
    rl = [(keys, title) for keys, title in rl if keys]
    if rl:
        fig, axes = plt.subplots(len(rl), 1, figsize=(8, 3.2 * len(rl)), squeeze=False)
        for ax, (keys, title) in zip(axes[:, 0], rl):
            _plot_keys(ax, stages, keys, curriculum)
            ax.set_title(title)
        save(fig, "rl.png")
    return written


# ---------------------------------------------------------------------------------------------- summary

def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(stages: List[Stage], curriculum: bool, run_dir: Path, plots: List[Path]) -> str:
    lines = [f"# {'Curriculum' if curriculum else 'Run'} report: {run_dir}", "",
             "| stage | status | steps | tokens | wall time | tokens/s | MFU | final loss | eval (start -> end) |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    total = {"steps": 0, "tokens": 0, "wall_s": 0.0}
    for stage in stages:
        s = stage_stats(stage)
        for key in total:
            total[key] += s[key] or 0
        loss = _number(s["loss"], ".4f")
        if s["task_losses"]:
            loss += " (" + ", ".join(f"{t} {_number(v, '.4f')}" for t, v in s["task_losses"].items()) + ")"
        evals = "; ".join(f"{m} {_number(v.get('start'), '.4g')} -> {_number(v.get('end'), '.4g')}"
                          for m, v in sorted(s["eval"].items())) or "-"
        mfu = "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
        lines.append(f"| {stage.name} | {s['status']} | {_number(s['steps'], ',')} | {_number(s['tokens'], ',')} | "
                     f"{_duration(s['wall_s'])} | {_number(s['tokens_per_s'], ',.0f')} | {mfu} | {loss} | {evals} |")
    if curriculum:
        lines.append(f"| total | | {total['steps']:,} | {total['tokens']:,} | {_duration(total['wall_s'])} | | | | |")
    lines += ["", "tokens: real decoder tokens over all ranks; tokens/s and MFU: means over the logged windows; "
              "final loss: the last logged window's.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, out_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Plots and REPORT.md for run_dir into out_dir (default: run_dir); returns {"plots", "report", "stages"}."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    stages, curriculum = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(stages, curriculum, out_dir)
    report = out_dir / REPORT_NAME
    report.write_text(markdown(stages, curriculum, run_dir, plots), encoding="utf-8")
    return {"plots": plots, "report": report, "stages": [s.name for s in stages]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (metrics.jsonl) or a curriculum's (curriculum.json, stages/)")
    parser.add_argument("--out", default=None, help="folder for the PNGs and REPORT.md (default: RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        result = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in result["plots"] + [result["report"]]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

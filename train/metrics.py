"""The one rank-aware metrics sink: console progress, JSONL in the run folder, optional wandb.

Rank 0 gets a real sink, every other rank the do-nothing one; nothing in the loop checks the rank.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from train.config import MetricsConfig
from train.run_folder import drop_steps_after


class NullSink:
    def begin(self, step: int) -> None: ...
    def start(self, step: int, total: int) -> None: ...
    def log(self, step: int, values: Dict[str, Any]) -> None: ...
    def advance(self, step: int, summary: str = "") -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class MetricsSink(NullSink):
    def __init__(self, cfg: MetricsConfig, run_dir: str, run_config: Dict[str, Any]):
        self.cfg = cfg
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.bar = None
        self.wandb_run = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("metrics.wandb=true needs wandb: pip install 'stepaudio2-train[wandb]'") from None
            self.wandb_run = wandb.init(project=cfg.wandb_project, dir=run_dir, config=run_config,
                                        name=Path(run_dir).name)

    def begin(self, step: int) -> None:
        """This attempt starts at step (the checkpoint's on a resume, else 0), before it logs anything: lines
        of later steps, logged by an attempt killed after that checkpoint, leave metrics.jsonl, as this run logs
        those steps again. At step 0 (a first start, or a restart before any checkpoint) every step's line
        goes, the start evaluation's too."""
        self.file.close()
        dropped = drop_steps_after(self.path, step if step > 0 else -1)
        self.file = open(self.path, "a", encoding="utf-8")
        if dropped:
            self.message(f"{self.path}: dropped {dropped} line(s) of an earlier attempt from step "
                         f"{step + 1 if step > 0 else 0} on, which this run repeats")

    def start(self, step: int, total: int) -> None:
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, values: Dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def advance(self, step: int, summary: str = "") -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if summary:
                self.bar.set_postfix_str(summary, refresh=False)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def make_sink(cfg: MetricsConfig, run_dir: str, rank: int, run_config: Optional[Dict[str, Any]] = None):
    return MetricsSink(cfg, run_dir, run_config or {}) if rank == 0 else NullSink()

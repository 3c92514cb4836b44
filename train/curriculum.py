"""The curriculum runner: each stage's starting point, then the recipe's stages trained in order, each a plain
run (train.loop) in its own folder. Each stage's config (the top level with the stage's overrides merged over
it) and its checks are train.recipe's stage rules (stage_config).

RUN_DIR/stages/<i>-<name>/ is stage i's run folder (checkpoints, metrics.jsonl, export/). Stage 0 starts
from model.init_from, model.init_parts or fresh weights; stage i > 0 from stage i-1's export, with a fresh
optimizer and a re-warmed schedule. A stage is done once its export is complete and RUN_DIR/stages/<i>-<name>/
DONE is written; the same command again skips done stages and resumes the current one from its latest
checkpoint. RUN_DIR/curriculum.json sums up every stage: steps, tokens, wall time, eval metric start/end.
"""
from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from data.files import atomic_write
from train.config import InitPartsConfig, MetricsConfig, TrainConfig
from train.engine import init_distributed
from train.loop import run
from train.metrics import make_sink
from train.recipe import ConfigError, stage_config, to_yaml

DONE_NAME = "DONE"
SUMMARY_NAME = "curriculum.json"


@dataclass
class StagePlan:
    index: int
    name: str
    cfg: TrainConfig
    """The stage's resolved config, its starting weights decided (model.init_from)."""
    done: bool
    """Its DONE marker exists: the same command skips it."""
    selected: bool
    """Named by run_stages (or all stages when none are named)."""


def read_done(run_dir: str) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / DONE_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _sets_start(stage_overrides: Dict[str, Any]) -> bool:
    """True when a stage's own overrides say where its weights come from."""
    model = stage_overrides.get("model") or {}
    dotted = [k for k in stage_overrides if k.startswith(("model.init_from", "model.init_parts"))]
    return bool(dotted) or "init_from" in model or "init_parts" in model


def plan(cfg: TrainConfig) -> List[StagePlan]:
    """Every stage's config and starting point; ConfigError before any work when a selected stage's
    starting export will not exist (its previous stage neither done nor selected)."""
    selected = set(cfg.run_stages or [s.name for s in cfg.stages])
    plans: List[StagePlan] = []
    for i, stage in enumerate(cfg.stages):
        scfg = stage_config(cfg, i)
        plans.append(StagePlan(i, stage.name, scfg, read_done(scfg.run_dir) is not None, stage.name in selected))
    for p in plans:
        if not p.selected or p.done or p.index == 0 or _sets_start(cfg.stages[p.index].overrides):
            continue
        # Running one stage on its own: the top-level model.init_from (e.g. from the command line) wins.
        if cfg.run_stages and cfg.model.init_from:
            continue
        # A reward model is not a policy: the next policy stage starts from the policy before it.
        policies = [q for q in plans[: p.index] if q.cfg.kind != "reward_model"]
        if not policies:
            continue
        prev = policies[-1]
        export = Path(prev.cfg.run_dir) / "export"
        if not (prev.done or prev.selected):
            raise ConfigError(f"stage {p.name!r} (stages[{p.index}]) starts from the export of stage {prev.name!r} "
                              f"({export}), which is not complete (no {DONE_NAME} marker in {prev.cfg.run_dir}); "
                              f"run stage {prev.name!r} first, or give model.init_from=FOLDER")
        model = dataclasses.replace(p.cfg.model, init_from=str(export), init_parts=InitPartsConfig())
        p.cfg = dataclasses.replace(p.cfg, model=model)
    for p in plans:
        p.cfg = _resolve_stage_refs(p, plans)
    return plans


STAGE_REF = "stage:"


def _resolve_stage_refs(p: StagePlan, plans: List[StagePlan]) -> TrainConfig:
    """rl.rewards[].model and rl.critic_init may say `stage:NAME`: that earlier stage's export folder."""
    def resolve(value: Optional[str], key: str) -> Optional[str]:
        if not value or not value.startswith(STAGE_REF):
            return value
        name = value[len(STAGE_REF):]
        earlier = [q for q in plans[: p.index] if q.name == name]
        if not earlier:
            raise ConfigError(f"config key '{key}' of stage {p.name!r} = {value!r}: no earlier stage is named "
                              f"{name!r} (stages before it: {[q.name for q in plans[: p.index]]})")
        return str(Path(earlier[0].cfg.run_dir) / "export")

    rl = p.cfg.rl
    rewards = [dataclasses.replace(r, model=resolve(r.model, f"rl.rewards[{i}].model")) for i, r in enumerate(rl.rewards)]
    rl = dataclasses.replace(rl, rewards=rewards, critic_init=resolve(rl.critic_init, "rl.critic_init"))
    return dataclasses.replace(p.cfg, rl=rl)


def _summary(cfg: TrainConfig, plans: List[StagePlan]) -> Dict[str, Any]:
    stages = []
    for p in plans:
        done = read_done(p.cfg.run_dir)
        stages.append({"index": p.index, "name": p.name, "run_dir": p.cfg.run_dir,
                       "status": "done" if done else "pending", **(done or {})})
    return {"run_dir": cfg.run_dir, "stages": stages}


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def run_curriculum(cfg: TrainConfig) -> Dict[str, Any]:
    """Runs the selected stages that are not done, in order (every rank calls it); returns the summary."""
    plans = plan(cfg)
    rank, _ = init_distributed(timeout_s=cfg.resilience.collective_timeout_s)
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    sink = make_sink(MetricsConfig(progress=False), cfg.run_dir, rank)
    for p in plans:
        if not p.selected:
            continue
        if p.done:
            sink.message(f"[curriculum] stage {p.index} {p.name!r} is done ({p.cfg.run_dir}/{DONE_NAME}); skipped")
            continue
        start = p.cfg.model.init_from or ("parts" if p.cfg.model.init_parts.qwen else "fresh weights")
        sink.message(f"[curriculum] stage {p.index} {p.name!r} -> {p.cfg.run_dir} (from {start})")
        results = run(p.cfg)
        done = {"steps": results["final_step"], "tokens": results["tokens"], "wall_s": round(results["wall_s"], 3),
                "metric": results["metric"], "eval_start": results["eval_start"], "eval_end": results["eval_end"],
                "export_dir": results.get("export_dir")}
        if rank == 0:
            # Written after the export is complete: its presence is what "done" means.
            _write_json(Path(p.cfg.run_dir) / DONE_NAME, done)
            _write_json(Path(cfg.run_dir) / SUMMARY_NAME, _summary(cfg, plans))
        sink.log(p.index, {"stage": p.name, **done})
        dist.barrier()
        del results
        gc.collect()  # the stage's engine and model, before the next stage builds its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = _summary(cfg, plans)
    if rank == 0:
        _write_json(Path(cfg.run_dir) / SUMMARY_NAME, summary)
    sink.close()
    return summary

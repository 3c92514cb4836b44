"""The curriculum: each stage's config (the top level with the stage's overrides merged over it), and the
runner that trains a recipe's stages in order, each a plain run (train.loop) in its own folder.

RUN_DIR/stages/<i>-<name>/ is stage i's run folder (checkpoints, metrics.jsonl, export/). Stage 0 starts
from model.init_from, model.init_parts or fresh weights; stage i > 0 from stage i-1's export, with a fresh
optimizer and a re-warmed schedule. A stage is done once its export is complete and RUN_DIR/stages/<i>-<name>/
DONE is written; the same command again skips done stages and resumes the current one from its latest
checkpoint. RUN_DIR/curriculum.json sums up every stage: steps, tokens, wall time, eval metric start/end.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import (ConfigError, InitPartsConfig, MetricsConfig, TrainConfig, apply_kind_defaults,
                          config_error, to_yaml, validate)

DONE_NAME = "DONE"
SUMMARY_NAME = "curriculum.json"

# Keys a stage's overrides may not set: they are the stage's own fields or belong to the whole curriculum.
_NOT_IN_OVERRIDES = {"run_dir": "the curriculum's", "stages": "the curriculum's", "run_stages": "the curriculum's",
                     "max_steps": "stages[i].max_steps", "max_tokens": "stages[i].max_tokens",
                     "lr_multipliers": "stages[i].lr_multipliers"}
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _validate_stage_list(cfg: TrainConfig) -> None:
    names = [s.name for s in cfg.stages]
    for i, stage in enumerate(cfg.stages):
        if not _STAGE_NAME.match(stage.name or ""):
            raise ConfigError(f"config key 'stages[{i}].name' = {stage.name!r}: expected a name of letters, "
                              f"digits, - and _")
        if names.index(stage.name) != i:
            raise ConfigError(f"config key 'stages[{i}].name' = {stage.name!r}: stage names must be unique")
    unknown = [n for n in cfg.run_stages if n not in names]
    if unknown:
        raise ConfigError(f"config key 'stages' = {cfg.run_stages!r}: no stage named {unknown[0]!r}; the "
                          f"recipe's stages are {names}")


def _nest(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Dotted keys (`optim.lr`) become nested mappings, so both spellings merge the same way."""
    out: Dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, last = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    return out


def stage_config(cfg: TrainConfig, index: int, where: str = "") -> TrainConfig:
    """The config stage `index` runs with: the top level (without stages) with the stage's overrides merged
    over it, the stage's budget and lr multipliers, and RUN_DIR/stages/<index>-<name> as its run folder."""
    stage = cfg.stages[index]
    label = f"stages[{index}]"
    overrides = _nest(stage.overrides)
    for key in overrides:
        if key in _NOT_IN_OVERRIDES:
            raise ConfigError(f"config key '{label}.overrides.{key}'{where}: not allowed in a stage's overrides "
                              f"(it is {_NOT_IN_OVERRIDES[key]} setting)")
    if stage.max_steps is None and stage.max_tokens is None:
        raise ConfigError(f"config key '{label}.max_steps'{where}: stage {stage.name!r} needs a budget: "
                          f"max_steps or max_tokens")
    base = copy.deepcopy(cfg)
    base.stages, base.run_stages = [], []
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), overrides)
        out: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise config_error(e, f"{label}.overrides.", where) from None
    out.run_dir = str(Path(cfg.run_dir) / "stages" / f"{index}-{stage.name}")
    out.kind = stage.kind
    apply_kind_defaults(out)
    out.max_steps, out.max_tokens = stage.max_steps, stage.max_tokens
    out.lr_multipliers = dict(stage.lr_multipliers)
    try:
        validate(out)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name!r} ({label}): {e}") from None
    if out.lora.enabled:
        raise ConfigError(f"config key '{label}.overrides.lora.enabled'{where}: LoRA runs are not curriculum stages; "
                          f"run them on their own with the last stage's export as lora.init_from")
    if not out.checkpoint.export:
        raise ConfigError(f"config key '{label}.overrides.checkpoint.export'{where}: every stage must export (the "
                          f"next stage starts from it, and its DONE marker follows it)")
    return out


def validate_stages(cfg: TrainConfig, where: str = "") -> None:
    """Names, the stage selection, and every stage's merged config: all checked before any work starts."""
    _validate_stage_list(cfg)
    for index in range(len(cfg.stages)):
        stage_config(cfg, index, where)


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def run_curriculum(cfg: TrainConfig) -> Dict[str, Any]:
    """Runs the selected stages that are not done, in order (every rank calls it); returns the summary."""
    from train.engine import init_distributed
    from train.loop import run
    from train.metrics import make_sink

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

"""Loading a recipe: YAML + dotted command-line overrides -> a validated TrainConfig (train.config's schema).

Here are the checks the schema's types cannot express and the curriculum's stage rules (each stage's config:
the top level with the stage's overrides merged over it). An unknown key, a wrong type or a bad value fails
at load time with a ConfigError naming the key, for every stage, before any work starts.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.lalm import ATTENTION_CHOICES
from train.config import PARAM_GROUPS, TrainConfig
from train.schedule import SCHEDULES

# What a run (or a curriculum stage) trains with: supervised next-token loss, or an RL algorithm (train.rl).
KINDS = ("sft", "dpo", "grpo", "ppo", "reward_model")
# rl.reference values: how the frozen reference policy is held (see RLConfig.reference).
REFERENCES = ("auto", "copy", "adapters_off", "none")

# eval.metric values (train.evaluate.run_eval).
EVAL_METRICS = ("wer", "code_accuracy", "bleu", "paralinguistic", "speaker_similarity")

# The decoder layer's linear layers LoRA may target (lora.target_modules).
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


def _stage_selection(item: str) -> Optional[List[str]]:
    """`stages=[a,b]` on the command line names stages to run; returns the names, or None for other items."""
    key, _, value = item.partition("=")
    if key.strip() != "stages":
        return None
    names = OmegaConf.from_dotlist([f"x={value}"]).x
    names = [names] if isinstance(names, str) else names
    if not OmegaConf.is_list(names) and not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"override {item!r}: expected stages=[name,...] with stage names of the recipe")
    return list(names)


def _update_stage(merged, item: str) -> None:
    """Applies `stages[i].key=value` (or `stages.i.key=value`) to the merged recipe; the key must exist."""
    key, _, value = item.partition("=")
    match = re.match(r"^stages(?:\[(\d+)\]|\.(\d+))\.(.+)$", key.strip())
    if match is None:
        raise ConfigError(f"override {item!r}: expected stages[INDEX].key=value, e.g. stages[1].max_steps=500")
    index = int(match.group(1) or match.group(2))
    if index >= len(merged.stages):
        raise ConfigError(f"override {item!r}: the recipe has {len(merged.stages)} stages (indices from 0)")
    parsed = OmegaConf.from_dotlist([f"x={value}"]).x
    value = OmegaConf.to_container(parsed) if OmegaConf.is_config(parsed) else parsed
    OmegaConf.update(merged, f"stages[{index}].{match.group(3)}", value, merge=True)


def config_error(e: OmegaConfBaseException, prefix: str, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    first = str(e).splitlines()[0]
    return ConfigError(f"config key '{prefix}{key}'{where}: {first}")


def load_config(recipe: Optional[str] = None, overrides: List[str] = ()) -> TrainConfig:
    """Recipe YAML + dotted `key=value` overrides -> a validated TrainConfig (ConfigError names the key).

    `stages=[name,...]` selects curriculum stages to run. Every stage's merged config is built and
    validated here, before any work starts."""
    schema = OmegaConf.structured(TrainConfig)
    layers = []
    selected: Optional[List[str]] = None
    where = f" in {recipe}" if recipe else ""
    try:
        if recipe is not None:
            path = Path(recipe)
            if not path.is_file():
                raise ConfigError(f"recipe not found: {recipe}")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, type(schema)):
                raise ConfigError(f"recipe {recipe} must be a YAML mapping at the top level")
            layers.append(loaded)
        stage_items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like dotted.key=value")
            names = _stage_selection(item)
            if names is not None:
                selected = names
            elif item.startswith(("stages.", "stages[")):
                stage_items.append(item)  # e.g. stages[1].max_steps=5: one stage's own field
            else:
                layers.append(OmegaConf.from_dotlist([item]))
        merged = OmegaConf.merge(schema, *layers)
        for item in stage_items:
            _update_stage(merged, item)
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise config_error(e, "", where) from None
    if selected is not None:
        cfg.run_stages = selected
    if not cfg.stages:
        if cfg.run_stages:
            raise ConfigError(f"config key 'stages' = {cfg.run_stages!r}: the recipe has no stages to select")
        apply_kind_defaults(cfg)
        validate(cfg)
        return cfg
    validate_stages(cfg, where)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks the schema's types cannot express; each error names the key and the allowed values."""
    def bad(key, value, expected):
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")

    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        bad("engine.zero_stage", cfg.engine.zero_stage, "0, 1, 2 or 3")
    if cfg.engine.precision not in ("fp32", "bf16"):
        bad("engine.precision", cfg.engine.precision, "fp32 or bf16")
    if cfg.engine.grad_accum_steps < 1:
        bad("engine.grad_accum_steps", cfg.engine.grad_accum_steps, "an integer >= 1")
    if cfg.max_steps is None and cfg.max_tokens is None:
        bad("max_steps", cfg.max_steps, "a budget: max_steps, max_tokens or both")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        bad("max_steps", cfg.max_steps, "an integer >= 1")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        bad("max_tokens", cfg.max_tokens, "an integer >= 1 (or unset)")
    if cfg.data.batch_size < 1:
        bad("data.batch_size", cfg.data.batch_size, "an integer >= 1")
    if cfg.eval.batch_size < 1:
        bad("eval.batch_size", cfg.eval.batch_size, "an integer >= 1")
    if not cfg.data.shards and not cfg.data.datasets:
        bad("data.shards", cfg.data.shards, "at least one shard folder, glob or pattern (or data.datasets)")
    if cfg.data.shards and cfg.data.datasets:
        bad("data.shards", cfg.data.shards, "empty when data.datasets is set (one or the other)")
    if not cfg.data.tokenizer:
        bad("data.tokenizer", cfg.data.tokenizer, "the path of a tokenizer folder")
    if len(cfg.optim.betas) != 2:
        bad("optim.betas", cfg.optim.betas, "two numbers")
    if cfg.optim.lr <= 0:
        bad("optim.lr", cfg.optim.lr, "a positive number")
    if cfg.optim.schedule not in SCHEDULES:
        bad("optim.schedule", cfg.optim.schedule, ", ".join(SCHEDULES))
    if cfg.optim.warmup_steps < 0:
        bad("optim.warmup_steps", cfg.optim.warmup_steps, "an integer >= 0")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        bad("optim.min_lr_ratio", cfg.optim.min_lr_ratio, "a number in [0, 1]")
    if not 0.0 < cfg.optim.decay_ratio <= 1.0:
        bad("optim.decay_ratio", cfg.optim.decay_ratio, "a number in (0, 1]")
    unknown = [g for g in cfg.model.trainable if g not in PARAM_GROUPS]
    if unknown:
        bad("model.trainable", cfg.model.trainable, f"names from {sorted(PARAM_GROUPS)}")
    if not cfg.model.trainable:
        bad("model.trainable", cfg.model.trainable, "at least one parameter group")
    for group, multiplier in cfg.lr_multipliers.items():
        if group not in PARAM_GROUPS:
            bad(f"lr_multipliers.{group}", multiplier, f"group names from {sorted(PARAM_GROUPS)}")
        if group not in cfg.model.trainable and not cfg.lora.enabled:
            bad(f"lr_multipliers.{group}", multiplier, f"a group that trains (model.trainable = {cfg.model.trainable})")
        if not multiplier > 0:
            bad(f"lr_multipliers.{group}", multiplier, "a positive number (freeze a group by leaving it out of "
                                                       "model.trainable)")
    if any(p not in ("encoder", "decoder") for p in cfg.model.gradient_checkpointing):
        bad("model.gradient_checkpointing", cfg.model.gradient_checkpointing, "a list from [encoder, decoder]")
    if cfg.model.attention not in ATTENTION_CHOICES:
        bad("model.attention", cfg.model.attention, ", ".join(ATTENTION_CHOICES))
    parts = cfg.model.init_parts
    if bool(parts.qwen) != bool(parts.audio_encoder):
        bad("model.init_parts", {"qwen": parts.qwen, "audio_encoder": parts.audio_encoder},
            "both folders (qwen and audio_encoder) or neither")
    if parts.qwen and cfg.model.init_from:
        bad("model.init_from", cfg.model.init_from, "unset when model.init_parts is given (one starting point)")
    if parts.qwen and cfg.lora.enabled:
        bad("model.init_parts", parts.qwen, "unset when lora.enabled (the base is lora.init_from)")
    if cfg.eval.metric not in EVAL_METRICS:
        bad("eval.metric", cfg.eval.metric, ", ".join(EVAL_METRICS))
    if cfg.checkpoint.keep_last < 1:
        bad("checkpoint.keep_last", cfg.checkpoint.keep_last, "an integer >= 1")
    if cfg.resilience.watchdog_s < 0:
        bad("resilience.watchdog_s", cfg.resilience.watchdog_s, "seconds >= 0 (0 disables)")
    if cfg.resilience.collective_timeout_s <= 0:
        bad("resilience.collective_timeout_s", cfg.resilience.collective_timeout_s, "positive seconds")
    if cfg.lora.enabled:
        if not cfg.lora.init_from:
            bad("lora.init_from", cfg.lora.init_from, "the StepFun-layout folder of the frozen base model")
        if cfg.model.init_from:
            bad("model.init_from", cfg.model.init_from, "unset when lora.enabled (the base is lora.init_from)")
        if cfg.lora.r < 1:
            bad("lora.r", cfg.lora.r, "an integer >= 1")
        if not 0.0 <= cfg.lora.dropout < 1.0:
            bad("lora.dropout", cfg.lora.dropout, "a number in [0, 1)")
        unknown = [m for m in cfg.lora.target_modules if m not in DECODER_LINEARS]
        if unknown:
            bad("lora.target_modules", cfg.lora.target_modules, f"names from {list(DECODER_LINEARS)}")
        if not cfg.lora.target_modules and not cfg.lora.adapter:
            bad("lora.target_modules", cfg.lora.target_modules, "at least one layer name, or lora.adapter=true")
    validate_rl(cfg)
    catchable = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
    if any(s not in catchable for s in cfg.resilience.preempt_signals):
        bad("resilience.preempt_signals", cfg.resilience.preempt_signals, f"names from {', '.join(catchable)}")


KIND_RENDER = {"sft": "full", "dpo": "pairs", "reward_model": "pairs", "grpo": "prompt", "ppo": "prompt"}


def apply_kind_defaults(cfg: TrainConfig) -> None:
    """An RL kind reads its data rendered its way: data.render left at "full" becomes the kind's (prompt or
    pairs), so a recipe need not repeat it per stage. Any other value is kept (and validated)."""
    if cfg.kind in KIND_RENDER and getattr(cfg.data, "render", "full") == "full" and hasattr(cfg.data, "render"):
        cfg.data.render = KIND_RENDER[cfg.kind]


def validate_rl(cfg: TrainConfig) -> None:
    """The kind and the rl.* knobs it uses; each error names the key."""
    def bad(key, value, expected):
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")

    rl, kind = cfg.rl, cfg.kind
    if kind not in KINDS:
        bad("kind", kind, ", ".join(KINDS))
    render = getattr(cfg.data, "render", "full")
    wanted = KIND_RENDER[kind]
    if render != wanted:
        bad("data.render", render, f"{wanted} for kind={kind}")
    if kind == "sft":
        return
    if cfg.data.batching != "fixed":
        bad("data.batching", cfg.data.batching, f"fixed for kind={kind} (data.batch_size prompts or pairs per rank)")
    if kind in ("grpo", "ppo"):
        if rl.num_generations < 1 or (kind == "grpo" and rl.num_generations < 2):
            bad("rl.num_generations", rl.num_generations, "an integer >= 2 for grpo (a group), >= 1 for ppo")
        if not rl.temperature > 0:
            bad("rl.temperature", rl.temperature, "a positive number (the log-probabilities are computed at it)")
        if not 0.0 < rl.top_p <= 1.0:
            bad("rl.top_p", rl.top_p, "a number in (0, 1]")
        if rl.max_new_tokens < 1:
            bad("rl.max_new_tokens", rl.max_new_tokens, "an integer >= 1")
        if rl.epochs < 1:
            bad("rl.epochs", rl.epochs, "an integer >= 1")
        answers = cfg.data.batch_size * rl.num_generations
        if rl.num_minibatches < 1 or answers % rl.num_minibatches:
            bad("rl.num_minibatches", rl.num_minibatches,
                f"an integer >= 1 dividing the answers per rank per step (data.batch_size x rl.num_generations "
                f"= {answers})")
        if (answers // rl.num_minibatches) % cfg.engine.grad_accum_steps:
            bad("engine.grad_accum_steps", cfg.engine.grad_accum_steps,
                f"a divisor of the answers per minibatch ({answers // rl.num_minibatches})")
        if not 0.0 < rl.clip < 1.0:
            bad("rl.clip", rl.clip, "a number in (0, 1)")
        if rl.kl_coef < 0:
            bad("rl.kl_coef", rl.kl_coef, "a number >= 0")
        if rl.kl_estimator not in ("k1", "k2", "k3"):
            bad("rl.kl_estimator", rl.kl_estimator, "k1, k2 or k3")
        if rl.reference not in REFERENCES:
            bad("rl.reference", rl.reference, ", ".join(REFERENCES))
        if rl.kl_coef > 0 and rl.reference == "none":
            bad("rl.reference", rl.reference, "a reference (auto, copy or adapters_off) when rl.kl_coef > 0")
        if rl.reference == "adapters_off" and not cfg.lora.enabled:
            bad("rl.reference", rl.reference, "copy, auto or none without LoRA (adapters_off needs lora.enabled)")
        if not rl.rewards:
            bad("rl.rewards", rl.rewards, f"at least one reward component for kind={kind}")
        for i, reward in enumerate(rl.rewards):
            if bool(reward.function) == bool(reward.model):
                bad(f"rl.rewards[{i}]", {"function": reward.function, "model": reward.model},
                    "exactly one of function (module:function) and model (a score-model folder)")
            if reward.function and (reward.function.count(":") != 1 or not all(reward.function.split(":"))):
                bad(f"rl.rewards[{i}].function", reward.function, "module:function")
            if not re.match(r"^[A-Za-z0-9_-]+$", reward.name or ""):
                bad(f"rl.rewards[{i}].name", reward.name, "a name of letters, digits, - and _")
        names = [r.name for r in rl.rewards]
        if len(set(names)) != len(names):
            bad("rl.rewards", names, "unique names")
        if not 0.0 <= rl.gamma <= 1.0:
            bad("rl.gamma", rl.gamma, "a number in [0, 1]")
        if not 0.0 <= rl.lam <= 1.0:
            bad("rl.lam", rl.lam, "a number in [0, 1]")
        if rl.value_clip < 0:
            bad("rl.value_clip", rl.value_clip, "a number >= 0 (0 = unclipped)")
        if rl.critic_lr is not None and not rl.critic_lr > 0:
            bad("rl.critic_lr", rl.critic_lr, "a positive number (or unset: optim.lr)")
        if rl.critic_warmup_steps < 0:
            bad("rl.critic_warmup_steps", rl.critic_warmup_steps, "an integer >= 0")
    if rl.placebo and kind not in ("grpo", "ppo"):
        bad("rl.placebo", True, f"false for kind={kind} (a placebo permutes the rewards of grpo/ppo rollouts)")
    if kind == "dpo":
        if not rl.beta > 0:
            bad("rl.beta", rl.beta, "a positive number")
        if not 0.0 <= rl.label_smoothing < 0.5:
            bad("rl.label_smoothing", rl.label_smoothing, "a number in [0, 0.5)")
        if rl.sft_coef < 0:
            bad("rl.sft_coef", rl.sft_coef, "a number >= 0")
    if kind == "reward_model" and cfg.lora.enabled:
        bad("lora.enabled", True, "false for kind=reward_model (a LoRA reward model's export is not supported yet)")
    if kind == "reward_model" and rl.center_coef < 0:
        bad("rl.center_coef", rl.center_coef, "a number >= 0")


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML: what a run writes beside its checkpoints, and --print-config shows."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------------------------------- stages

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

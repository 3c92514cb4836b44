"""The training config tree: one typed schema for recipes and command-line overrides.

A recipe is YAML data merged onto these dataclasses through omegaconf; an unknown key or a wrong type
fails at load time naming the key. The DeepSpeed JSON is generated from this tree (`deepspeed_config`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.loader import DataConfig

# Parameter groups a recipe can train or freeze, by StepFun parameter-name prefix.
PARAM_GROUPS = {
    "encoder": ("encoder.",),
    "adapter": ("adapter.",),
    "embeddings": ("model.embed_tokens.",),
    "decoder": ("model.layers.", "model.norm."),
    "lm_head": ("lm_head.",),
}

# The decoder layer's linear layers LoRA may target (lora.target_modules).
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


@dataclass
class ModelConfig:
    preset: str = "demo"
    """Size preset of model.config.preset_config: tiny (tests), demo (CPU minutes), mini (8B shape)."""
    init_from: Optional[str] = None
    """A folder in StepFun's layout to start from (config.json + safetensors); None = fresh weights."""
    vocab_size: Optional[int] = None
    """Rows of the embeddings and output layer; None = the tokenizer's length rounded up to 64."""
    trainable: List[str] = field(default_factory=lambda: ["encoder", "adapter", "embeddings", "decoder", "lm_head"])
    """Parameter groups that train (encoder, adapter, embeddings, decoder, lm_head); others stay frozen."""
    gradient_checkpointing: List[str] = field(default_factory=list)
    """Parts whose activations are recomputed in the backward pass to save memory: [encoder, decoder]."""
    attention: str = "auto"
    """Decoder attention kernel: auto (flash-attention 2 when installed on a GPU, else sdpa), sdpa, eager or
    flash_attention_2."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to matrices only (not to biases and norms)."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr over this many optimizer steps."""
    decay_steps: Optional[int] = None
    """Length of the cosine schedule in optimizer steps; None = max_steps. Set it to stop a run early
    on the same schedule it would follow to the end."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (3 also partitions parameters; the model is then built under zero.Init)."""
    precision: str = "fp32"
    """fp32 or bf16 (bf16 keeps fp32 master weights in the optimizer)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed keys merged over the generated JSON (for options this schema does not cover)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Save a checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints; older ones are deleted after a new one is complete."""
    resume: str = "auto"
    """auto = continue from the run folder's latest checkpoint if there is one; none = start fresh;
    or the path of a checkpoint folder to resume from."""
    export: bool = True
    """Write the final weights in StepFun's layout to RUN_DIR/export at the end."""


@dataclass
class MetricsConfig:
    log_every: int = 10
    """Log loss, learning rate and throughput every N optimizer steps."""
    progress: bool = True
    """Show a progress bar on the console (rank 0)."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless WANDB_MODE says otherwise; needs `pip install wandb`)."""
    wandb_project: str = "stepaudio2"
    """The wandb project name."""


@dataclass
class EvalConfig:
    shards: List[str] = field(default_factory=list)
    """Held-out ASR shards (folders with index.json, globs or brace patterns); empty = no evaluation."""
    max_samples: int = 64
    """Evaluate on at most this many held-out samples (in file order)."""
    max_new_tokens: int = 64
    """Greedy decoding stops after this many tokens if no end token came."""
    at_start: bool = True
    """Evaluate before the first step (the untrained baseline)."""
    at_end: bool = True
    """Evaluate after the last step."""
    every_steps: int = 0
    """Also evaluate every N steps; 0 = never in between."""


@dataclass
class ResilienceConfig:
    watchdog_s: float = 1800.0
    """No step finished for this many seconds -> every rank dumps its threads' stacks to
    RUN_DIR/watchdog/rank_N.txt and exits non-zero; 0 disables the watchdog."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this for a peer (e.g. a dead rank on another node) fails."""
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals that mean: finish the current step, write a checkpoint, exit with code 75 (requeue)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train peft LoRA adapters on a frozen base (lora.init_from) instead of the model's own weights."""
    r: int = 16
    """Rank of each LoRA update."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers of the decoder (under model.layers) that get LoRA, by their last name."""
    adapter: bool = False
    """Also put LoRA on the audio adapter's adapter.linear1 and adapter.linear2."""
    train_audio_rows: bool = False
    """Train the audio-token rows of model.embed_tokens and lm_head (needed to learn a voice); text rows
    stay frozen. Done with peft's trainable tokens: a small delta parameter over just those rows."""
    init_from: Optional[str] = None
    """The StepFun-layout folder (a release or an export of ours) whose weights are the frozen base;
    required when enabled (model.init_from must then stay unset)."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Folder for checkpoints, metrics.jsonl, the resolved config and the export."""
    seed: int = 0
    """Seeds the weights, the data order and every random number generator."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def load_config(recipe: Optional[str] = None, overrides: List[str] = ()) -> TrainConfig:
    """Recipe YAML + dotted `key=value` overrides -> a validated TrainConfig (ConfigError names the key)."""
    schema = OmegaConf.structured(TrainConfig)
    layers = []
    try:
        if recipe is not None:
            path = Path(recipe)
            if not path.is_file():
                raise ConfigError(f"recipe not found: {recipe}")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, type(schema)):
                raise ConfigError(f"recipe {recipe} must be a YAML mapping at the top level")
            layers.append(loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like dotted.key=value")
            layers.append(OmegaConf.from_dotlist([item]))
        merged = OmegaConf.merge(schema, *layers)
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        first = str(e).splitlines()[0]
        where = f" in {recipe}" if recipe else ""
        raise ConfigError(f"config key '{key}'{where}: {first}") from None
    validate(cfg)
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
    if cfg.max_steps < 1:
        bad("max_steps", cfg.max_steps, "an integer >= 1")
    if cfg.data.batch_size < 1:
        bad("data.batch_size", cfg.data.batch_size, "an integer >= 1")
    if not cfg.data.shards:
        bad("data.shards", cfg.data.shards, "at least one shard folder, glob or pattern")
    if not cfg.data.tokenizer:
        bad("data.tokenizer", cfg.data.tokenizer, "the path of a tokenizer folder")
    if len(cfg.optim.betas) != 2:
        bad("optim.betas", cfg.optim.betas, "two numbers")
    if cfg.optim.lr <= 0:
        bad("optim.lr", cfg.optim.lr, "a positive number")
    unknown = [g for g in cfg.model.trainable if g not in PARAM_GROUPS]
    if unknown:
        bad("model.trainable", cfg.model.trainable, f"names from {sorted(PARAM_GROUPS)}")
    if any(p not in ("encoder", "decoder") for p in cfg.model.gradient_checkpointing):
        bad("model.gradient_checkpointing", cfg.model.gradient_checkpointing, "a list from [encoder, decoder]")
    if cfg.model.attention not in ("auto", "sdpa", "eager", "flash_attention_2"):
        bad("model.attention", cfg.model.attention, "auto, sdpa, eager or flash_attention_2")
    if not cfg.model.trainable:
        bad("model.trainable", cfg.model.trainable, "at least one parameter group")
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
    catchable = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
    if any(s not in catchable for s in cfg.resilience.preempt_signals):
        bad("resilience.preempt_signals", cfg.resilience.preempt_signals, f"names from {', '.join(catchable)}")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def deepspeed_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The DeepSpeed JSON, generated from the config tree; engine.deepspeed keys are merged over it."""
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        # Our AdamW and schedule are passed in as client objects; DeepSpeed must accept them under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our metrics sink reports; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.engine.zero_stage == 3:
        # Export needs the full weights gathered on rank 0.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return _deep_merge(ds, cfg.engine.deepspeed)


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out

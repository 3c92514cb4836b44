"""The training config tree: one typed schema for recipes and command-line overrides, every field documented.

A recipe is YAML data for these dataclasses; train.recipe loads it (merging the overrides, naming the key of
any unknown field, wrong type or bad value) and holds the stage rules. The DeepSpeed JSON is generated from
this tree beside the engine seam (train.engine.deepspeed_config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from data.loading.loader import DataConfig

# Parameter groups a recipe can train or freeze, by StepFun parameter-name prefix.
PARAM_GROUPS = {
    "encoder": ("encoder.",),
    "adapter": ("adapter.",),
    "embeddings": ("model.embed_tokens.",),
    "decoder": ("model.layers.", "model.norm."),
    "lm_head": ("lm_head.",),
}


@dataclass
class InitPartsConfig:
    """A model built from parts: the vocabulary grows to data.tokenizer's once, into RUN_DIR/init/."""
    qwen: Optional[str] = None
    """Folder of a Qwen2.5 decoder (transformers layout: config.json + safetensors)."""
    audio_encoder: Optional[str] = None
    """Folder of a Qwen2-Audio model (or its bare encoder) whose audio tower becomes the encoder."""


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
    """Decoder attention kernel: auto (flash-attention 2 on a GPU in bf16 when installed, else varlen_sdpa:
    packed rows cost their samples' attention either way), varlen_sdpa, sdpa (a dense block-diagonal mask for
    packed rows), eager or flash_attention_2."""
    init_parts: InitPartsConfig = field(default_factory=InitPartsConfig)
    """Start from a Qwen2.5 decoder and a Qwen2-Audio encoder instead of init_from (the paper's stage 1)."""


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
    """Linear warmup from 0 to lr over this many optimizer steps (again at each stage's start)."""
    schedule: str = "cosine"
    """After the warmup: cosine, linear (both decay to the floor over the budget), constant, or wsd
    (warmup-stable-decay: the peak, then a linear decay over the last decay_ratio of the budget)."""
    decay_steps: Optional[int] = None
    """Length of the schedule in optimizer steps; None = max_steps. Set it to stop a run early on the
    same schedule it would follow to the end. Unused with a token budget (max_tokens)."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio (constant: unused)."""
    decay_ratio: float = 0.1
    """wsd only: the final fraction of the budget over which the lr decays to the floor."""
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
    sample_keys: bool = False
    """Write the key and epoch of every sample each rank trains on to RUN_DIR/sample_keys/rank_N.jsonl
    (one line per micro-batch: step, keys, epochs), to audit what a run saw. A resumed run first drops the
    lines of steps after its checkpoint (a killed attempt's rolled-back steps), so each step appears once."""


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
    batch_size: int = 8
    """Held-out prompts decoded (or teacher-forced) together per forward, on each rank; the samples are split
    across ranks, and the metric does not depend on either."""
    metric: str = "wer"
    """wer (ASR, lower is better), code_accuracy (teacher-forced accuracy of audio-code answers, higher is
    better), bleu (speech translation, sacrebleu corpus BLEU 0-100), paralinguistic (answers about the voice
    matched to each attribute's labels: mean per-attribute accuracy, higher is better) or speaker_similarity
    (cosine between a spoken answer's voice and the clip in its prompt, by the eval.speaker_model encoder;
    higher is better)."""
    speaker_model: Optional[str] = None
    """speaker_similarity: the speaker encoder (`python -m train.speaker_encoder fit`); None:
    runs/speaker/speaker.pt."""
    vocoder: Optional[str] = None
    """speaker_similarity: how answers' codes become audio (kmeans:FILE.pt or token2wav:MODULE:ATTR); None: the
    codec named in the held-out shards' tokenizer.json."""


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
    adapter_init: Optional[str] = None
    """A peft adapter folder (a LoRA run's RUN_DIR/adapter) to start the adapters from instead of fresh ones:
    tuning an existing adapter further, e.g. RL after a LoRA SFT. Its settings (r, targets) must match."""


@dataclass
class RewardConfig:
    """One component of the reward; the reward of an answer is the weighted sum of the components."""
    name: str = ""
    """Its name in the metrics (reward/<name>_mean, reward/<name>_std)."""
    function: Optional[str] = None
    """`module:function` called as function(samples) with a list of train.rl.rewards.RolloutSample
    (prompt metadata, answer text, audio codes, ...); returns one float per sample (a list or a tensor)."""
    model: Optional[str] = None
    """A score-model folder (a `kind: reward_model` run's export, or `stage:NAME` for that curriculum
    stage's export): its score at the answer's last token."""
    weight: float = 1.0
    """Multiplier of this component in the sum."""
    args: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments the function is called with (function(samples, **args)); see train.rl.rule_rewards."""


@dataclass
class RLConfig:
    """Knobs of the RL kinds (dpo, grpo, ppo, reward_model); a plain SFT run ignores them. Defaults follow
    what TRL and OpenRLHF users expect. Rollout batch = data.batch_size prompts per rank per step (with
    data.render=prompt), each answered num_generations times."""
    # --- rollouts (grpo, ppo)
    num_generations: int = 4
    """Answers per prompt (GRPO's group; PPO usually 1)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; the log-probabilities of the loss are computed at the same one."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1 = off)."""
    max_new_tokens: int = 256
    """An answer that has not ended (<|EOT|>) after this many tokens is cut there; see truncated_reward."""
    truncated_reward: Optional[float] = None
    """Reward given to a cut answer instead of its scored reward (None: score it like any other)."""
    # --- updates (grpo, ppo)
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    num_minibatches: int = 1
    """Optimizer steps per epoch: the rollout batch is cut into this many minibatches."""
    clip: float = 0.2
    """Clip range of the importance ratio."""
    # --- KL to the reference policy (grpo, ppo)
    kl_coef: float = 0.0
    """Weight of the KL term (GRPO's beta; PPO's KL penalty). 0 = no reference model is built at all."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (see train.rl.losses.kl_per_token)."""
    kl_in_reward: bool = False
    """PPO: subtract kl_coef x KL from each token's reward (TRL/OpenRLHF's default) instead of adding
    kl_coef x KL to the loss. GRPO always adds it to the loss."""
    reference: str = "auto"
    """How the reference is held: copy (a frozen copy of the starting policy, partitioned under ZeRO-3),
    adapters_off (LoRA: the base with the adapters disabled, no second copy; wrong when lora.adapter_init
    tunes an existing adapter further, then a frozen copy of that adapter is used), none, or auto (LoRA:
    adapters_off, or a frozen copy of the starting adapter; else copy)."""
    reference_offload: bool = False
    """ZeRO-3: keep the reference's partitions in CPU memory (DeepSpeed parameter offload)."""
    # --- PPO
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the rollout batch of each rank."""
    value_clip: float = 0.2
    """Clip range of the critic's values around the rollout's (0 = unclipped)."""
    critic_lr: Optional[float] = None
    """The critic's peak learning rate (None: optim.lr); the schedule is the policy's."""
    critic_init: Optional[str] = None
    """Folder the critic starts from: a score model (its head too) or a causal LM (a fresh head). None: the
    first reward model of rl.rewards if there is one, else the policy's starting folder."""
    critic_warmup_steps: int = 0
    """The first N steps train only the critic (the policy waits for useful values)."""
    # --- GRPO
    scale_rewards: bool = True
    """Divide each group's centred rewards by the group's std (False: Dr. GRPO's unscaled advantages)."""
    # --- rewards (grpo, ppo)
    rewards: List[RewardConfig] = field(default_factory=list)
    """The reward's components, summed with their weights; each is logged."""
    placebo: bool = False
    """A control run: the policy learns from the rewards permuted across each rank's rollout batch (the same
    values, dealt to the wrong answers); the logged rewards are the true ones. What a placebo gains is what
    the real run's gains must beat."""
    # --- DPO
    beta: float = 0.1
    """DPO's temperature of the implicit reward."""
    label_smoothing: float = 0.0
    """Conservative DPO: the share of pairs assumed mislabelled."""
    precompute_reference: bool = True
    """DPO: compute the reference's log-probabilities of every pair once before training (a pass over the
    pair shards) and drop the reference model, instead of holding it for every step."""
    sft_coef: float = 0.0
    """DPO: add this times the chosen answers' cross-entropy (CosyVoice-style regularisation)."""
    # --- reward model
    center_coef: float = 0.0
    """Reward model: weight of the centring term mean((s_chosen + s_rejected)^2)."""
    eval_pairs: List[str] = field(default_factory=list)
    """Reward model and DPO: held-out preference shards; their pairwise accuracy is logged at the start, at the
    end and with eval.every_steps."""


@dataclass
class StageConfig:
    """One stage of a curriculum: its budget, its learning-rate multipliers, and what it changes."""
    name: str = ""
    """Stage name (letters, digits, - and _); its run folder is RUN_DIR/stages/<index>-<name>."""
    kind: str = "sft"
    """What the stage trains with: sft, dpo, grpo, ppo or reward_model (see TrainConfig.kind)."""
    max_steps: Optional[int] = None
    """Budget in optimizer steps (with max_tokens too: whichever is reached first)."""
    max_tokens: Optional[int] = None
    """Budget in real decoder tokens summed over all ranks; the schedule's progress then counts tokens."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Config keys merged over the top-level config for this stage, nested (optim: {lr: 2e-5}) or dotted
    (optim.lr: 2e-5): data mixture, model.trainable, optim.*, eval.*, engine.grad_accum_steps, ..."""
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    """Per parameter group (encoder, adapter, embeddings, decoder, lm_head): lr = optim.lr x multiplier;
    unlisted trained groups get 1.0."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Folder for checkpoints, metrics.jsonl, the resolved config and the export (a curriculum: one
    sub-folder per stage under RUN_DIR/stages/)."""
    seed: int = 0
    """Seeds the weights, the data order and every random number generator."""
    kind: str = "sft"
    """sft (next-token loss on data.shards), dpo (preference pairs, data.render=pairs), grpo or ppo (rollouts
    on prompts, data.render=prompt, rewards from rl.rewards), reward_model (a scalar head trained on
    preference pairs; exports a score model). See rl.*; a curriculum stage sets its own."""
    max_steps: Optional[int] = 1000
    """Optimizer steps to train for; None = only max_tokens limits the run."""
    max_tokens: Optional[int] = None
    """Token budget: stop once this many real decoder tokens (summed over ranks) are trained on; the
    schedule's progress then counts tokens. None = a step budget only."""
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    """Per parameter group (encoder, adapter, embeddings, decoder, lm_head): lr = optim.lr x multiplier;
    unlisted trained groups get 1.0. In a curriculum each stage sets its own."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    stages: List[StageConfig] = field(default_factory=list)
    """A curriculum: stages run in order, each from the previous one's export. Empty = one plain run."""
    run_stages: List[str] = field(default_factory=list)
    """Names of the stages to run (command line: `stages=[name]`); empty = all of them, done ones skipped."""

"""`accelerate launch ... -m train RECIPE` as a launcher: what accelerate's environment asks of a rank.

accelerate starts ranks through torchrun (`--multi_gpu`, automatic with two or more GPUs, or a DeepSpeed
config), which sets RANK / WORLD_SIZE exactly as our launcher does. Two things need our config's terms:
- its DeepSpeed plugin and mixed precision arrive as ACCELERATE_* variables, which accelerate_overrides
  turns into dotted overrides (the DeepSpeed JSON is always generated from the recipe);
- without GPUs and without `--multi_gpu`, accelerate starts ONE process whatever --num_processes says; a
  rank that would then train alone is refused by check_accelerate_processes.
"""
from __future__ import annotations

import os
from typing import List, Mapping, Optional

# accelerate sets this in every process it starts, whichever of its launchers it used.
ACCELERATE_MARKER = "ACCELERATE_MIXED_PRECISION"
# accelerate's DeepSpeed plugin variables -> our config keys.
_DEEPSPEED_KEYS = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "engine.zero_stage",
                   "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "engine.grad_accum_steps",
                   "ACCELERATE_GRADIENT_CLIPPING": "optim.grad_clip"}
# Settings with no counterpart here: where to say it instead.
_REFUSED = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "the DeepSpeed JSON is generated from the recipe; put extra "
                                                "DeepSpeed keys under engine.deepspeed",
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "set engine.deepspeed.zero_optimization.offload_optimizer "
                                                             "in the recipe",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "set engine.deepspeed.zero_optimization.offload_param in "
                                                         "the recipe"}
# Values accelerate writes when a setting was left at its default.
_UNSET = ("", "none", "null")


def started_by_accelerate(env: Optional[Mapping[str, str]] = None) -> bool:
    return ACCELERATE_MARKER in (os.environ if env is None else env)


def accelerate_overrides(env: Optional[Mapping[str, str]] = None) -> List[str]:
    """Dotted config overrides for what `accelerate launch` was told: `--mixed_precision bf16` ->
    engine.precision=bf16, and with a DeepSpeed config its zero stage, gradient accumulation and clipping.
    [] outside accelerate. ValueError naming the variable for a setting this framework cannot take from
    accelerate (fp16, offload devices, a DeepSpeed JSON of accelerate's), with where to set it instead.

    They go before the command line's own overrides, so `engine.zero_stage=...` given there still wins."""
    env = os.environ if env is None else env
    if not started_by_accelerate(env):
        return []
    out = []
    precision = env[ACCELERATE_MARKER].strip().lower()
    if precision == "bf16":
        out.append("engine.precision=bf16")
    elif precision not in ("no",) + _UNSET:
        raise ValueError(f"accelerate launch --mixed_precision {precision} (ACCELERATE_MIXED_PRECISION): this "
                         f"framework trains in fp32 or bf16; use --mixed_precision bf16 or no")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return out
    for var, why in _REFUSED.items():
        if env.get(var, "").strip().lower() not in _UNSET:
            raise ValueError(f"{var}={env[var]!r} from the accelerate config: not taken from accelerate; {why}")
    for var, key in _DEEPSPEED_KEYS.items():
        value = env.get(var, "").strip()
        if value.lower() not in _UNSET:
            out.append(f"{key}={value}")
    return out


def check_accelerate_processes(env: Optional[Mapping[str, str]] = None) -> None:
    """ValueError when accelerate started this process alone although it was asked for several.

    accelerate's single-process launcher sets MASTER_ADDR only when --num_processes (or --num_machines) is
    above 1, and sets no RANK: such a process would train as a world of one, silently."""
    env = os.environ if env is None else env
    if started_by_accelerate(env) and "RANK" not in env and "MASTER_ADDR" in env:
        raise ValueError("accelerate launch started this as its only process although several were asked for: "
                         "without GPUs it starts several only through its torchrun path. Add --multi_gpu (with "
                         "STEPAUDIO_DEVICE=cpu the ranks run on CPU over gloo), or use a DeepSpeed config file")

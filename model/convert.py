"""`python -m model.convert SRC DST`: a checkpoint the project knows -> a folder in StepFun's layout.

SRC is a StepFun-layout folder, or a training checkpoint of ours: RUN_DIR/checkpoints/step_N (DeepSpeed
files + config.yaml), RUN_DIR/checkpoints or RUN_DIR (then the one `latest` names).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from model.checkpoint import (CONFIG_NAME, INDEX_NAME, StepFunLayout, load_stepfun, read_layout,
                              save_stepfun)
from model.config import StepAudio2Config, preset_config

# A training checkpoint may carry the model's own config.json content under this name; when it does, it
# wins over re-deriving the config from config.yaml (preset + tokenizer), which breaks if files moved.
MODEL_CONFIG_NAME = "model_config.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def is_stepfun_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / INDEX_NAME).is_file()


def find_training_checkpoint(path: Union[str, Path]) -> Optional[Path]:
    """The step folder SRC names (itself, or the one `latest` names under SRC or SRC/checkpoints)."""
    path = Path(path)
    if (path / "train_state.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            step_dir = root / latest.read_text(encoding="utf-8").strip()
            if (step_dir / "train_state.json").is_file():
                return step_dir
    return None


def _load_tokenizer(path: str):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def training_config(step_dir: Path, tokenizer_dir: Optional[str] = None) -> Tuple[StepAudio2Config, Any, Optional[Path]]:
    """(model config, tokenizer or None, StepFun folder the run started from or None) of a training checkpoint.

    Mirrors how train.loop.build_model made the model: init_from's config.json, or the preset sized to
    the tokenizer (vocab rounded up to 64, <audio_patch> looked up in it).
    """
    from omegaconf import OmegaConf

    yaml_path = step_dir / "config.yaml"
    if not yaml_path.is_file():
        raise ValueError(f"training checkpoint {step_dir} has no config.yaml (the run's resolved config)")
    run_cfg = OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True)
    model_cfg, data_cfg = run_cfg.get("model", {}), run_cfg.get("data", {})
    tok_path = tokenizer_dir or data_cfg.get("tokenizer")
    tok = None
    if tok_path:
        if not Path(tok_path).is_dir():
            raise ValueError(f"the tokenizer of {step_dir} ({tok_path}, data.tokenizer in its config.yaml) does "
                             f"not exist; pass --tokenizer DIR")
        tok = _load_tokenizer(str(tok_path))
    init_from = model_cfg.get("init_from")
    start = Path(init_from) if init_from else None
    if (step_dir / MODEL_CONFIG_NAME).is_file():
        config = StepAudio2Config.from_dict(json.loads((step_dir / MODEL_CONFIG_NAME).read_text()))
    elif start is not None:
        if not (start / CONFIG_NAME).is_file():
            raise ValueError(f"model.init_from of {step_dir} is {start}, which has no {CONFIG_NAME}")
        config = StepAudio2Config.from_dict(json.loads((start / CONFIG_NAME).read_text()))
    else:
        if tok is None:
            raise ValueError(f"{step_dir}/config.yaml names no data.tokenizer; pass --tokenizer DIR")
        from data.tokenizer import special_ids

        vocab_size = model_cfg.get("vocab_size") or -(-len(tok) // 64) * 64
        config = preset_config(model_cfg.get("preset", "demo"), vocab_size=vocab_size,
                               audio_patch_token_id=special_ids(tok).audio_patch)
    return config, tok, start if start is not None and is_stepfun_folder(start) else None


def _deepspeed_data_classes() -> list:
    """Classes DeepSpeed pickles into its optimizer state (built from their fields: no code of the file runs)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def read_deepspeed_weights(step_dir: Path) -> Dict[str, torch.Tensor]:
    """Full weights of a DeepSpeed checkpoint folder: fp32 master weights for ZeRO 1-3, "module" for stage 0."""
    if not any(step_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        # Stage 0: the module's own state dict is the whole model.
        model_states = step_dir / "mp_rank_00_model_states.pt"
        if not model_states.is_file():
            raise ValueError(f"training checkpoint {step_dir} has neither {model_states.name} nor ZeRO optimizer "
                             f"shards (not a DeepSpeed checkpoint)")
        from train.checkpoint import load_plain

        # Tensors, plain data and DeepSpeed's data classes: a file naming anything else is refused, never run.
        return dict(load_plain(model_states, allowed=_deepspeed_data_classes())["module"])
    # ZeRO 1-3 keep the fp32 weights partitioned in the optimizer shards (stage 3 has no mp_rank_00 file).
    # Only this CLI reads DeepSpeed's files, so the import stays here rather than in model code.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name))


def convert(src: Union[str, Path], dst: Union[str, Path], dtype: Optional[torch.dtype] = None,
            tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write SRC (StepFun folder or training checkpoint) to DST in StepFun's layout; dtype=None keeps dtypes."""
    src = Path(src)
    layout: Optional[StepFunLayout]
    if is_stepfun_folder(src):
        model = load_stepfun(src, dtype=dtype)
        state, config, layout = model.state_dict(), model.config, read_layout(src)
        tok = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    else:
        step_dir = find_training_checkpoint(src)
        if step_dir is None:
            raise ValueError(f"{src} is neither a model folder in StepFun's layout ({CONFIG_NAME} + {INDEX_NAME}) "
                             f"nor a training checkpoint (a step folder with train_state.json, or a run/checkpoints "
                             f"folder with `latest`)")
        config, tok, start = training_config(step_dir, tokenizer_dir)
        state = read_deepspeed_weights(step_dir)
        # Strict: the weights must be exactly what this config builds, names and shapes.
        with torch.device("meta"):
            from model.lalm import StepAudio2ForCausalLM

            expected = {n: tuple(t.shape) for n, t in StepAudio2ForCausalLM(config).state_dict().items()}
        missing = [n for n in expected if n not in state]
        unexpected = sorted(n for n in state if n not in expected)
        wrong = [f"{n} {tuple(state[n].shape)} != {s}" for n, s in expected.items()
                 if n in state and tuple(state[n].shape) != s]
        if missing or unexpected or wrong:
            raise ValueError(f"training checkpoint {step_dir} does not match its model config: missing tensors "
                             f"{missing}, unexpected tensors {unexpected}, shape mismatches {wrong}")
        state = {n: state[n] for n in expected}
        if dtype is not None:
            state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
        layout = read_layout(start) if start is not None else None
    if layout is not None and set(layout.weight_map) != set(state):
        layout = None  # the names changed since that folder: fall back to a fresh split
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    # A StepFun folder keeps its config as it was unless asked to cast; a training run states what it wrote.
    if (dtype is not None or layout is None or not is_stepfun_folder(src)) and len(stored) == 1 and next(iter(stored)) in _DTYPE_NAMES:
        config.torch_dtype = _DTYPE_NAMES[next(iter(stored))]
    return save_stepfun(state, config, dst, tokenizer=tok, max_shard_bytes=max_shard_bytes, layout=layout)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__)
    parser.add_argument("src", help="a StepFun-layout folder, or RUN_DIR, RUN_DIR/checkpoints or a step folder")
    parser.add_argument("dst", help="output folder (replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to write (default: the source's)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="shard size when the source has no shard split to reproduce")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, DTYPES.get(args.dtype), args.tokenizer, int(args.max_shard_gb * 2**30))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

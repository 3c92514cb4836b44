"""`python -m train.export SRC DST`: a training checkpoint of ours -> a model folder in StepFun's layout.

SRC is a step folder (RUN_DIR/checkpoints/step_N: DeepSpeed's files, config.yaml, model_config.json), or
RUN_DIR/checkpoints or RUN_DIR (then the step `latest` names). DST is a model folder like the run's own
RUN_DIR/export, from any checkpoint: the weights (ZeRO 1-3: the fp32 master copy; stage 0: the module's),
the run's tokenizer, and the shard split of the folder the run started from (model.init_from) where the
names still match.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from model.checkpoint import CONFIG_NAME, StepFunLayout, read_layout
from model.config import StepAudio2Config
from model.convert import DTYPES, add_output_arguments, is_stepfun_folder, load_tokenizer, write_export
from train.checkpoint import load_plain

# The model's own config.json content, which train.checkpoint writes into every step folder.
MODEL_CONFIG_NAME = "model_config.json"


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


def training_config(step_dir: Path, tokenizer_dir: Optional[str] = None
                    ) -> Tuple[StepAudio2Config, Any, Optional[StepFunLayout]]:
    """(model config, tokenizer or None, layout of the StepFun folder the run started from or None).

    The config is the checkpoint's model_config.json: the model as the run built it, vocabulary rows
    included, so nothing here re-derives it from the preset and the tokenizer. A checkpoint older than that
    file takes model.init_from's config.json."""
    from omegaconf import OmegaConf

    yaml_path = step_dir / "config.yaml"
    if not yaml_path.is_file():
        raise ValueError(f"training checkpoint {step_dir} has no config.yaml (the run's resolved config)")
    run_cfg = OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True)
    model_cfg, data_cfg = run_cfg.get("model") or {}, run_cfg.get("data") or {}
    tok_path = tokenizer_dir or data_cfg.get("tokenizer")
    tok = None
    if tok_path:
        if not Path(tok_path).is_dir():
            raise ValueError(f"the tokenizer of {step_dir} ({tok_path}, data.tokenizer in its config.yaml) does "
                             f"not exist; pass --tokenizer DIR")
        tok = load_tokenizer(str(tok_path))
    init_from = model_cfg.get("init_from")
    start = Path(init_from) if init_from else None
    if (step_dir / MODEL_CONFIG_NAME).is_file():
        config = StepAudio2Config.from_dict(json.loads((step_dir / MODEL_CONFIG_NAME).read_text()))
    elif start is not None and (start / CONFIG_NAME).is_file():
        config = StepAudio2Config.from_dict(json.loads((start / CONFIG_NAME).read_text()))
    else:
        raise ValueError(f"training checkpoint {step_dir} has no {MODEL_CONFIG_NAME} (it predates that file) and "
                         f"its run started from no model folder with a {CONFIG_NAME} (model.init_from: {init_from}): "
                         f"write the model's config.json content to {step_dir / MODEL_CONFIG_NAME}")
    layout = read_layout(start) if start is not None and is_stepfun_folder(start) else None
    return config, tok, layout


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
    if any(step_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        # ZeRO 1-3 keep the fp32 weights partitioned in the optimizer shards (stage 3 has no whole module
        # anywhere): DeepSpeed's own consolidation reads them. It unpickles with weights_only=False, so these
        # files are trusted as DeepSpeed trusts them.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name))
    # Stage 0: our own read of the module's state dict, the whole model. zero_to_fp32 only consolidates ZeRO
    # optimizer shards, and this way tensors, plain data and DeepSpeed's data classes load while a file
    # naming anything else is refused, never run.
    model_states = step_dir / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        raise ValueError(f"training checkpoint {step_dir} has neither {model_states.name} nor ZeRO optimizer "
                         f"shards (not a DeepSpeed checkpoint)")
    return dict(load_plain(model_states, allowed=_deepspeed_data_classes())["module"])


def export(src: Union[str, Path], dst: Union[str, Path], dtype: Optional[torch.dtype] = None,
           tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the training checkpoint SRC names to DST in StepFun's layout; dtype=None keeps the stored dtypes."""
    step_dir = find_training_checkpoint(src)
    if step_dir is None:
        raise ValueError(f"{src} is not a training checkpoint (a step folder with train_state.json, or a run or "
                         f"its checkpoints folder with `latest`); a model folder in StepFun's layout is converted "
                         f"by `python -m model.convert`")
    config, tok, layout = training_config(step_dir, tokenizer_dir)
    state = read_deepspeed_weights(step_dir)
    # Strict: the weights must be exactly what this config builds, names and shapes.
    from model.lalm import StepAudio2ForCausalLM

    with torch.device("meta"):
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
    # A run's export states the dtype it wrote, whatever the starting folder's config.json said.
    return write_export(state, config, dst, tok, layout, max_shard_bytes, state_dtype=True)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="RUN_DIR, RUN_DIR/checkpoints or a step folder (RUN_DIR/checkpoints/step_N)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    try:
        out = export(args.src, args.dst, DTYPES.get(args.dtype), args.tokenizer, int(args.max_shard_gb * 2**30))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""`python -m model.convert SRC DST`: a model folder in StepFun's layout -> another, cast or re-split.

A training run or checkpoint of ours is exported by `python -m train.export`, which reads DeepSpeed's files;
both write through `write_export` here, so the two folders come out alike.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from model.checkpoint import CONFIG_NAME, INDEX_NAME, StepFunLayout, load_stepfun, read_layout, save_stepfun
from model.config import StepAudio2Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def is_stepfun_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / INDEX_NAME).is_file()


def load_tokenizer(path: str):
    from data.text_tokenizer import load_tokenizer as load

    return load(path)


def write_export(state: Dict[str, torch.Tensor], config: StepAudio2Config, dst: Union[str, Path], tokenizer: Any,
                 layout: Optional[StepFunLayout], max_shard_bytes: int, state_dtype: bool) -> Path:
    """Writes DST in StepFun's layout; layout=None (or one whose names no longer match) splits anew.

    state_dtype: config.json's torch_dtype says the tensors' one floating dtype; always so for a freshly
    split folder (whose config has nothing else to keep)."""
    if layout is not None and set(layout.weight_map) != set(state):
        layout = None  # the names changed since that folder: fall back to a fresh split
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    if (state_dtype or layout is None) and len(stored) == 1 and next(iter(stored)) in _DTYPE_NAMES:
        config.torch_dtype = _DTYPE_NAMES[next(iter(stored))]
    return save_stepfun(state, config, dst, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, layout=layout)


def convert(src: Union[str, Path], dst: Union[str, Path], dtype: Optional[torch.dtype] = None,
            tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the StepFun folder SRC to DST in the same layout; dtype=None keeps dtypes (and config.json)."""
    src = Path(src)
    if not is_stepfun_folder(src):
        raise ValueError(f"{src} is neither a model folder in StepFun's layout ({CONFIG_NAME} + {INDEX_NAME}) nor "
                         f"anything else model.convert reads; a training run or checkpoint of ours is exported by "
                         f"`python -m train.export {src} {dst}`")
    model = load_stepfun(src, dtype=dtype)
    tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return write_export(model.state_dict(), model.config, dst, tok, read_layout(src), max_shard_bytes,
                        state_dtype=dtype is not None)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """DST and the options of the folder written: model.convert's and train.export's."""
    parser.add_argument("dst", help="output folder (replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to write (default: the source's)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="shard size when the source has no shard split to reproduce")


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__)
    parser.add_argument("src", help="a model folder in StepFun's layout")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, DTYPES.get(args.dtype), args.tokenizer, int(args.max_shard_gb * 2**30))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""`python -m train.merge_lora BASE_DIR ADAPTER_DIR OUT_DIR`: base + peft adapter -> one StepFun-layout folder.

The adapter is read by peft itself (PeftModel.from_pretrained), merged in fp32 and written back in the
base's own dtypes, shard split and extra files, so untouched tensors stay bit-identical to the base.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Union

from model.checkpoint import load_stepfun, read_layout, save_stepfun
from model.lalm import StepAudio2ForCausalLM
from train.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME


def merged_model(base: StepAudio2ForCausalLM, adapter_dir: Union[str, Path]) -> StepAudio2ForCausalLM:
    """base (changed in place) with the adapter merged into its weights; peft reads the adapter itself."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    missing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if not (adapter_dir / n).is_file()]
    if missing:
        raise ValueError(f"adapter folder {adapter_dir} has no {', '.join(missing)} (a LoRA run writes it to "
                         f"RUN_DIR/adapter)")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge(base_dir: Union[str, Path], adapter_dir: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Writes the merged model to out_dir in the base folder's layout and returns out_dir."""
    base = load_stepfun(base_dir)
    stored_dtypes = {name: t.dtype for name, t in base.state_dict().items()}
    # Merged in fp32: a bf16 base would otherwise round the LoRA update before adding it.
    model = merged_model(base.float(), adapter_dir)
    state = {name: t.to(stored_dtypes[name]) for name, t in model.state_dict().items()}
    return save_stepfun(state, model.config, out_dir, layout=read_layout(base_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.merge_lora", description=__doc__.splitlines()[0])
    parser.add_argument("base_dir", help="the StepFun-layout folder the LoRA run started from (lora.init_from)")
    parser.add_argument("adapter_dir", help="the run's adapter folder (RUN_DIR/adapter)")
    parser.add_argument("out_dir", help="where to write the merged StepFun-layout folder")
    args = parser.parse_args(argv)
    out = merge(args.base_dir, args.adapter_dir, args.out_dir)
    print(f"merged {args.adapter_dir} into {args.base_dir} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

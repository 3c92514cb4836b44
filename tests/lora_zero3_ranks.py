"""Run by tests/test_lora_resume.py under torchrun (2 gloo ranks): a LoRA run's model built under ZeRO-3 as
`python -m train` builds it (train.loop.build_model). Records, per rank, in OUT/rank{r}.json: the most base
elements ever whole at once while building (every gather of the build counted, nested ones together), the
base's size, whether each base parameter ended partitioned, and the loss of a fixed batch through the ZeRO-3
engine next to the loss of the same LoRA model built plainly in this process alone (before any collective).

usage: torchrun --nproc_per_node 2 tests/lora_zero3_ranks.py BASE_DIR TOKENIZER_DIR OUT"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("STEPAUDIO_DEVICE", "cpu")

from data.text_tokenizer import load_tokenizer, special_ids  # noqa: E402
from model.checkpoint import load_stepfun  # noqa: E402
from train import loop  # noqa: E402
from train.engine import Engine, exit_process, init_distributed  # noqa: E402
from train.lora import apply_lora, audio_rows  # noqa: E402
from train.recipe import load_config  # noqa: E402


def is_adapter(name: str) -> bool:
    return ".lora_" in name or "trainable_tokens_" in name


def main(base: Path, tokenizer: Path, out: Path) -> None:
    cfg = load_config("recipes/demo/asr.yaml", [
        f"data.tokenizer={tokenizer}", "engine.zero_stage=3", "lora.enabled=true", f"lora.init_from={base}",
        "lora.r=4", "lora.adapter=true", "lora.train_audio_rows=true", "data.batch_size=2"])
    tok = load_tokenizer(str(tokenizer))
    ids = special_ids(tok)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, ids.first_audio_code + 50, (2, 24))}
    batch["labels"] = batch["input_ids"].clone()
    # Alone, before any collective: the base read whole, LoRA applied (B = 0: the base's loss).
    plain = load_stepfun(base)
    apply_lora(plain, cfg.lora, audio_rows(ids.first_audio_code, ids.num_audio_codes))
    with torch.no_grad():
        plain_loss = float(plain(**batch).loss)
    del plain

    rank, _ = init_distributed()
    whole = {"now": 0, "most": 0, "gathers": 0}

    def counting(gather):
        def wrapped(params):
            inner = gather(params)
            size = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)

            class Counted:
                def __enter__(self):
                    whole["gathers"] += 1
                    whole["now"] += size
                    whole["most"] = max(whole["most"], whole["now"])
                    return inner.__enter__()

                def __exit__(self, *exc):
                    whole["now"] -= size
                    return inner.__exit__(*exc)
            return Counted()
        return wrapped

    loop.gathered_for_write = counting(loop.gathered_for_write)
    loop.gathered_for_read = counting(loop.gathered_for_read)
    model = loop.build_model(cfg, tok)
    base_params = {n: p for n, p in model.named_parameters() if not is_adapter(n)}
    whole_after = sorted(n for n, p in base_params.items() if not hasattr(p, "ds_id") or p.data.numel() > 0)
    base_numel = sum(int(p.ds_numel) for n, p in base_params.items() if hasattr(p, "ds_numel"))
    heads = sorted(n for n in base_params if n.startswith(("model.embed_tokens.", "lm_head.")))
    heads_numel = sum(int(base_params[n].ds_numel) for n in heads)
    largest = max(int(p.ds_numel) for p in base_params.values() if hasattr(p, "ds_numel"))
    engine = Engine(model, cfg)
    with torch.no_grad():
        zero3_loss = float(engine.ds(**batch).loss)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "most_whole": whole["most"], "gathers": whole["gathers"], "base_numel": base_numel,
        "heads": heads, "heads_numel": heads_numel, "largest": largest, "whole_after_build": whole_after,
        "base_params": len(base_params), "plain_loss": plain_loss, "zero3_loss": zero3_loss}))
    engine.close()


if __name__ == "__main__":
    out_dir = Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    main(Path(sys.argv[1]), Path(sys.argv[2]), out_dir)
    exit_process(0)

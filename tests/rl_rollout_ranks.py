"""Run by tests/test_rl_distributed.py under torchrun (2 gloo ranks): ZeRO-3 rollouts where rank 0's answers end
after one token and rank 1's run to the token limit. Writes OUT/rank{r}.json (the answers through the
ZeRO-3 engine, and how often the parameters were gathered) and OUT/alone{r}.json (the same prompts answered
by a plain copy of the model in this process alone, before any collective)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("STEPAUDIO_DEVICE", "cpu")

from data.text_tokenizer import SpecialIds  # noqa: E402
from model.config import preset_config  # noqa: E402
from model.generate import generate  # noqa: E402
from model.lalm import StepAudio2ForCausalLM  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from model.checkpoint import load_stepfun, save_stepfun  # noqa: E402
from train.engine import (Engine, gathered_for_write, init_distributed, model_init_context,  # noqa: E402
                          shutdown_distributed)
from train.rl.rollout import left_padded, sample_answers  # noqa: E402

MAX_NEW = 24
IDS = SpecialIds(end_of_text=0, bot=1, eot=2, audio_start=3, audio_end=4, audio_patch=300, tts_pad=5, tts_start=6,
                 tts_end=7, first_audio_code=280, num_audio_codes=16, audio_pad=296)


class _Tok:
    def decode(self, ids):
        return " ".join(map(str, ids))


def main(out: Path) -> None:
    rank, world = init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    config = preset_config("tiny", vocab_size=320, audio_patch_token_id=300)
    torch.manual_seed(0)
    plain = StepAudio2ForCausalLM(config).eval()
    # Greedy decoding: rank 0's three prompts are one prompt, whose first answer token becomes its stop token,
    # so its answers are one token long; rank 1's prompts differ and run to the limit.
    prompts = [{"key": f"r{rank}p{i}", "meta": {}, "input_ids": [10, 20, 30] if rank == 0 else [11, 21 + i, 31 + i],
                "mels": [], "num_audio_s": 0.0} for i in range(3)]
    ids = IDS
    ids_BT, mask_BT = left_padded([p["input_ids"] for p in prompts for _ in range(2)], IDS.end_of_text)
    if rank == 0:
        first = generate(plain, ids_BT, mask_BT, max_new_tokens=1)
        ids = dataclasses.replace(IDS, eot=first[0][0])
    # Alone: the plain model, the same decoding, no DeepSpeed.
    alone = generate(plain, ids_BT, mask_BT, max_new_tokens=MAX_NEW, stop_token_ids=[ids.eot, ids.end_of_text],
                     include_stop=True)
    (out / f"alone{rank}.json").write_text(json.dumps({"answers": alone, "max_new_tokens": MAX_NEW}))

    cfg = TrainConfig()
    cfg.engine.zero_stage = 3
    cfg.data.batch_size = 6
    # The same weights, partitioned: written once, read tensor by tensor into the ZeRO-3 model.
    if rank == 0:
        save_stepfun(plain.state_dict(), config, out / "model")
    torch.distributed.barrier()
    engine = Engine(load_stepfun(out / "model", build_context=model_init_context(cfg), gather=gathered_for_write), cfg)
    import deepspeed

    calls = {"n": 0}
    real = deepspeed.zero.GatheredParameters

    class Counting(real):
        def __init__(self, *args, **kwargs):
            calls["n"] += 1
            super().__init__(*args, **kwargs)

    deepspeed.zero.GatheredParameters = Counting
    rollout = sample_answers(engine, prompts, ids, _Tok(), num_generations=2, max_new_tokens=MAX_NEW,
                             temperature=0.0, top_p=1.0, generator=None)
    deepspeed.zero.GatheredParameters = real
    answers = [s.answer_ids for s in rollout.samples]
    (out / f"rank{rank}.json").write_text(json.dumps({"answers": answers, "max_new_tokens": MAX_NEW,
                                                      "gathers": calls["n"]}))
    engine.close()
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)

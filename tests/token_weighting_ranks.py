"""Run by tests/test_token_weighting.py under torchrun (2 gloo ranks, ZeRO-0, grad_accum_steps=2): one SFT step
over micro-batches with very unequal label counts; writes OUT/rank{r}.json with the largest difference between
DeepSpeed's averaged gradient and the gradient of one process's mean over every label of the step, and the
logged loss next to that global mean."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("STEPAUDIO_DEVICE", "cpu")

from data.loading.batching import collate  # noqa: E402
from model.config import preset_config  # noqa: E402
from model.lalm import StepAudio2ForCausalLM  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.engine import Engine, init_distributed, shutdown_distributed  # noqa: E402
from train.loop import SFTStep  # noqa: E402

# (rank, micro-batch) -> label counts of its rows: 23 vs 41 labels per rank, 20 vs 3 per micro-batch.
LAYOUT = {(0, 0): [10, 10], (0, 1): [3], (1, 0): [40], (1, 1): [1]}


def batches():
    g = torch.Generator().manual_seed(5)
    out = {}
    for where, rows in LAYOUT.items():
        samples = []
        for n in rows:
            ids = torch.randint(0, 250, (n + 4,), generator=g).tolist()
            samples.append({"key": str(where), "input_ids": ids, "labels": [-100] * 4 + ids[4:], "mels": [],
                            "num_audio_s": 0.0})
        out[where] = collate(samples, pad_id=0)
    return out


class CapturingEngine(Engine):
    """Keeps the gradient DeepSpeed holds at the accumulation boundary (averaged over ranks), before the step."""

    def backward_and_step(self, loss):
        self.ds.backward(loss)
        if self.ds.is_gradient_accumulation_boundary():
            self.captured = {n: p.grad.detach().clone() for n, p in self.ds.module.named_parameters()
                             if p.grad is not None}
        self.ds.step()


def main(out: Path) -> None:
    rank, world = init_distributed()
    config = preset_config("tiny", vocab_size=256, audio_patch_token_id=255)
    torch.manual_seed(0)
    reference = StepAudio2ForCausalLM(config)
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(config)
    cfg = TrainConfig()
    cfg.engine.grad_accum_steps = 2
    cfg.optim.grad_clip = 0.0
    cfg.model.trainable = ["adapter", "embeddings", "decoder", "lm_head"]
    engine = CapturingEngine(model, cfg)
    data = batches()
    step = SFTStep(cfg, engine, [data[rank, 0], data[rank, 1]])
    result = step.step(1)
    # One process, every micro-batch of both ranks: the mean over all their labels.
    total = sum(sum(rows) for rows in LAYOUT.values())
    reference.train()
    summed = sum(reference(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss * sum(LAYOUT[w])
                 for w, b in data.items())
    (summed / total).backward()
    diff = max((engine.captured[n] - p.grad).abs().max().item() for n, p in reference.named_parameters()
               if n in engine.captured)
    logged = torch.tensor([float(result.metrics["loss"])])
    torch.distributed.all_reduce(logged)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "max_grad_diff": diff, "compared": len(engine.captured), "logged_loss": logged.item() / world,
        "global_mean": (summed / total).item(), "grad_norm": sum(float(p.grad.norm()) for p in reference.parameters()
                                                                  if p.grad is not None)}))
    engine.close()
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)

"""Under ZeRO-3 every lm_head call gathers lm_head (a collective): two ranks whose batches need different
numbers of loss chunks (LOSS_CHUNK_ROWS labelled rows each) must still make the same number of calls, or
the job aborts or hangs. Two gloo ranks, one with 3 chunks' worth of labels and one with a few labels."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.conftest import run_cli

VOCAB = 128


def _batch(rank: int) -> dict:
    from data.loading.batching import collate

    n = 2600 if rank == 0 else 40  # rank 0: 3 chunks of 1024; rank 1: one
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, VOCAB - 1, (n,), generator=g).tolist()
    return collate([{"key": f"r{rank}", "input_ids": ids, "labels": ids, "mels": [], "num_audio_s": 0.0}], pad_id=0)


def _rank_main(out: Path) -> None:
    from model.config import preset_config
    from model.lalm import StepAudio2ForCausalLM
    from train.recipe import load_config
    from train.engine import Engine, init_distributed, model_init_context, shutdown_distributed

    rank, _ = init_distributed(timeout_s=60)
    cfg = load_config(None, ["engine.zero_stage=3", "data.shards=[unused]", "data.tokenizer=unused",
                             f"run_dir={out}", "model.gradient_checkpointing=[decoder]"])
    with model_init_context(cfg):
        torch.manual_seed(0)
        model = StepAudio2ForCausalLM(preset_config("tiny", vocab_size=VOCAB, audio_patch_token_id=VOCAB - 1))
    engine = Engine(model, cfg)
    losses = []
    for _ in range(2):
        result = engine.forward(_batch(rank))
        engine.backward_and_step(result.loss)
        losses.append(float(result.loss.detach()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{rank}.json").write_text(json.dumps({"losses": losses, "count": result.num_label_tokens}))
    shutdown_distributed()


def test_ranks_with_different_loss_chunk_counts_step_together_under_zero3(tmp_path):
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "tests.test_zero3_loss_chunks", str(tmp_path), timeout=240)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["count"] for r in ranks] == [2599, 39]
    for r in ranks:  # random tokens: the loss starts near ln(128) = 4.85 and the step lowers it
        assert 4.0 < r["losses"][0] < 5.5 and r["losses"][1] < r["losses"][0]


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)

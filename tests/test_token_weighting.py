"""A step's loss is the mean over every label token of the step on all ranks and accumulation micro-batches
together: two ranks with very unequal batches and grad_accum_steps=2 give the gradient of one process over
all the batches (within 1e-6), and the logged loss is that global mean."""
from __future__ import annotations

import json
import sys

from tests.conftest import REPO, run_cli


def test_two_ranks_with_unequal_batches_and_accumulation_give_the_one_process_gradient(tmp_path):
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "tests" / "token_weighting_ranks.py"), str(tmp_path), timeout=300)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["compared"] > 10 and got["grad_norm"] > 0
        assert got["max_grad_diff"] < 1e-6, got
        assert abs(got["logged_loss"] - got["global_mean"]) < 1e-5, got

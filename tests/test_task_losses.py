"""Per-dataset losses of a mixture, loss/<name> and tokens/<name>: on two gloo ranks with two accumulation
micro-batches (packed rows holding both datasets plus padding, and a padded fixed batch; rank 1 sees no
sample of "b"), the logged values equal each dataset's mean cross-entropy from plain single-sample forwards
(within 1e-5), the token counts are exact, and their token-weighted mean is the logged loss; `python -m
train` on a two-dataset packed mixture writes both to metrics.jsonl. Also: the collate's sample_index, and
the model's per-token losses (token_losses=True) against torch's cross-entropy in many loss chunks.

Run as a script (under torchrun, by the first test), this file is each rank's side."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("STEPAUDIO_DEVICE", "cpu")

from data.loading.batching import collate, collate_packed  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

# (rank, micro-batch) -> rows of (dataset, prompt tokens, answer tokens); a row of several samples is packed.
# A sample with no prompt ("b", 0, 6) follows another in its row: its first label is not trained.
LAYOUT = {
    (0, 0): [[("a", 3, 9), ("b", 5, 4)], [("b", 2, 11)], [("a", 4, 2), ("b", 0, 6), ("a", 2, 3)]],
    (0, 1): [[("b", 6, 7)], [("a", 3, 2)]],
    (1, 0): [[("a", 2, 13), ("a", 3, 5)]],
    (1, 1): [[("a", 5, 3)]],
}


def samples(where):
    """The rows of LAYOUT[where] as rendered samples (uid = (dataset, epoch, position), as the loader's)."""
    g = torch.Generator().manual_seed(10 * where[0] + where[1])
    rows = []
    for r, row in enumerate(LAYOUT[where]):
        out = []
        for k, (name, prompt, answer) in enumerate(row):
            ids = torch.randint(0, 250, (prompt + answer,), generator=g).tolist()
            out.append({"key": f"{where}/{r}/{k}", "uid": (name, 0, 10 * r + k), "input_ids": ids,
                        "labels": [-100] * prompt + ids[prompt:], "mels": [], "num_audio_s": 0.0})
        rows.append(out)
    return rows


def batch(where):
    rows = samples(where)
    packed = any(len(row) > 1 for row in rows)
    out = collate_packed(rows, pad_id=0) if packed else collate([row[0] for row in rows], pad_id=0)
    out["datasets"] = [uid[0] for uid in out["uids"]]  # as data.loading.streams adds them
    return out


def reference(model) -> dict:
    """{dataset: [cross-entropy sum, label tokens]} over every sample of both ranks, one plain forward per
    sample (full logits, torch's cross-entropy). A packed sample's first label follows another sample, so
    the collate drops it; alone, position 0 predicts nothing either: the same labels count."""
    sums = {"a": [0.0, 0], "b": [0.0, 0]}
    model.eval()
    with torch.no_grad():
        for where in LAYOUT:
            for row in samples(where):
                for s in row:
                    ids, labels = torch.tensor([s["input_ids"]]), torch.tensor(s["labels"])
                    logits = model(input_ids=ids).logits[0].double()
                    ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="none")
                    kept = labels[1:] != -100
                    sums[s["uid"][0]][0] += float(ce[kept].sum())
                    sums[s["uid"][0]][1] += int(kept.sum())
    return sums


class Recorder:
    """A metrics sink that keeps what it is given."""

    def __init__(self):
        self.logged, self.lines = [], []

    def log(self, step, metrics):
        self.logged.append(metrics)

    def message(self, text):
        pass

    def advance(self, step, text=None):
        if text:
            self.lines.append(text)


def rank_main(out: Path) -> None:
    from types import SimpleNamespace

    from data.loading.loader import DatasetConfig
    from model.config import preset_config
    from model.lalm import StepAudio2ForCausalLM
    from train.config import TrainConfig
    from train.engine import Engine, init_distributed, shutdown_distributed
    from train.loop import RunState, SFTStep, _log_window, _Window

    rank, world = init_distributed()
    config = preset_config("tiny", vocab_size=256, audio_patch_token_id=255)
    torch.manual_seed(0)
    ref = reference(StepAudio2ForCausalLM(config))
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(config)
    cfg = TrainConfig()
    cfg.engine.grad_accum_steps = 2
    cfg.data.datasets = [DatasetConfig("a", ["unused"]), DatasetConfig("b", ["unused"])]
    cfg.model.trainable = ["adapter", "embeddings", "decoder", "lm_head"]
    engine = Engine(model, cfg)
    batches = [batch((rank, 0)), batch((rank, 1))]
    assert rank == 1 or (batches[0]["attention_mask"] == 0).any()  # rank 0's packed rows hold padding
    result = SFTStep(cfg, engine, batches).step(1)
    state = RunState(step=1, tokens=1)
    window = _Window(RunState())
    window.add(result)
    sink = Recorder()
    no_skips = SimpleNamespace(skip_stats=lambda: {"skipped": {}, "skipped_keys": []})
    _log_window(sink, engine, no_skips, window, state, world, set())
    (out / f"rank{rank}.json").write_text(json.dumps({"logged": sink.logged[0], "line": sink.lines[0],
                                                      "reference": ref}))
    engine.close()
    shutdown_distributed()


def test_two_ranks_log_each_datasets_exact_mean_and_tokens(tmp_path):
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
            str(tmp_path), timeout=300)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Every rank made the same collective (rank 1 with zeros for "b") and got the same values.
    mine = [{k: v for k, v in g["logged"].items() if k.startswith(("loss", "tokens/"))} for g in got]
    assert mine[0] == mine[1] and len(mine[0]) == 5, mine
    logged, ref = got[0]["logged"], got[0]["reference"]
    assert (ref["a"][1], ref["b"][1]) == (9 + 2 + 3 + 2 + 13 + 5 + 3, 4 + 11 + 6 - 1 + 7)
    for name in ("a", "b"):
        assert logged[f"tokens/{name}"] == ref[name][1]
        assert abs(logged[f"loss/{name}"] - ref[name][0] / ref[name][1]) < 1e-5, (name, logged, ref)
    tokens = logged["tokens/a"] + logged["tokens/b"]
    weighted = (logged["loss/a"] * logged["tokens/a"] + logged["loss/b"] * logged["tokens/b"]) / tokens
    assert abs(weighted - logged["loss"]) < 1e-5, logged
    assert abs(logged["loss"] - (ref["a"][0] + ref["b"][0]) / tokens) < 1e-5
    assert f"(a {logged['loss/a']:.3f} b {logged['loss/b']:.3f})" in got[0]["line"]


def test_sample_index_names_each_positions_sample():
    def sample(n, key="k"):
        return {"key": key, "input_ids": [1] * n, "labels": [1] * n, "mels": [], "num_audio_s": 0.0}

    packed = collate_packed([[sample(2), sample(3)], [sample(4)]], pad_id=0)
    assert packed["sample_index"].tolist() == [[0, 0, 1, 1, 1, -1, -1, -1], [2, 2, 2, 2, -1, -1, -1, -1]]
    fixed = collate([sample(1), sample(3)], pad_id=0)
    assert fixed["sample_index"].tolist() == [[0, -1, -1], [1, 1, 1]]
    pairs = collate([{"key": "p", "pair": [sample(2), sample(1)]}, {"key": "q", "pair": [sample(1), sample(3)]}],
                    pad_id=0)  # rows: the chosen of p and q, then the rejected ones; indices into the pairs
    assert pairs["sample_index"].tolist() == [[0, 0, -1], [1, -1, -1], [0, -1, -1], [1, 1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_losses_are_each_labels_cross_entropy_in_many_chunks(monkeypatch, dtype):
    from model import lalm

    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", 4)  # 13 labelled rows: 4 chunks
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.lm_head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    hidden_BTH = torch.randn(2, 11, 16, dtype=dtype, requires_grad=True)
    labels_BT = torch.randint(0, 50, (2, 11))
    labels_BT[0, :4] = labels_BT[1, 7:] = -100
    loss, count, losses_BT = lalm.StepAudio2ForCausalLM.chunked_loss(holder, hidden_BTH, labels_BT,
                                                                      token_losses=True)
    assert count == 13 and losses_BT.dtype == torch.float32 and not losses_BT.requires_grad
    want_BT = torch.zeros(2, 11)
    want_BT[:, 1:] = torch.nn.functional.cross_entropy(holder.lm_head(hidden_BTH[:, :-1]).float().transpose(1, 2),
                                                       labels_BT[:, 1:], reduction="none").detach()
    assert torch.allclose(losses_BT, want_BT, atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert abs(float(losses_BT.sum()) / count - loss.item()) < 1e-5  # the values the loss averages
    loss.backward()  # the loss still trains
    assert hidden_BTH.grad is not None and hidden_BTH.grad[1, 6:].abs().sum() == 0


RECIPE = """
model: {{preset: tiny}}
data:
  tokenizer: {tok}
  datasets:
    - {{name: short, shards: [{root}/short], task: tts, weight: 1.0}}
    - {{name: long, shards: [{root}/long], task: tts, weight: 1.0}}
  batching: packed
  max_seq_len: 256
  max_tokens: 512
  num_workers: 0
max_steps: 3
metrics: {{log_every: 1, progress: false}}
checkpoint: {{export: false, every_steps: 0}}
"""


def test_train_run_of_a_mixture_logs_loss_and_tokens_per_dataset(tmp_path):
    from tests.test_loader import _tts, _write, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    for name, words, first in (("short", 2, 0), ("long", 7, 100)):
        _write(tmp_path / name, [[(f"{name}{s}_{i}", _tts(first + 8 * s + i, words)) for i in range(8)]
                                 for s in range(2)])
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(RECIPE.format(tok=tok, root=tmp_path))
    run_cli(sys.executable, "-m", "train", str(recipe), f"run_dir={tmp_path / 'run'}",
            env={"STEPAUDIO_DEVICE": "cpu"}, timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 3
    for m in steps:
        assert m["tokens/short"] > 0 and m["tokens/long"] > 0, m
        weighted = (m["loss/short"] * m["tokens/short"] + m["loss/long"] * m["tokens/long"]) / \
            (m["tokens/short"] + m["tokens/long"])
        assert abs(weighted - m["loss"]) < 1e-5, m


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)

"""model.fused_loss through the model's chunked_loss and token_logprobs: the naive full-logits values and
gradients (lm_head's weight, the hidden rows, a parameter before the head) in fp32 and bf16, in one chunk or
many, with no labelled row; lm_head runs once per forward and the mean loss recomputes nothing in backward;
under ZeRO-3 on two gloo ranks (lm_head partitioned) the gradients equal one process's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import fused_loss, lalm
from model.lalm import IGNORE_INDEX, StepAudio2ForCausalLM
from tests.conftest import run_cli

VOCAB, HIDDEN = 97, 24


class Stack(nn.Module):
    """Embedding -> a linear layer -> lm_head: enough model around the head to check the gradient before it."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pre = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.5)  # spread-out logits: a real softmax, not a uniform one
        self.to(dtype)

    def hidden(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pre(self.embed(ids_BT)))


def batch(no_labels: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 13), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # prompts
    labels[1, 9:] = IGNORE_INDEX  # a shorter answer
    if no_labels:
        labels[:] = IGNORE_INDEX
    return ids, labels  # 3 * 12 - 3 * 2 - 4 = 26 labelled targets


def grads(out: torch.Tensor, m: Stack, hidden_BTH: torch.Tensor):
    # retain_graph: the fused and the naive loss share the graph below hidden_BTH
    return torch.autograd.grad(out, [hidden_BTH, m.lm_head.weight, m.pre.weight], retain_graph=True)


def naive_logits(m: Stack, hidden_BTH: torch.Tensor) -> torch.Tensor:
    return m.lm_head(hidden_BTH[:, :-1]).float()


def assert_close(got, want, atol, rtol, what):
    for name, a, b in zip(("hidden", "lm_head.weight", "pre.weight"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name)
        assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), (what, name, (a - b).abs().max())


# (rows cap, logits per chunk): one chunk; many by the row cap; many by the logits budget (3 rows), whose
# bf16 chunks do their fp32 math a row at a time (an eighth of the budget is under a row).
CHUNKINGS = [(1024, 2**25), (4, 2**25), (1024, 3 * VOCAB)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)]


def chunking(monkeypatch, rows: int, logits: int) -> None:
    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", rows)
    monkeypatch.setattr(fused_loss, "CHUNK_LOGITS", {"cpu": logits})


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("rows,logits", CHUNKINGS)
def test_loss_and_gradients_equal_full_logits_cross_entropy(monkeypatch, dtype, atol, rtol, rows, logits):
    chunking(monkeypatch, rows, logits)
    m = Stack(dtype)
    ids, labels = batch()
    hidden_BTH = m.hidden(ids)
    loss, count = StepAudio2ForCausalLM.chunked_loss(m, hidden_BTH, labels)
    assert count == 26 and loss.dtype == torch.float32
    naive = F.cross_entropy(naive_logits(m, hidden_BTH).reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - naive.item()) < (1e-5 if dtype == torch.float32 else 1e-3)
    # A non-unit upstream gradient (a loss scale, accumulation) multiplies what forward computed.
    assert_close(grads(loss * 3.0, m, hidden_BTH), grads(naive * 3.0, m, hidden_BTH), atol, rtol, "loss")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("rows,logits", CHUNKINGS)
def test_token_logprobs_and_gradients_equal_log_softmax(monkeypatch, dtype, atol, rtol, rows, logits):
    chunking(monkeypatch, rows, logits)
    m = Stack(dtype)
    ids, labels = batch()
    hidden_BTH = m.hidden(ids)
    temperature = 0.7
    logprobs_BT, entropy_BT, count = StepAudio2ForCausalLM.token_logprobs(m, hidden_BTH, labels, temperature)
    assert count == 26 and logprobs_BT.shape == ids.shape and logprobs_BT.dtype == torch.float32
    log_p = torch.log_softmax(naive_logits(m, hidden_BTH) / temperature, -1)
    keep = labels[:, 1:] != IGNORE_INDEX
    expected = torch.where(keep, log_p.gather(-1, ids[:, 1:, None]).squeeze(-1), 0.0)
    entropy = torch.where(keep, -(log_p.exp() * log_p).sum(-1), 0.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert logprobs_BT[:, 0].abs().max() == 0 and entropy_BT[:, 0].abs().max() == 0
    assert torch.allclose(logprobs_BT[:, 1:], expected, atol=tol)
    assert torch.allclose(entropy_BT[:, 1:], entropy.detach(), atol=tol) and not entropy_BT.requires_grad
    # A different upstream gradient per token, as RL losses give.
    upstream = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    assert_close(grads((logprobs_BT * upstream).sum(), m, hidden_BTH),
                 grads((expected * upstream[:, 1:]).sum(), m, hidden_BTH), atol, rtol, "logprobs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_labelled_row_gives_zero_that_reaches_every_parameter(monkeypatch, dtype):
    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", 4)
    m = Stack(dtype)
    ids, labels = batch(no_labels=True)
    loss, count = StepAudio2ForCausalLM.chunked_loss(m, m.hidden(ids), labels)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    logprobs_BT, entropy_BT, count = StepAudio2ForCausalLM.token_logprobs(m, m.hidden(ids), labels)
    assert count == 0 and logprobs_BT.abs().max() == 0 and entropy_BT.abs().max() == 0
    logprobs_BT.sum().backward()
    for name, p in m.named_parameters():  # every rank's backward reaches every parameter (ZeRO hooks)
        assert p.grad is not None and p.grad.abs().max() == 0, name


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_lm_head_runs_once_per_forward_and_the_loss_recomputes_nothing(monkeypatch):
    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", 4)  # 26 rows: 7 chunks
    m = Stack()
    calls = []
    m.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    ids, labels = batch()
    hidden_BTH = m.hidden(ids)
    loss, _ = StepAudio2ForCausalLM.chunked_loss(m, hidden_BTH, labels)
    with CountMatmuls() as matmuls:
        torch.autograd.grad(loss, [hidden_BTH, m.lm_head.weight])
    # One call on all 3 x 13 rows (the fusion computes the 26 labelled ones); backward only scales.
    assert calls == [39] and matmuls.count == 0
    logprobs_BT, _, _ = StepAudio2ForCausalLM.token_logprobs(m, hidden_BTH, labels)
    with CountMatmuls() as matmuls:
        torch.autograd.grad(logprobs_BT.sum(), [hidden_BTH, m.lm_head.weight])
    # Log-probabilities recompute each chunk's logits: per chunk, logits, hidden gradient, weight gradient.
    assert calls == [39, 39] and matmuls.count == 3 * 7


def test_backward_twice_through_the_loss_is_an_error():
    m = Stack()
    ids, labels = batch()
    loss, _ = StepAudio2ForCausalLM.chunked_loss(m, m.hidden(ids), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through the fused loss"):
        loss.backward()


def test_a_head_without_a_linear_map_is_rejected():
    m = Stack()
    m.lm_head = nn.Sequential()  # identity: never calls functional.linear
    ids, labels = batch()
    with pytest.raises(ValueError, match="did not call torch.nn.functional.linear"):
        StepAudio2ForCausalLM.chunked_loss(m, m.hidden(ids), labels)


def test_peft_trainable_rows_of_lm_head_get_the_naive_gradient(monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", 4)
    m = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=["pre"], trainable_token_indices={"lm_head": [1, 5, 50]}), Stack())
    delta = next(p for n, p in m.named_parameters() if "trainable_tokens_delta" in n)
    with torch.no_grad():
        delta.add_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(3)))  # rows unlike the base
    ids, labels = batch()
    hidden_BTH = m.hidden(ids)
    loss, _ = StepAudio2ForCausalLM.chunked_loss(m, hidden_BTH, labels)
    naive = F.cross_entropy(m.lm_head(hidden_BTH[:, :-1]).float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - naive.item()) < 1e-5
    got, want = (torch.autograd.grad(out, [delta, hidden_BTH]) for out in (loss, naive))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ZeRO-3: two gloo ranks, the tiny model partitioned; the loss and a per-token log-probability objective
# through one backward. Equal label counts per rank, so every weighting across ranks is the plain mean.
Z3_VOCAB, Z3_TOKENS, Z3_CHUNK_ROWS = 128, 150, 64


def _z3_batch(rank: int) -> dict:
    from data.loading.batching import collate

    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, Z3_VOCAB - 1, (Z3_TOKENS,), generator=g).tolist()
    return collate([{"key": f"r{rank}", "input_ids": ids, "labels": ids, "mels": [], "num_audio_s": 0.0}], pad_id=0)


def _z3_model() -> StepAudio2ForCausalLM:
    from model.config import preset_config

    torch.manual_seed(0)
    return StepAudio2ForCausalLM(preset_config("tiny", vocab_size=Z3_VOCAB, audio_patch_token_id=Z3_VOCAB - 1))


def _z3_objective(model_call, batch: dict, rank: int) -> torch.Tensor:
    """The mean loss plus sum(w * log p) / count with a weight w per token, as an RL loss has."""
    loss = model_call(batch).loss
    out = model_call(batch, token_logprobs=True)
    weights_BT = torch.randn(out.token_logprobs.shape, generator=torch.Generator().manual_seed(20 + rank))
    return loss + (out.token_logprobs * weights_BT).sum() / out.num_label_tokens


Z3_PARAMS = ("lm_head.weight", "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight")


def _z3_rank_main(out: Path) -> None:
    import deepspeed

    from train.recipe import load_config
    from train.engine import Engine, init_distributed, shutdown_distributed

    rank, _ = init_distributed(timeout_s=60)
    lalm.LOSS_CHUNK_ROWS = Z3_CHUNK_ROWS  # 149 labelled rows: 3 chunks per forward
    cfg = load_config(None, ["engine.zero_stage=3", "engine.precision=fp32", "data.shards=[unused]",
                             "data.tokenizer=unused", f"run_dir={out}"])
    engine = Engine(_z3_model(), cfg)
    params = dict(engine.module.named_parameters())
    assert params["lm_head.weight"].ds_numel == Z3_VOCAB * 64 and params["lm_head.weight"].numel() == 0
    engine.ds.backward(_z3_objective(engine.forward, _z3_batch(rank), rank))
    grads = {name: deepspeed.utils.safe_get_full_grad(params[name]).clone() for name in Z3_PARAMS}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(grads, out / f"rank_{rank}.pt")
    shutdown_distributed()


def test_zero3_gradients_equal_one_process(tmp_path, monkeypatch):
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "tests.test_fused_loss", str(tmp_path), timeout=240)
    from train.engine import model_inputs

    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", Z3_CHUNK_ROWS)
    model = _z3_model()

    def call(batch, **kwargs):
        return model(**model_inputs(batch, torch.device("cpu"), torch.float32), **kwargs)

    total = sum(_z3_objective(call, _z3_batch(rank), rank) for rank in (0, 1)) / 2  # DeepSpeed averages ranks
    want = dict(zip(Z3_PARAMS, torch.autograd.grad(total, [dict(model.named_parameters())[n] for n in Z3_PARAMS])))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank_{rank}.pt")
        for name in Z3_PARAMS:
            assert got[name].abs().max() > 0, name
            gap = (got[name] - want[name]).abs().max()
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), (rank, name, gap)


if __name__ == "__main__":
    _z3_rank_main(Path(sys.argv[1]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)

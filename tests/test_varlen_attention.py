"""model.attention's varlen_sdpa: packed rows attend sample by sample, at the samples' cost, with the logits and
gradients of each sample run alone; ordinary batches and KV-cache decoding stay plain SDPA."""
from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from data.loading.batching import collate_packed, packed_cu_seq_lens
from model.attention import VARLEN_KERNELS, VARLEN_SDPA, segment_lengths, varlen_layout, varlen_sdpa_forward
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM, packed_attention, resolve_attention

torch.set_num_threads(1)


class _Layer(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _dense_reference(q_BHTD, k_BKTD, v_BKTD, segment_ids_BT):
    """Block-diagonal causal attention in plain math (keys and values repeated to the query heads)."""
    groups = q_BHTD.shape[1] // k_BKTD.shape[1]
    k = k_BKTD.repeat_interleave(groups, dim=1)
    v = v_BKTD.repeat_interleave(groups, dim=1)
    T = q_BHTD.shape[2]
    allowed = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q_BHTD @ k.transpose(-1, -2)) / q_BHTD.shape[-1] ** 0.5
    weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2)  # [B, T, H, D] like the attention functions return


# Rows with several samples, a one-token sample (segment 3 of row 0), padding (segment 0) and a row that is
# one sample with no padding.
SEGMENTS = torch.tensor([[1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("min_share", [1.0, 0.8, 0.0])  # one call per length, the default groups, one call
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_kernel_equals_block_diagonal_attention_values_and_gradients(heads, kv_heads, min_share):
    gen = torch.Generator().manual_seed(0)
    B, T, D = *SEGMENTS.shape, 8
    # q/k/v laid out as the decoder's projections make them: [B, T, heads, D] viewed as [B, heads, T, D].
    q0 = torch.randn(B, T, heads, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    k0 = torch.randn(B, T, kv_heads, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    v0 = torch.randn(B, T, kv_heads, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    lengths = segment_lengths(packed_cu_seq_lens(SEGMENTS)[0])
    assert lengths == (3, 2, 1, 4, 2, 7, 2, 3, 12)
    grads = []
    layout = varlen_layout(lengths, min_share=min_share)
    for fn in (lambda q, k, v: varlen_sdpa_forward(_Layer(heads // kv_heads), q, k, v, None,
                                                   varlen_layout=layout)[0],
               lambda q, k, v: _dense_reference(q, k, v, SEGMENTS)):
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
        out = fn(q, k, v)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out, q.grad, k.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # the one-token sample sees only itself: its output is its own value
    torch.testing.assert_close(grads[0][0][0, 5], v0[0, :, 5].repeat_interleave(heads // kv_heads, dim=0))


def test_kernel_without_segments_is_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, :, :, 4:] = False
    layer = _Layer(1)
    assert torch.equal(varlen_sdpa_forward(layer, q, k, v, mask)[0], sdpa_attention_forward(layer, q, k, v, mask)[0])


def test_layout_groups_similar_lengths_and_pads_on_the_right():
    layout = varlen_layout((3, 2, 1, 4, 2, 7, 2, 3, 12))
    # longest first; a group holds lengths >= 80 % of its longest
    assert layout.groups == ((1, 12), (1, 7), (1, 4), (2, 3), (3, 2), (1, 1))
    # the group of the two 3s: sequences at 0..2 and 21..23, no padding; the 2s likewise
    assert layout.gather[23:29].tolist() == [0, 1, 2, 21, 22, 23]
    # every position's output is read from the slot that computed it, never from a padding slot
    assert torch.equal(layout.gather[layout.take], torch.arange(36))
    wide = varlen_layout((5, 3, 4), min_share=0.5)
    assert wide.groups == ((3, 5),)
    # padding slots repeat a sequence's last token (keys no real query of that sequence can see)
    assert wide.gather.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 11, 5, 6, 7, 7, 7]
    assert wide.take.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"sequence lengths \[5, 0\]: expected at least one, all >= 1"):
        varlen_layout((5, 0))


def test_kernel_rejects_a_wrong_layout_and_sliding_windows():
    q = torch.zeros(2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"varlen_layout covers 9 positions but the batch holds 2 x 5 = 10"):
        varlen_sdpa_forward(_Layer(1), q, q, q, None, varlen_layout=varlen_layout((5, 4)))
    with pytest.raises(ValueError, match="does not implement sliding-window attention"):
        varlen_sdpa_forward(_Layer(1), q, q, q, None, sliding_window=4, varlen_layout=varlen_layout((5, 5)))
    with pytest.raises(ValueError, match=r"cu_seq_lens must be 1-D \[S \+ 1\] boundaries"):
        segment_lengths(torch.tensor([[0, 5]]))


def test_packed_attention_hands_a_layout_not_a_mask():
    mask, extra = packed_attention(SEGMENTS, VARLEN_SDPA, torch.float32)
    want = varlen_layout((3, 2, 1, 4, 2, 7, 2, 3, 12))
    assert mask is None and extra.keys() == {"varlen_layout"}
    got = extra["varlen_layout"]
    assert got.groups == want.groups and torch.equal(got.gather, want.gather) and torch.equal(got.take, want.take)
    # the collate's host copy is used as it is
    cu_seq_lens, max_length = packed_cu_seq_lens(SEGMENTS)
    again = packed_attention(SEGMENTS, VARLEN_SDPA, torch.float32, cu_seq_lens, max_length)[1]["varlen_layout"]
    assert torch.equal(again.gather, want.gather)
    assert set(VARLEN_KERNELS) == {"flash_attention_2", VARLEN_SDPA}


# ---------------------------------------------------------------------------------------------- the model

def _text_sample(seed: int, n: int) -> dict:
    ids = torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"key": f"s{seed}", "input_ids": ids, "labels": [-100] + ids[1:], "mels": [], "num_audio_s": 0.0}


ROWS = [[_text_sample(1, 9), _text_sample(2, 1), _text_sample(3, 5)],  # a one-token sample, then padding
        [_text_sample(4, 13)],
        [_text_sample(5, 4), _text_sample(6, 7)]]


def _model(attention: str) -> StepAudio2ForCausalLM:
    torch.manual_seed(0)
    return StepAudio2ForCausalLM(preset_config("tiny"), attention=attention)


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "labels", "segment_ids", "cu_seq_lens", "max_length", "num_loss_tokens")}


def test_packed_logits_equal_each_sample_alone_and_no_mask_is_built(monkeypatch):
    batch = collate_packed(ROWS, 0)
    assert batch["input_ids"].shape == (3, 16) and batch["segment_ids"][0, -1] == 0  # rows padded to 16
    model = _model(VARLEN_SDPA).eval()
    assert model.attention_implementation == VARLEN_SDPA
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    built = []
    real_create = qwen2.create_causal_mask
    monkeypatch.setattr(qwen2, "create_causal_mask", lambda **kw: built.append(1) or real_create(**kw))
    with torch.no_grad():
        logits = model(**{k: v for k, v in _inputs(batch).items() if k != "labels"}).logits
    assert built == []  # no [B, T, T] mask for packed rows
    monkeypatch.undo()
    with torch.no_grad():
        for r, row in enumerate(ROWS):
            start = 0
            for sample in row:
                n = len(sample["input_ids"])
                alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[r, start:start + n], alone, atol=1e-5, rtol=0)
                start += n


def test_packed_loss_and_gradients_equal_the_dense_mask_and_each_sample_alone():
    batch = collate_packed(ROWS, 0)
    varlen, dense = _model(VARLEN_SDPA).train(), _model("sdpa").train()
    dense.load_state_dict(varlen.state_dict())
    grads = {}
    for name, model in (("varlen", varlen), ("dense", dense)):
        out = model(**_inputs(batch))
        out.loss.backward()
        grads[name] = (out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads["varlen"][0] == pytest.approx(grads["dense"][0], abs=1e-6)
    assert grads["varlen"][1].keys() == grads["dense"][1].keys()
    for n, g in grads["varlen"][1].items():
        torch.testing.assert_close(g, grads["dense"][1][n], atol=1e-5, rtol=1e-4)
    # and the sum of the samples run alone, each weighted by its share of the labelled tokens
    varlen.zero_grad()
    total = batch["num_loss_tokens"]
    for row in ROWS:
        for sample in row:
            if len(sample["input_ids"]) < 2:
                continue  # a one-token sample predicts nothing
            ids = torch.tensor([sample["input_ids"]])
            out = varlen(input_ids=ids, labels=torch.tensor([sample["labels"]]))
            (out.loss * out.num_label_tokens / total).backward()
    for n, p in varlen.named_parameters():
        if n in grads["varlen"][1]:
            torch.testing.assert_close(grads["varlen"][1][n], p.grad, atol=1e-5, rtol=1e-4)


def test_unpacked_batches_and_cached_decoding_stay_sdpa():
    varlen, dense = _model(VARLEN_SDPA).eval(), _model("sdpa").eval()
    dense.load_state_dict(varlen.state_dict())
    ids = torch.randint(1, 500, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        assert torch.equal(varlen(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits)
        outs = []
        for model in (varlen, dense):
            prefill = model(ids[:1, :6], use_cache=True)
            step = model(ids[:1, 6:7], past_key_values=prefill.past_key_values, use_cache=True)
            outs.append(step.logits)
        assert torch.equal(*outs)


def test_auto_picks_varlen_sdpa_without_flash(monkeypatch):
    import model.lalm as lalm
    assert resolve_attention("auto") == VARLEN_SDPA  # no GPU here
    assert resolve_attention(VARLEN_SDPA) == VARLEN_SDPA and resolve_attention("sdpa") == "sdpa"
    monkeypatch.setattr(lalm, "flash_attention_status", lambda: (True, "flash_attn 2.8.3"))
    assert resolve_attention("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attention("auto", torch.float32) == VARLEN_SDPA  # flash-attention computes in half precision


def test_decoder_checkpointing_recomputes_the_same_packed_attention():
    batch = collate_packed(ROWS, 0)
    plain, checkpointed = _model(VARLEN_SDPA).train(), _model(VARLEN_SDPA).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_gradient_checkpointing(["decoder"])
    for model in (plain, checkpointed):
        model(**_inputs(batch)).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)

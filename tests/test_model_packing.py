"""Packed rows (segment_ids): each sample's logits and loss equal those of the sample run alone."""
from __future__ import annotations

import pytest
import torch

from data.loading.batching import collate_packed
from data.features import num_audio_tokens
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM, packed_attention, packed_position_ids

torch.set_num_threads(1)
PATCH = 511  # the tiny preset's <audio_patch>
PAD = 0


def _sample(seed: int, prefix: int, chunk_frames: list, answer: int) -> dict:
    """A prefix, one patch run per audio chunk (text between them), a labelled answer; labels[0] is -100."""
    gen = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(1, 500, (prefix,), generator=gen)]
    mels = []
    for frames in chunk_frames:
        pieces.append(torch.full((num_audio_tokens(frames),), PATCH))
        pieces.append(torch.randint(1, 500, (2,), generator=gen))
        mels.append(torch.randn(128, frames, generator=gen))
    pieces.append(torch.randint(1, 500, (answer,), generator=gen))
    input_ids = torch.cat(pieces)
    labels = torch.full_like(input_ids, -100)
    labels[-answer:] = input_ids[-answer:]
    return {"input_ids": input_ids, "labels": labels, "mels": mels}


SAMPLES = {
    "audio": _sample(1, 3, [150], 9),           # 19 audio tokens
    "text": _sample(2, 6, [], 7),                # text only
    "two_chunks": _sample(3, 2, [97, 60], 5),    # two audio spans in one sample
}


def _mel_batch(mels: list):
    if not mels:
        return None, None
    out = torch.zeros(len(mels), 128, max(m.shape[1] for m in mels))
    for i, m in enumerate(mels):
        out[i, :, :m.shape[1]] = m
    return out, torch.tensor([m.shape[1] for m in mels])


def _pack(rows: list, length: int) -> dict:
    """rows: lists of sample names packed left to right and padded to `length`, as data.loading.batching lays
    them out."""
    B = len(rows)
    batch = {"input_ids": torch.full((B, length), PAD), "labels": torch.full((B, length), -100),
             "segment_ids": torch.zeros(B, length, dtype=torch.long),
             "position_ids": torch.zeros(B, length, dtype=torch.long)}
    spans, mels = {}, []
    for r, names in enumerate(rows):
        start = 0
        for seg, name in enumerate(names, 1):
            s = SAMPLES[name]
            n = len(s["input_ids"])
            batch["input_ids"][r, start:start + n] = s["input_ids"]
            batch["labels"][r, start:start + n] = s["labels"]
            batch["segment_ids"][r, start:start + n] = seg
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            spans[name] = (r, start, n)
            mels += s["mels"]  # row-major: the order their patch runs appear in the batch
            start += n
        batch["position_ids"][r, start:] = torch.arange(length - start)
    batch["mels"], batch["mel_lengths"] = _mel_batch(mels)
    return batch, spans


def _alone(model, name: str):
    s = SAMPLES[name]
    mels, mel_lengths = _mel_batch(s["mels"])
    kw = dict(input_ids=s["input_ids"][None], mels=mels, mel_lengths=mel_lengths)
    logits = model(**kw).logits[0]
    out = model(**kw, labels=s["labels"][None])
    return logits, out.loss, out.num_label_tokens


LAYOUTS = {"one_row": [["audio", "text", "two_chunks"]], "two_rows": [["two_chunks", "text"], ["audio"]]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("attention", ["sdpa", "varlen_sdpa", "eager"])
def test_packed_logits_and_loss_equal_each_sample_alone(attention, layout):
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(preset_config("tiny"), attention=attention).eval()
    length = max(sum(len(SAMPLES[n]["input_ids"]) for n in row) for row in LAYOUTS[layout]) + 5  # + padding
    batch, spans = _pack(LAYOUTS[layout], length)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        packed = model(**batch)
        alone = {name: _alone(model, name) for name in SAMPLES}
    for name, (row, start, n) in spans.items():
        torch.testing.assert_close(packed_logits[row, start:start + n], alone[name][0], atol=1e-5, rtol=0)
    counts = torch.tensor([alone[name][2] for name in SAMPLES], dtype=torch.float64)
    losses = torch.tensor([float(alone[name][1]) for name in SAMPLES], dtype=torch.float64)
    assert packed.num_label_tokens == int(counts.sum()) == 9 + 7 + 5
    assert float(packed.loss) == pytest.approx(float((losses * counts).sum() / counts.sum()), abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "varlen_sdpa"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_batches_from_collate_packed_keep_samples_apart(layout, attention):
    # data.loading.batching lists mels sample by sample, row by row: the order the model fills patch rows in.
    rows = [[{"key": name, "input_ids": SAMPLES[name]["input_ids"].tolist(), "num_audio_s": 0.0,
              "labels": SAMPLES[name]["labels"].tolist(), "mels": SAMPLES[name]["mels"]} for name in row]
            for row in LAYOUTS[layout]]
    batch = collate_packed(rows, PAD)
    mine, spans = _pack(LAYOUTS[layout], batch["input_ids"].shape[1])
    for key in ("input_ids", "labels", "segment_ids", "mels", "mel_lengths"):
        assert torch.equal(batch[key], mine[key]), key
    real = mine["segment_ids"] > 0  # padding positions do not matter
    assert torch.equal(batch["position_ids"][real], mine["position_ids"][real])
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(preset_config("tiny"), attention=attention).eval()
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "segment_ids",
                                                 "mels", "mel_lengths", "cu_seq_lens", "max_length")}).logits
        for name, (row, start, n) in spans.items():
            torch.testing.assert_close(logits[row, start:start + n], _alone(model, name)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "varlen_sdpa"])
def test_packed_gradients_equal_summed_alone_gradients(attention):
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(preset_config("tiny"), attention=attention).eval()
    batch, _ = _pack(LAYOUTS["one_row"], 80)
    packed = model(**batch)
    packed.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = sum(_alone(model, name)[2] for name in SAMPLES)
    for name in SAMPLES:
        _, loss, count = _alone(model, name)
        (loss * count / total).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4)
    assert got["encoder.conv1.weight"].abs().sum() > 0  # the audio path was trained through the packed row


def test_packed_position_ids_restart_per_segment():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    assert packed_position_ids(segment_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]


def test_packed_attention_masks():
    segment_ids = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask, extra = packed_attention(segment_ids, "sdpa", torch.float32)
    assert extra == {} and mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [0, 0, 1, 0, 0, 0],
                                         [0, 0, 1, 1, 0, 0],
                                         [0, 0, 1, 1, 1, 0],
                                         [0, 0, 0, 0, 0, 1]]
    eager, _ = packed_attention(segment_ids, "eager", torch.float32)
    assert torch.equal(eager == 0, mask) and eager.min() == torch.finfo(torch.float32).min


def test_flash_attention_gets_varlen_boundaries():
    # flash_attn itself needs a GPU; what we hand transformers' flash path is checked here.
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    mask, extra = packed_attention(segment_ids, "flash_attention_2", torch.bfloat16)
    assert mask is None
    assert extra["cu_seq_lens_q"].tolist() == extra["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 10, 12]
    assert extra["cu_seq_lens_q"].dtype == torch.int32
    assert extra["max_length_q"] == extra["max_length_k"] == 4


def test_segment_ids_errors():
    model = StepAudio2ForCausalLM(preset_config("tiny")).eval()
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"segment_ids must be an integer tensor \[B, T\], got torch.float32"):
        model(input_ids=ids, segment_ids=torch.ones(1, 4))
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model(input_ids=ids, segment_ids=torch.ones(1, 4, dtype=torch.long), use_cache=True)

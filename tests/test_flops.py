"""train.flops: model FLOPs by hand for the tiny preset, packed against padded attention, the peak table."""
import time

import pytest
import torch

from data.loading.batching import collate, collate_packed
from model.config import preset_config
from train import flops as F
from train.config import LoraConfig

# tiny: hidden 64, intermediate 128, 2 layers, 4 heads x 16, 2 key/value heads x 16, vocabulary 512;
# encoder width 32, 2 layers, 128 mels; adapter hidden 2048, kernel 3, stride 2.
TINY_LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate + up + down = 36,864
TINY_DECODER = 2 * TINY_LAYER                                        # 73,728
TINY_HEAD = 64 * 512                                                 # 32,768


@pytest.fixture(scope="module")
def tiny():
    return preset_config("tiny")


def test_parameter_counts_by_hand(tiny):
    assert F.decoder_matmul_params(tiny) == TINY_DECODER == 73_728
    assert F.lm_head_params(tiny) == TINY_HEAD
    mini = preset_config("mini")
    # Qwen2.5-7B: 28 layers of 3584 wide, 4 key/value heads of 128, MLP 18944.
    assert F.decoder_matmul_params(mini) == 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)


def test_flops_per_token_by_hand(tiny):
    # full training: 6 x (decoder + lm_head) + 3 x 2 x layers x 64 x (L + 1)
    assert F.flops_per_token(tiny, 128) == 6 * (73_728 + 32_768) + 3 * 2 * 2 * 64 * 129 == 738_048
    # stage 1 of the paper: the adapter alone trains; decoder and lm_head pass the gradient (2 passes)
    adapter_only = F.training_passes(["adapter"])
    assert adapter_only == {"encoder": 1, "adapter": 3, "decoder": 2, "lm_head": 2}
    assert F.flops_per_token(tiny, 128, adapter_only) == 4 * (73_728 + 32_768) + 3 * 2 * 2 * 64 * 129
    # forward only (generation, a frozen reference); a score model has no lm_head
    assert F.flops_per_token(tiny, 1, F.forward_passes()) == 2 * (73_728 + 32_768) + 2 * 2 * 64 * 2
    assert F.flops_per_token(tiny, 128, lm_head=False) == 6 * 73_728 + 3 * 2 * 2 * 64 * 129
    # only the output layer trains: nothing before it needs a gradient
    assert F.training_passes(["lm_head"]) == {"encoder": 1, "adapter": 1, "decoder": 1, "lm_head": 3}
    # LoRA on the decoder: no base weight trains, the gradient runs through the decoder and lm_head
    lora = LoraConfig(enabled=True)
    assert F.training_passes(lora=lora) == {"encoder": 1, "adapter": 1, "decoder": 2, "lm_head": 2}
    with pytest.raises(ValueError, match="trainable groups"):
        F.training_passes(["decoders"])


def test_encoder_flops_by_hand(tiny):
    # 1 s = 100 mel frames -> conv2 50 -> pool 25 -> adapter conv 13 frames
    encoder = 2 * (100 * 3 * 128 * 32 + 50 * 3 * 32 * 32 + 2 * 50 * 12 * 32 * 32)  # conv1, conv2, 2 blocks
    attention = 2 * 4 * 32 * 50 * 50
    adapter = 2 * 13 * (3 * 32 * 32 + 32 * 2048 + 2048 * 64)
    # frozen encoder: forward only; trained adapter: 3 passes
    assert F.encoder_flops_per_audio_second(tiny, chunk_s=1.0) == encoder + attention + 3 * adapter == 21_437_440
    trained = F.training_passes(["encoder", "adapter"])
    assert F.encoder_chunk_flops(tiny, 100, trained) == 3 * (encoder + attention + adapter)
    # per second at 25 s chunks: the attention term grows with the chunk
    per_s_25 = F.encoder_flops_per_audio_second(tiny, chunk_s=25.0)
    assert per_s_25 == F.encoder_chunk_flops(tiny, 2500) / 25
    assert per_s_25 > F.encoder_flops_per_audio_second(tiny, chunk_s=1.0)


def _sample(n: int, key: str, labelled_from: int = 1):
    labels = [-100] * labelled_from + list(range(3 + labelled_from, 3 + n))
    return {"input_ids": list(range(3, 3 + n)), "labels": labels,
            "mels": [], "key": key, "uid": key, "num_audio_s": 0.0}


def test_packed_attention_counts_segments_not_rows(tiny):
    a, b = _sample(10, "a"), _sample(6, "b")
    packed = collate_packed([[a, b]], pad_id=0, max_len=24)
    assert packed["input_ids"].shape == (1, 16) and packed["num_tokens"] == 16
    varlen = F.flops_breakdown(tiny, packed, varlen=True)
    dense = F.flops_breakdown(tiny, packed, varlen=False)
    per_pair = 3 * 2 * 2 * 64  # passes x 2 x layers x q_width: attention = per_pair x n (n + 1)
    assert varlen["attention"] == per_pair * (10 * 11 + 6 * 7)
    assert dense["attention"] == per_pair * 16 * 17
    assert varlen["decoder"] == dense["decoder"] == 6 * TINY_DECODER * 16
    # lm_head on the labelled targets only: 9 + 5 (each sample's first label is masked)
    assert packed["num_loss_tokens"] == 14 and varlen["lm_head"] == 6 * TINY_HEAD * 14
    # the same samples padded one per row cost what the packed row costs with varlen
    padded = collate([a, b], pad_id=0)
    assert padded["input_ids"].shape == (2, 10)
    assert F.flops_breakdown(tiny, padded, varlen=False) == varlen
    assert F.step_flops(tiny, packed, varlen=True) == sum(varlen.values())


def test_step_flops_matches_flops_per_token_and_counts_audio(tiny):
    row = collate([_sample(128, "x", labelled_from=0)], pad_id=0)
    assert row["num_loss_tokens"] == 127  # position t predicts t + 1: the last token predicts nothing
    assert F.step_flops(tiny, row) == 128 * F.flops_per_token(tiny, 128) - 6 * TINY_HEAD
    with_audio = dict(row, mel_lengths=torch.tensor([100, 60]))
    assert F.flops_breakdown(tiny, with_audio)["encoder"] == F.encoder_chunk_flops(tiny, 100) + \
        F.encoder_chunk_flops(tiny, 60)


def test_gpu_table_by_name(monkeypatch):
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA H20": 148e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12,
             "NVIDIA GeForce RTX 4090": 165.2e12, "NVIDIA A10": 125e12}
    for name, bf16 in names.items():
        assert F.gpu_peak_flops(name, torch.bfloat16) == bf16, name
    assert F.gpu_peak_flops("h100", torch.bfloat16) == 989e12  # the short keys of train.plan --gpu
    assert F.gpu_peak_flops("NVIDIA A100 80GB PCIe", torch.float32) == 19.5e12
    assert F.gpu_peak_flops("NVIDIA A100 80GB PCIe", torch.float32, tf32=True) == 156e12
    assert F.gpu_peak_flops("NVIDIA A10G", torch.bfloat16) is None  # not in the table: no guess
    assert F.gpu_peak_flops("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # no bf16 tensor cores

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert F.device_peak_flops("cuda:0", torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert F.device_peak_flops("cuda", torch.bfloat16) is None
    assert F.mfu(400e12, None) is None


def test_cpu_peak_is_measured_once():
    peak = F.device_peak_flops("cpu", torch.float32)
    assert peak > 1e8  # any CPU of this decade does better than 0.1 GFLOP/s
    t0 = time.perf_counter()
    assert F.device_peak_flops(torch.device("cpu"), torch.float32) == peak  # cached
    assert time.perf_counter() - t0 < 0.01
    assert F.mfu(peak / 4, peak) == 0.25
    with pytest.raises(ValueError, match="peak"):
        F.mfu(1.0, 0.0)

"""The encoder's sinusoid table built under deepspeed.zero.Init in bf16 (ZeRO-3) is the float32 table
rounded once to bf16, also past position 256, where bf16 positions are no longer whole numbers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json, math, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from train.engine import init_distributed
    init_distributed(timeout_s=120)
    import deepspeed
    from model.config import preset_config
    from model.encoder import AudioEncoder, sinusoids

    def torch_sinusoids(length, channels):  # the table as it was built before: with torch constructors
        log_step = math.log(10000.0) / (channels // 2 - 1)
        inv = torch.exp(-log_step * torch.arange(channels // 2, dtype=torch.float32))
        time_TC = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
        return torch.cat([torch.sin(time_TC), torch.cos(time_TC)], dim=1)

    enc = preset_config("tiny").audio_encoder_config
    zero3_bf16 = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=zero3_bf16):
        encoder = AudioEncoder(enc.n_mels, enc.n_audio_ctx, enc.n_audio_state, enc.n_audio_head, enc.n_audio_layer)
        old_way = torch_sinusoids(enc.n_audio_ctx, enc.n_audio_state)
    weight = encoder.positional_embedding.weight
    partitioned = weight.numel() == 0
    with deepspeed.zero.GatheredParameters([weight]):
        table = weight.detach().clone()
    expected = sinusoids(enc.n_audio_ctx, enc.n_audio_state).to(torch.bfloat16)
    exact = lambda t: [row for row in (0, 255, 256, 300, 1000, 1499) if not torch.equal(t[row], expected[row])]
    print(json.dumps({"partitioned": partitioned, "dtype": str(table.dtype), "shape": list(table.shape),
                      "wrong_rows": exact(table), "all_equal": torch.equal(table, expected),
                      "old_way_dtype": str(old_way.dtype), "old_way_wrong_rows": exact(old_way.to(torch.bfloat16))}))
""")


def test_the_sinusoid_table_is_exact_under_zero_init_in_bf16():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partitioned"] and result["dtype"] == "torch.bfloat16" and result["shape"] == [1500, 32]
    assert result["wrong_rows"] == [] and result["all_equal"]
    # Why numpy: zero.Init turns torch.arange's float32 into bf16, so the table built with torch
    # constructors (the code before) was wrong, row 1000 among others.
    assert result["old_way_dtype"] == "torch.bfloat16"
    assert result["old_way_wrong_rows"] == [255, 256, 300, 1000, 1499]

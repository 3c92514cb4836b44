"""The loss benchmark's contract on a tiny size: its last line is one JSON object with the five keys."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_line_has_the_keys_and_both_paths_agree():
    proc = subprocess.run([sys.executable, "-m", "model.bench_loss", "--json", "--tokens", "2100", "--vocab", "300",
                           "--hidden", "16", "--dtype", "fp32", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert sorted(result) == ["chunked_peak_bytes", "chunked_s", "floor_bytes", "naive_peak_bytes", "naive_s"]
    assert all(isinstance(v, int) and v >= 0 for k, v in result.items() if k.endswith("_bytes"))
    assert all(v > 0 for k, v in result.items() if k.endswith("_s"))
    assert result["floor_bytes"] == 300 * 16 * 4  # lm_head's fp32 weight gradient
    # The two paths compute the same loss (printed with 4 decimals) over 2100 rows = 3 chunks of 1024.
    losses = [line.split("loss ")[-1] for line in lines if line.strip().startswith(("fused", "naive"))]
    assert len(losses) == 2 and losses[0] == losses[1]

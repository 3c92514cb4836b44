"""`python -m train.rl.bench --json` at the tiny size: every figure is there and positive, the KV-cache and
recomputed decodes produce the same tokens, and so do ZeRO-3's two paths on both ranks."""
import json
import math
import sys

from conftest import run_cli
from train.rl.bench import first_difference


def test_bench_json_figures_and_equal_tokens():
    proc = run_cli(sys.executable, "-m", "train.rl.bench", "--preset", "tiny", "--new-tokens", "12", "--prompts", "2",
                   "--prompt-len", "16", "--json", timeout=240)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    for key in ("kv_tokens_per_s", "nokv_tokens_per_s", "zero3_gathered_tokens_per_s", "zero3_pertoken_tokens_per_s",
                "kv_speedup", "zero3_speedup"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    assert report["same_tokens"] is True and report["first_difference"] is None
    assert report["zero3_same_tokens"] is True
    assert report["kv_speedup"] == report["kv_tokens_per_s"] / report["nokv_tokens_per_s"]
    assert report["zero3_speedup"] == report["zero3_gathered_tokens_per_s"] / report["zero3_pertoken_tokens_per_s"]
    settings = (report["preset"], report["new_tokens"], report["zero3_new_tokens"], report["prompts"])
    assert settings == ("tiny", 12, 12, 2)
    # No stop tokens: each rank decoded exactly prompts x new tokens, and the sum is over both ranks.
    ranks = report["zero3_ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["tokens"] == 2 * 12 for r in ranks)
    assert report["zero3_gathered_tokens_per_s"] == sum(r["tokens"] / r["gathered_s"] for r in ranks)
    text = "\n".join(lines[:-1])
    assert "| KV cache, one process (cpu, 1 thread(s)) | 12 |" in text and ">= 5x at 256 new tokens" in text
    assert "KV cache and recomputation decode the same tokens: True" in text


def test_first_difference_names_row_and_step():
    assert first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert first_difference([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == "row 1, step 1"
    assert first_difference([[1, 2]], [[1]]) == "row 0, step 1"

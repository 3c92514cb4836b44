"""`python -m train.bench --json` on the tiny model, one rank, a few steps: every contender reports real tokens/s,
packing pads less than Trainer's pad-to-longest batches, the HF batch size matches ours' real tokens per step, and
the bare loop over our batches trains exactly as our loop does (same batches, same initial weights)."""
import json
import math
import sys

from conftest import run_cli

PREFIXES = ("ours", "hf_trainer", "hf_grouped", "bare")
SPEEDS = tuple(f"{p}_tokens_per_s" for p in PREFIXES) + tuple(f"{p}_tokens_per_cpu_s" for p in PREFIXES)


def test_bench_json_figures(tmp_path):
    proc = run_cli(sys.executable, "-m", "train.bench", "--json", "--preset", "tiny", "--world", "1", "--threads", "1",
                   "--steps", "4", "--warmup", "1", "--repeats", "1", "--num-samples", "6", "--max-seq-len", "256",
                   "--max-tokens", "512", "--data", str(tmp_path / "data"), timeout=600)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    for key in (*SPEEDS, "ours_padding", "hf_padding", "hf_grouped_padding", "ours_vs_hf", "ours_vs_hf_grouped",
                "ours_vs_bare", "ours_vs_hf_cpu", "ours_vs_hf_grouped_cpu", "ours_vs_bare_cpu"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    assert report["ours_vs_hf"] == report["ours_tokens_per_s"] / report["hf_trainer_tokens_per_s"]
    assert report["ours_vs_bare"] == report["ours_tokens_per_s"] / report["bare_tokens_per_s"]
    for name, runs in report["runs"].items():  # one round each; a contender cannot use more cores than exist
        assert len(runs) == 1 and 0 < runs[0]["cores_used"] < 3, (name, runs)
    # Packed rows pad far less than one sample per row padded to the longest of a random batch.
    assert report["ours_padding"] < 0.1 < report["hf_padding"] < 1
    assert report["hf_grouped_padding"] < 1
    # HF's batch size is chosen so that its real tokens per step match ours on average.
    ratio = report["hf_real_tokens_per_step"] / report["ours_real_tokens_per_step"]
    assert 0.6 < ratio < 1.6, ratio
    # Same batches, same initial weights, same AdamW on one rank: the bare loop's losses are ours.
    assert abs(report["ours_loss"] - report["bare_loss"]) < 1e-4, (report["ours_loss"], report["bare_loss"])
    settings = report["settings"]
    assert settings["preset"] == "tiny" and settings["world"] == 1 and settings["threads_per_rank"] == 1
    assert settings["hf_engine"] == "DeepSpeedEngine"  # Trainer ran through its DeepSpeed integration
    assert set(report["goals"]) == {"vs_hf", "vs_hf_grouped", "vs_bare"}
    text = "\n".join(lines[:-1])
    assert "HF Trainer + DeepSpeed, grouped by length" in text and "goal >= 1.5x" in text

"""`python -m data.tools.bench --json` on a tiny mixture: the figures exist, are sane, and packing beats padding."""
import json
import math
import sys

from conftest import run_cli
from data.tools.bench import build_mixture


def test_bench_json_figures(tmp_path):
    proc = run_cli(sys.executable, "-m", "data.tools.bench", "--json", "--samples", "24", "--epochs", "1",
                   "--max-seq-len", "512", "--rows", "2", "--buffer", "16", "--data", str(tmp_path / "mix"),
                   timeout=300)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    for key in ("ours_rt_per_worker", "baseline_rt_per_worker", "packing_efficiency",
                "baseline_packing_efficiency", "ours_startup_s", "speedup"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    assert report["packing_efficiency"] <= 1.0 and report["baseline_packing_efficiency"] <= 1.0
    assert report["packing_efficiency"] > report["baseline_packing_efficiency"]
    assert report["speedup"] == report["ours_rt_per_worker"] / report["baseline_rt_per_worker"]
    assert report["baseline"]["samples"] == 24 and report["ours"]["samples"] >= 24
    assert set(report["goals"]) == {"rt_per_worker", "speedup", "packing_efficiency"}
    # The human-readable report precedes the JSON and states each goal.
    text = "\n".join(lines[:-1])
    assert "x real time per worker" in text and "goal >= 500x per worker:" in text
    # --data keeps the mixture: asked again for the same one, nothing is rebuilt.
    wav = next((tmp_path / "mix" / "baseline" / "wav").iterdir())
    before = wav.stat().st_mtime_ns
    paths = build_mixture(str(tmp_path / "mix"), 24)
    assert wav.stat().st_mtime_ns == before and paths["shards"] == str(tmp_path / "mix" / "shards")
    assert len(list((tmp_path / "mix" / "baseline" / "wav").iterdir())) == 24

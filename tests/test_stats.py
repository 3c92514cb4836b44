"""python -m data.corpus.stats: counts and duration histogram read from the shards themselves."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from data.audio import encode_flac
from data.corpus.prepare import prepare_manifest
from data.shards import ShardWriter
from data.corpus.stats import BIN_LABELS, collect, duration_bin, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_duration_bins_are_half_open():
    assert BIN_LABELS == ("0-1", "1-2", "2-5", "5-10", "10-20", "20-30", "30+")
    assert [duration_bin(s) for s in (0.0, 0.999, 1.0, 4.99, 5.0, 19.9, 20.0, 30.0, 600.0)] == [
        "0-1", "0-1", "1-2", "2-5", "5-10", "10-20", "20-30", "30+", "30+"]


@pytest.fixture
def dataset(tmp_path):
    """Seven samples of 0.5 .. 31 s with tasks, languages, speakers and styles, prepared into 3 shards."""
    durations_s = [0.5, 0.75, 1.5, 3.0, 7.0, 12.0, 31.0]
    fields = [{"task": "asr", "language": "en", "speaker": "ann", "emotion": "happy"},
              {"task": "asr", "language": "en", "speaker": "ann"},
              {"task": "tts", "language": "de", "speaker": "bob", "style": "whisper"},
              {"language": "de", "speaker": "bob", "emotion": "sad", "style": "ignored"},
              {"task": "s2tt", "speaker": "ann"},
              {"task": "tts", "language": "en", "speaker": "cy", "emotion": "happy"},
              {"task": "asr", "language": "en", "speaker": "cy"}]
    lines = []
    for i, (duration_s, extra) in enumerate(zip(durations_s, fields)):
        # A quiet tone compresses well, so even 31 s of FLAC stays small.
        t = np.arange(int(duration_s * 16000)) / 16000
        sf.write(tmp_path / f"{i}.wav", (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000,
                 subtype="PCM_16")
        lines.append(json.dumps({"audio": f"{i}.wav", "text": f"s{i}", **extra}) + "\n")
    (tmp_path / "m.jsonl").write_text("".join(lines))
    index = prepare_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), shard_size=3, workers=1,
                             progress=False)
    return tmp_path / "out", index


def _hours(*durations_s):
    return round(sum(durations_s) / 3600, 6)


def test_stats_json_counts_every_dimension_and_matches_the_index(dataset):
    out, index = dataset
    proc = subprocess.run([sys.executable, "-m", "data.corpus.stats", str(out / "shard-*.tar"), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["num_shards"] == 3 and stats["num_samples"] == 7 and stats["errors"] == []
    assert stats["hours"] == _hours(0.5, 0.75, 1.5, 3.0, 7.0, 12.0, 31.0)
    assert stats["duration_histogram"] == {"0-1": 2, "1-2": 1, "2-5": 1, "5-10": 1, "10-20": 1, "20-30": 0,
                                           "30+": 1}
    assert stats["counts"]["task"] == {
        "asr": {"samples": 4, "hours": _hours(0.5, 0.75, 3.0, 31.0)},  # the sample without a task is ASR
        "s2tt": {"samples": 1, "hours": _hours(7.0)},
        "tts": {"samples": 2, "hours": _hours(1.5, 12.0)}}
    assert {k: v["samples"] for k, v in stats["counts"]["language"].items()} == {"de": 2, "en": 4, "unknown": 1}
    assert {k: v["samples"] for k, v in stats["counts"]["speaker"].items()} == {"ann": 3, "bob": 2, "cy": 2}
    # "emotion" wins over "style" when a sample has both.
    assert stats["counts"]["style"] == {"happy": {"samples": 2, "hours": _hours(0.5, 12.0)},
                                        "sad": {"samples": 1, "hours": _hours(3.0)},
                                        "unknown": {"samples": 3, "hours": _hours(0.75, 7.0, 31.0)},
                                        "whisper": {"samples": 1, "hours": _hours(1.5)}}
    assert stats["counts"] == index["counts"]


def test_stats_reads_the_shards_not_the_index(dataset, tmp_path, capsys):
    out, _ = dataset
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())
    index["counts"] = {}  # a stale or edited index must not change what stats reports
    index_path.write_text(json.dumps(index))
    # A shard from another writer: no duration_s (read from the FLAC header), a broken JSON, no JSON.
    with ShardWriter(str(tmp_path / "other")) as writer:
        writer.write("nodur", {"flac": encode_flac(torch.zeros(40000)), "json": b'{"text": "x", "task": "tts"}'})
        writer.write("badjson", {"flac": encode_flac(torch.zeros(10)), "json": b"{oops"})
        writer.write("nojson", {"flac": encode_flac(torch.zeros(10))})
    other = str(tmp_path / "other" / "shard-000000.tar")
    stats = collect([str(out / "shard-000000.tar"), other])
    assert stats["num_samples"] == 4 and stats["duration_histogram"]["2-5"] == 1
    assert stats["counts"]["task"]["tts"] == {"samples": 2, "hours": _hours(1.5, 2.5)}
    assert [e.split(": ")[0] for e in stats["errors"]] == [f"{other}:badjson", f"{other}:nojson"]
    assert stats["errors"][1] == f"{other}:nojson: no .json member"

    assert main([str(out)]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == "7 samples, 0.015 h in 3 shards"
    assert "asr          4      0.010" in report
    assert report[-7:] == ["0-1                  2  ########################################",
                           "1-2                  1  ####################",
                           "2-5                  1  ####################",
                           "5-10                 1  ####################",
                           "10-20                1  ####################",
                           "20-30                0",
                           "30+                  1  ####################"]

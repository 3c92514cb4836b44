"""python -m train.report on a fake run folder and a fake 2-stage curriculum: PNGs that are PNGs, and
REPORT.md with the run's numbers."""
import json
import subprocess
import sys
from pathlib import Path

from train import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _write_metrics(folder: Path, lines) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def _train_lines(steps, tokens_per_step, loss0, t0, tasks=(), eval_metric=None, eval_start=None, eval_end=None,
                 mfu=None):
    """metrics.jsonl as train.loop writes it: eval at start, a line per log window, eval at the end, done."""
    lines = []
    if eval_metric:
        lines.append({"step": 0, "time": t0, f"eval/{eval_metric}_start": eval_start, "eval/num_samples": 24})
    for step in range(10, steps + 1, 10):
        line = {"step": step, "time": t0 + step, "loss": loss0 / step, "lr": 1e-3 * (1 - step / (steps + 10)),
                "grad_norm": 1.0, "tokens": tokens_per_step * step, "tokens_per_s": 1000.0 + step,
                "padding": 0.1, "data_stall": 0.01, "skipped_samples": 0}
        for i, task in enumerate(tasks):
            line[f"loss/{task}"] = (i + 1) * loss0 / step
        if mfu is not None:
            line["mfu"] = mfu
        lines.append(line)
    if eval_metric:
        lines.append({"step": steps, "time": t0 + steps + 5, f"eval/{eval_metric}_end": eval_end,
                      "eval/num_samples": 24})
    lines.append({"step": steps, "time": t0 + steps + 6, "done": True, "final_step": steps,
                  "tokens": tokens_per_step * steps, "wall_s": steps + 6.0})
    return lines


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size > 1000


def test_plain_run(tmp_path):
    run = tmp_path / "run"
    lines = _train_lines(40, 100, 8.0, 1000.0, eval_metric="wer", eval_start=1.2, eval_end=0.25, mfu=0.125)
    lines.insert(2, {"step": 15, "time": 1015.0, "reward": 0.5, "kl": 0.01})  # an RL line
    lines[-2]["eval/wer_num_codes_end"] = 412  # a count beside the metric: not a figure to plot
    _write_metrics(run, lines)
    (run / "metrics.jsonl").open("a").write('{"step": 41, "loss": 1.0')  # a line cut off by a kill
    out = tmp_path / "out"
    assert subprocess.run([sys.executable, "-m", "train.report", str(run), "--out", str(out)], cwd=ROOT,
                          check=True, capture_output=True, text=True).returncode == 0
    for name in ("loss.png", "lr.png", "throughput.png", "eval_wer.png", "rl.png"):
        _assert_png(out / name)
    text = (out / "REPORT.md").read_text()
    # steps 40, tokens 4,000, wall 46 s, tokens/s mean of 1010..1040, MFU 12.5%, final loss 8 / 40
    assert "| run | done | 40 | 4,000 | 46 s | 1,025 | 12.5% | 0.2000 | wer 1.2 -> 0.25 |" in text
    assert not (out / "eval_wer_num_codes.png").exists()
    assert report.eval_values(report.load_run(run)[0][0]) == {"wer": {"start": 1.2, "end": 0.25}}
    assert not (run / "REPORT.md").exists()


def test_two_stage_curriculum(tmp_path):
    run = tmp_path / "curriculum"
    _write_metrics(run / "stages" / "0-asr", _train_lines(30, 1000, 6.0, 0.0, eval_metric="wer", eval_start=1.095,
                                                          eval_end=0.125))
    _write_metrics(run / "stages" / "1-mix", _train_lines(20, 2000, 4.0, 100.0, tasks=("asr", "tts"),
                                                          eval_metric="bleu", eval_start=0.09, eval_end=13.0))
    summary = {"run_dir": "/elsewhere/curriculum", "stages": [
        {"index": 0, "name": "asr", "run_dir": "/elsewhere/curriculum/stages/0-asr", "status": "done", "steps": 30,
         "tokens": 30000, "wall_s": 244.0, "metric": "wer", "eval_start": 1.095, "eval_end": 0.125},
        {"index": 1, "name": "mix", "run_dir": "/elsewhere/curriculum/stages/1-mix", "status": "done", "steps": 20,
         "tokens": 40000, "wall_s": 7300.0, "metric": "bleu", "eval_start": 0.09, "eval_end": 13.0},
        {"index": 2, "name": "dialogue", "run_dir": "/elsewhere/curriculum/stages/2-dialogue", "status": "pending"}]}
    (run / "curriculum.json").write_text(json.dumps(summary))

    stages, curriculum = report.load_run(run)
    assert curriculum and [s.name for s in stages] == ["asr", "mix", "dialogue"]
    assert [s.offset for s in stages] == [0, 30, 50]  # one step axis: stage 1's step 10 is step 40
    assert report.series(stages[1], "loss/tts")[0][0] == 40

    result = report.write_report(run)
    names = {p.name for p in result["plots"]}
    assert names == {"loss.png", "lr.png", "throughput.png", "eval_wer.png", "eval_bleu.png"}
    for path in result["plots"]:
        _assert_png(path)
    text = (run / "REPORT.md").read_text()
    assert "| asr | done | 30 | 30,000 | 4.1 min | 1,020 | - | 0.2000 | wer 1.095 -> 0.125 |" in text
    # per-task final losses of the mixture: asr 4 / 20, tts 2 x 4 / 20
    mix = "| mix | done | 20 | 40,000 | 2.0 h | 1,015 | - | 0.2000 (asr 0.2000, tts 0.4000) | bleu 0.09 -> 13 |"
    assert mix in text
    assert "| dialogue | pending | - | - | - | - | - | - | - |" in text
    assert "| total | | 50 | 70,000 | 2.1 h |" in text
    assert "![eval_bleu](eval_bleu.png)" in text


def test_not_a_run_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr

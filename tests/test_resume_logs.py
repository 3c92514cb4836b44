"""A restart tidies its run folder (train.run_folder): the temporaries a killed attempt left half-written go,
and metrics.jsonl and sample_keys/ hold every step once, though a resume repeats the steps after its checkpoint."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from train.run_folder import drop_steps_after, process_start_time, remove_stale_temporaries

MAX_STEPS = 8


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_lines_past_the_resumed_step_go_atomically(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    records[2:2] = [{"step": 2, "eval/wer_step2": 0.5}]
    records += [{"step": 4, "eval/wer_step4": 0.4}, {"note": "no step"}, {"step": 6, "done": True}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lo')  # cut short by a kill
    inode = log.stat().st_ino
    # Steps 4, 5, 6, step 4's evaluation, step 6's "done" line, and the torn line.
    assert drop_steps_after(log, 3) == 6
    assert lines(log) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval/wer_step2": 0.5},
                          {"step": 3, "loss": 1.0 / 3}, {"note": "no step"}]
    assert log.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    # Nothing past the step: the file is left as it is.
    inode = log.stat().st_ino
    assert drop_steps_after(log, 3) == 0 and log.stat().st_ino == inode
    assert drop_steps_after(tmp_path / "missing.jsonl", 3) == 0


def test_stale_temporaries_go_and_those_a_live_process_writes_stay(tmp_path):
    run = tmp_path / "run"
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.time()
    old = started - 3600

    def make(rel: str, file: str = "", changed: float = old) -> None:
        path = run / rel
        if file:
            path.mkdir(parents=True, exist_ok=True)
            (path / file).write_text("x")
            os.utime(path / file, (changed, changed))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        os.utime(path, (changed, changed))

    try:
        make(f".export.tmp-{dead}", "model-00001-of-00001.safetensors", changed=started + 1)  # fresh, owner gone
        make(f".export.old-{dead}", "config.json")
        make(f".export.tmp-{live.pid}", "model-00001-of-00001.safetensors", changed=started + 1)  # being written
        make(f".init.tmp.tmp-{live.pid}", "config.json")  # a live pid, but untouched since before the start
        make("checkpoints/step_00000006.tmp", "mp_rank_00_model_states.pt")
        make("checkpoints/step_00000009.tmp", "mp_rank_00_model_states.pt")
        os.utime(run / "checkpoints/step_00000009.tmp/mp_rank_00_model_states.pt", (started + 1, started + 1))
        make("checkpoints/latest.tmp")
        make("checkpoints/universal/step_00000003.tmp", "DONE")
        make(f"sample_keys/.rank_0.jsonl.tmp-{dead}")
        for keep in ("checkpoints/step_00000003/train_state.json", "checkpoints/latest", "export/config.json",
                     "metrics.jsonl", "sample_keys/rank_0.jsonl", "config.yaml"):
            make(keep)

        removed = remove_stale_temporaries(str(run), started)
    finally:
        live.kill()
        live.wait()
    names = [line.split(" (")[0].removeprefix(f"removed the stale temporary {run}/") for line in removed]
    assert sorted(names) == sorted([f".export.old-{dead}", f".export.tmp-{dead}", f".init.tmp.tmp-{live.pid}",
                                    "checkpoints/latest.tmp", "checkpoints/step_00000006.tmp",
                                    "checkpoints/universal/step_00000003.tmp", f"sample_keys/.rank_0.jsonl.tmp-{dead}"])
    assert f"(its process {dead} is gone)" in removed[names.index(f".export.tmp-{dead}")]
    assert "before this run started" in removed[names.index("checkpoints/step_00000006.tmp")]
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == sorted([f".export.tmp-{live.pid}/model-00001-of-00001.safetensors", "checkpoints/latest",
                           "checkpoints/step_00000003/train_state.json",
                           "checkpoints/step_00000009.tmp/mp_rank_00_model_states.pt", "config.yaml",
                           "export/config.json", "metrics.jsonl", "sample_keys/rank_0.jsonl"])


def test_process_start_time_is_when_the_process_began():
    code = "from train.run_folder import process_start_time; print(process_start_time())"
    before = time.time()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)\n" + code], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    second = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    started = [float(first.communicate()[0]), float(second.stdout)]
    # Both from the same boot time, in clock ticks: the second began 1.5 s (and its start-up) after the first.
    assert 1.5 <= started[1] - started[0] < 3
    # The boot time has whole seconds, and the wall clock may have been set since the boot.
    assert abs(started[0] - before) < 30
    assert process_start_time() < started[0]


def launch(run_dir: Path, data: dict, fault: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch", "--gpus-per-node", "2", "--min-free-gb", "0.1", "recipes/demo/asr.yaml",
           f"run_dir={run_dir}", f"data.shards=[{data['train']}]", f"data.tokenizer={data['tokenizer']}",
           "eval.shards=[]", "model.preset=tiny", "data.batch_size=2", "data.num_workers=1", "data.shuffle_buffer=4",
           "optim.warmup_steps=2", f"max_steps={MAX_STEPS}", "metrics.log_every=1", "metrics.progress=false",
           "metrics.sample_keys=true", "checkpoint.export=false", "checkpoint.every_steps=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("STEPAUDIO_FAULT", None)
    if fault:
        env["STEPAUDIO_FAULT"] = fault
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def steps_of(records: list) -> list:
    return sorted(r["step"] for r in records)


def test_a_resumed_run_logs_every_step_once(espeak_data, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 0 is SIGKILLed after step 5; the last checkpoint is step 3's.
    crashed = launch(run_dir, espeak_data, fault="kill:5:0")
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    killed_metrics = [r for r in lines(run_dir / "metrics.jsonl") if "loss" in r]
    killed_keys = {r: lines(run_dir / "sample_keys" / f"rank_{r}.jsonl") for r in (0, 1)}
    assert steps_of(killed_metrics) == [1, 2, 3, 4]  # step 4 is past the checkpoint: the resume repeats it
    assert steps_of(killed_keys[0]) == [1, 2, 3, 4, 5]
    assert steps_of(killed_keys[1])[:5] == [1, 2, 3, 4, 5]
    # What a kill during the export leaves, and a checkpoint's temporary from an attempt before this one.
    export_tmp = run_dir / f".export.tmp-{dead_pid()}"
    export_tmp.mkdir()
    (export_tmp / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1024)
    step_tmp = run_dir / "checkpoints" / "step_00000006.tmp"
    step_tmp.mkdir()
    (step_tmp / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1024)
    for path in (step_tmp / "mp_rank_00_model_states.pt", step_tmp):
        os.utime(path, (time.time() - 3600, time.time() - 3600))

    done = launch(run_dir, espeak_data)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "at step 3" in done.stderr
    assert f"removed the stale temporary {export_tmp} (its process" in done.stderr
    assert f"removed the stale temporary {step_tmp} (unchanged since" in done.stderr
    assert not export_tmp.exists() and not step_tmp.exists()
    assert f"{run_dir / 'metrics.jsonl'}: dropped 1 line(s) of an earlier attempt from step 4 on" in done.stderr

    records = lines(run_dir / "metrics.jsonl")
    loss_lines = [r for r in records if "loss" in r]
    assert steps_of(loss_lines) == list(range(1, MAX_STEPS + 1))
    assert [r["step"] for r in records if r.get("done")] == [MAX_STEPS]
    # The lines before the checkpoint are the killed attempt's, kept as they were.
    assert loss_lines[:3] == killed_metrics[:3]
    seen: collections.Counter = collections.Counter()
    for rank in (0, 1):
        keys = lines(run_dir / "sample_keys" / f"rank_{rank}.jsonl")
        assert steps_of(keys) == list(range(1, MAX_STEPS + 1))
        # The resumed run trains on the same samples at steps 4 and 5 as the killed attempt did.
        assert keys[3:5] == killed_keys[rank][3:5]
        for record in keys:
            seen.update(zip(record["epochs"], record["keys"]))
    # 8 steps x 2 ranks x 2 samples: the 24 of epoch 0 once each, then 8 of epoch 1.
    assert sum(n for (epoch, _), n in seen.items() if epoch == 0) == 24
    assert len([k for (epoch, k) in seen if epoch == 0]) == 24
    assert sum(n for (epoch, _), n in seen.items() if epoch == 1) == 8 and set(seen.values()) == {1}


def test_a_restart_before_the_first_checkpoint_logs_every_step_once(espeak_data, tmp_path):
    """Killed after step 2, before the first checkpoint (step 3): the restart begins at step 0 again, and the
    killed attempt's lines go (found by train.drill: they used to stay, so steps 1-2 were logged twice)."""
    run_dir = tmp_path / "run"
    assert launch(run_dir, espeak_data, fault="kill:2:0").returncode != 0
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert steps_of([r for r in lines(run_dir / "metrics.jsonl") if "loss" in r]) == [1]
    done = launch(run_dir, espeak_data)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{run_dir / 'metrics.jsonl'}: dropped 1 line(s) of an earlier attempt from step 0 on" in done.stderr
    assert steps_of([r for r in lines(run_dir / "metrics.jsonl") if "loss" in r]) == list(range(1, MAX_STEPS + 1))
    for rank in (0, 1):
        assert steps_of(lines(run_dir / "sample_keys" / f"rank_{rank}.jsonl")) == list(range(1, MAX_STEPS + 1))


def test_a_rank_opens_its_watchdog_file_though_another_rank_removed_the_folder(tmp_path, monkeypatch):
    """A rank whose run ends removes the empty watchdog/ folder; another rank, between its mkdir and its
    open, must make the folder again (found by train.drill: FileNotFoundError on a resume with no steps left)."""
    import builtins

    from train.watchdog import Watchdog

    dog = Watchdog(str(tmp_path), 1, 60.0)
    real_open, calls = builtins.open, []

    def racing_open(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:  # the other rank's stop() removes the folder just before our first open
            (tmp_path / "watchdog").rmdir()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", racing_open)
    dog.beat()
    monkeypatch.setattr(builtins, "open", real_open)
    try:
        assert len(calls) == 2 and (tmp_path / "watchdog" / "rank_1.txt").is_file()
    finally:
        dog.stop()
    assert not (tmp_path / "watchdog").exists()

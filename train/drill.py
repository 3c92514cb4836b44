"""`python -m train.drill [--kills 10] [--seed 0] [--json]`: the fault drill. A 2-rank run of a tiny 2-stage
curriculum (gloo on CPU, the espeak corpus) is SIGKILLed at kill points drawn by the seed, and after each kill
the same command resumes it; the drill passes when the last attempt finishes, every stage's exported weights
are torch.equal to an uninterrupted run's, sample_keys/ holds every sample once and metrics.jsonl every step's
loss once, as that run's do. `--points a,b` names the kill points instead; `--via torchrun` skips the launcher.

Kill points (train.faults does the killing, from STEPAUDIO_FAULT; a stage's steps count from 1):
  mid-step:S:N        the whole job (launcher, torchrun, both ranks), in step N's backward pass
  checkpoint:S:N:rR   the whole job, half-way through rank R's first file of the step-N checkpoint
  export:S            the whole job, half-way through the weights file of stage S's export
  rankR-only:S:N      rank R alone, after step N (torchrun stops the other)
  stage-boundary      the whole job, after step 1 of the second stage (before its first checkpoint)
Every drawn set has one of each kind. A kill must land where aimed (a missed one, or one that leaves a process
of the run behind, fails the drill), and each resume must start from the checkpoint that kill left.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
STAGES: Tuple[Tuple[str, int], ...] = (("a", 8), ("b", 8))  # (name, steps): 6 steps are an epoch of 24 samples
CHECKPOINT_EVERY = 3
KINDS = ("mid-step", "checkpoint", "export", "rank-only", "stage-boundary")
ATTEMPT_TIMEOUT_S = 300

RECIPE = """\
# Written by train.drill: a tiny 2-stage curriculum on 2 ranks.
seed: 0
model: {{preset: tiny}}
data: {{shards: [{train}], tokenizer: {tokenizer}, task: asr, batch_size: 2, num_workers: 1, shuffle_buffer: 4}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
engine: {{zero_stage: 0, precision: fp32}}
checkpoint: {{every_steps: {every}, keep_last: 2}}
metrics: {{log_every: 1, progress: false, sample_keys: true}}
eval: {{shards: []}}
stages:
  - {{name: {name0}, max_steps: {steps0}}}
  - name: {name1}
    max_steps: {steps1}
    overrides:
      model: {{trainable: [adapter, embeddings, decoder, lm_head]}}
      optim: {{lr: 1.0e-3, warmup_steps: 1}}
"""


def ensure_data(folder: Path) -> Dict[str, Path]:
    """24 sentences spoken by espeak-ng, a 300-token tokenizer and shards of 6 (as tests/conftest.py's
    espeak_data), built under `folder` once."""
    from data.tools.demo import make_demo
    from data.corpus.prepare import prepare_manifest
    from data.text_tokenizer import build_text_tokenizer, extend_tokenizer

    paths = {"train": folder / "train", "tokenizer": folder / "tokenizer"}
    done = folder / "DONE"
    if done.is_file():
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    make_demo(str(folder / "corpus"), num_train=24, num_heldout=1, tasks=["asr"])
    manifest = folder / "corpus" / "train.jsonl"
    texts = [json.loads(line)["text"] for line in manifest.read_text(encoding="utf-8").splitlines()]
    extend_tokenizer(build_text_tokenizer(texts, 300), 16).save_pretrained(str(paths["tokenizer"]))
    prepare_manifest(str(manifest), str(paths["train"]), shard_size=6, workers=1, progress=False)
    done.write_text("")
    return paths


def stage_dir(run_dir: Path, stage: int) -> Path:
    return run_dir / "stages" / f"{stage}-{STAGES[stage][0]}"


def last_checkpoint_before(step: int, steps: int) -> int:
    """The newest checkpoint step before `step` (0: none), with every CHECKPOINT_EVERY and the last step."""
    return max([s for s in range(1, step) if s % CHECKPOINT_EVERY == 0 or s == steps], default=0)


@dataclass(frozen=True)
class KillPoint:
    kind: str
    stage: int
    step: int
    """The step it lands in: during it (mid-step), after it, in its checkpoint, in the export after it (the last)."""
    rank: int = 0

    @property
    def name(self) -> str:
        stage = STAGES[self.stage][0]
        return {"mid-step": f"mid-step:{stage}:{self.step}",
                "checkpoint": f"checkpoint:{stage}:{self.step}:r{self.rank}",
                "export": f"export:{stage}",
                "rank-only": f"rank{self.rank}-only:{stage}:{self.step}",
                "stage-boundary": "stage-boundary"}[self.kind]

    def order(self) -> Tuple[int, int, int]:
        """When it lands in an uninterrupted run: stage, step, then backward < after the step < save < export."""
        return self.stage, self.step, {"mid-step": 0, "rank-only": 1, "stage-boundary": 1, "checkpoint": 2,
                                       "export": 3}[self.kind]

    def fault_env(self, run_dir: Path) -> Dict[str, str]:
        """STEPAUDIO_FAULT (and STEPAUDIO_FAULT_AFTER past the first stage) for train.faults."""
        spec = {"mid-step": f"kill_job_in_backward:{self.step - 1}:0",  # armed after the step before
                "checkpoint": f"kill_job_in_write:{self.step}:{self.rank}",
                "export": f"kill_job_in_export:{self.step}:0",
                "rank-only": f"kill:{self.step}:{self.rank}",
                "stage-boundary": f"kill_job:{self.step}:0"}[self.kind]
        env = {"STEPAUDIO_FAULT": spec}
        if self.stage > 0:
            env["STEPAUDIO_FAULT_AFTER"] = str(stage_dir(run_dir, self.stage - 1) / "DONE")
        return env

    def resume_point(self) -> Tuple[int, int]:
        """(stage, step) the next attempt starts from."""
        steps = STAGES[self.stage][1]
        return self.stage, steps if self.kind == "export" else last_checkpoint_before(self.step, steps)


def candidates() -> List[KillPoint]:
    points = []
    for stage, (_, steps) in enumerate(STAGES):
        points += [KillPoint("mid-step", stage, n) for n in range(2, steps + 1)]  # step 1 has no step before
        points += [KillPoint("rank-only", stage, n, r) for n in range(1, steps + 1) for r in (0, 1)]
        points += [KillPoint("checkpoint", stage, n, r) for n in range(1, steps + 1)
                   if n % CHECKPOINT_EVERY == 0 or n == steps for r in (0, 1)]
        points.append(KillPoint("export", stage, steps))
    return points + [KillPoint("stage-boundary", 1, 1)]


def parse_point(name: str) -> KillPoint:
    for point in candidates():
        if point.name == name:
            return point
    raise ValueError(f"kill point {name!r}: expected one of {[p.name for p in candidates()]}")


def draw(seed: int, kills: int) -> List[KillPoint]:
    """`kills` distinct points, one of each kind first (as many as fit), in the order they land."""
    rng = random.Random(seed)
    pool = candidates()
    chosen = [rng.choice([p for p in pool if p.kind == kind]) for kind in KINDS[:kills]]
    rest = [p for p in pool if p not in chosen]
    chosen += rng.sample(rest, min(kills - len(chosen), len(rest)))
    return sorted(chosen, key=KillPoint.order)


def check_sequence(points: Sequence[KillPoint]) -> None:
    """Each point must lie past where the attempt before it resumes (a mid-step kill is armed by the step before
    its own, which that attempt must run)."""
    start = (0, 0)
    for point in sorted(points, key=KillPoint.order):
        armed_by = point.step - 1 if point.kind == "mid-step" else point.step
        if point.stage == start[0] and armed_by <= start[1]:
            raise ValueError(f"kill point {point.name}: the attempt before it resumes at stage "
                             f"{STAGES[start[0]][0]} step {start[1]}, past it")
        start = point.resume_point()


# ------------------------------------------------------------------------------------------- attempts

def launch_cmd(recipe: Path, run_dir: Path, via: str = "launch") -> List[str]:
    """The command each attempt runs: our launcher (a whole-job kill SIGKILLs it), or torchrun itself (then
    torchrun is killed; the launcher's checks cost seconds per attempt, which the test saves)."""
    if via == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "--max-restarts", "0", "-m", "train", str(recipe), f"run_dir={run_dir}"]
    return [sys.executable, "-m", "launch", "--gpus-per-node", "2", "--min-free-gb", "0.1", str(recipe),
            f"run_dir={run_dir}"]


def processes_of(run_dir: Path) -> List[int]:
    """Live processes whose command line names the run folder (the launcher, torchrun, the ranks and their
    loader workers, which leave within 5 s of their rank)."""
    arg, found = f"run_dir={run_dir}", []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if arg in cmdline.read_bytes().decode(errors="replace").split("\0"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return [pid for pid in found if pid != os.getpid()]


def attempt(recipe: Path, run_dir: Path, log: Path, fault: Dict[str, str], via: str) -> Tuple[int, List[int]]:
    """One run of the command (with `fault` in its environment): (launcher exit status, pids of the run left
    running 60 s after it ended, which are then killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPAUDIO_FAULT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", **fault)
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(launch_cmd(recipe, run_dir, via), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=ATTEMPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            out.write(f"\n[drill] timed out after {ATTEMPT_TIMEOUT_S} s: killed\n")
    deadline = time.time() + 60
    while processes_of(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    left = processes_of(run_dir)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return rc, left


def started_at(log_text: str) -> Optional[Tuple[int, int]]:
    """(stage, step) an attempt started from, from rank 0's messages: its first stage not skipped, and the
    step it resumed at (0: from the stage's start)."""
    stage: Optional[int] = None
    for line in log_text.splitlines():
        entered = re.search(r"\[curriculum\] stage (\d+) '[^']*' ->", line)
        if entered and stage is None:
            stage = int(entered.group(1))
            continue
        if entered:
            break
        resumed = re.search(r"resumed from \S+ at step (\d+)", line)
        if stage is not None and resumed:
            return stage, int(resumed.group(1))
    return None if stage is None else (stage, 0)


def jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def missed(point: KillPoint, run_dir: Path, rc: int, log_text: str) -> Optional[str]:
    """Why the kill did not land where aimed, or None."""
    if rc == 0:
        return "the attempt finished: the fault never fired"
    if point.kind == "rank-only":
        if "Signal 9 (SIGKILL) received by PID" not in log_text:
            return f"exit {rc}, and torchrun names no rank killed by SIGKILL"
    elif rc != -signal.SIGKILL:
        return f"the launcher exited {rc}, not by SIGKILL"
    folder = stage_dir(run_dir, point.stage)
    if (folder / "DONE").is_file():
        return f"stage {STAGES[point.stage][0]} is done: the kill came after it"
    if point.kind == "checkpoint":
        # torch.save writes a zip whose directory sits at the end: a file cut short is not a zip.
        partial = folder / "checkpoints" / f"step_{point.step:08d}.tmp"
        cut = [p for p in partial.glob("*.pt") if not zipfile.is_zipfile(p)]
        return None if cut else f"no half-written file in {partial.name}"
    if point.kind == "export":
        cut = [p for p in folder.glob(".export.tmp-*/*.safetensors") if not _complete_safetensors(p)]
        return None if cut else "no half-written weights file in an .export.tmp-PID"
    # Killed in (mid-step) or after step N: the rank logged step N's keys, no one logged its loss.
    keys = jsonl(folder / "sample_keys" / f"rank_{point.rank}.jsonl")
    losses = [r["step"] for r in jsonl(folder / "metrics.jsonl") if "loss" in r]
    if not keys or keys[-1]["step"] != point.step or point.step in losses:
        return (f"rank {point.rank}'s last logged step is {keys[-1]['step'] if keys else None}, losses logged to "
                f"step {max(losses, default=0)}: not killed in step {point.step}")
    return None


def _complete_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # safetensors raises its own error types for a file cut short
        return False


# ------------------------------------------------------------------------------------------- checks

def export_weights(run_dir: Path, stage: int) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for shard in sorted((stage_dir(run_dir, stage) / "export").glob("model*.safetensors")):
        out.update(load_file(shard))
    return out


def weight_differences(run_dir: Path, reference: Path) -> List[str]:
    """Every stage's export against the reference's: tensors that are not torch.equal (or are missing)."""
    problems = []
    for stage, (name, _) in enumerate(STAGES):
        got, want = export_weights(run_dir, stage), export_weights(reference, stage)
        if not want or sorted(got) != sorted(want):
            problems.append(f"stage {name}: tensors {sorted(set(got) ^ set(want))[:5]} differ in presence")
            continue
        problems += [f"stage {name}: {key}" for key in want if not torch.equal(got[key], want[key])]
    return problems


def sample_key_problems(run_dir: Path, reference: Path) -> Tuple[List[str], int]:
    """(what is wrong, samples counted): every rank logs each step once, the same samples as the reference at
    each step, and no (epoch, key) twice in a stage."""
    problems, counted = [], 0
    for stage, (name, steps) in enumerate(STAGES):
        seen: Dict[Tuple[Any, str], int] = {}
        for rank in (0, 1):
            rel = Path("sample_keys") / f"rank_{rank}.jsonl"
            got, want = jsonl(stage_dir(run_dir, stage) / rel), jsonl(stage_dir(reference, stage) / rel)
            logged = [r["step"] for r in got]
            if logged != list(range(1, steps + 1)):
                problems.append(f"stage {name} rank {rank} logged steps {logged}")
            if got != want:
                problems.append(f"stage {name} rank {rank}: not the uninterrupted run's samples")
            for record in got:
                for epoch, key in zip(record["epochs"] or [None] * len(record["keys"]), record["keys"]):
                    seen[(epoch, key)] = seen.get((epoch, key), 0) + 1
        twice = sorted(f"{key} (epoch {epoch})" for (epoch, key), n in seen.items() if n > 1)
        if twice:
            problems.append(f"stage {name}: {len(twice)} samples logged as trained more than once, e.g. {twice[:3]}")
        counted += sum(seen.values())
    return problems, counted


def loss_problems(run_dir: Path, reference: Path) -> List[str]:
    """Each stage's metrics.jsonl logs every step's loss once, bit-equal to the reference's."""
    problems = []
    for stage, (name, steps) in enumerate(STAGES):
        got, want = ([(r["step"], r["loss"]) for r in jsonl(stage_dir(run, stage) / "metrics.jsonl") if "loss" in r]
                     for run in (run_dir, reference))
        if [step for step, _ in got] != list(range(1, steps + 1)):
            problems.append(f"stage {name}: metrics.jsonl logs the loss of steps {[step for step, _ in got]}")
        elif got != want:
            problems.append(f"stage {name}: losses differ from the uninterrupted run's at steps "
                            f"{[a[0] for a, b in zip(got, want) if a != b]}")
    return problems


# ------------------------------------------------------------------------------------------- the drill

@dataclass
class KillRecord:
    point: str
    fault: str
    exit_code: int
    missed: Optional[str]
    left_running: List[int]
    expected_resume: str
    resumed: Optional[str] = None
    """Where the next attempt started (filled in after it ran)."""


def _at(where: Optional[Tuple[int, int]]) -> Optional[str]:
    return None if where is None else f"{STAGES[where[0]][0]}@{where[1]}"


def run_drill(work: Path, points: Sequence[KillPoint], data: Optional[Dict[str, Path]] = None, via: str = "launch",
              say=lambda text: print(text, file=sys.stderr, flush=True)) -> Dict[str, Any]:
    """The uninterrupted run, then the drilled one killed at `points` (in the order they land) and resumed after
    each; returns the tally (see main)."""
    t0 = time.time()
    check_sequence(points)
    points = sorted(points, key=KillPoint.order)
    work = work.resolve()
    data = data or ensure_data(work / "data")
    recipe = work / "drill.yaml"
    recipe.write_text(RECIPE.format(train=data["train"], tokenizer=data["tokenizer"], every=CHECKPOINT_EVERY,
                                    name0=STAGES[0][0], steps0=STAGES[0][1], name1=STAGES[1][0],
                                    steps1=STAGES[1][1]), encoding="utf-8")
    reference, drilled, logs = work / "uninterrupted", work / "drilled", work / "logs"
    for folder in (reference, drilled, logs):
        shutil.rmtree(folder, ignore_errors=True)
    logs.mkdir(parents=True)

    say(f"[drill] uninterrupted run -> {reference}")
    rc, left = attempt(recipe, reference, logs / "uninterrupted.log", {}, via)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {rc}): see {logs / 'uninterrupted.log'}")
    kills: List[KillRecord] = []
    final_rc, final_left = None, []
    for i in range(len(points) + 1):
        point = points[i] if i < len(points) else None
        fault = point.fault_env(drilled) if point else {}
        log = logs / f"attempt_{i:02d}.log"
        rc, left = attempt(recipe, drilled, log, fault, via)
        text = log.read_text(encoding="utf-8", errors="replace")
        start = _at(started_at(text))
        if kills:
            kills[-1].resumed = start
        if point is None:
            final_rc, final_left = rc, left
            say(f"[drill] attempt {i}: started at {start}, exit {rc}")
            break
        record = KillRecord(point.name, fault["STEPAUDIO_FAULT"], rc, missed(point, drilled, rc, text), left,
                            _at(point.resume_point()))
        kills.append(record)
        say(f"[drill] attempt {i}: started at {start}, killed at {point.name}: {record.missed or 'landed'} "
            f"(exit {rc})")

    finished = final_rc == 0
    weights = weight_differences(drilled, reference) if finished else ["the last attempt did not finish"]
    keys, counted = sample_key_problems(drilled, reference) if finished else (["not checked"], 0)
    losses = loss_problems(drilled, reference) if finished else ["not checked"]
    tally = {
        "kills": len(kills), "landed": sum(k.missed is None for k in kills),
        "resumes": len(kills), "resumed_as_expected": sum(k.resumed == k.expected_resume for k in kills),
        "finished": finished, "runs": 1, "equal_runs": int(finished and not weights),
        "samples_once": finished and not keys, "samples": counted, "losses_once_and_equal": finished and not losses,
        "left_running": sum(len(k.left_running) for k in kills) + len(final_left),
        "weight_problems": weights[:10], "sample_key_problems": keys[:10], "loss_problems": losses,
        "points": [asdict(k) for k in kills], "via": via, "wall_s": round(time.time() - t0, 1), "work": str(work)}
    tally["ok"] = (tally["landed"] == tally["kills"] == tally["resumed_as_expected"] and finished
                   and tally["equal_runs"] == 1 and tally["samples_once"] and tally["losses_once_and_equal"]
                   and tally["left_running"] == 0)
    return tally


def summary(tally: Dict[str, Any]) -> str:
    lines = [f"{k['point']:<22} {k['fault']:<28} exit {k['exit_code']:>3}  {k['missed'] or 'landed'}; resumed at "
             f"{k['resumed']} (expected {k['expected_resume']})" for k in tally["points"]]
    lines.append(f"kills {tally['kills']} ({tally['landed']} landed where aimed), resumes {tally['resumes']} "
                 f"({tally['resumed_as_expected']} from the expected checkpoint, last one "
                 f"{'finished' if tally['finished'] else 'FAILED'}), equal runs {tally['equal_runs']}/{tally['runs']} "
                 f"(every stage's export torch.equal), samples once: {'yes' if tally['samples_once'] else 'NO'} "
                 f"({tally['samples']} logged), losses once and equal: "
                 f"{'yes' if tally['losses_once_and_equal'] else 'NO'}, "
                 f"processes left running {tally['left_running']}, "
                 f"{tally['wall_s']:.0f} s: {'PASS' if tally['ok'] else 'FAIL'}")
    lines += [f"  weights: {p}" for p in tally["weight_problems"]]
    lines += [f"  sample keys: {p}" for p in tally["sample_key_problems"]]
    lines += [f"  metrics: {p}" for p in tally["loss_problems"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.drill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kill points to draw (one of each kind first)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points")
    parser.add_argument("--points", default=None,
                        help="comma-separated kill point names instead of drawing them, e.g. export:a,rank1-only:b:4")
    parser.add_argument("--work", default="runs/drill", help="folder for the data, both runs and the logs")
    parser.add_argument("--via", choices=("launch", "torchrun"), default="launch",
                        help="run each attempt with python -m launch (default) or torchrun itself")
    parser.add_argument("--json", action="store_true", help="also print the tally as one JSON line")
    args = parser.parse_args(argv)
    try:
        if args.points:
            points = [parse_point(name.strip()) for name in args.points.split(",") if name.strip()]
        elif 1 <= args.kills <= len(candidates()):
            points = draw(args.seed, args.kills)
        else:
            raise ValueError(f"--kills {args.kills}: expected 1 to {len(candidates())}")
        check_sequence(points)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tally = run_drill(Path(args.work), points, via=args.via)
    except RuntimeError as e:  # the uninterrupted run failed: nothing to compare with
        print(f"error: {e}", file=sys.stderr)
        return 1
    tally["seed"] = None if args.points else args.seed
    print(summary(tally))
    if args.json:
        print(json.dumps(tally))
    return 0 if tally["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

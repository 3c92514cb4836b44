"""`python -m launch [--nodes N] [--gpus-per-node G] RECIPE.yaml [dotted.key=value ...]`: one torchrun per
node, after environment checks; forwards preemption signals to the ranks and reports how the run ended.

Killed, even with SIGKILL, it takes torchrun and the ranks with it (train.lifeline).

Exit codes: 0 done, 75 preempted after a checkpoint (requeue; also written to $STEPAUDIO_PREEMPTED_FILE
when set), 2 bad arguments or environment, other = a rank failed (torchrun's summary names it; per-rank
logs in RUN_DIR/logs/node_R/).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

from launch.checks import CudaUnavailableError, check_devices, check_run_dir, network_settings
from launch.topology import Topology, detect, rank_threads
from train.lifeline import LAUNCHER_PID_ENV, parent_death_arm, parent_of
from train.preempt import MARKER_ENV, PREEMPTED_EXIT_CODE
from train.recipe import ConfigError, load_config


def torchrun_command(topo: Topology, run_dir: str, train_args: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(topo.procs_per_node),
           "--max-restarts", "0", "--tee", "3", "--log-dir", str(Path(run_dir) / "logs" / f"node_{topo.node_rank}")]
    if topo.nodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(topo.nodes), "--node-rank", str(topo.node_rank), "--rdzv-backend", "static",
                "--master-addr", topo.master_addr, "--master-port", str(topo.master_port)]
    return cmd + ["-m", "train", *train_args]


def children(pid: int) -> List[int]:
    """Direct child processes of pid (Linux /proc): torchrun's ranks, each in a session of its own."""
    return [int(proc.name) for proc in Path("/proc").glob("[0-9]*") if parent_of(int(proc.name)) == pid]


def _ignore_usr1() -> None:
    # torchrun dies on SIGUSR1 by default; only the ranks must act on it (they install their own handler).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _torchrun_preexec(launcher_pid: int):
    """What torchrun's process does before it starts: ignore SIGUSR1, and die with this launcher (a SIGKILL
    of the launcher reaches nothing in torchrun's session of its own); its ranks die with torchrun in turn
    (train.lifeline.stay_with_torchrun, in `python -m train`)."""
    arm = parent_death_arm(lambda parent: parent == launcher_pid)

    def preexec() -> None:
        _ignore_usr1()
        if arm is not None:
            arm()

    return preexec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, passed on to `python -m train`")
    parser.add_argument("--nodes", type=int, default=None, help="machines in the job (default: from Slurm or 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="ranks per machine (processes on CPU)")
    parser.add_argument("--hostfile", default=None, help="one host per line; node 0 is the master")
    parser.add_argument("--node-rank", type=int, default=None, help="this machine's index (default: detected)")
    parser.add_argument("--min-free-gb", type=float, default=5.0, help="free disk the run folder needs")
    parser.add_argument("--dry-run", action="store_true", help="check and print the torchrun command only")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(f"[launch node {topo.node_rank if topo else '?'}] {text}", file=sys.stderr, flush=True)

    topo = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        topo = detect(args.nodes, args.gpus_per_node, args.hostfile, args.node_rank)
        say(f"{topo.source}: {topo.nodes} node(s) x {topo.procs_per_node} rank(s), master "
            f"{topo.master_addr}:{topo.master_port}")
        say(check_devices(topo.procs_per_node))
        say(check_run_dir(cfg.run_dir, args.min_free_gb))
    except (ConfigError, ValueError, CudaUnavailableError) as e:
        say(f"error: {e}")
        return 2
    rank_env, threads = rank_threads(topo.procs_per_node)
    say(threads)
    for line in network_settings():
        say(line)
    latest = Path(cfg.run_dir) / "checkpoints" / "latest"
    if cfg.checkpoint.resume == "auto" and latest.is_file():
        say(f"resuming from {latest.parent / latest.read_text().strip()}")
    cmd = torchrun_command(topo, cfg.run_dir, [args.recipe, *args.overrides])
    say(" ".join(cmd))
    if args.dry_run:
        return 0

    marker = Path(cfg.run_dir) / f".preempted-node{topo.node_rank}-{os.getpid()}"
    marker.unlink(missing_ok=True)
    rank_env[MARKER_ENV] = str(marker)
    rank_env[LAUNCHER_PID_ENV] = str(os.getpid())
    child = subprocess.Popen(cmd, env=rank_env, preexec_fn=_torchrun_preexec(os.getpid()), start_new_session=True)
    preempted = []

    def forward_preemption(signum, frame):
        preempted.append(signal.Signals(signum).name)
        say(f"{preempted[-1]}: asking the ranks to checkpoint and stop")
        for rank_pid in children(child.pid):  # not their data workers, which must not see it
            os.kill(rank_pid, signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, forward_preemption)
    signal.signal(signal.SIGTERM, forward_preemption)
    signal.signal(signal.SIGINT, lambda signum, frame: child.send_signal(signal.SIGINT))
    code = child.wait()

    traces = sorted(str(p) for p in (Path(cfg.run_dir) / "watchdog").glob("rank_*.txt") if p.stat().st_size)
    if traces and code != 0:
        say(f"watchdog: no step progress for {cfg.resilience.watchdog_s} s; stack traces in {', '.join(traces)}")
    if code == 0:
        say("finished")
        return 0
    if marker.is_file():  # the signal reached a rank (not this launcher), which checkpointed and stopped
        marker.unlink()
        preempted.append(preempted[0] if preempted else "a signal to a rank")
    if preempted:
        say(f"preempted: checkpoint written, exit {PREEMPTED_EXIT_CODE} (requeue to continue)")
        # srun may kill this node once another node exits 75, so its exit code can get lost; a file
        # tells slurm/train.sbatch instead.
        if os.environ.get("STEPAUDIO_PREEMPTED_FILE"):
            Path(os.environ["STEPAUDIO_PREEMPTED_FILE"]).write_text(f"{preempted[0]} node {topo.node_rank}\n")
        return PREEMPTED_EXIT_CODE
    say(f"failed with exit code {code}; per-rank logs under {Path(cfg.run_dir) / 'logs'}")
    return code if code > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

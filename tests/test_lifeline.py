"""A SIGKILLed launcher takes torchrun and the ranks with it (train.lifeline): nothing of the run keeps
training or writing into its folder, though each runs in a session of its own."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List

from tests.conftest import REPO
from train.lifeline import LAUNCHER_PID_ENV, parent_of


def running(pid: int) -> bool:
    """pid exists and is not a zombie waiting for a parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_naming(text: str) -> Dict[int, List[str]]:
    """pid -> command line of every running process whose command line holds text (zombies have none)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(text in a for a in args):
            found[int(cmdline.parent.name)] = args
    return found


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def py(code: str, env_extra: Dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", LAUNCHER_PID_ENV)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env={**env, **env_extra},
                          capture_output=True, text=True, timeout=60)


def test_a_process_in_its_own_session_dies_with_its_parent():
    # parent -> child (own session, armed); SIGKILL the parent: the kernel SIGKILLs the child.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, subprocess, sys, time
        from train.lifeline import parent_death_arm
        me = os.getpid()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                                 preexec_fn=parent_death_arm(lambda parent: parent == me))
        print(child.pid, flush=True)
        time.sleep(120)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert parent_of(child) == parent.pid
        time.sleep(0.5)
        assert running(child)  # armed, not killed: its parent is the expected one
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not running(child), 5)
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


def test_an_orphan_before_arming_kills_itself_and_ranks_check_for_torchrun():
    arm = "from train.lifeline import parent_death_arm\nparent_death_arm(lambda parent: {})()\nprint('alive')"
    # The parent it expects is gone (here: not the one it has): it SIGKILLs itself instead of training on.
    orphan = py(arm.format("False"), {})
    assert (orphan.returncode, orphan.stdout) == (-signal.SIGKILL, "")
    kept = py(arm.format("True"), {})
    assert (kept.returncode, kept.stdout) == (0, "alive\n")

    rank = "from train.lifeline import stay_with_torchrun\nprint(stay_with_torchrun())"
    # Not started by torchrun: nothing armed.
    assert py(rank, {}).stdout == "False\n"
    # Started by torchrun under the launcher: its parent's parent must be the launcher. Here the parent is
    # this test process, so the launcher is the test's own parent ...
    launcher = str(parent_of(os.getpid()))
    assert py(rank, {"TORCHELASTIC_RUN_ID": "x", LAUNCHER_PID_ENV: launcher}).stdout == "True\n"
    # ... and with another launcher pid, torchrun is taken to have died already: the rank ends itself.
    gone = py(rank, {"TORCHELASTIC_RUN_ID": "x", LAUNCHER_PID_ENV: str(os.getpid())})
    assert (gone.returncode, gone.stdout) == (-signal.SIGKILL, "")
    assert f"torchrun, which started this rank, is gone (parent now {os.getpid()}" in gone.stderr


def launch_cmd(run_dir: Path, data: dict) -> list:
    return [sys.executable, "-m", "launch", "--gpus-per-node", "2", "--min-free-gb", "0.1", "recipes/demo/asr.yaml",
            f"run_dir={run_dir}", f"data.shards=[{data['train']}]", f"data.tokenizer={data['tokenizer']}",
            "eval.shards=[]", "model.preset=tiny", "data.batch_size=2", "data.num_workers=1",
            "optim.warmup_steps=2", "max_steps=100000", "metrics.log_every=1", "metrics.progress=false",
            "checkpoint.export=false", "checkpoint.every_steps=0"]


def folder_state(folder: Path) -> Dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_sigkill_of_the_launcher_ends_torchrun_and_both_ranks(espeak_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    env.pop("STEPAUDIO_FAULT", None)
    launcher = subprocess.Popen(launch_cmd(run_dir, espeak_data), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    try:
        assert wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1
                          or launcher.poll() is not None, 240), "no training step in 240 s"
        assert launcher.poll() is None, "the run ended before it was killed"
        before = processes_naming(str(run_dir))
        torchrun = [pid for pid, args in before.items() if "torch.distributed.run" in args]
        assert len(torchrun) == 1 and parent_of(torchrun[0]) == launcher.pid
        ranks = [pid for pid in before if parent_of(pid) == torchrun[0]]
        assert len(ranks) == 2 and all(before[pid][1:4] == ["-u", "-m", "train"] for pid in ranks)

        launcher.send_signal(signal.SIGKILL)  # no handler runs: nothing is forwarded
        launcher.wait()
        t_killed = time.time()
        assert wait_until(lambda: not processes_naming(str(run_dir)), 15), \
            f"still running 15 s after the launcher's SIGKILL: {processes_naming(str(run_dir))}"
        assert time.time() - t_killed < 15
        steps = metrics.read_text().count("\n")
        state = folder_state(run_dir)
        time.sleep(3)
        assert folder_state(run_dir) == state  # nothing writes into the run folder any more
        assert metrics.read_text().count("\n") == steps >= 1
    finally:
        launcher.kill()
        for pid in processes_naming(str(run_dir)):  # a failed test leaves no run behind
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_of_one_nodes_launcher_ends_that_node_and_then_the_job(espeak_data, tmp_path):
    # Two "nodes" on this machine, one launcher each (as srun starts them), one rank per node.
    run_dir = tmp_path / "run"
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\nlocalhost\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "MASTER_PORT": str(free_port())}
    env.pop("STEPAUDIO_FAULT", None)
    launchers = []
    for node in (0, 1):
        cmd = launch_cmd(run_dir, espeak_data)
        cmd[cmd.index("--gpus-per-node") + 1] = "1"
        cmd[3:3] = ["--hostfile", str(hosts), "--nodes", "2", "--node-rank", str(node)]
        launchers.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    metrics = run_dir / "metrics.jsonl"
    try:
        assert wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1
                          or any(p.poll() is not None for p in launchers), 240), "no training step in 240 s"
        assert all(p.poll() is None for p in launchers), "the run ended before it was killed"
        procs = processes_naming(str(run_dir))
        torchrun = [pid for pid in procs if parent_of(pid) == launchers[1].pid]
        ranks = [pid for pid in procs if parent_of(pid) in torchrun]
        assert len(torchrun) == 1 and len(ranks) == 1  # node 1's
        node1 = torchrun + ranks

        launchers[1].send_signal(signal.SIGKILL)
        launchers[1].wait()
        assert wait_until(lambda: not any(running(pid) for pid in node1), 15), "node 1 outlived its launcher"
        # Node 0's rank loses its peer in the next collective: node 0's torchrun and launcher end, with an error.
        stderr = launchers[0].communicate(timeout=120)[1]
        assert launchers[0].returncode not in (0, 75), stderr[-3000:]
        assert "[launch node 0] failed with exit code" in stderr
        assert wait_until(lambda: not processes_naming(str(run_dir)), 15), processes_naming(str(run_dir))
    finally:
        for launcher in launchers:
            launcher.kill()
        for pid in processes_naming(str(run_dir)):
            os.kill(pid, signal.SIGKILL)

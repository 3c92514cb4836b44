"""Where this process sits in a job: node count, this node's rank and the master, from Slurm's
environment, a hostfile, or the command line (one machine); and how many CPU threads each rank gets."""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple


@dataclass
class Topology:
    nodes: int
    """Machines in the job."""
    node_rank: int
    """This machine's index, 0 = the master."""
    procs_per_node: int
    """Ranks started on each machine (GPUs, or processes on CPU)."""
    master_addr: str
    """Address of node 0, where the rendezvous store listens."""
    master_port: int
    """Port of the rendezvous store; all nodes must agree on it."""
    source: str
    """Where the layout came from: single, slurm or hostfile."""


def expand_nodelist(nodelist: str) -> List[str]:
    """Slurm's compressed host list (`gpu[01-03,07],login1`) -> host names, in order."""
    hosts: List[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def read_hostfile(path: str) -> List[str]:
    """One host per line (`host` or `host slots=8`, DeepSpeed's form); `#` starts a comment."""
    hosts = [line.split("#")[0].split()[0] for line in Path(path).read_text().splitlines()
             if line.split("#")[0].strip()]
    if not hosts:
        raise ValueError(f"hostfile {path} names no hosts; expected one host name per line")
    return hosts


def _address(host: str) -> str:
    """The host's address; Slurm's NodeAddr when the name does not resolve (e.g. fake nodes of a test)."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    match = re.search(r"NodeAddr=(\S+)", out)
    if not match:
        raise ValueError(f"master node {host!r} does not resolve and Slurm knows no NodeAddr for it; "
                         f"set MASTER_ADDR")
    return match.group(1)


def detect(nodes: Optional[int], procs_per_node: int, hostfile: Optional[str] = None,
           node_rank: Optional[int] = None, env: Optional[Dict[str, str]] = None) -> Topology:
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 0))
    if hostfile:
        hosts = read_hostfile(hostfile)
        if node_rank is None:
            me = socket.gethostname()
            if me not in hosts:
                raise ValueError(f"this host {me!r} is not in hostfile {hostfile} ({hosts}); pass --node-rank")
            node_rank = hosts.index(me)
        source = "hostfile"
    elif "SLURM_JOB_NODELIST" in env and "SLURM_NODEID" in env:
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        node_rank = int(env["SLURM_NODEID"])
        # Every node derives the same port from the job id, so no node has to tell the others.
        port = port or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        source = "slurm"
    else:
        count = nodes or 1
        if count > 1 and "MASTER_ADDR" not in env:
            raise ValueError(f"--nodes {count} outside Slurm needs --hostfile, or MASTER_ADDR and --node-rank")
        hosts = [env.get("MASTER_ADDR", "127.0.0.1")] * count
        node_rank = node_rank or 0
        source = "single" if count == 1 else "env"
    if nodes is not None and nodes != len(hosts):
        raise ValueError(f"--nodes {nodes} but the {source} layout has {len(hosts)} nodes: {hosts}")
    if not 0 <= node_rank < len(hosts):
        raise ValueError(f"node rank {node_rank} is outside 0..{len(hosts) - 1} ({source}: {hosts})")
    master = env.get("MASTER_ADDR") or (_address(hosts[0]) if len(hosts) > 1 else "127.0.0.1")
    return Topology(nodes=len(hosts), node_rank=node_rank, procs_per_node=procs_per_node,
                    master_addr=master, master_port=port or 29500, source=source)


def node_cpus(env: Optional[Mapping[str, str]] = None, affinity: Optional[int] = None) -> Tuple[int, str]:
    """CPUs this node's ranks share, and where that number came from.

    What this process may run on (its affinity: the cores Slurm's cgroup or binding left it), capped by
    Slurm's allotment to the task (SLURM_CPUS_PER_TASK; train.sbatch runs one task per node, so it holds
    all of the node's ranks): without cgroups Slurm does not confine the task, but other jobs share the rest."""
    env = os.environ if env is None else env
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if not (slurm.isdigit() and int(slurm) > 0):
        return affinity, "this process's CPU affinity"
    if int(slurm) <= affinity:
        return int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    return affinity, f"this process's CPU affinity, below SLURM_CPUS_PER_TASK={slurm}"


def rank_threads(procs_per_node: int, env: Optional[Mapping[str, str]] = None,
                 affinity: Optional[int] = None) -> Tuple[Dict[str, str], str]:
    """The environment torchrun and its ranks start with, and a line saying what it set.

    Each rank gets OMP_NUM_THREADS = the node's CPUs / ranks per node (at least 1), unless the user set it:
    left unset, torchrun gives every rank of a multi-rank node one thread, whatever the node has."""
    env = dict(os.environ if env is None else env)
    cpus, source = node_cpus(env, affinity)
    threads = max(1, cpus // procs_per_node)
    if env.get("OMP_NUM_THREADS"):
        return env, (f"threads: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} per rank, as set "
                     f"({cpus} CPU(s) for {procs_per_node} rank(s) would give {threads}; from {source})")
    env["OMP_NUM_THREADS"] = str(threads)
    return env, (f"threads: OMP_NUM_THREADS={threads} per rank = {cpus} CPU(s) / {procs_per_node} rank(s) "
                 f"(from {source})")

#!/usr/bin/env bash
# A throwaway Slurm cluster on this one machine: munge + slurmctld + two fake nodes (slurmd -N node1/node2),
# everything (config, state, logs, sockets) under DIR.  Usage: cluster.sh start|stop DIR
# After start, commands need SLURM_CONF=DIR/slurm.conf (DIR/env holds the line to source).
set -euo pipefail
action=${1:?start|stop}
dir=$(realpath -m "${2:?state folder}")

stop() {
    # Only the daemons this script started, by the pid files it wrote.
    for pidfile in "$dir"/slurmd.node*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
for tool in munged slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install slurm-wlm munge" >&2; exit 3; }
done

mkdir -p "$dir"/state "$dir"/spool
base=$(( 20000 + RANDOM % 20000 ))
host=$(hostname -s)
cpus=$(nproc)
dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge.key"
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$base
SlurmUser=$(id -un)
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=socket=$dir/munge.sock,cred_expire=5
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=60
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((base + 1)) CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((base + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
CONF
echo "export SLURM_CONF=$dir/slurm.conf" > "$dir/env"
export SLURM_CONF=$dir/slurm.conf

munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munge.seed"
slurmctld -f "$dir/slurm.conf" -i
slurmd -f "$dir/slurm.conf" -N node1
slurmd -f "$dir/slurm.conf" -N node2
for _ in $(seq 100); do
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c idle || true)
    [ "$idle" = 2 ] && { echo "slurm up: node1 node2 idle (SLURM_CONF=$dir/slurm.conf)"; exit 0; }
    sleep 0.3
done
echo "slurm did not come up; logs in $dir" >&2
sinfo -N >&2 || true
stop
exit 1

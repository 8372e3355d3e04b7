#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests that submit real jobs (tests/test_workflow_slurm.py).
#
#   tests/slurm/cluster.sh start [DIR]   # write DIR/slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   tests/slurm/cluster.sh stop  [DIR]   # stop the daemons this script started
#   tests/slurm/cluster.sh env   [DIR]   # print `export SLURM_CONF=...` for the client commands
#
# Needs root and Debian's `slurm-wlm` and `munge` packages (.ci/run installs them). DIR defaults to
# /tmp/graft-slurm. Settings that work without cgroups or accounting (checked on these machines):
# proctrack/linuxproc, task/none, select/cons_tres, no accounting storage, no job accounting; two
# count-only GPUs so that GPU stages can be scheduled (they run on the CPU).
set -euo pipefail
cmd=${1:-start}
dir=$(realpath -m "${2:-/tmp/graft-slurm}")
conf="$dir/slurm.conf"
node=$(hostname -s)

need() { command -v "$1" >/dev/null || { echo "cluster.sh: $1 not found. Fix: apt-get install -y slurm-wlm munge" >&2; exit 3; }; }

start() {
  need slurmctld; need slurmd; need munged
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: must run as root (slurmd starts jobs as their users)" >&2; exit 3; }
  mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/log"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  cat > "$conf" <<CONF
ClusterName=graft-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
MpiDefault=none
GresTypes=gpu
NodeName=$node CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 )) Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  # Two count-only "GPUs" (no device files): enough for Slurm to schedule a train job's --gres=gpu:N
  # on this CPU machine, where the job itself then runs accelerate on the CPU.
  printf "NodeName=%s Name=gpu File=/dev/null\nNodeName=%s Name=gpu File=/dev/zero\n" "$node" "$node" > "$dir/gres.conf"
  export SLURM_CONF="$conf"
  if scontrol ping >/dev/null 2>&1 && ! scontrol show node "$node" | grep -q 'Gres=gpu:2'; then
    stop; sleep 1  # started with an older slurm.conf
  fi
  if ! scontrol ping >/dev/null 2>&1; then
    /usr/sbin/slurmctld -c -f "$conf"  # -c: no node or job state from an earlier cluster
    /usr/sbin/slurmd -f "$conf"
  fi
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster.sh: the node did not come up; see $dir/log/" >&2
  sinfo >&2 || true
  exit 4
}

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: $0 start|stop|env [DIR]" >&2; exit 2 ;;
esac

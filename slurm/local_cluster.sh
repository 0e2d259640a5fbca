#!/usr/bin/env bash
# A single-node SLURM on this machine (Debian's slurm-wlm), for the tests and CI: munge, slurmctld, slurmd, run as
# root without systemd or cgroups. Idempotent: `bash slurm/local_cluster.sh` starts what is not running and waits
# until the node takes jobs; `bash slurm/local_cluster.sh stop` stops it. Needs root (CI runs as root).
# The settings are the ones that work in a container: process tracking without cgroups (proctrack/linuxproc,
# task/none), no accounting, and short credential and scheduling intervals so that a requeued job runs again within
# seconds (defaults: about two minutes).
set -euo pipefail

if [ "${1:-start}" = stop ]; then
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-wlm and munge are not installed: apt-get install -y slurm-wlm munge" >&2
    exit 1
fi
NODE=$(slurmd -C | head -1)               # NodeName=<host> CPUs=... RealMemory=... as slurmd sees this machine
HOST=$(hostname -s)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=kdqa
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
CONF
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld -c   # -c: a test cluster starts with no job of an earlier run
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM is up: $(sinfo -h -o '%P %D %T %C')"
        exit 0
    fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/slurmctld.log and slurmd.log:" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1

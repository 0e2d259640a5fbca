#!/usr/bin/env bash
# One launcher per node of a multi-node SLURM job step; pipeline.py --launcher slurm runs each training stage as
#   srun --kill-on-bad-exit=1 bash slurm/node_launch.sh CONFIG SCRIPT [ARGS...]   (allocation: one task per node)
# Every task starts `accelerate launch` for its node (through launch.py, so a preemption signal ends it cleanly):
# machine rank = the task's rank (one task per node), main process = the first host of the node list, processes
# per node = the node's GPUs (KD_PROCS_PER_NODE to change), port from the job id (KD_MAIN_PROCESS_PORT to change).
set -euo pipefail
CONFIG=$1
shift
NODES=${SLURM_NTASKS:?run this with srun inside a SLURM allocation}
RANK=$SLURM_PROCID
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${KD_MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
PER_NODE=${KD_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
EXTRA=()
if grep -q DEEPSPEED "$CONFIG"; then
    EXTRA+=(--deepspeed_multinode_launcher standard)   # torch's launcher on every node, no pdsh/ssh
fi
exec "${PYTHON:-python}" "$(dirname "$0")/../launch.py" "${PYTHON:-python}" -m accelerate.commands.launch \
    --config_file "$CONFIG" --num_machines "$NODES" --machine_rank "$RANK" --num_processes $((NODES * PER_NODE)) \
    --main_process_ip "$HEAD" --main_process_port "$PORT" --same_network "${EXTRA[@]}" "$@"

"""Launch a training script so that a preemption signal ends the job cleanly wherever it lands.

    python launch.py accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_prediction.py ...
    python launch.py torchrun --nproc_per_node 4 train_prediction.py ...

SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption) sent to this process, to the launcher
it starts (accelerate launch, torchrun), to their process group, or to any worker: every rank saves one
checkpoint at the same step boundary, writes preempted.json, and the job exits 0 with no worker left behind;
rerun the same command with --resume_from_checkpoint latest to continue. Plain torchrun cannot promise that
(see kd/launcher.py for what each launcher does on its own).
"""

import sys

from kd.launcher import run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())

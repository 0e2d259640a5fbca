"""Records of a run in its output dir: what ran (arguments, resolved settings, git sha, versions, processes)
and what came out (metrics), written atomically by the main process."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from accelerate import Accelerator

from kd.files import write_json_atomic

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_sha() -> str | None:
    """HEAD of the checkout the scripts run from, with ``-dirty`` when tracked files are modified."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def run_record(args: dict, accelerator: Accelerator, **extra) -> dict:
    """args: the parsed arguments as a dict (``vars(args)``); extra: resolved settings, status, metrics."""
    import accelerate
    import transformers

    return {
        "script": os.path.basename(sys.argv[0]),
        "argv": sys.argv[1:],
        "args": dict(args),
        "git_sha": git_sha(),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
        **extra,
    }


def write_record(accelerator: Accelerator, output_dir: str, name: str, record: dict) -> None:
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(output_dir, name), record)


def write_outcome(accelerator: Accelerator, output_dir: str, record: dict, preempted_by: str | None) -> None:
    """The run's closing record: ``all_results.json`` (status finished) or, when a preemption signal stopped it,
    ``preempted.json`` (status preempted) and a message saying how to continue."""
    if preempted_by is None:
        write_record(accelerator, output_dir, "all_results.json", {**record, "status": "finished"})
        return
    write_record(accelerator, output_dir, "preempted.json", {**record, "status": "preempted"})
    accelerator.print(f"Preempted by {preempted_by}: saved {record.get('checkpoint')}. Resume with "
                      f"--resume_from_checkpoint latest (or {record.get('checkpoint')}).")

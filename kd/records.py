"""Records of a run in its output dir: what ran (arguments, resolved settings, git sha, versions, processes)
and what came out (metrics), written atomically by the main process.

Secrets (``--hub_token``) never reach a record: the records are uploaded with the model and quoted in its card.
``all_results.json`` also carries the metrics flat, under the names of HF's example scripts (:func:`flat_metrics`).
"""

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


SECRET_ARGS = ("hub_token",)
REDACTED = "<redacted>"


def redact_args(args: dict) -> dict:
    """``args`` with the value of every secret flag that was given replaced by ``<redacted>``."""
    return {k: (REDACTED if k in SECRET_ARGS and v is not None else v) for k, v in args.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the values of secret flags (``--hub_token T`` and ``--hub_token=T``) redacted."""
    flags = tuple(f"--{name}" for name in SECRET_ARGS)
    out = []
    for arg in argv:
        if out and out[-1] in flags:
            out.append(REDACTED)
        elif arg.startswith(tuple(f"{flag}=" for flag in flags)):
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(arg)
    return out


def command_record(args: dict, script: str | None = None, argv: list[str] | None = None) -> dict:
    """What ran: the script, its command line (default: this process's) and arguments (secrets redacted), the git
    sha and versions."""
    import transformers

    return {
        "script": script or os.path.basename(sys.argv[0]),
        "argv": redact_argv(sys.argv[1:] if argv is None else [str(a) for a in argv]),
        "args": redact_args(args),
        "git_sha": git_sha(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def run_record(args: dict, accelerator: Accelerator, **extra) -> dict:
    """args: the parsed arguments as a dict (``vars(args)``); extra: resolved settings, status, metrics."""
    import accelerate

    record = command_record(args)
    record["versions"]["accelerate"] = accelerate.__version__
    return {
        **record,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        **extra,
    }


# Our training figures under the names HF's Trainer gives them in its all_results.json.
HF_TRAIN_NAMES = {"train_runtime_s": "train_runtime", "train_samples_per_s": "train_samples_per_second",
                  "train_tokens_per_s": "train_tokens_per_second"}


def flat_metrics(record: dict) -> dict:
    """The nested ``eval_metrics`` / ``train_metrics`` of a record as HF's example scripts write them, flat:
    ``eval_<key>`` for every numeric eval metric (``eval_exact``, ``eval_f1``, ``eval_HasAns_f1``, ...; step 2:
    ``eval_loss``, ...), ``train_<key>`` for the training figures (HF's names where it has one:
    ``train_runtime``, ``train_samples_per_second``)."""
    flat = {}
    for prefix, metrics in (("eval", record.get("eval_metrics")), ("train", record.get("train_metrics"))):
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key if key.startswith(f"{prefix}_") else f"{prefix}_{key}"
                flat[HF_TRAIN_NAMES.get(name, name)] = value
    return flat


def write_record(accelerator: Accelerator, output_dir: str, name: str, record: dict) -> None:
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(output_dir, name), record)


def write_outcome(accelerator: Accelerator, output_dir: str, record: dict, preempted_by: str | None) -> None:
    """The run's closing record: ``all_results.json`` (status finished) or, when a preemption signal stopped it,
    ``preempted.json`` (status preempted) and a message saying how to continue. Both carry the metrics twice:
    nested (``eval_metrics``, ``train_metrics``: pipeline.py and the benchmarks read these) and flat
    (:func:`flat_metrics`: what users of HF's run_qa_no_trainer.py grep for)."""
    flat = {k: v for k, v in flat_metrics(record).items() if k not in record}  # the nested ones stay, as read
    if preempted_by is None:
        write_record(accelerator, output_dir, "all_results.json", {**record, "status": "finished", **flat})
        return
    write_record(accelerator, output_dir, "preempted.json", {**record, "status": "preempted", **flat})
    accelerator.print(f"Preempted by {preempted_by}: saved {record.get('checkpoint')}. Resume with "
                      f"--resume_from_checkpoint latest (or {record.get('checkpoint')}).")

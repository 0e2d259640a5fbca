"""An output dir belongs to one run: a new run never mixes its checkpoints, logs or results with another's.

A run gets an id when it first claims its output dir (``OUTPUT_DIR/run.json``); every checkpoint it saves records
that id, and only checkpoints with it are resumed from or pruned (kd.checkpoint.CheckpointManager). A dir that
already holds another run's checkpoints, records or model is refused, unless the run continues it
(``--resume_from_checkpoint``: same id) or replaces it (``--overwrite_output_dir``: the old checkpoints and
records are deleted first, and a new id is drawn). Modelled on the HF Trainer's and Accelerate's refusal of a
non-empty output dir.

``--overwrite_output_dir`` deletes only what the tool itself wrote there, and never an input: every script with
the flag asks :func:`overwrite_refusal` first (training runs: the names of :data:`RUN_OUTPUTS`, theirs when the dir
has a ``run.json``; export_onnx.py: the whole dir, when its ``export_report.json`` lists every name in it).

A pipeline holds its whole output dir for as long as it runs (:func:`hold_dir`): a second one on the same dir is
refused while the first, or a stage it started, is alive.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable

from kd.files import write_json_atomic

RUN_FILE = "run.json"
# What a run leaves in its output dir besides checkpoints/: records, evaluation files, the exported model.
RUN_OUTPUTS = ("run.json", "run_config.json", "train_log.jsonl", "all_results.json", "preempted.json",
               "eval_results.json", "predictions.json", "null_odds.json", "config.json", "model.safetensors",
               "pytorch_model.bin", "data_trace", "qa_settings.json", "README.md")


class OutputDirInUseError(RuntimeError):
    pass


def run_outputs(output_dir: str) -> list[str]:
    """The names in ``output_dir`` that a run left there (checkpoints/ when it holds any checkpoint)."""
    if not os.path.isdir(output_dir):
        return []
    found = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, name))]
    checkpoints = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        found.insert(0, "checkpoints/")
    return found


def read_run_id(output_dir: str) -> str | None:
    try:
        with open(os.path.join(output_dir, RUN_FILE)) as f:
            return json.load(f)["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def input_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(--flag, path) for every argument but --output_dir that names an existing local file or dir (glob patterns
    expanded): what a run may read, so what overwriting its output dir must never delete."""
    found = []
    for key, value in vars(args).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if key != "output_dir" and isinstance(item, str) and item:
                paths = sorted(glob.glob(item)) or ([item] if os.path.exists(item) else [])
                found += [(f"--{key}", path) for path in paths]
    return found


def overwrite_refusal(output_dir: str, inputs: Iterable[tuple[str, str]], doomed: Iterable[str],
                      owned: Iterable[str], writer: str) -> str | None:
    """Why ``--overwrite_output_dir`` may not delete the names ``doomed`` in ``output_dir``, or None when it may.

    Refused: ``output_dir`` is or holds one of ``inputs`` ((--flag, path), e.g. :func:`input_paths`), or a doomed
    name is not ``owned`` (what the tool's own record in the dir says it wrote; ``writer`` names the tool).
    """
    out = os.path.realpath(output_dir)
    for flag, path in inputs:
        real = os.path.realpath(path)
        if os.path.commonpath([out, real]) == out:
            return (f"--output_dir {output_dir} {'is' if real == out else 'holds'} {flag} {path}, an input of this "
                    "run, and --overwrite_output_dir would delete it; choose an --output_dir that holds no input.")
    foreign = sorted(set(doomed) - set(owned))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"--output_dir {output_dir} holds {shown}, not written by {writer}; --overwrite_output_dir deletes "
                "only what it wrote. Move those away yourself, or choose another --output_dir.")
    return None


def check_output_dir(output_dir: str, resume: bool, overwrite: bool,
                     inputs: Iterable[tuple[str, str]] = ()) -> None:
    """Raise OutputDirInUseError when ``output_dir`` holds another run and the new one neither resumes nor
    overwrites it, or when overwriting would delete an input (``inputs``: :func:`input_paths`) or files that no
    run of ours wrote (no run.json). Reads only: safe on every process before any of them writes."""
    found = run_outputs(output_dir)
    if found and not resume and not overwrite:
        raise OutputDirInUseError(
            f"--output_dir {output_dir} already holds a run ({', '.join(found)}). Pass --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to delete its checkpoints and records and start anew, "
            "or choose another --output_dir.")
    if overwrite and not resume:
        ours = found if os.path.isfile(os.path.join(output_dir, RUN_FILE)) else []
        problem = overwrite_refusal(output_dir, inputs, found, ours, f"a training run (it has no {RUN_FILE})")
        if problem:
            raise OutputDirInUseError(problem)


def claim_output_dir(output_dir: str, resume: bool, overwrite: bool, script: str) -> str | None:
    """Main process only, after :func:`check_output_dir` passed on every process: clear the old run when
    overwriting, then record this run. Returns the run id (None when resuming a run saved before run ids)."""
    if overwrite and not resume:
        for name in run_outputs(output_dir):
            path = os.path.join(output_dir, name.rstrip("/"))
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(output_dir, exist_ok=True)
    run_id = read_run_id(output_dir) if resume else None
    if run_id is None and resume and os.path.isdir(os.path.join(output_dir, "checkpoints")) \
            and not os.path.exists(os.path.join(output_dir, RUN_FILE)) and os.listdir(os.path.join(output_dir,
                                                                                                  "checkpoints")):
        return None  # checkpoints of a run from before run ids: they carry none, and this run continues them
    if run_id is None:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        write_json_atomic(os.path.join(output_dir, RUN_FILE), {"run_id": run_id, "script": script,
                                                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return run_id


def hold_dir(output_dir: str, lock_name: str) -> int:
    """Take the exclusive lock ``output_dir/lock_name`` (created with the dir) for this process and write its pid
    there; returns the lock's fd, held until it is closed in every process that inherited it (a stage passed it
    keeps the dir taken until it ends, even when the process that took it was killed). Raises
    OutputDirInUseError naming the holder's pid when another process holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, lock_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path) as f:
            holder = f.read().strip() or "unknown"
        os.close(fd)
        raise OutputDirInUseError(f"{output_dir} is in use by another run (pid {holder} holds {path}, it or a "
                                  "stage it started is still running); wait for it to end, or choose another "
                                  "--output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd

"""Resumable, verified checkpoints on top of ``accelerator.save_state``.

Layout: ``<output_dir>/checkpoints/step_00000120/`` holds Accelerate's state (model, optimizer, scheduler, RNG
states; DeepSpeed's shards when it runs) plus ``kd_state.json`` with the position in training, the run it belongs
to (kd.run_dir) and the size and content hash of every file, and, when the data is a stateful stream,
``data_state_<rank>.json`` per process with its reading position. A checkpoint is written under
``step_XXXXXXXX.partial`` and renamed only after every process has finished writing and the state file is on
disk, so a job killed mid-write leaves a ``.partial`` dir that is never resumed from. A resume checks the
hashes first and the loaded weights after: a damaged checkpoint (truncated, overwritten) is reported by path
and file and skipped for the newest intact one of the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil

import torch

from kd.files import file_digest, space_error, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "kd_state.json"
KEEP_CHOICES = ("all", "last", "none")
DATA_STATE_FILE = "data_state_{rank}.json"
_NAME = re.compile(r"^step_(\d{8})$")


@dataclasses.dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped.

    epoch: the epoch in progress; batches_in_epoch: per-process batches of it already consumed;
    completed_steps: optimizer steps done over the whole run.
    """

    epoch: int = 0
    batches_in_epoch: int = 0
    completed_steps: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def advance(self, batches_per_epoch: int | None) -> bool:
        """Count one consumed batch; True when it completed the epoch (the state then points at the next one).
        A loader without a length (an endless stream) never ends an epoch here."""
        self.batches_in_epoch += 1
        if batches_per_epoch is None or self.batches_in_epoch < batches_per_epoch:
            return False
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        return True


class CheckpointError(RuntimeError):
    pass


def manifest(directory: str) -> dict[str, list]:
    """{relative path: [size, content hash]} of every file under ``directory`` but the state file."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != STATE_FILE:
                files[rel] = [os.path.getsize(path), file_digest(path)]
    return dict(sorted(files.items()))


def damage(directory: str, expected: dict[str, list]) -> str | None:
    """What is wrong with the files of a checkpoint against its manifest, or None when all are intact."""
    for rel, (size, digest) in expected.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {size} were written (truncated?)"
        if file_digest(path) != digest:
            return f"{rel} differs from what was written (content hash mismatch)"
    return None


class CheckpointManager:
    """Saves, finds, verifies, prunes and restores the checkpoints of one run under ``<output_dir>/checkpoints``."""

    def __init__(self, output_dir: str, total_limit: int | None = None, data_state=None, run_id: str | None = None):
        """data_state: optional object with ``state_dict()`` / ``load_state_dict()`` (JSON-able) that owns the
        reading position of a stateful stream (kd.streaming.PackedStream): saved per process in every
        checkpoint and restored by resume(). run_id: the run (kd.run_dir) whose checkpoints these are; the
        checkpoints of any other run in the dir are neither resumed from nor pruned."""
        self.root = os.path.join(output_dir, "checkpoints")
        self.total_limit = total_limit or None
        self.data_state = data_state
        self.run_id = run_id
        self.last: str | None = None  # the newest checkpoint this run saved or resumed from
        self._last_state: dict | None = None

    @staticmethod
    def read_meta(path: str) -> dict | None:
        try:
            with open(os.path.join(path, STATE_FILE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def completed(self) -> list[str]:
        """This run's finished checkpoints, oldest first (name final, state file present, run id ours)."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _NAME.match(name)
            meta = self.read_meta(os.path.join(self.root, name)) if m else None
            if meta is not None and meta.get("run_id") == self.run_id:
                found.append((int(m.group(1)), os.path.join(self.root, name)))
        return [path for _, path in sorted(found)]

    def latest(self) -> str | None:
        done = self.completed()
        return done[-1] if done else None

    def resolve(self, resume_from: str | None) -> str | None:
        """Map ``--resume_from_checkpoint`` to a checkpoint dir (``latest``: this run's newest), or None to start
        fresh."""
        candidates = self.candidates(resume_from)
        return candidates[0] if candidates else None

    def candidates(self, resume_from: str | None) -> list[str]:
        """The checkpoints ``--resume_from_checkpoint`` may load, in order of preference: for ``latest`` this run's,
        newest first (none: start fresh); for a dir, that one."""
        if resume_from is None:
            return []
        if resume_from == "latest":
            return self.completed()[::-1]
        if self.read_meta(resume_from) is None:
            raise FileNotFoundError(
                f"{resume_from} is not a finished checkpoint (no {STATE_FILE}); it may have been cut off mid-write. "
                f"Finished ones: {self.completed() or 'none'}.")
        return [resume_from]

    def resume(self, accelerator, resume_from: str | None, model: torch.nn.Module) -> TrainState:
        """The state to train from: the checkpoint ``--resume_from_checkpoint`` names, or this run's newest
        intact one, loaded into the prepared objects; a fresh state when there is none.

        Each candidate's files are checked against its manifest (by the main process) before loading and
        ``model``'s weights for non-finite values after; a damaged one is reported and skipped (``latest``) or
        stops the run (an explicit dir). Raises CheckpointError when every checkpoint of the run is damaged.
        """
        from accelerate.utils import broadcast_object_list

        candidates = self.candidates(resume_from)
        if not candidates:
            if resume_from == "latest":
                logger.warning("--resume_from_checkpoint latest: no checkpoint of this run under %s yet, starting "
                               "fresh.", self.root)
            return TrainState()
        damaged = []
        for path in candidates:
            problem = [None]
            if accelerator.is_main_process:
                meta = self.read_meta(path) or {}
                problem[0] = damage(path, meta["files"]) if "files" in meta else None
            broadcast_object_list(problem)
            if problem[0] is None:
                state = self.load(accelerator, path, data_state=self.data_state)
                problem = [_non_finite(model) if accelerator.is_main_process else None]
                broadcast_object_list(problem)  # replicas are equal: every process follows the main one
                if problem[0] is None:
                    if damaged:
                        logger.warning("Resumed from %s, the newest intact checkpoint of this run.", path)
                    self.last, self._last_state = path, state.to_json()
                    return state
            logger.warning("Checkpoint %s is damaged: %s.%s", path, problem[0],
                           " Trying an older one." if resume_from == "latest" else "")
            damaged.append(f"{path}: {problem[0]}")
            if resume_from != "latest":
                break
        raise CheckpointError("No intact checkpoint to resume from: " + "; ".join(damaged) + ". Resume from another "
                              "checkpoint dir, or start anew with --overwrite_output_dir.")

    def save(self, accelerator, state: TrainState) -> str:
        """Save on every process (DeepSpeed shards its state), publish atomically on the main process.

        Each process writes its data state (when there is one) as ``data_state_<rank>.json`` before the
        checkpoint is published. Saving a state just saved (the same step at an epoch's end, say) is a no-op.
        A full disk stops the run with the path and the free space, the partial checkpoint removed and the
        previous checkpoints intact.
        """
        if state.to_json() == self._last_state:
            return self.last
        data_state = self.data_state
        final = os.path.join(self.root, f"step_{state.completed_steps:08d}")
        partial = final + ".partial"
        if accelerator.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # leftover of a run killed mid-write
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(partial)
            if data_state is not None:
                os.makedirs(partial, exist_ok=True)
                write_json_atomic(os.path.join(partial, DATA_STATE_FILE.format(rank=accelerator.process_index)),
                                  data_state.state_dict())
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json_atomic(os.path.join(partial, STATE_FILE),
                                  {**state.to_json(), "run_id": self.run_id, "files": manifest(partial)})
        except Exception as err:  # torch, numpy and safetensors each report a full disk in their own way
            error = space_error(err, partial, "a checkpoint")
            shutil.rmtree(partial, ignore_errors=True)  # frees the space it took; never mistaken for a checkpoint
            raise error from err
        if accelerator.is_main_process:
            if os.path.isdir(final):  # same step saved twice (e.g. preemption right after a periodic save)
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()
            logger.info("Saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        self.last, self._last_state = final, state.to_json()
        return final

    def load(self, accelerator, path: str, data_state=None) -> TrainState:
        """Restore Accelerate's state and, when ``data_state`` is given, this process's data position into it."""
        accelerator.load_state(path)
        if data_state is not None:
            data_file = os.path.join(path, DATA_STATE_FILE.format(rank=accelerator.process_index))
            if not os.path.isfile(data_file):
                raise FileNotFoundError(
                    f"{path} has no {os.path.basename(data_file)}: it was saved by a run without a data stream state "
                    f"or with fewer processes than this one ({accelerator.num_processes}). Resume with the data "
                    "settings and the number of processes of the run that saved it, or start a fresh run.")
            with open(data_file) as f:
                data_state.load_state_dict(json.load(f))
        meta = self.read_meta(path)
        state = TrainState(**{k: meta[k] for k in ("epoch", "batches_in_epoch", "completed_steps")})
        logger.info("Resumed from %s at epoch %d, batch %d, step %d",
                    path, state.epoch, state.batches_in_epoch, state.completed_steps)
        return state

    def finish(self, accelerator, keep: str) -> str | None:
        """Once a run has finished (the exported model is its result): keep ``all`` checkpoints (as pruned by
        total_limit), only the ``last``, or ``none`` (optimizer states take 2-3x the model's size on disk).
        Returns the checkpoint that remains newest, or None."""
        if keep not in KEEP_CHOICES:
            raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and keep != "all":
            done = self.completed()
            for old in done[:-1] if keep == "last" else done:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        if keep == "none":
            self.last = self._last_state = None
        return self.last

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        for old in self.completed()[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def _non_finite(model: torch.nn.Module) -> str | None:
    """Names the first parameter holding NaN or inf (this process's part under ZeRO-3), else None."""
    for name, p in model.named_parameters():
        if p.numel() and not torch.isfinite(p.detach()).all():
            return f"parameter {name} holds non-finite values after loading"
    return None

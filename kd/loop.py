"""The pieces a training loop is made of; the loop itself is written out in each training script.

A stage's loop, as train_prediction.py, train_task_intermediate.py and train_general.py write it::

    with PreemptionFlag() as preemption:
        for batch in train_batches(accelerator, train_dataloader, state, total_steps):  # resumes mid-epoch
            with accelerator.accumulate(model):
                terms = <the stage's losses>                                    # {"loss": ..., "loss_kd": ...}
                accelerator.backward(terms["loss"])
                sync.add(terms, samples=...)
                if accelerator.sync_gradients:
                    means = sync.reduce(preemption.signum)                      # one all-reduce per step
                    means["grad_norm"] = clip_gradients(accelerator, model, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            end_of_epoch = state.advance(len(train_dataloader))
            if not accelerator.sync_gradients:
                continue
            <scheduler step, state.completed_steps += 1, train_log.step, checkpoint, eval>

- :class:`StepSync` is the one collective of a step: the mean of every loss term over processes, token and
  sample counts, and two flags every process must agree on (a non-finite loss anywhere stops all before the
  update; a preemption signal anywhere makes all save the same step).
- :class:`TrainLog` turns per-step means into logged running means (trackers, ``train_log.jsonl``, progress
  bar, tokens/s) and the run's closing throughput figures.
- :func:`train_batches` yields the batches still to come, epoch after epoch, from where a resumed state stands.
- :class:`PreemptionFlag` records SIGTERM/SIGUSR1 (SLURM's warnings) for the next step boundary.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from kd.checkpoint import CheckpointManager, TrainState
from kd.launcher import orphaned, set_death_signal

_FIRST_PARENT = os.getppid()  # the launcher that started this process, before anything could orphan it

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM sends them before killing a job), or when the launch this process belongs to
    died (kd.launcher.orphaned: its launcher killed outright, a wrapper gone with it); read at the next step
    boundary. A worker whose launch is gone saves and stops rather than train on unseen, beside its rerun."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    PARENT_DIED = signal.SIGUSR2  # the death signal asked for: sent by the kernel when the parent dies

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        self._previous[self.PARENT_DIED] = signal.signal(self.PARENT_DIED, self._parent_died)
        set_death_signal(self.PARENT_DIED)
        self._parent_died(None, None)  # it may have died before we asked
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def _parent_died(self, signum, frame):
        if orphaned(_FIRST_PARENT):
            self.signum = self.PARENT_DIED

    def __exit__(self, *exc):
        set_death_signal(0)  # the closing records are written whole, whoever dies meanwhile
        # Once signalled, the process only finishes its records and exits: a repeat of the signal (a launcher's
        # agent and the wrapper may both pass it on, at any moment) must not kill it half-way through them.
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)

    def describe(self) -> str:
        if self.signum == self.PARENT_DIED:
            return "the end of its launcher (killed with the job that started it)"
        return signal.Signals(self.signum).name if self.signum else "a signal on another process"


class StepSync:
    """Loss terms and counts of one optimizer step's micro-batches, reduced over processes once per step.

    add() after each backward; reduce() on the micro-batch that completes the step. Loss terms are averaged
    over micro-batches and processes; counts (``samples``, ``tokens``) are summed. reduce() raises
    NonFiniteLossError on every process, before the optimizer step, when any process saw a non-finite term,
    naming the last good checkpoint of ``checkpoints``; ``preempted`` tells whether any process was signalled.
    """

    def __init__(self, accelerator: Accelerator, accumulation_steps: int, checkpoints: CheckpointManager,
                 state: TrainState):
        self.accelerator, self.accumulation_steps = accelerator, accumulation_steps
        self.checkpoints, self.state = checkpoints, state
        self.preempted = False
        self._terms: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, terms: dict[str, torch.Tensor], **counts) -> None:
        """terms: scalar loss tensors of one micro-batch; counts: scalars such as samples=B or tokens=N."""
        for name, value in terms.items():
            value = value.detach() / self.accumulation_steps
            self._terms[name] = self._terms[name] + value if name in self._terms else value
        for name, value in counts.items():
            value = torch.as_tensor(value).detach()
            self._counts[name] = self._counts[name] + value if name in self._counts else value

    def reduce(self, signum: int | None) -> dict[str, float]:
        """{term: mean over processes, count: sum over processes}; one all-reduce carrying both flags too."""
        names, count_names = sorted(self._terms), sorted(self._counts)
        values = torch.stack([self._terms[n].float() for n in names])
        device = values.device
        flags = torch.stack([(~torch.isfinite(values).all()).float(), torch.tensor(float(signum is not None),
                                                                                      device=device)])
        counts = [self._counts[n].to(device).float().reshape(1) for n in count_names]
        packed = torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), *counts, flags])
        packed = packed.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        packed = packed.tolist()
        self._terms, self._counts = {}, {}
        k, c = len(names), len(count_names)
        nonfinite, self.preempted = packed[k + c] > 0, packed[k + c + 1] > 0
        if nonfinite:
            raise NonFiniteLossError(
                f"Non-finite loss at optimizer step {self.state.completed_steps + 1} (epoch {self.state.epoch}); "
                f"stopped before the update. Last good checkpoint: {self.checkpoints.last or 'none'}. "
                "Lower --learning_rate, check the data, or run in fp32/bf16 instead of fp16.")
        means = {n: v / self.accelerator.num_processes for n, v in zip(names, packed[:k])}
        means.update(zip(count_names, packed[k:k + c]))
        return means


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float) -> float | None:
    """Clip to ``max_grad_norm`` (0: no clipping) and return the norm before clipping, when one is known
    (DeepSpeed clips inside its own step and reports none here)."""
    if not max_grad_norm:
        return None
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    return None if norm is None else float(norm)


def every(interval: int | None, step: int) -> bool:
    """Whether ``step`` is a multiple of ``interval`` (None or 0: never)."""
    return bool(interval) and step % interval == 0


def train_batches(accelerator: Accelerator, dataloader, state: TrainState, total_steps: int,
                  stateful: bool = False) -> Iterator[dict]:
    """The batches still to come, epoch after epoch, from where ``state`` stands, until ``total_steps`` optimizer
    steps are done (none at all for a run resumed at its end; the caller stops at the last step).

    A map-style loader is resumed by skipping the batches of the epoch already consumed
    (``state.batches_in_epoch``), and each pass tells the loader its epoch (Accelerate's loader would otherwise
    count epochs from its own iterations, and a fresh skipping loader counts from 0). ``stateful``: the loader
    restores its own reading position (kd.streaming.PackedStream, loaded from the checkpoint), so nothing is
    skipped. A loader without a length is read again when it runs out. The caller advances ``state``
    (``state.advance``) and stops at its total steps.
    """
    while state.completed_steps < total_steps:
        skip = state.batches_in_epoch if not stateful else 0
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty and not skip:
            raise RuntimeError("the training data yields no batch; check the data and --max_train_samples")


class TrainLog:
    """Running means of the per-step values, logged every ``logging_steps`` to the trackers and to
    ``OUTPUT_DIR/train_log.jsonl`` (one JSON object a line, main process), with a progress bar; throughput
    (samples/s, tokens/s when counted) and wall and CPU time for the run's record."""

    def __init__(self, accelerator: Accelerator, output_dir: str, logging_steps: int, total_steps: int,
                 start_step: int = 0):
        self.accelerator, self.logging_steps, self.total_steps = accelerator, logging_steps, total_steps
        self.path = os.path.join(output_dir, "train_log.jsonl")
        if accelerator.is_main_process:
            self._drop_lines_after(start_step)
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                             desc="train", unit="step", dynamic_ncols=True)
        self.running: dict[str, float] = {}
        self.totals = {"samples": 0.0, "tokens": 0.0}
        self.t_start = self.t_interval = time.perf_counter()
        self.cpu_start = time.process_time()
        self.tokens_at_interval = 0.0

    def _drop_lines_after(self, step: int) -> None:
        """A resumed run logs again the steps after its checkpoint: drop what the interrupted run logged of them,
        so that the log holds each step once."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)

    def write(self, values: dict, step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def step(self, step: int, means: dict[str, float | None]) -> None:
        """Record one optimizer step's values (from StepSync.reduce, plus lr and grad_norm)."""
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{means['loss']:.4f}")
        for name in self.totals:
            self.totals[name] += means.pop(name, 0.0)
        for name, value in means.items():
            if value is not None:
                self.running[name] = self.running.get(name, 0.0) + value
        if step % self.logging_steps and step != self.total_steps:
            return
        n = step % self.logging_steps or self.logging_steps
        averaged = {f"train/{k}": v / n for k, v in self.running.items()}
        averaged["train/lr"] = means["lr"]
        now = time.perf_counter()
        interval_tokens = self.totals["tokens"] - self.tokens_at_interval
        if interval_tokens:
            averaged["train/tokens_per_s"] = interval_tokens / max(now - self.t_interval, 1e-9)
        self.write(averaged, step)
        self.running, self.tokens_at_interval, self.t_interval = {}, self.totals["tokens"], now

    def eval(self, step: int, metrics: dict) -> None:
        self.write({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
        logger.info("step %d eval: %s", step, {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})

    def summary(self, completed_steps: int) -> dict:
        """Closing figures of this process's run (CPU seconds too: on a shared machine wall time also measures
        the neighbours)."""
        self.progress.close()
        elapsed = time.perf_counter() - self.t_start
        metrics = {"train_runtime_s": elapsed, "train_cpu_s": time.process_time() - self.cpu_start,
                   "train_samples_per_s": self.totals["samples"] / max(elapsed, 1e-9),
                   "completed_steps": completed_steps}
        if self.totals["tokens"]:
            metrics.update(train_tokens=int(self.totals["tokens"]),
                           train_tokens_per_s=self.totals["tokens"] / max(elapsed, 1e-9))
        return metrics


def log_banner(accelerator: Accelerator, *, data: str, per_device_batch_size: int, accumulation_steps: int,
               total_steps: int, output_dir: str, state: TrainState, epochs: float | None = None) -> None:
    """The "Running training" summary of run_qa_no_trainer.py: what trains on what, how big a step is, where
    the output goes, and where a resumed run picks up."""
    total_batch = per_device_batch_size * accelerator.num_processes * accumulation_steps
    lines = ["***** Running training *****", f"  Data = {data}"]
    if epochs is not None:
        lines.append(f"  Num epochs = {epochs:g}")
    lines += [f"  Processes = {accelerator.num_processes} ({accelerator.distributed_type}, mixed precision "
              f"{accelerator.mixed_precision})",
              f"  Instantaneous batch size per device = {per_device_batch_size}",
              f"  Total train batch size (w. parallel & accumulation) = {total_batch}",
              f"  Gradient accumulation steps = {accumulation_steps}",
              f"  Total optimization steps = {total_steps}"
              + (f" (resuming at step {state.completed_steps}, epoch {state.epoch})" if state.completed_steps else ""),
              f"  Output = {output_dir}"]
    accelerator.print("\n".join(lines))


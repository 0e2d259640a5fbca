"""The training machinery every entry script shares: Accelerate setup, data order, optimizer and schedule,
the loop (accumulation, clipping, logging, evaluation, checkpoints, resume, preemption, non-finite guard),
trackers and run records.

A script supplies ``compute_loss(model, batch) -> {"loss": tensor, "<term>": tensor, ...}`` and optionally
``evaluate() -> metrics``; everything else lives here once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from kd.checkpoint import CheckpointManager, TrainState, write_json_atomic

logger = logging.getLogger(__name__)

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------
def setup_accelerator(args) -> Accelerator:
    """Accelerator with trackers, logging, output dir and seed. Precision, DDP or DeepSpeed come from the
    ``accelerate launch`` config, not from script flags."""
    log_with = {"none": None, "all": ["wandb", "tensorboard"]}.get(args.report_to, [args.report_to])
    if log_with and "wandb" in log_with:
        _wandb_offline_without_account()
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        # DeepSpeed without a GPU (CI, debugging): Accelerate picks a process-group backend only for
        # accelerators; ZeRO runs on CPU over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
        # Our sampler owns the data order; accelerate must not swap it for its own.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    for noisy in ("datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    return accelerator


def _wandb_offline_without_account() -> None:
    """W&B must work for a user with no account or no network: fall back to offline mode, loudly."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read():
        return
    os.environ["WANDB_MODE"] = "offline"
    logger.warning("No W&B credentials found: logging offline (sync later with `wandb sync <output_dir>/wandb`).")


def init_trackers(accelerator: Accelerator, args, extra_config: dict | None = None) -> None:
    if not accelerator.log_with:
        return
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    config = {k: ("None" if v is None else v) for k, v in config.items()}  # tensorboard hparams reject None
    config.update(extra_config or {})
    init_kwargs = {"wandb": {"dir": args.output_dir, "name": args.run_name}}
    accelerator.init_trackers(args.project_name, config=config, init_kwargs=init_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): every process draws the same one (accelerate then
    hands each its batches), and a resumed run sees exactly the order the interrupted run would have seen."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors (or arrays), fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader slice every column once per batch instead of collating per row.
    Integer columns are kept compact and widened to int64 per batch.
    """

    def __init__(self, columns: dict):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for name, col in self.columns.items():
            rows = torch.as_tensor(col[indices]) if not isinstance(col, torch.Tensor) else col[indices]
            out[name] = rows.long() if not rows.is_floating_point() else rows.float()
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def batch_is_ready(batch):
    """collate_fn for TensorDictDataset: ``__getitems__`` already returns the batch."""
    return batch


def make_train_dataloader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled by EpochSampler; pass it to accelerator.prepare, and run_training sets the epoch."""
    sampler = EpochSampler(len(dataset), seed)
    collate = batch_is_ready if hasattr(dataset, "__getitems__") else None
    # A private generator: creating an iterator draws a base seed from it, and drawing from the global RNG
    # instead would shift dropout masks after a resume (the resumed run creates one iterator more).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=False,
                        generator=torch.Generator().manual_seed(seed))
    return loader


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (as BERT was trained)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def training_steps(args, batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) from the per-process batches of one epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else math.ceil(args.warmup_ratio * total)
    return total, warmup


def make_scheduler(optimizer, args, total_steps: int, warmup_steps: int):
    """Stepped by the loop once per optimizer step (not prepared: AcceleratedScheduler would step it once per
    process). Registered for checkpointing by the caller through ``run_training``."""
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps)


# ---------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------
class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM sends them before killing a job); read at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------------
# Run records
# ---------------------------------------------------------------------------------------------------------------
def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def run_record(args, accelerator: Accelerator, **extra) -> dict:
    import accelerate
    import transformers

    return {
        "script": os.path.basename(sys.argv[0]),
        "argv": sys.argv[1:],
        "args": vars(args),
        "git_sha": git_sha(),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
        **extra,
    }


def write_record(accelerator: Accelerator, args, name: str, record: dict) -> None:
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, name), record)


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    pass


def _reduce_step(accelerator: Accelerator, terms: dict[str, torch.Tensor], preempted: bool,
                 counts: dict[str, torch.Tensor] | None = None):
    """One all-reduce per optimizer step: mean loss terms over processes, and whether any process saw a
    non-finite loss or a preemption signal (every process must stop or save at the same step). ``counts``
    (e.g. tokens) are summed over processes instead, and returned among the means under their own names."""
    names, count_names = sorted(terms), sorted(counts or {})
    values = torch.stack([terms[n].detach().float() for n in names])
    finite = torch.isfinite(values).all()
    flags = torch.stack([(~finite).float(), torch.tensor(float(preempted), device=values.device)])
    summed = [torch.as_tensor(counts[n], device=values.device).detach().float().reshape(1) for n in count_names]
    packed = torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), *summed, flags])
    packed = packed.to(accelerator.device)
    if accelerator.num_processes > 1:
        packed = accelerator.reduce(packed, reduction="sum")
    packed = packed.tolist()
    k, c = len(names), len(count_names)
    means = {n: v / accelerator.num_processes for n, v in zip(names, packed[:k])}
    means.update(zip(count_names, packed[k:k + c]))
    return means, packed[k + c] > 0, packed[k + c + 1] > 0


def _length(loader) -> int | None:
    """len(loader), or None for a loader without one (an endless stream)."""
    try:
        return len(loader)
    except TypeError:
        return None


def run_training(
    accelerator: Accelerator,
    args,
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    train_dataloader: DataLoader,
    compute_loss: Callable[[torch.nn.Module, dict], dict],
    evaluate: Callable[[], dict] | None = None,
    total_steps: int,
    data_state=None,
) -> dict:
    """Train until ``total_steps`` optimizer steps, resuming from ``--resume_from_checkpoint`` if given.

    train_dataloader: a map-style DataLoader (resumed by skipping the batches of the epoch already consumed), or
    any iterable of batches; one without a length (an endless stream) runs until ``total_steps``, and one that
    runs out starts the next epoch.
    data_state: optional object with ``state_dict()`` / ``load_state_dict()`` that owns the reading position of
    train_dataloader (a stateful stream such as kd.corpus.PackedStream): every checkpoint saves it per process
    (``data_state_{rank}.json``), a resume loads it, and the loop then skips no batches itself.
    compute_loss may also return ``"tokens"``, a count rather than a loss (not backpropagated, summed over
    processes and micro-batches): the loop then logs ``train/tokens_per_s``.

    Returns {"status": "finished"|"preempted", "state", "train_metrics", "eval_metrics", "checkpoint"}.
    Raises NonFiniteLossError before the optimizer step of a non-finite loss (no checkpoint is written after).
    """
    accelerator.register_for_checkpointing(scheduler)
    checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit)
    resume_path = checkpoints.resolve(args.resume_from_checkpoint)
    state = checkpoints.load(accelerator, resume_path, data_state=data_state) if resume_path else TrainState()
    batches_per_epoch = _length(train_dataloader)
    num_epochs = (math.ceil(total_steps * args.gradient_accumulation_steps / batches_per_epoch)
                  if batches_per_epoch is not None else math.inf)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")

    progress = tqdm(total=total_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    eval_metrics: dict = {}
    running: dict[str, float] = {}
    t_start, cpu_start, samples_seen = time.perf_counter(), time.process_time(), 0
    tokens_seen, interval_tokens, t_interval = 0.0, 0.0, t_start

    def log(values: dict, step: int) -> None:
        accelerator.log(values, step=step)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def do_eval() -> dict:
        metrics = evaluate()
        model.train()
        log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, state.completed_steps)
        logger.info("step %d eval: %s", state.completed_steps,
                    {k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)})
        return metrics

    last_checkpoint, saved_at = resume_path, state.completed_steps if resume_path else -1
    with PreemptionFlag() as preemption:
        while state.completed_steps < total_steps and state.epoch < num_epochs:
            loader = (accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
                      if state.batches_in_epoch and data_state is None else train_dataloader)
            # Accelerate's loader re-sets its sampler's epoch from its own iteration counter on each pass, and a
            # fresh skipping loader counts from 0: tell it which epoch this is.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)
            model.train()
            accumulated: dict[str, torch.Tensor] = {}
            counts: dict[str, torch.Tensor] = {}
            exhausted = False
            for batch in loader:
                with accelerator.accumulate(model):
                    terms = compute_loss(model, batch)
                    if "tokens" in terms:
                        tokens = terms.pop("tokens")
                        counts["tokens"] = counts["tokens"] + tokens if "tokens" in counts else tokens
                    accelerator.backward(terms["loss"])
                    for name, value in terms.items():
                        value = value.detach() / args.gradient_accumulation_steps
                        accumulated[name] = accumulated[name] + value if name in accumulated else value
                    if accelerator.sync_gradients:
                        means, nonfinite, stop = _reduce_step(accelerator, accumulated, preemption.signum is not None,
                                                              counts)
                        accumulated, counts = {}, {}
                        if nonfinite:
                            raise NonFiniteLossError(
                                f"Non-finite loss at optimizer step {state.completed_steps + 1} (epoch {state.epoch}); "
                                f"stopped before the update. Last good checkpoint: {last_checkpoint or 'none'}. "
                                "Lower --learning_rate, check the data, or run in fp32/bf16 instead of fp16.")
                        if args.max_grad_norm:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                            if grad_norm is not None:
                                means["grad_norm"] = float(grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                samples_seen += len(next(iter(batch.values()))) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step done ----
                means["lr"] = scheduler.get_last_lr()[0]
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the update did not happen
                    scheduler.step()
                state.completed_steps += 1
                progress.update(1)
                progress.set_postfix(loss=f"{means['loss']:.4f}")
                if "tokens" in means:
                    step_tokens = means.pop("tokens")
                    tokens_seen += step_tokens
                    interval_tokens += step_tokens
                for name, value in means.items():
                    running[name] = running.get(name, 0.0) + value
                if state.completed_steps % args.logging_steps == 0 or state.completed_steps == total_steps:
                    n = state.completed_steps % args.logging_steps or args.logging_steps
                    averaged = {f"train/{k}": v / n for k, v in running.items()}
                    averaged["train/lr"] = means["lr"]
                    now = time.perf_counter()
                    if interval_tokens:
                        averaged["train/tokens_per_s"] = interval_tokens / max(now - t_interval, 1e-9)
                    log(averaged, state.completed_steps)
                    running, interval_tokens, t_interval = {}, 0.0, now
                if stop:
                    last_checkpoint = checkpoints.save(accelerator, state, data_state=data_state)
                    sig = signal.Signals(preemption.signum).name if preemption.signum else "a signal on another process"
                    accelerator.print(f"Preempted by {sig}: saved {last_checkpoint}. Resume with "
                                      f"--resume_from_checkpoint latest (or {last_checkpoint}).")
                    progress.close()
                    return {"status": "preempted", "state": state.to_json(), "checkpoint": last_checkpoint,
                            "eval_metrics": eval_metrics, "train_metrics": {}}
                if args.checkpointing_steps and state.completed_steps % args.checkpointing_steps == 0:
                    last_checkpoint = checkpoints.save(accelerator, state, data_state=data_state)
                    saved_at = state.completed_steps
                if evaluate and args.eval_steps and state.completed_steps % args.eval_steps == 0:
                    eval_metrics = do_eval()
                if state.completed_steps >= total_steps:
                    break
            else:
                exhausted = True

            epoch_done = (state.batches_in_epoch >= batches_per_epoch if batches_per_epoch is not None
                          else exhausted)
            if epoch_done:
                state.epoch += 1
                state.batches_in_epoch = 0
            if saved_at != state.completed_steps or epoch_done:
                last_checkpoint = checkpoints.save(accelerator, state, data_state=data_state)
                saved_at = state.completed_steps
            if evaluate:
                eval_metrics = do_eval()
    progress.close()
    elapsed = time.perf_counter() - t_start
    # CPU seconds of this process too: on a shared machine wall time also measures the neighbours.
    train_metrics = {"train_runtime_s": elapsed, "train_cpu_s": time.process_time() - cpu_start,
                     "train_samples_per_s": samples_seen / max(elapsed, 1e-9),
                     "completed_steps": state.completed_steps}
    if tokens_seen:
        train_metrics.update(train_tokens=int(tokens_seen), train_tokens_per_s=tokens_seen / max(elapsed, 1e-9))
    return {"status": "finished", "state": state.to_json(), "checkpoint": last_checkpoint,
            "eval_metrics": eval_metrics, "train_metrics": train_metrics}

"""The Accelerate side of a run: the Accelerator (precision, DDP or DeepSpeed come from the ``accelerate launch``
config, not from script flags), logging, the output dir, the seed, and trackers (W&B offline without an account)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed

logger = logging.getLogger(__name__)

TRACKERS = {"none": None, "wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"]}


def setup_accelerator(output_dir: str, seed: int, gradient_accumulation_steps: int = 1,
                      report_to: str = "none") -> Accelerator:
    """Accelerator with trackers, logging, the output dir made, and every RNG seeded."""
    log_with = TRACKERS[report_to]
    if log_with and "wandb" in log_with:
        _wandb_offline_without_account()
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        # DeepSpeed without a GPU (CI, debugging): Accelerate picks a process-group backend only for
        # accelerators; ZeRO runs on CPU over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")),
        # Our sampler owns the data order; accelerate must not swap it for its own.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    for noisy in ("datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(seed)
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


def init_trackers(accelerator: Accelerator, project_name: str, run_name: str | None, output_dir: str,
                  config: dict, run_id: str | None = None) -> None:
    """Start the trackers with the run's settings (scalars only: tracker configs take no lists or dicts).
    run_id (kd.run_dir): a resumed run, requeued as often as it may be, continues one W&B run."""
    if not accelerator.log_with:
        return
    from kd.records import redact_args

    config = {k: ("None" if v is None else v)  # tensorboard hparams reject None; W&B uploads the config
              for k, v in redact_args(config).items() if isinstance(v, (int, float, str, bool)) or v is None}
    init_kwargs = {"wandb": {"dir": output_dir, "name": run_name}}
    if run_id is not None:
        init_kwargs["wandb"].update(id=run_id, resume="allow")
    accelerator.init_trackers(project_name, config=config, init_kwargs=init_kwargs)


def start_run(accelerator: Accelerator, output_dir: str, resume: bool, overwrite: bool,
              inputs: Iterable[tuple[str, str]] = ()) -> str | None:
    """Claim ``output_dir`` for this run (kd.run_dir): refuse another run's dir unless resuming or overwriting
    (never one that is or holds an input: ``inputs``, kd.run_dir.input_paths), then record the run. Every process
    checks before the main one writes; returns the run id on every process."""
    import sys

    from accelerate.utils import broadcast_object_list

    from kd.run_dir import OutputDirInUseError, check_output_dir, claim_output_dir

    try:
        check_output_dir(output_dir, resume, overwrite, inputs)
    except OutputDirInUseError as err:
        accelerator.print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    accelerator.wait_for_everyone()
    run_id = [claim_output_dir(output_dir, resume, overwrite, os.path.basename(sys.argv[0]))
              if accelerator.is_main_process else None]
    broadcast_object_list(run_id)
    return run_id[0]

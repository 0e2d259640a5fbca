"""Helpers for end-to-end tests that run the entry scripts as users do (``accelerate launch``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIG = REPO_ROOT / "accelerate_configs" / "cpu.yaml"
DEEPSPEED_CONFIG = REPO_ROOT / "accelerate_configs" / "deepspeed_zero2.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env() -> dict:
    # No WANDB_MODE: the scripts must fall back to offline W&B by themselves when there is no account.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(name, None)
    return env


def launch(script: str, args: list, processes: int = 1, check: bool = True, timeout: int = 600,
           deepspeed: bool | str = False):
    """Run a script from the repo root as users do; returns the CompletedProcess.

    One process: ``accelerate launch --config_file accelerate_configs/cpu.yaml``. Several: ``torchrun`` with
    ACCELERATE_USE_CPU=1, which Accelerate turns into DDP over gloo (``accelerate launch`` itself only starts
    several CPU processes through mpirun). deepspeed: ``accelerate launch`` with the repo's ZeRO-2 config (or the
    accelerate_configs/ file named), on CPU (DS_ACCELERATOR=cpu, fp32).
    """
    env = script_env()
    if deepspeed:
        env["DS_ACCELERATOR"] = "cpu"
        config = DEEPSPEED_CONFIG if deepspeed is True else REPO_ROOT / "accelerate_configs" / deepspeed
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port())]
    elif processes == 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(REPO_ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path) as f:
        return json.load(f)

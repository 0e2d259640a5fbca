"""Optimizer and learning-rate schedule, from plain settings."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorm weights (as BERT was trained)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


def steps_per_epoch(batches_per_epoch: int, accumulation_steps: int) -> int:
    """Optimizer steps in one pass over a loader of ``batches_per_epoch`` per-process batches (Accelerate
    completes a step on the last batch of a pass even when fewer than ``accumulation_steps`` remain)."""
    if batches_per_epoch == 0:
        raise ValueError("the training data yields no batch; check the data and --max_train_samples")
    return math.ceil(batches_per_epoch / accumulation_steps)


def total_and_warmup_steps(steps_in_epoch: int | None, *, num_train_epochs: float, max_train_steps: int | None,
                           num_warmup_steps: int | None, warmup_ratio: float) -> tuple[int, int]:
    """(total optimizer steps, warmup steps): ``max_train_steps`` when given, else ``num_train_epochs`` epochs;
    warmup ``num_warmup_steps`` when given, else ``warmup_ratio`` of the total."""
    total = max_train_steps or math.ceil(num_train_epochs * steps_in_epoch)
    warmup = num_warmup_steps if num_warmup_steps is not None else math.ceil(warmup_ratio * total)
    return total, warmup


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int):
    """A transformers schedule, stepped by the loop once per optimizer step. Not prepared (AcceleratedScheduler
    would step it once per process); register it with ``accelerator.register_for_checkpointing``."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

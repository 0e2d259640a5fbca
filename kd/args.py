"""Argument groups shared by the entry scripts, composed with ``argparse.ArgumentParser(parents=[...])``.

Names follow transformers' ``run_qa_no_trainer.py`` where one exists, Haystack 1.x for distillation knobs.
Each group has a ``check_*`` function that fails fast with a message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import os


def _group(title: str) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    parser = argparse.ArgumentParser(add_help=False)
    return parser, parser.add_argument_group(title)


def squad_data_args(train: bool = True) -> argparse.ArgumentParser:
    """--train_file/--validation_file (local SQuAD JSON) or --dataset_name, and the sliding-window settings."""
    parser, g = _group("SQuAD data")
    g.add_argument("--dataset_name", default=None,
                   help="A `datasets` name such as squad_v2, used where --train_file/--validation_file are not given.")
    g.add_argument("--dataset_config_name", default=None)
    if train:
        g.add_argument("--train_file", default=None, help="SQuAD-format JSON (1.1 or 2.0) to train on.")
    g.add_argument("--validation_file", default=None, help="SQuAD-format JSON to evaluate on.")
    g.add_argument("--skip_invalid", action="store_true",
                   help="Skip malformed SQuAD records (and report how many) instead of stopping with an error.")
    g.add_argument("--max_seq_length", type=int, default=384)
    g.add_argument("--doc_stride", type=int, default=128)
    g.add_argument("--max_query_length", type=int, default=64)
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Keep only the first N training questions (debugging, quick runs).")
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--preprocessing_num_workers", type=int, default=None)
    return parser


def eval_args() -> argparse.ArgumentParser:
    parser, g = _group("evaluation")
    g.add_argument("--per_device_eval_batch_size", type=int, default=32)
    g.add_argument("--n_best_size", type=int, default=20)
    g.add_argument("--max_answer_length", type=int, default=30)
    g.add_argument("--no_answer_threshold", type=float, default=0.0,
                   help="Predict no answer when null score - best span score exceeds this (SQuAD 2.0).")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="Also evaluate every N optimizer steps (always after each epoch).")
    return parser


def training_args() -> argparse.ArgumentParser:
    parser, g = _group("training")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--per_device_train_batch_size", type=int, default=16)
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--num_train_epochs", type=float, default=2,
                   help="Number of epochs; a fraction stops part-way through the last one.")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Total optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    g.add_argument("--lr_scheduler_type", default="linear",
                   choices=["linear", "cosine", "constant", "constant_with_warmup"])
    g.add_argument("--num_warmup_steps", type=int, default=None)
    g.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="Warmup as a fraction of the total steps, used when --num_warmup_steps is not given.")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--logging_steps", type=int, default=10, help="Log to trackers every N optimizer steps.")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Save a resumable checkpoint every N optimizer steps (one is always saved at epoch end).")
    g.add_argument("--checkpoints_total_limit", type=int, default=3,
                   help="Keep only the newest K checkpoints; 0 keeps all.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (start fresh if there is none yet, handy in requeued jobs) or a checkpoint dir.")
    g.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard", "all"],
                   help="Trackers. W&B runs offline when no API key is configured.")
    g.add_argument("--project_name", default="kd-qa", help="Tracker project name.")
    g.add_argument("--run_name", default=None)
    return parser


def prediction_distillation_args() -> argparse.ArgumentParser:
    parser, g = _group("prediction-layer distillation")
    g.add_argument("--teacher_name_or_path", default=None,
                   help="Fine-tuned QA teacher. Without it the script is plain fine-tuning.")
    g.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature T > 0.")
    g.add_argument("--distillation_loss_weight", type=float, default=0.5,
                   help="w in [0, 1]: loss = w * KD + (1 - w) * CE(gold spans).")
    g.add_argument("--distillation_loss", default="kl_div", choices=["kl_div", "mse", "ce"])
    g.add_argument("--teacher_cache_dir", default=None,
                   help="Where teacher logits are cached (default: $KD_CACHE or ~/.cache/kd-qa/teacher_logits).")
    g.add_argument("--teacher_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Teacher precision for its one pass; auto = bf16 (fp16 without bf16 support) on GPU, fp32 on CPU.")
    return parser


def _fail(parser: argparse.ArgumentParser, msg: str) -> None:
    parser.error(msg)


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate data and training arguments up front, before any model or data is loaded."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_seq_length", "logging_steps"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) <= 0:
            _fail(parser, f"--{name} must be a positive integer, got {getattr(args, name)}.")
    for name in ("checkpointing_steps", "eval_steps", "max_train_steps", "max_train_samples", "max_eval_samples"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            _fail(parser, f"--{name} must be a positive integer when given, got {value}.")
    if getattr(args, "num_train_epochs", 1) <= 0 and getattr(args, "max_train_steps", None) is None:
        _fail(parser, f"--num_train_epochs must be > 0, got {args.num_train_epochs}.")
    if not 0 <= getattr(args, "warmup_ratio", 0) < 1:
        _fail(parser, f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}.")
    if hasattr(args, "max_query_length"):
        room = args.max_seq_length - args.max_query_length - 4  # CLS/SEP tokens (RoBERTa adds 4)
        if room <= 0:
            _fail(parser, f"--max_seq_length {args.max_seq_length} leaves no room for the context after "
                          f"--max_query_length {args.max_query_length}; raise the first or lower the second.")
        if not 0 <= args.doc_stride < room:
            _fail(parser, f"--doc_stride must be in [0, {room}) for --max_seq_length {args.max_seq_length} and "
                          f"--max_query_length {args.max_query_length}, got {args.doc_stride}.")
    if hasattr(args, "train_file"):
        for name in ("train_file", "validation_file"):
            path = getattr(args, name)
            if path is not None and not os.path.isfile(path):
                _fail(parser, f"--{name} {path!r} does not exist or is not a file.")
        if args.train_file is None and args.dataset_name is None:
            _fail(parser, "give --train_file (SQuAD JSON) or --dataset_name (e.g. squad_v2).")
    if getattr(args, "resume_from_checkpoint", None) not in (None, "latest"):
        if not os.path.isdir(args.resume_from_checkpoint):
            _fail(parser, f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a directory; "
                          "pass a checkpoint dir or 'latest'.")


def check_prediction_distillation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.temperature > 0:
        _fail(parser, f"--temperature must be > 0, got {args.temperature}.")
    if not 0.0 <= args.distillation_loss_weight <= 1.0:
        _fail(parser, f"--distillation_loss_weight must be in [0, 1], got {args.distillation_loss_weight}.")

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


def intermediate_distillation_args() -> argparse.ArgumentParser:
    """Teacher, layer map and loss terms of intermediate-layer distillation (TinyBERT, MiniLMv2).

    The per-term weights default to None, meaning "as the --loss_kind preset says" (kd.intermediate.LOSS_KINDS);
    a weight given explicitly overrides the preset for that term only.
    """
    parser, g = _group("intermediate-layer distillation")
    g.add_argument("--teacher_name_or_path", required=True,
                   help="The fine-tuned teacher (any head, or none: only its encoder is loaded). Must tokenize "
                        "exactly as the student.")
    g.add_argument("--layer_map", default="uniform",
                   help="Which student layer learns from which teacher layer: 'uniform' (TinyBERT, embeddings "
                        "included), 'last', pairs 'student:teacher' such as '0:0,1:2,2:4' (0 = embeddings), or "
                        "JSON (inline or a .json file).")
    g.add_argument("--loss_kind", default="tinybert", choices=["tinybert", "minilm_relation"],
                   help="tinybert: pre-softmax attention scores + hidden states + embeddings (MSE; equal head "
                        "counts); minilm_relation: MiniLMv2 Q-Q/K-K/V-V relation KL (any head counts and widths).")
    for term, what in (("attention", "pre-softmax attention-score MSE"), ("hidden", "hidden-state MSE"),
                       ("embedding", "embedding-output MSE (needs 0:0 in the layer map)"),
                       ("relation", "MiniLMv2 self-attention relation KL")):
        g.add_argument(f"--{term}_loss_weight", type=float, default=None,
                       help=f"Weight of the {what}; default: from --loss_kind.")
    g.add_argument("--relation_heads", type=int, default=None,
                   help="Relation heads of the relation loss; must divide both hidden sizes. Default: the "
                        "teacher's attention head count.")
    g.add_argument("--teacher_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Teacher precision; auto = bf16 (fp16 without bf16 support) on GPU, fp32 on CPU.")
    return parser


def intermediate_loss_weights(args: argparse.Namespace) -> dict[str, float]:
    """The per-term weights given explicitly on the command line ({} when all come from --loss_kind)."""
    return {term: getattr(args, f"{term}_loss_weight") for term in ("attention", "hidden", "embedding", "relation")
            if getattr(args, f"{term}_loss_weight") is not None}


def check_intermediate_distillation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag-level checks (no model is read); kd.intermediate.check_distillation_setup checks against the configs."""
    import math

    for term, w in intermediate_loss_weights(args).items():
        if not (math.isfinite(w) and w >= 0):
            _fail(parser, f"--{term}_loss_weight must be a finite number >= 0, got {w}.")
    relation_on = (args.relation_loss_weight if args.relation_loss_weight is not None
                   else float(args.loss_kind == "minilm_relation")) > 0
    if args.relation_heads is not None:
        if args.relation_heads < 1:
            _fail(parser, f"--relation_heads must be a positive integer, got {args.relation_heads}.")
        if not relation_on:
            _fail(parser, "--relation_heads applies to the relation loss only, which is off here; use "
                          "--loss_kind minilm_relation or --relation_loss_weight > 0, or drop --relation_heads.")
    spec = args.layer_map.strip()
    if spec.endswith(".json") and not spec.startswith(("{", "[")) and not os.path.isfile(spec):
        _fail(parser, f"--layer_map file {spec!r} does not exist.")


def general_distillation_args() -> argparse.ArgumentParser:
    """Corpus, packing and student of general distillation (train_general.py); the teacher and the losses come
    from intermediate_distillation_args(), the schedule from training_args()."""
    parser, g = _group("corpus")
    g.add_argument("--train_file", "--train_files", dest="corpus_files", nargs="+", default=None, metavar="PATH",
                   help="Text (.txt and others), JSON Lines (.jsonl/.json/.ndjson) or parquet files; glob patterns "
                        "allowed (quote them).")
    g.add_argument("--dataset_name", default=None,
                   help="A `datasets` corpus instead of files, e.g. wikimedia/wikipedia (with --dataset_config_name "
                        "20231101.en).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--text_column", default="text", help="The text field of JSON Lines, parquet and datasets.")
    g.add_argument("--line_by_line", action="store_true",
                   help="Text files: one document per non-blank line (default: per block of lines between blank "
                        "lines).")
    g.add_argument("--max_seq_length", type=int, default=128,
                   help="Tokens per packed sequence, special tokens included.")
    g.add_argument("--respect_document_boundaries", action="store_true",
                   help="A sequence never spans two documents (a document's last piece is shorter and batches are "
                        "padded). Default: documents are concatenated with a separator token between them and cut "
                        "into full-length sequences, no padding.")
    g.add_argument("--streaming", action="store_true",
                   help="Read, tokenize and pack on the fly, each process its own shard, resumable mid-stream; for "
                        "corpora that fit neither memory nor disk. Default: tokenize and pack once into "
                        "--corpus_cache_dir, memory-mapped.")
    g.add_argument("--shuffle_buffer_size", type=int, default=1000,
                   help="--streaming: packed sequences held in the seeded shuffle buffer of each process (0: no "
                        "shuffling; also part of every checkpoint, ~4 bytes a token).")
    g.add_argument("--shard_size_mb", type=float, default=256,
                   help="--streaming: text/JSONL files are dealt to processes in byte ranges of at most this size "
                        "(the unit order is reshuffled every epoch).")
    g.add_argument("--corpus_cache_dir", default=None,
                   help="Where the tokenized, packed corpus is cached (default: $KD_CACHE/corpus or "
                        "~/.cache/kd-qa/corpus). Must be visible to every node.")
    g.add_argument("--preprocess_only", action="store_true",
                   help="Tokenize and pack the corpus into --corpus_cache_dir, then exit. For a large corpus, run "
                        "this once on one process before the multi-process job, whose other processes would "
                        "otherwise wait at a barrier (and may time out) while the main process packs it.")
    g.add_argument("--trace_data", action="store_true",
                   help="Debugging: write every training sequence of each process to "
                        "OUTPUT_DIR/data_trace/rank<R>.jsonl (every token: small runs only).")
    s = parser.add_argument_group("student (exactly one of: a checkpoint, the teacher's layers, a size)")
    s.add_argument("--model_name_or_path", default=None, help="An existing student checkpoint to continue from.")
    s.add_argument("--student_layers", default=None,
                   help="Keep these teacher blocks, weights copied (DistilBERT-style): '2,4,6' or 'every_other'.")
    for name, what in (("num_hidden_layers", "Transformer layers"), ("hidden_size", "width"),
                       ("num_attention_heads", "attention heads"), ("intermediate_size", "feed-forward width")):
        s.add_argument(f"--{name}", type=int, default=None,
                       help=f"A randomly initialised student of the teacher's architecture: its {what} (the "
                            "teacher's when not given).")
    return parser


STUDENT_SIZE_FLAGS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def check_general_distillation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag-level checks for train_general.py; resolves --train_file patterns into args.corpus_files."""
    from kd.corpus import resolve_files

    if args.max_train_steps is None:
        _fail(parser, "general distillation is counted in optimizer steps: pass --max_train_steps N "
                      "(--num_train_epochs does not apply to a stream).")
    if (args.corpus_files is None) == (args.dataset_name is None):
        _fail(parser, "give the corpus as --train_file PATH [PATH ...] (files or glob patterns) or as --dataset_name "
                      "NAME [--dataset_config_name CONFIG], not both.")
    if args.corpus_files is not None:
        try:
            args.corpus_files = resolve_files(args.corpus_files)
        except (FileNotFoundError, ValueError) as e:
            _fail(parser, f"--train_file: {e}.")
    if args.max_seq_length < 4:
        _fail(parser, f"--max_seq_length must be at least 4 (2 special tokens + content), got {args.max_seq_length}.")
    if args.preprocess_only and args.streaming:
        _fail(parser, "--preprocess_only builds the non-streaming cache; drop --streaming (a stream is not cached).")
    if args.shuffle_buffer_size < 0:
        _fail(parser, f"--shuffle_buffer_size must be >= 0 (0 = no shuffling), got {args.shuffle_buffer_size}.")
    if not args.shard_size_mb > 0:
        _fail(parser, f"--shard_size_mb must be > 0, got {args.shard_size_mb}.")
    sizes = [f"--{n}" for n in STUDENT_SIZE_FLAGS if getattr(args, n) is not None]
    chosen = ([["--model_name_or_path"]] if args.model_name_or_path else []) + \
             ([["--student_layers"]] if args.student_layers else []) + ([sizes] if sizes else [])
    if len(chosen) != 1:
        _fail(parser, "choose the student in exactly one way: --model_name_or_path (a checkpoint), --student_layers "
                      "(e.g. 2,4,6 or every_other: the teacher's own blocks) or a size (--num_hidden_layers, "
                      "--hidden_size, --num_attention_heads, --intermediate_size); got "
                      f"{', '.join(sum(chosen, [])) or 'none'}.")
    for name in STUDENT_SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None and value <= 0:
            _fail(parser, f"--{name} must be a positive integer, got {value}.")

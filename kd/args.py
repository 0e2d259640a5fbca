"""Argument groups shared by the entry scripts, composed with ``argparse.ArgumentParser(parents=[...])``.

Each flag is declared once, here. Names follow transformers' ``run_qa_no_trainer.py`` where one exists, Haystack
1.x for distillation knobs. Integer flags are typed (``positive_int``, ``non_negative_int``), so argparse itself
rejects a bad one. Each group has a ``check_*`` function that fails fast (``parser.error``: exit status 2, a
message saying what is wrong and how to fix it) and returns the values it resolved; none writes to ``args``.
"""

from __future__ import annotations

import argparse
import math
import os

from kd.losses import INTERMEDIATE_LOSS_KINDS, INTERMEDIATE_TERMS
from kd.student import SIZE_FIELDS as STUDENT_SIZE_FLAGS


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0, e.g. 2.0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1], e.g. 0.99."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], e.g. 0.99, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every script's ``--help``: each flag's default after its help (none for a flag without one or a required
    flag), the description as written."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def _group(title: str) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    parser = argparse.ArgumentParser(add_help=False)
    return parser, parser.add_argument_group(title)


# ---------------------------------------------------------------------------------------------------------------
# SQuAD data, windows, answers
# ---------------------------------------------------------------------------------------------------------------
def squad_data_args() -> argparse.ArgumentParser:
    """--train_file/--validation_file (local SQuAD JSON) or --dataset_name, and how much of them to use."""
    parser, g = _group("SQuAD data")
    g.add_argument("--dataset_name", default=None,
                   help="A `datasets` name such as squad_v2, used where --train_file/--validation_file are not "
                        "given (its train and validation splits).")
    add_dataset_config_name(g)
    g.add_argument("--train_file", default=None, help="SQuAD-format JSON (1.1 or 2.0) to train on.")
    g.add_argument("--validation_file", default=None, help="SQuAD-format JSON to evaluate on.")
    g.add_argument("--eval_steps", type=positive_int, default=None,
                   help="Also evaluate every N optimizer steps (always after each epoch).")
    add_skip_invalid(g)
    g.add_argument("--max_train_samples", type=positive_int, default=None,
                   help="Keep only the first N training questions (debugging, quick runs).")
    g.add_argument("--max_eval_samples", type=positive_int, default=None,
                   help="Evaluate on only the first N questions (default: all).")
    return parser


def add_dataset_config_name(g) -> None:
    g.add_argument("--dataset_config_name", default=None, help="`datasets` config (hub datasets only).")


def add_skip_invalid(g) -> None:
    g.add_argument("--skip_invalid", action="store_true",
                   help="Skip malformed SQuAD records (and report how many) instead of stopping with an error.")


def window_args(from_model: bool = False) -> argparse.ArgumentParser:
    """Sliding windows over long contexts (kd.features). from_model: no defaults here; the model's
    qa_settings.json (then the usual 384/128/64) fills what is not given (kd.qa_settings.resolve_settings)."""
    parser, g = _group("windows")
    later = " Default: the model's qa_settings.json, else %(default)s." if from_model else ""
    g.add_argument("--max_seq_length", type=positive_int, default=None if from_model else 384,
                   help="Tokens per window, all included." + (later % {"default": 384} if later else ""))
    g.add_argument("--doc_stride", type=positive_int, default=None if from_model else 128,
                   help="Context tokens shared by consecutive windows of one long context."
                        + (later % {"default": 128} if later else ""))
    g.add_argument("--max_query_length", type=positive_int, default=None if from_model else 64,
                   help="Questions are cut to this many tokens." + (later % {"default": 64} if later else ""))
    g.add_argument("--preprocessing_num_workers", type=positive_int, default=None,
                   help="Processes that tokenize and window the data (default: this process alone).")
    return parser


def features_cache_args() -> argparse.ArgumentParser:
    """Where loaded examples and their windows are cached (kd.feature_cache)."""
    parser, g = _group("features cache")
    g.add_argument("--features_cache_dir", default=None,
                   help="Where SQuAD examples and their windows are cached as memory-mapped Arrow data, keyed by "
                        "the file's content, the tokenizer and the window settings: built once, shared by every "
                        "process and every restart with the same inputs (default: $KD_CACHE/features or "
                        "~/.cache/kd-qa/features).")
    return parser


def eval_batch_args() -> argparse.ArgumentParser:
    parser, g = _group("evaluation batches")
    g.add_argument("--per_device_eval_batch_size", type=positive_int, default=32,
                   help="Windows per forward pass in evaluation, per process.")
    return parser


def answer_args(from_model: bool = False) -> argparse.ArgumentParser:
    """Turning start/end logits into answers (kd.qa_eval). from_model: as in :func:`window_args`."""
    parser, g = _group("answers")
    later = " Default: the model's qa_settings.json, else %s." if from_model else ""
    g.add_argument("--n_best_size", type=positive_int, default=None if from_model else 20,
                   help="Start and end candidates paired per window." + (later % 20 if later else ""))
    g.add_argument("--max_answer_length", type=positive_int, default=None if from_model else 30,
                   help="Longest answer, in tokens." + (later % 30 if later else ""))
    g.add_argument("--no_answer_threshold", type=float, default=None if from_model else 0.0,
                   help="Predict no answer when null score - best span score exceeds this (SQuAD 2.0)."
                        + (" Default: the best threshold of the model's last evaluation (qa_settings.json), "
                           "else 0." if from_model else ""))
    return parser


def check_squad_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("train_file", "validation_file"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{name} {path!r} does not exist or is not a file.")
    if args.train_file is None and args.dataset_name is None:
        parser.error("give --train_file (SQuAD JSON) or --dataset_name (e.g. squad_v2).")


def check_windows(parser: argparse.ArgumentParser, args, tokenizer=None) -> None:
    """The window sizes (an argparse Namespace or a dict of resolved settings) against each other and, given a
    tokenizer, against its special tokens (the one window check: kd.features.check_window_args)."""
    from kd.features import check_window_args

    values = args if isinstance(args, dict) else vars(args)
    try:
        # without a tokenizer, 0 special tokens: the loosest bound; featurizing checks again with the real count
        check_window_args(tokenizer if tokenizer is not None else 0, values["max_seq_length"], values["doc_stride"],
                          values["max_query_length"])
    except ValueError as e:
        parser.error(str(e))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def training_args() -> argparse.ArgumentParser:
    parser, g = _group("training")
    g.add_argument("--output_dir", required=True,
                   help="Where the model, checkpoints and records go (the run resumes from here).")
    g.add_argument("--per_device_train_batch_size", type=positive_int, default=16,
                   help="Training examples per step and process; the global batch is this x processes x "
                        "--gradient_accumulation_steps.")
    g.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate (AdamW).")
    g.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW weight decay (not on biases and LayerNorm weights).")
    g.add_argument("--num_train_epochs", type=float, default=2,
                   help="Number of epochs; a fraction stops part-way through the last one.")
    g.add_argument("--max_train_steps", type=positive_int, default=None,
                   help="Total optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                   help="Batches whose gradients are summed before each optimizer step.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    g.add_argument("--lr_scheduler_type", default="linear",
                   choices=["linear", "cosine", "constant", "constant_with_warmup"],
                   help="Learning-rate schedule after the warmup.")
    g.add_argument("--num_warmup_steps", type=non_negative_int, default=None,
                   help="Optimizer steps of linear warmup (default: --warmup_ratio of the total).")
    g.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="Warmup as a fraction of the total steps, used when --num_warmup_steps is not given.")
    g.add_argument("--seed", type=int, default=42, help="Seeds initialisation, shuffling and dropout.")
    g.add_argument("--logging_steps", type=positive_int, default=10, help="Log to trackers every N optimizer steps.")
    g.add_argument("--checkpointing_steps", type=positive_int, default=None,
                   help="Save a resumable checkpoint every N optimizer steps (one is always saved at epoch end).")
    g.add_argument("--checkpoints_total_limit", type=non_negative_int, default=3,
                   help="Keep only the newest K checkpoints; 0 keeps all.")
    g.add_argument("--keep_checkpoints", default="all", choices=["all", "last", "none"],
                   help="Once the run has finished: keep all checkpoints (up to --checkpoints_total_limit), only "
                        "the last, or none (the exported model is the result; optimizer states are large).")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Delete the checkpoints and records of a run already in --output_dir, then start anew "
                        "(without it, such a dir is refused unless the run resumes).")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (start fresh if there is none yet, handy in requeued jobs) or a checkpoint dir.")
    g.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard", "all"],
                   help="Trackers. W&B runs offline when no API key is configured.")
    g.add_argument("--project_name", default="kd-qa", help="Tracker project name.")
    g.add_argument("--run_name", default=None, help="Tracker run name (default: the tracker's).")
    return parser


def check_models(parser: argparse.ArgumentParser, models: dict[str, str | None], max_seq_length: int) -> dict:
    """Each ``{flag: name or path}`` must load its config (a model dir, or a model on the hub) and take inputs of
    ``max_seq_length`` tokens; checked before any data work. Returns {flag: config}."""
    from transformers import AutoConfig

    from kd.models import usable_positions

    configs = {}
    for flag, name in models.items():
        if name is None:
            continue
        try:
            configs[flag] = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            where = "no such directory, and no" if not os.path.isdir(name) else "a directory without a usable"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            parser.error(f"{flag} {name}: {where} model config could be loaded ({first}). Pass a directory saved "
                         "with save_pretrained, or a model name on the Hugging Face hub.")
        room = usable_positions(configs[flag])
        if max_seq_length > room:
            parser.error(f"--max_seq_length {max_seq_length} exceeds the {room} positions of {flag} {name}; pass "
                         f"--max_seq_length {room} or less.")
    return configs


def check_trained_qa_head(parser: argparse.ArgumentParser, flag: str, name: str | None,
                          allow_flag: str | None = None) -> None:
    """``{flag} name`` must be a QA model whose QA head was trained (not one from_pretrained initialises at random:
    a bare encoder, a masked LM), told by kd.models.untrained_qa_head. allow_flag: the
    flag that lets such a model through (named in the error), where there is one; a teacher has none."""
    from kd.models import untrained_qa_head, untrained_qa_head_message

    if name is None:
        return
    try:
        head = untrained_qa_head(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.error(f"{flag} {name}: cannot be loaded as a QA model ({first}).")
    if head:
        fix = f", or pass {allow_flag} to go on anyway" if allow_flag else f", then pass its output as {flag}"
        parser.error(f"{flag} {untrained_qa_head_message(name, head)}{fix}.")


def check_tokenizers(parser: argparse.ArgumentParser, models: dict[str, str | None]) -> None:
    """Each ``{flag: name or path}`` has a usable tokenizer (kd.models.load_tokenizer), checked before any data
    work."""
    from kd.models import NoTokenizerError, load_tokenizer

    for flag, name in models.items():
        if name is not None:
            try:
                load_tokenizer(name, flag)
            except NoTokenizerError as e:
                parser.error(str(e))


def check_training(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("learning_rate", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0) or (name == "learning_rate" and value == 0):
            parser.error(f"--{name} must be a finite number {'> 0' if name == 'learning_rate' else '>= 0'}, "
                         f"got {value}.")
    if not args.num_train_epochs > 0 and args.max_train_steps is None:
        parser.error(f"--num_train_epochs must be > 0, got {args.num_train_epochs}.")
    if not 0 <= args.warmup_ratio < 1:
        parser.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}.")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a directory; "
                     "pass a checkpoint dir or 'latest'.")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub
# ---------------------------------------------------------------------------------------------------------------
def hub_args() -> argparse.ArgumentParser:
    """--push_to_hub, --hub_model_id, --hub_token, as in run_qa_no_trainer.py (the upload: kd.hub)."""
    parser, g = _group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Once the run has finished and --output_dir is complete (model, tokenizer, README.md model "
                        "card, records), upload it to the Hub, checkpoints excluded. A failed upload leaves the "
                        "local output as it is and exits non-zero with the command to upload later.")
    g.add_argument("--hub_model_id", default=None,
                   help="The Hub repo to upload to: 'user/name', or 'name' for the token's user. Default: the name "
                        "of --output_dir.")
    g.add_argument("--hub_token", default=None,
                   help="A Hub token with write access. Default: HF_TOKEN, else the `hf auth login` token (both "
                        "better: a command line is visible to other users of the machine). Never written to a record.")
    return parser


def check_hub(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The repo id to upload to (--hub_model_id, else the output dir's name); None without --push_to_hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from kd.hub import default_repo_id

    if not args.push_to_hub:
        given = [f"--{name}" for name in ("hub_model_id", "hub_token") if getattr(args, name) is not None]
        if given:
            parser.error(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with --push_to_hub; "
                         f"add --push_to_hub, or drop {'them' if len(given) > 1 else 'it'}.")
        return None
    repo_id = args.hub_model_id or default_repo_id(args.output_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        what = (f"--hub_model_id {repo_id!r}" if args.hub_model_id else
                f"the default repo name {repo_id!r} (the name of --output_dir {args.output_dir})")
        parser.error(f"{what} is not a valid Hub repo id: {e} Pass --hub_model_id user/name.")
    return repo_id


# ---------------------------------------------------------------------------------------------------------------
# Teachers and distillation
# ---------------------------------------------------------------------------------------------------------------
def _add_teacher(g, required: bool, help: str) -> None:
    g.add_argument("--teacher_name_or_path", required=required, default=None, help=help)
    g.add_argument("--teacher_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Teacher precision; auto = bf16 (fp16 without bf16 support) on GPU, fp32 on CPU.")


def prediction_distillation_args() -> argparse.ArgumentParser:
    parser, g = _group("prediction-layer distillation")
    _add_teacher(g, required=False, help="Fine-tuned QA teacher (its QA head trained: a bare encoder is refused). "
                                         "Without it the script is plain fine-tuning.")
    g.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature T > 0.")
    g.add_argument("--distillation_loss_weight", type=float, default=0.5,
                   help="w in [0, 1]: loss = w * KD + (1 - w) * CE(gold spans).")
    g.add_argument("--distillation_loss", default="kl_div", choices=["kl_div", "mse", "ce"],
                   help="KD term between the student's and the teacher's start/end distributions at T.")
    g.add_argument("--teacher_cache_dir", default=None,
                   help="Where teacher logits are cached (default: $KD_CACHE/teacher_logits or "
                        "~/.cache/kd-qa/teacher_logits).")
    for name, what in (("max_seq_length", "window length"), ("doc_stride", "window overlap"),
                       ("max_query_length", "question length")):
        g.add_argument(f"--teacher_{name}", type=positive_int, default=None,
                       help=f"The teacher's own {what} in tokens (default: the student's --{name}). A teacher "
                            "whose tokenization differs from the student's runs on its own windows; its "
                            "distributions are carried onto the student's tokens through character offsets.")
    return parser


def teacher_window(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The teacher's window settings: its own --teacher_* values, else the student's; checked like the student's."""
    window = {name: getattr(args, f"teacher_{name}") or getattr(args, name)
              for name in ("max_seq_length", "doc_stride", "max_query_length")}
    check_windows(parser, window)
    return window


def check_prediction_distillation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> float:
    """Returns the distillation loss weight in effect: 0 without a teacher (gold spans only)."""
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        parser.error(f"--temperature must be > 0 and finite, got {args.temperature}.")
    if not 0.0 <= args.distillation_loss_weight <= 1.0:
        parser.error(f"--distillation_loss_weight must be in [0, 1], got {args.distillation_loss_weight}.")
    return args.distillation_loss_weight if args.teacher_name_or_path else 0.0


def intermediate_distillation_args() -> argparse.ArgumentParser:
    """Teacher, layer map and loss terms of intermediate-layer distillation (TinyBERT, MiniLMv2).

    The per-term weights default to None, meaning "as the --loss_kind preset says" (kd.losses.INTERMEDIATE_LOSS_KINDS);
    a weight given explicitly overrides the preset for that term only.
    """
    parser, g = _group("intermediate-layer distillation")
    _add_teacher(g, required=True, help="The teacher; only its encoder is loaded. Must tokenize exactly as the "
                                        "student. train_task_intermediate.py: a fine-tuned QA model (its QA head "
                                        "trained); train_general.py: any head, or none.")
    g.add_argument("--layer_map", default="uniform",
                   help="Which student layer learns from which teacher layer: 'uniform' (TinyBERT, embeddings "
                        "included), 'last', pairs 'student:teacher' such as '0:0,1:2,2:4' (0 = embeddings), or "
                        "JSON (inline or a .json file).")
    g.add_argument("--loss_kind", default="tinybert", choices=sorted(INTERMEDIATE_LOSS_KINDS),
                   help="tinybert: pre-softmax attention scores + hidden states + embeddings (MSE; equal head "
                        "counts); minilm_relation: MiniLMv2 Q-Q/K-K/V-V relation KL (any head counts and widths).")
    for term, (_, what) in INTERMEDIATE_TERMS.items():
        g.add_argument(f"--{term}_loss_weight", type=float, default=None,
                       help=f"Weight of the {what}; default: from --loss_kind.")
    g.add_argument("--relation_heads", type=positive_int, default=None,
                   help="Relation heads of the relation loss; must divide both hidden sizes. Default: the "
                        "teacher's attention head count.")
    return parser


def check_intermediate_distillation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, float]:
    """Flag-level checks (no model is read; kd.intermediate.check_distillation_setup checks against the configs).
    Returns the per-term weights given explicitly ({} when all come from --loss_kind)."""
    weights = {term: getattr(args, f"{term}_loss_weight") for term in INTERMEDIATE_TERMS
               if getattr(args, f"{term}_loss_weight") is not None}
    for term, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            parser.error(f"--{term}_loss_weight must be a finite number >= 0, got {w}.")
    relation_on = weights.get("relation", INTERMEDIATE_LOSS_KINDS[args.loss_kind]["relation"]) > 0
    if args.relation_heads is not None and not relation_on:
        parser.error("--relation_heads applies to the relation loss only, which is off here; use "
                     "--loss_kind minilm_relation or --relation_loss_weight > 0, or drop --relation_heads.")
    spec = args.layer_map.strip()
    if spec.endswith(".json") and not spec.startswith(("{", "[")) and not os.path.isfile(spec):
        parser.error(f"--layer_map file {spec!r} does not exist.")
    return weights


# ---------------------------------------------------------------------------------------------------------------
# General distillation: corpus and student
# ---------------------------------------------------------------------------------------------------------------
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
    add_dataset_config_name(g)
    g.add_argument("--dataset_split", default="train", help="Split of --dataset_name to read.")
    g.add_argument("--text_column", default="text", help="The text field of JSON Lines, parquet and datasets.")
    g.add_argument("--line_by_line", action="store_true",
                   help="Text files: one document per non-blank line (default: per block of lines between blank "
                        "lines).")
    g.add_argument("--max_seq_length", type=positive_int, default=128,
                   help="Tokens per packed sequence, special tokens included.")
    g.add_argument("--respect_document_boundaries", action="store_true",
                   help="A sequence never spans two documents (a document's last piece is shorter and batches are "
                        "padded). Default: documents are concatenated with a separator token between them and cut "
                        "into full-length sequences, no padding.")
    g.add_argument("--streaming", action="store_true",
                   help="Read, tokenize and pack on the fly, each process its own shard, resumable mid-stream; for "
                        "corpora that fit neither memory nor disk. Default: tokenize and pack once into "
                        "--corpus_cache_dir, memory-mapped.")
    g.add_argument("--shuffle_buffer_size", type=non_negative_int, default=1000,
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
    for name, what in zip(STUDENT_SIZE_FLAGS, ("Transformer layers", "width", "attention heads",
                                               "feed-forward width")):
        s.add_argument(f"--{name}", type=positive_int, default=None,
                       help=f"A randomly initialised student of the teacher's architecture: its {what} (the "
                            "teacher's when not given).")
    return parser


def check_general_distillation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str] | None:
    """Flag-level checks for train_general.py, then the corpus files' start (kd.corpus.FileCorpus.validate); returns
    the corpus files the --train_file patterns match (None for a --dataset_name corpus)."""
    from kd.corpus import FileCorpus, resolve_files

    if args.max_train_steps is None:
        parser.error("general distillation is counted in optimizer steps: pass --max_train_steps N "
                     "(--num_train_epochs does not apply to a stream).")
    if (args.corpus_files is None) == (args.dataset_name is None):
        parser.error("give the corpus as --train_file PATH [PATH ...] (files or glob patterns) or as --dataset_name "
                     "NAME [--dataset_config_name CONFIG], not both.")
    files = None
    if args.corpus_files is not None:
        try:
            files = resolve_files(args.corpus_files)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--train_file: {e}.")
    if args.max_seq_length < 4:
        parser.error(f"--max_seq_length must be at least 4 (2 special tokens + content), got {args.max_seq_length}.")
    if args.preprocess_only and args.streaming:
        parser.error("--preprocess_only builds the non-streaming cache; drop --streaming (a stream is not cached).")
    if not args.shard_size_mb > 0:
        parser.error(f"--shard_size_mb must be > 0, got {args.shard_size_mb}.")
    sizes = [f"--{n}" for n in STUDENT_SIZE_FLAGS if getattr(args, n) is not None]
    chosen = ([["--model_name_or_path"]] if args.model_name_or_path else []) + \
             ([["--student_layers"]] if args.student_layers else []) + ([sizes] if sizes else [])
    if len(chosen) != 1:
        parser.error("choose the student in exactly one way: --model_name_or_path (a checkpoint), --student_layers "
                     "(e.g. 2,4,6 or every_other: the teacher's own blocks) or a size (--num_hidden_layers, "
                     "--hidden_size, --num_attention_heads, --intermediate_size); got "
                     f"{', '.join(sum(chosen, [])) or 'none'}.")
    if files is not None:  # last: it reads the start of every file (a binary or non-UTF-8 one is refused here)
        try:
            FileCorpus(files, text_column=args.text_column, line_by_line=args.line_by_line).validate()
        except ValueError as e:
            parser.error(f"--train_file: {e}")
    return files

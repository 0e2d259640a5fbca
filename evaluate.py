"""Evaluate an extractive QA model on SQuAD-format data, or score an existing predictions file.

Run a model (one process, or several with ``accelerate launch``)::

    python evaluate.py --model_name_or_path outputs/student \\
        --validation_file /path/to/dev-v2.0.json --output_dir outputs/student/eval
    accelerate launch --num_processes 2 evaluate.py --model_name_or_path outputs/student \\
        --validation_file /path/to/dev-v2.0.json --output_dir outputs/student/eval

  The main process writes ``predictions.json`` and ``null_odds.json`` (the official script's
  pred / na-prob files) and ``eval_results.json``: the official SQuAD 2.0 metrics (``exact``,
  ``f1``, ``HasAns_*``, ``NoAns_*``, ``best_*`` with null odds as the no-answer score) plus model
  size and speed (median latency of ``--timing_batches`` forward passes of one batch after
  ``--warmup_batches``, per process). Without ``--output_dir`` nothing is written. The results
  are printed as JSON at the end.

  ``--onnx_file`` runs an ONNX export (``export_onnx.py``) under ONNX Runtime instead of the PyTorch
  weights, through the same windows, post-processing and timing (ONNX Runtime gets as many threads as
  torch). The tokenizer and ``qa_settings.json`` still come from ``--model_name_or_path``: pass the
  export's own dir, which holds them::

    python evaluate.py --model_name_or_path outputs/student-onnx \
        --onnx_file outputs/student-onnx/model.int8.onnx --validation_file /path/to/dev-v2.0.json

Score a predictions file exactly like the official ``evaluate-v2.0.py``::

    python evaluate.py --validation_file dev-v2.0.json --predictions predictions.json \\
        [--na_prob_file null_odds.json] [--na_prob_thresh 1.0]

``--validation_file`` may also be a ``datasets`` name (with ``--dataset_config_name`` and
``--validation_split``). Invalid questions stop the run with a list of problems unless
``--skip_invalid`` drops them (they are then not scored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from accelerate import Accelerator
from accelerate.utils import set_seed

from kd import args as kd_args
from kd.feature_cache import cached_windows
from kd.feature_cache import load_examples as load_examples_cached
from kd.features import check_window_args
from kd.files import write_json_atomic
from kd.model_eval import evaluate_model
from kd import models as kd_models
from kd.qa_eval import save_eval_outputs
from kd.qa_settings import DEFAULTS, load_qa_settings, resolve_settings
from kd.squad import SquadFormatError, load_squad
from kd.squad_metrics import squad_evaluate

logger = logging.getLogger("evaluate")

# Tokenizers without a configured limit report a huge sentinel value instead.
_UNSET_MODEL_MAX_LENGTH = 10**9


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate an extractive QA model on SQuAD-format data, or score a predictions file.",
        parents=[kd_args.window_args(from_model=True), kd_args.features_cache_args(), kd_args.eval_batch_args(),
                 kd_args.answer_args(from_model=True)],
        formatter_class=kd_args.HelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model_name_or_path", help="QA model (and tokenizer) directory to run.")
    mode.add_argument("--predictions", help="Existing predictions JSON ({id: answer}) to score instead.")
    parser.add_argument("--validation_file", required=True, help="SQuAD .json file or a datasets name.")
    parser.add_argument("--validation_split", default="validation", help="datasets split (hub datasets only).")
    kd_args.add_dataset_config_name(parser)
    kd_args.add_skip_invalid(parser)
    parser.add_argument("--output_dir", default=None, help="Where to write the result files (main process).")

    scoring = parser.add_argument_group("scoring a predictions file (--predictions)")
    scoring.add_argument("--na_prob_file", default=None, help="JSON {id: no-answer probability / null odds}.")
    scoring.add_argument(
        "--na_prob_thresh", type=float, default=1.0,
        help="Count a prediction as no-answer when its na_prob exceeds this (official script's rule).",
    )

    model = parser.add_argument_group("running a model (--model_name_or_path)")
    model.add_argument(
        "--version_2_with_negative", action=argparse.BooleanOptionalAction, default=None,
        help="Allow no-answer predictions; default: yes if the data has unanswerable questions.",
    )
    model.add_argument("--warmup_batches", type=kd_args.non_negative_int, default=2,
                        help="Untimed forward passes before the timing.")
    model.add_argument("--timing_batches", type=kd_args.positive_int, default=5,
                        help="Timed forward passes; the latency is their median.")
    model.add_argument("--seed", type=int, default=42, help="Seeds e.g. a randomly initialised QA head.")
    model.add_argument(
        "--onnx_file", default=None,
        help="Run this ONNX graph (export_onnx.py) under ONNX Runtime instead of the PyTorch weights; the tokenizer "
             "and qa_settings.json still come from --model_name_or_path (an export's dir holds both).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """Parse and sanity-check arguments; exits with a usage error saying what to change.

    Returns (args, settings): the window and answer settings of a model run, each from its flag, else the model's
    qa_settings.json, else the default (kd.qa_settings.resolve_settings); {} when scoring a predictions file.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.predictions is not None and args.version_2_with_negative is not None:
        parser.error(
            "--version_2_with_negative only applies when running a model (--model_name_or_path); a "
            "predictions file is scored with the official SQuAD 2.0 rules."
        )
    if args.predictions is None and args.na_prob_file is not None:
        parser.error(
            "--na_prob_file only applies to scoring a predictions file (--predictions); a model run "
            "computes its own null odds."
        )
    if args.onnx_file is not None and args.predictions is not None:
        parser.error("--onnx_file only applies when running a model (--model_name_or_path).")
    if args.onnx_file is not None and not os.path.isfile(args.onnx_file):
        parser.error(f"--onnx_file {args.onnx_file!r} does not exist or is not a file.")
    if args.predictions is not None:
        return args, {}
    explicit = {k: getattr(args, k) for k in DEFAULTS}
    try:
        settings, _ = resolve_settings(explicit, load_qa_settings(args.model_name_or_path))  # values: results
    except ValueError as err:
        parser.error(str(err))
    kd_args.check_windows(parser, settings)
    return args, settings


def read_json_mapping(path: str, what: str) -> dict:
    """Read a JSON object from ``path``; exit with a clear message when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        sys.exit(f"evaluate.py: error: {what} file not found: {path}")
    except json.JSONDecodeError as err:
        sys.exit(f"evaluate.py: error: {what} file {path} is not valid JSON ({err}).")
    if not isinstance(data, dict):
        sys.exit(f"evaluate.py: error: {what} file {path} must hold a JSON object {{question id: value}}.")
    return data


def load_examples(args: argparse.Namespace):
    """Validated examples, or exit with the data problem (no traceback: it is not a bug)."""
    try:
        return load_squad(
            args.validation_file, split=args.validation_split, config=args.dataset_config_name,
            skip_invalid=args.skip_invalid,
        )
    except (SquadFormatError, FileNotFoundError) as err:
        sys.exit(f"evaluate.py: error: {err}")


def cached_examples_and_windows(args: argparse.Namespace, settings: dict, tokenizer, accelerator):
    """(examples, evaluation windows, cache info) through kd.feature_cache, or exit with the data problem."""
    window = {k: settings[k] for k in ("max_seq_length", "doc_stride", "max_query_length")}
    try:
        examples, info = load_examples_cached(
            accelerator, args.validation_file, split=args.validation_split, config=args.dataset_config_name,
            skip_invalid=args.skip_invalid, cache_dir=args.features_cache_dir)
    except (SquadFormatError, FileNotFoundError) as err:
        sys.exit(f"evaluate.py: error: {err}")
    features, windows = cached_windows(accelerator, "eval", examples, info["source_key"], tokenizer, **window,
                                       num_proc=args.preprocessing_num_workers, cache_dir=args.features_cache_dir)
    return examples, features, {"examples": info, "eval_windows": windows}


def score_predictions_file(args: argparse.Namespace) -> dict:
    """``--predictions`` mode: the official SQuAD 2.0 metrics of an existing predictions file."""
    examples = load_examples(args)
    predictions = read_json_mapping(args.predictions, "predictions")
    na_probs = read_json_mapping(args.na_prob_file, "na_prob") if args.na_prob_file else None
    try:
        return squad_evaluate(examples, predictions, na_probs=na_probs, na_prob_thresh=args.na_prob_thresh)
    except ValueError as err:
        sys.exit(f"evaluate.py: error: {err}")


def load_tokenizer(args: argparse.Namespace, settings: dict):
    """The model's tokenizer, after checking the window sizes (resolved ``settings``) against it."""
    try:
        tokenizer = kd_models.load_tokenizer(args.model_name_or_path, "--model_name_or_path")
    except kd_models.NoTokenizerError as err:
        sys.exit(f"evaluate.py: error: {err}")
    limit = tokenizer.model_max_length
    if limit < _UNSET_MODEL_MAX_LENGTH and settings["max_seq_length"] > limit:
        sys.exit(
            f"evaluate.py: error: --max_seq_length {settings['max_seq_length']} exceeds what the model accepts "
            f"({limit} tokens); pass --max_seq_length {limit} or less."
        )
    try:
        check_window_args(tokenizer, settings["max_seq_length"], settings["doc_stride"], settings["max_query_length"])
    except ValueError as err:
        sys.exit(f"evaluate.py: error: {err}")
    return tokenizer


def load_onnx_model(args: argparse.Namespace):
    """The --onnx_file graph under ONNX Runtime, or None: evaluate_model then loads the PyTorch weights."""
    if args.onnx_file is None:
        return None
    from kd.onnx_qa import OnnxQAModel  # onnxruntime is an export-only need (requirements-test.txt)

    return OnnxQAModel(args.onnx_file)


def run_model(args: argparse.Namespace, settings: dict, accelerator: Accelerator) -> dict:
    """``--model_name_or_path`` mode: predict, score, time; returns eval_results (all processes)."""
    set_seed(args.seed)
    tokenizer = load_tokenizer(args, settings)
    examples, features, cache_info = cached_examples_and_windows(args, settings, tokenizer, accelerator)
    results, predictions, null_odds = evaluate_model(
        accelerator, args.model_name_or_path, tokenizer, examples, features=features,
        max_seq_length=settings["max_seq_length"], doc_stride=settings["doc_stride"],
        max_query_length=settings["max_query_length"], n_best_size=settings["n_best_size"],
        max_answer_length=settings["max_answer_length"], no_answer_threshold=settings["no_answer_threshold"],
        version_2_with_negative=args.version_2_with_negative, eval_batch_size=args.per_device_eval_batch_size,
        warmup_batches=args.warmup_batches, timing_batches=args.timing_batches,
        num_proc=args.preprocessing_num_workers, model=load_onnx_model(args))
    results["validation_file"] = args.validation_file
    results["features_cache"] = cache_info
    if args.onnx_file is not None:
        results["onnx_file"] = args.onnx_file
    if accelerator.is_main_process and args.output_dir:
        save_eval_outputs(args.output_dir, results, predictions, null_odds)
        logger.info("Wrote predictions.json, null_odds.json, eval_results.json to %s", args.output_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    if args.predictions is not None:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
        results = score_predictions_file(args)
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            write_json_atomic(os.path.join(args.output_dir, "eval_results.json"), results)
        print(json.dumps(results, indent=2))
        return
    accelerator = Accelerator()
    logging.basicConfig(
        format="%(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    if not args.output_dir:
        logger.info("No --output_dir: results are printed, not saved.")
    results = run_model(args, settings, accelerator)
    if accelerator.is_main_process:
        print(json.dumps(results, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()

"""Export an extractive QA model to ONNX, check it against PyTorch, optionally quantize it to int8.

    python export_onnx.py --model_name_or_path runs/student --output_dir runs/student-onnx
    python export_onnx.py --model_name_or_path runs/student --output_dir runs/student-onnx \\
        --validation_file data/dev-v2.0.json --max_eval_samples 500 --quantize int8

The output dir is self-contained: ``model.onnx`` (fp32; inputs input_ids, attention_mask [, token_type_ids],
outputs start_logits, end_logits, all [batch, sequence] with both axes dynamic), ``model.int8.onnx`` with
``--quantize int8``, the tokenizer files, ``config.json``, the model's ``qa_settings.json`` when it has one (its
windows travel with it) and ``export_report.json``:

- ``parity``: PyTorch vs ONNX Runtime logits on the windows of ``--validation_file`` (default: the repo's
  ``data/squad_demo_dev.json``, real SQuAD 1.1 dev questions), cut as the model's qa_settings.json says unless
  ``--max_seq_length`` / ``--doc_stride`` / ``--max_query_length`` override it: the largest absolute difference of
  start and of end logits, ``--atol``, and whether both are within it.
- ``file_sizes_bytes``: the ONNX files and the PyTorch weights they came from.
- ``files``: every name the export wrote into the dir (what a later ``--overwrite_output_dir`` may delete).
- with ``--quantize int8``: EM/F1 of the fp32 and the int8 graph on the same questions through the same evaluation
  (kd.qa_eval.evaluate_qa), and the change.

Parity beyond ``--atol`` exits with status 1 and a message; nothing is written then. An existing non-empty
``--output_dir`` is refused unless ``--overwrite_output_dir``, and even then when it is or holds an input (the model,
``--validation_file``) or anything a previous export's ``export_report.json`` does not list under ``files``. The
export is built in a temp dir beside ``--output_dir`` and renamed into place once finished, so a crash never leaves
a half export that looks whole.

Evaluate an export like any model (F1 and latency measured the same way as PyTorch's)::

    python evaluate.py --model_name_or_path runs/student-onnx --onnx_file runs/student-onnx/model.int8.onnx \\
        --validation_file data/dev-v2.0.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import sys

import torch
from accelerate import Accelerator

from kd import args as kd_args
from kd.features import check_window_args, prepare_eval_features
from kd.files import write_json_atomic
from kd.model_eval import model_size_on_disk
from kd.models import load_qa_model, load_tokenizer, untrained_qa_head_message
from kd.onnx_qa import OnnxQAModel, export_qa_onnx, max_abs_logit_diff, onnx_file_bytes, onnx_opset, quantize_int8
from kd.qa_eval import evaluate_qa, make_eval_dataloader
from kd.qa_settings import WINDOW_KEYS, load_qa_settings, resolve_settings, save_qa_settings
from kd.run_dir import input_paths, overwrite_refusal
from kd.squad import SquadFormatError, load_squad

logger = logging.getLogger("export_onnx")

DEMO_DEV_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "squad_demo_dev.json")
FP32_FILE, INT8_FILE, REPORT_FILE = "model.onnx", "model.int8.onnx", "export_report.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export an extractive QA model to ONNX, check it against PyTorch, optionally quantize it.",
        parents=[kd_args.eval_batch_args()], formatter_class=kd_args.HelpFormatter,
    )
    parser.add_argument("--model_name_or_path", required=True, help="QA model (and tokenizer) to export.")
    parser.add_argument("--output_dir", required=True, help="Where the self-contained export goes.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an existing non-empty --output_dir (only once the new export is finished).")
    parser.add_argument("--validation_file", default=DEMO_DEV_FILE,
                        help="SQuAD JSON whose windows the parity check (and the int8 EM/F1) runs on.")
    parser.add_argument("--max_eval_samples", type=kd_args.positive_int, default=None,
                        help="Use only its first N questions (None: all).")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="Largest absolute logit difference ONNX Runtime may show against PyTorch.")
    parser.add_argument("--opset", type=kd_args.positive_int, default=None,
                        help="ONNX opset to export to (None: the exporter's; the report says which).")
    parser.add_argument("--allow_untrained_qa_head", action="store_true",
                        help="Export (with a warning) even when the model has no trained QA head, i.e. one that "
                             "from_pretrained initialises at random (a bare encoder): its answers are then random.")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="Also write model.int8.onnx (ONNX Runtime dynamic quantization) and report its EM/F1 "
                             "against the fp32 graph's.")
    windows = parser.add_argument_group("windows (default: the model's qa_settings.json, else 384/128/64)")
    for name, what, default in (("max_seq_length", "Tokens per window", 384),
                                ("doc_stride", "Context tokens shared by consecutive windows", 128),
                                ("max_query_length", "Questions are cut to this many tokens", 64)):
        windows.add_argument(f"--{name}", type=kd_args.positive_int, default=None,
                             help=f"{what} (default: the model's qa_settings.json, else {default}).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and sanity-check arguments; exits with a usage error saying what to change."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.atol >= 0:  # also catches nan
        parser.error(f"--atol must be >= 0, got {args.atol}.")
    if not os.path.isfile(args.validation_file):
        parser.error(f"--validation_file {args.validation_file!r} does not exist or is not a file.")
    out = args.output_dir
    if os.path.realpath(out) == os.path.realpath(args.model_name_or_path):
        parser.error("--output_dir is the model's own dir; an export replaces its dir whole, so choose another.")
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--output_dir {out!r} exists and is not a directory.")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite_output_dir:
        parser.error(f"--output_dir {out!r} exists and is not empty; pass --overwrite_output_dir to replace it "
                     "(the old contents go only once the new export is finished) or choose another dir.")
    problem = replace_refusal(out, input_paths(args)) if args.overwrite_output_dir else None
    if problem:
        parser.exit(2, f"export_onnx.py: error: {problem}\n")
    kd_args.check_tokenizers(parser, {"--model_name_or_path": args.model_name_or_path})
    if not args.allow_untrained_qa_head:
        kd_args.check_trained_qa_head(parser, "--model_name_or_path", args.model_name_or_path,
                                      "--allow_untrained_qa_head")
    return args


def replace_refusal(out: str, inputs: list[tuple[str, str]]) -> str | None:
    """Why the export may not replace ``out`` whole (kd.run_dir.overwrite_refusal), or None: it may when ``out``
    holds no input and nothing that a previous export's report does not list."""
    if not os.path.isdir(out):
        return None
    try:
        with open(os.path.join(out, REPORT_FILE)) as f:
            written = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        written = []
    return overwrite_refusal(out, inputs, os.listdir(out), written if isinstance(written, list) else [],
                             f"export_onnx.py (its {REPORT_FILE} does not list them)")


def resolve_windows(args: argparse.Namespace, tokenizer) -> tuple[dict, dict]:
    """The settings the parity/eval windows use (argument, else qa_settings.json, else default), checked against
    the tokenizer; returns (settings, the model's saved qa_settings)."""
    saved = load_qa_settings(args.model_name_or_path)
    settings, source = resolve_settings({k: getattr(args, k) for k in WINDOW_KEYS}, saved)
    logger.info("Windows: %s", ", ".join(f"{k} {settings[k]} ({source[k]})" for k in WINDOW_KEYS))
    try:
        check_window_args(tokenizer, *(settings[k] for k in WINDOW_KEYS))
    except ValueError as err:
        sys.exit(f"export_onnx.py: error: {err}")
    return settings, saved


def write_export(model, tokenizer, saved_settings: dict, folder: str, opset: int | None) -> list[str]:
    """model.onnx, tokenizer files, config.json and (if the model has one) qa_settings.json into ``folder``."""
    os.makedirs(folder)
    input_names = export_qa_onnx(model, tokenizer, os.path.join(folder, FP32_FILE), opset=opset)
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    if saved_settings:
        save_qa_settings(folder, saved_settings)
    return input_names


def check_parity(model, folder: str, features, args: argparse.Namespace) -> dict:
    """PyTorch against ONNX Runtime on every window; exits (nothing written) when a difference exceeds --atol."""
    parity = max_abs_logit_diff(model, OnnxQAModel(os.path.join(folder, FP32_FILE)),
                                make_eval_dataloader(features, args.per_device_eval_batch_size))
    logger.info("Parity on %d windows: max |diff| start %.3g, end %.3g (atol %g)", len(features),
                parity["max_abs_diff_start"], parity["max_abs_diff_end"], args.atol)
    if max(parity.values()) > args.atol:
        sys.exit(f"export_onnx.py: error: ONNX Runtime's logits differ from PyTorch's by up to "
                 f"{parity['max_abs_diff_start']:.3g} (start) / {parity['max_abs_diff_end']:.3g} (end) on "
                 f"{len(features)} windows of {args.validation_file}, more than --atol {args.atol:g}; nothing was "
                 "written. Raise --atol if that difference is acceptable, or try another --opset.")
    return {"validation_file": args.validation_file, "num_windows": len(features), **parity, "atol": args.atol,
            "passed": True}


def quantized_quality(accelerator, folder: str, examples, features, settings: dict, batch_size: int) -> dict:
    """Write model.int8.onnx; EM/F1 of the fp32 and int8 graphs on the same windows, same evaluation path."""
    quantize_int8(os.path.join(folder, FP32_FILE), os.path.join(folder, INT8_FILE))
    scores = {}
    for name, file in (("fp32", FP32_FILE), ("int8", INT8_FILE)):
        metrics, _, _ = evaluate_qa(
            accelerator, OnnxQAModel(os.path.join(folder, file)), examples, features,
            make_eval_dataloader(features, batch_size), n_best_size=settings["n_best_size"],
            max_answer_length=settings["max_answer_length"], no_answer_threshold=settings["no_answer_threshold"])
        scores[name] = {"exact": metrics["exact"], "f1": metrics["f1"]}
    return {"method": "onnxruntime quantize_dynamic, int8 weights (QInt8), activations quantized per batch",
            "file": INT8_FILE, **scores, "exact_change": scores["int8"]["exact"] - scores["fp32"]["exact"],
            "f1_change": scores["int8"]["f1"] - scores["fp32"]["f1"]}


def publish(tmp: str, out: str, overwrite: bool, inputs: list[tuple[str, str]]) -> None:
    """Rename the finished export ``tmp`` to ``out``; an existing ``out`` (allowed by ``overwrite``) is moved aside
    first and deleted last, so at every moment ``out`` is either the old export or the new one, whole."""
    if os.path.isdir(out) and os.listdir(out):
        problem = replace_refusal(out, inputs)  # it may have changed while we were exporting
        if not overwrite or problem:
            sys.exit(f"export_onnx.py: error: {out} was filled during the export; "
                     + (problem or "rerun with --overwrite_output_dir or another --output_dir."))
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)  # replaces an empty dir


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # INFO from this script and kd only: the exporter's optimizer logs every pass it makes at INFO.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    for name in ("export_onnx", "kd"):
        logging.getLogger(name).setLevel(logging.INFO)
    tokenizer = load_tokenizer(args.model_name_or_path, "--model_name_or_path")
    # fp32 whatever dtype the checkpoint was saved in: the graph is exported, and checked, in fp32
    model, head = load_qa_model(args.model_name_or_path, dtype=torch.float32)
    model.eval()
    if head:  # let through by --allow_untrained_qa_head (parse_args refuses it otherwise)
        logger.warning("%s. Exporting it anyway (--allow_untrained_qa_head).",
                       untrained_qa_head_message(args.model_name_or_path, head))
    settings, saved = resolve_windows(args, tokenizer)
    try:
        examples = load_squad(args.validation_file, split="validation", max_samples=args.max_eval_samples)
    except SquadFormatError as err:
        sys.exit(f"export_onnx.py: error: {err}")
    features = prepare_eval_features(examples, tokenizer, *(settings[k] for k in WINDOW_KEYS))

    out = os.path.abspath(args.output_dir)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        input_names = write_export(model, tokenizer, saved, tmp, args.opset)
        report = {
            "model_name_or_path": args.model_name_or_path, "onnx_file": FP32_FILE,
            "opset": onnx_opset(os.path.join(tmp, FP32_FILE)),
            "inputs": input_names, "outputs": ["start_logits", "end_logits"], "dynamic_axes": ["batch", "sequence"],
            "windows": {k: settings[k] for k in WINDOW_KEYS},
            "parity": {"num_examples": len(examples), **check_parity(model, tmp, features, args)},
        }
        if args.quantize:
            report["int8"] = quantized_quality(Accelerator(cpu=True), tmp, examples, features, settings,
                                               args.per_device_eval_batch_size)
            logger.info("int8: EM %+.2f, F1 %+.2f against fp32", report["int8"]["exact_change"],
                        report["int8"]["f1_change"])
        report["file_sizes_bytes"] = {
            **{f: onnx_file_bytes(os.path.join(tmp, f)) for f in (FP32_FILE, INT8_FILE)
               if os.path.isfile(os.path.join(tmp, f))},
            "pytorch_weights": model_size_on_disk(args.model_name_or_path)}
        report["versions"] = {name: importlib.metadata.version(name) for name in ("torch", "onnx", "onnxruntime")}
        report["files"] = sorted([*os.listdir(tmp), REPORT_FILE])  # what a later --overwrite_output_dir may delete
        write_json_atomic(os.path.join(tmp, REPORT_FILE), report)
        publish(tmp, out, args.overwrite_output_dir, input_paths(args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Wrote %s", args.output_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

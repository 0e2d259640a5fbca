"""Answer questions with an extractive QA model (a student trained here, or any QA model): top-k answers with scores
and character offsets, the no-answer score and decision. The way to serve a student on transformers >= 5.3, which
removed ``pipeline("question-answering")``; in Python use ``kd.inference.QuestionAnswerer`` directly.

    python predict.py --model_name_or_path runs/student \\
        --question "Who gave their name to Normandy?" \\
        --context "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."
    python predict.py --model_name_or_path runs/student --input_file dev-v2.0.json --top_k 3 \\
        --output_file answers.json --predictions_file predictions.json --device cuda --dtype bfloat16

--input_file: a SQuAD JSON file (validated as evaluate.py does: each question has an answers list, [] is fine) or JSON Lines
(``.jsonl``) of {"id", "question", "context"} (strings; "id" optional, unique; an empty context gets no answer),
checked whole before the model loads: a bad line is refused as ``FILE:LINE: what is wrong``. --output_file: JSON
{"model", "settings", "settings_source", "results": [one per question: id, answer, start, end, score, no_answer,
null_odds, candidates]} (strict JSON: a score that does not exist is null). --predictions_file: {id: answer}, the
format of evaluate.py's predictions.json (with the same settings the two files are identical). Without
--output_file the results are printed.

Window sizes, answer length and the no-answer threshold default to the model's qa_settings.json (what it was
trained with, and the best threshold of its last evaluation), else to the usual 384/128/64/30 and 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import datasets

from kd import args as kd_args
from kd.files import write_text_atomic
from kd.inference import DTYPES, QuestionAnswerer
from kd.qa_settings import DEFAULTS
from kd.squad import SquadFormatError, load_squad, read_question_lines

logger = logging.getLogger("predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[kd_args.window_args(from_model=True), kd_args.eval_batch_args(),
                 kd_args.answer_args(from_model=True)],
        formatter_class=kd_args.HelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="QA model dir or hub id (with its tokenizer).")
    source = parser.add_argument_group("questions (one of)")
    source.add_argument("--question", help="One question (with --context).")
    source.add_argument("--context", help="Its context.")
    source.add_argument("--input_file", help="SQuAD JSON or JSON Lines of {id, question, context}.")
    parser.add_argument("--top_k", type=kd_args.positive_int, default=1, help="Answers per question.")
    parser.add_argument("--version_2_with_negative", action=argparse.BooleanOptionalAction, default=None,
                        help="Answer '' when the no-answer score wins. Default: what the model was evaluated "
                             "with (qa_settings.json), else no (as HF's pipeline).")
    parser.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bf16 (or fp16) on GPU, fp32 on CPU.")
    parser.add_argument("--allow_untrained_qa_head", action="store_true",
                        help="Answer (with a warning) even when the model has no trained QA head, i.e. one that "
                             "from_pretrained initialises at random (a bare encoder): its answers are then random.")
    parser.add_argument("--output_file", default=None, help="Write the results here (JSON) instead of printing.")
    parser.add_argument("--predictions_file", default=None, help="Also write {id: answer} (evaluate.py's format).")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    one = args.question is not None or args.context is not None
    if one == (args.input_file is not None):
        parser.error("give either --question and --context, or --input_file (SQuAD JSON or JSON Lines).")
    if one and (args.question is None or args.context is None):
        parser.error("--question and --context go together; give both.")
    if args.input_file is not None and not os.path.isfile(args.input_file):
        parser.error(f"--input_file {args.input_file} does not exist.")
    kd_args.check_tokenizers(parser, {"--model_name_or_path": args.model_name_or_path})
    if not args.allow_untrained_qa_head:
        kd_args.check_trained_qa_head(parser, "--model_name_or_path", args.model_name_or_path,
                                      "--allow_untrained_qa_head")
    return args


def fail(message: str):
    """A bad input: one line, exit status 2, nothing written."""
    print(f"predict.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_questions(path: str) -> datasets.Dataset:
    """Examples (id, question, context) of a SQuAD JSON file or a JSON Lines file; exits on a bad one."""
    try:
        if path.endswith(".jsonl"):
            return datasets.Dataset.from_list(read_question_lines(path))
        return load_squad(path).select_columns(["id", "question", "context"])
    except SquadFormatError as err:
        fail(str(err))


def to_json(obj) -> str:
    """Strict JSON: a score that is not finite is a bug here, never an ``Infinity`` that JSON readers reject."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    examples = read_questions(args.input_file) if args.input_file else None  # bad input fails before the model
    try:
        qa = QuestionAnswerer(args.model_name_or_path, device=args.device, dtype=args.dtype,
                              version_2_with_negative=args.version_2_with_negative,
                              allow_untrained_qa_head=args.allow_untrained_qa_head,
                              **{k: getattr(args, k) for k in DEFAULTS})
    except ValueError as err:  # a window that does not fit the tokenizer, a broken qa_settings.json
        fail(str(err))
    if examples is not None:
        results = qa.answer_examples(examples, top_k=args.top_k, batch_size=args.per_device_eval_batch_size)
    else:
        results = qa([args.question], [args.context], top_k=args.top_k, batch_size=args.per_device_eval_batch_size)
    output = {"model": args.model_name_or_path, "settings": qa.settings, "settings_source": qa.settings_source,
              "version_2_with_negative": qa.version_2_with_negative, "results": results}
    if args.predictions_file:
        write_text_atomic(args.predictions_file, to_json({r["id"]: r["answer"] for r in results}))
    if args.output_file:
        write_text_atomic(args.output_file, to_json(output))
        logger.info("Wrote %d answers to %s", len(results), args.output_file)
    else:
        print(to_json(output), end="")


if __name__ == "__main__":
    main()

"""Make a student by keeping a selection of a teacher's layers (DistilBERT-style initialisation).

    python make_student.py --teacher_name_or_path runs/teacher --layers 2,4,6 --output_dir runs/student_init
    python make_student.py --teacher_name_or_path deepset/roberta-base-squad2 --layers every_other --output_dir s

Layers are 1-based block numbers (0 is the embedding output, always kept). The student keeps the teacher's
tokenizer, embeddings and heads (a QA head too, when the teacher has one), and loads with from_pretrained. Beside
it: the teacher's windows (qa_settings.json), a README.md model card and student_origin.json.
"""

import argparse
import json
import os

from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering

from kd.model_card import write_model_card
from kd.models import NoTokenizerError, load_tokenizer, save_weights
from kd.qa_settings import ANSWER_KEYS, WINDOW_KEYS, load_qa_settings, save_qa_settings
from kd.records import command_record
from kd.student import parse_layer_selection, student_from_teacher_layers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher_name_or_path", required=True)
    parser.add_argument("--layers", required=True, help="Block numbers to keep, e.g. '2,4,6', or 'every_other'.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--head", default="qa", choices=["qa", "none"],
                        help="qa: keep/initialise a QA head (AutoModelForQuestionAnswering); none: bare encoder.")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    config = AutoConfig.from_pretrained(args.teacher_name_or_path)
    try:  # before anything is loaded or written: the student takes (and saves) the teacher's tokenizer
        tokenizer = load_tokenizer(args.teacher_name_or_path, "--teacher_name_or_path")
    except NoTokenizerError as e:
        parser.error(str(e))
    try:
        layers = parse_layer_selection(args.layers, config.num_hidden_layers)
    except ValueError as e:
        parser.error(str(e))
    auto = AutoModelForQuestionAnswering if args.head == "qa" else AutoModel
    teacher = auto.from_pretrained(args.teacher_name_or_path)
    student = student_from_teacher_layers(teacher, layers)
    os.makedirs(args.output_dir, exist_ok=True)
    save_weights(student, args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    # the teacher's windows suit the student (same tokenizer, same positions); its no-answer threshold does not
    windows = {k: v for k, v in load_qa_settings(args.teacher_name_or_path).items() if k in WINDOW_KEYS + ANSWER_KEYS}
    if windows:
        save_qa_settings(args.output_dir, windows)
    origin = {"teacher": args.teacher_name_or_path, "teacher_layers_kept": layers}
    write_model_card(args.output_dir, {**command_record(vars(args), "make_student.py", argv),  # README.md
                                       "student": {**origin, "head": args.head}})
    with open(os.path.join(args.output_dir, "student_origin.json"), "w") as f:  # last: marks the dir finished
        json.dump(origin, f, indent=2)
    print(f"student with teacher blocks {layers} of {config.num_hidden_layers} saved to {args.output_dir} "
          f"({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()

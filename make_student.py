"""Make a student by keeping a selection of a teacher's layers (DistilBERT-style initialisation) and/or pruning its
vocabulary to the tokens some data uses.

    python make_student.py --teacher_name_or_path runs/teacher --layers 2,4,6 --output_dir runs/student_init
    python make_student.py --teacher_name_or_path deepset/roberta-base-squad2 --layers every_other --output_dir s
    python make_student.py --teacher_name_or_path runs/teacher --layers 2,4,6 \\
        --prune_vocab_file data/train-v2.0.json --vocab_size 16000 --output_dir runs/student_init
    python make_student.py --teacher_name_or_path runs/teacher --target_speedup 2.0 --max_seq_length 384 \\
        --output_dir runs/student_init     # the deepest student at least twice as fast here

Layers are 1-based block numbers (0 is the embedding output, always kept); without --layers every block is kept.
The student keeps the teacher's tokenizer, embeddings and heads (a QA head too, when the teacher has one), and
loads with from_pretrained. --prune_vocab_file keeps only the special tokens, the one-character tokens (so any text
still tokenizes without new unknowns), and the most frequent tokens of that SQuAD file's contexts and questions:
--vocab_size in all, or the fewest covering --vocab_coverage of its tokens (default: every token it uses); the
embedding rows and the tokenizer follow (kd/vocab.py). Beside the model: the teacher's windows (qa_settings.json),
a README.md model card and student_origin.json (what was kept, parameters before and after).

--target_speedup X (or --target_latency_ms Y) chooses the layers instead of --layers: the teacher and a student of
every smaller depth (its blocks spread evenly, the last kept) are timed side by side on this machine, on a batch of
--per_device_eval_batch_size windows of --max_seq_length tokens (--warmup_batches, then --timing_batches rounds;
PyTorch, and ONNX Runtime where installed), the table is printed (layers, vocabulary, parameters, size, p50/p95
latency, speed-up) and saved as speed_table.md, and the largest student meeting the target is built. Run it on
the kind of machine the student will serve on, otherwise idle.
"""

import argparse
import json
import os
import tempfile

from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, AutoTokenizer

from kd.args import HelpFormatter, fraction, positive_float, positive_int
from kd.files import write_text_atomic
from kd.model_card import write_model_card
from kd.models import NoTokenizerError, load_tokenizer, save_weights, usable_positions
from kd.qa_settings import ANSWER_KEYS, WINDOW_KEYS, load_qa_settings, save_qa_settings
from kd.records import command_record
from kd.speed import candidate_table, choose
from kd.speed import markdown as speed_markdown
from kd.squad import SquadFormatError, load_squad
from kd.student import parse_layer_selection, student_from_teacher_layers
from kd.vocab import (choose_tokens, config_token_ids, coverage, merge_parents, prune_model_vocab,
                      prune_tokenizer_json, required_ids, token_counts, tokenizer_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--teacher_name_or_path", required=True,
                        help="The model whose blocks, embeddings and tokenizer the student takes (dir or hub name).")
    parser.add_argument("--layers", default=None,
                        help="Block numbers to keep, e.g. '2,4,6', or 'every_other'; default (only with "
                             "--prune_vocab_file): all of them.")
    parser.add_argument("--output_dir", required=True, help="Where the student (and student_origin.json) goes.")
    parser.add_argument("--head", default="qa", choices=["qa", "none"],
                        help="qa: keep/initialise a QA head (AutoModelForQuestionAnswering); none: bare encoder.")
    g = parser.add_argument_group("vocabulary pruning")
    g.add_argument("--prune_vocab_file", default=None,
                   help="SQuAD JSON whose contexts and questions, tokenized by the teacher's tokenizer, decide "
                        "which tokens the student keeps.")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--vocab_size", type=positive_int, default=None,
                      help="Tokens to keep in all: the required ones, then the data's most frequent.")
    size.add_argument("--vocab_coverage", type=fraction, default=None,
                      help="Keep the fewest most frequent tokens that cover this share of the data's tokens "
                           "(plus the required ones); default 1.0: every token the data uses.")
    t = parser.add_argument_group("sized to a speed target (instead of --layers)")
    target = t.add_mutually_exclusive_group()
    target.add_argument("--target_speedup", type=positive_float, default=None,
                        help="Build the largest student at least this many times faster than the teacher here.")
    target.add_argument("--target_latency_ms", type=positive_float, default=None,
                        help="Build the largest student whose median latency here is at most this.")
    t.add_argument("--max_seq_length", type=positive_int, default=384, help="Window length the timing uses.")
    t.add_argument("--per_device_eval_batch_size", type=positive_int, default=1, help="Batch the timing uses.")
    t.add_argument("--warmup_batches", type=positive_int, default=3, help="Untimed rounds before the timing.")
    t.add_argument("--timing_batches", type=positive_int, default=20,
                   help="Timed rounds (one batch of every model per round, in turn).")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    sized = args.target_speedup is not None or args.target_latency_ms is not None
    if args.layers is None and args.prune_vocab_file is None and not sized:
        parser.error("give --layers (the teacher blocks to keep), --target_speedup / --target_latency_ms (to "
                     "choose them), --prune_vocab_file (data to prune the vocabulary to), or layers and pruning")
    if args.layers is not None and sized:
        parser.error("--layers names the blocks, --target_speedup / --target_latency_ms chooses them: give one")
    if args.prune_vocab_file is None and (args.vocab_size or args.vocab_coverage):
        parser.error("--vocab_size / --vocab_coverage size a pruned vocabulary: give --prune_vocab_file too")

    config = AutoConfig.from_pretrained(args.teacher_name_or_path)
    try:  # before anything is loaded or written: the student takes (and saves) the teacher's tokenizer
        tokenizer = load_tokenizer(args.teacher_name_or_path, "--teacher_name_or_path")
    except NoTokenizerError as e:
        parser.error(str(e))
    try:
        layers = parse_layer_selection(args.layers, config.num_hidden_layers) if args.layers else None
    except ValueError as e:
        parser.error(str(e))

    prune = None
    if args.prune_vocab_file:
        # which tokens to keep, from the tokenizer and the data alone, before any weight is loaded
        if not tokenizer.is_fast:
            parser.error(f"{args.teacher_name_or_path}'s tokenizer is not a fast (tokenizers) one; vocabulary "
                         "pruning edits its tokenizer.json")
        tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
        try:
            vocab_model = tokenizer_model(tokenizer_json)
        except ValueError as e:
            parser.error(f"cannot prune the vocabulary of {args.teacher_name_or_path}: {e}")
        if len(tokenizer) > config.vocab_size:
            parser.error(f"{args.teacher_name_or_path}'s tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{config.vocab_size} embeddings; they do not belong together")
        required = required_ids(tokenizer_json, {*tokenizer.all_special_ids, *config_token_ids(config).values()})
        if args.vocab_size is not None and args.vocab_size < len(required):
            parser.error(f"--vocab_size {args.vocab_size} is smaller than the {len(required)} tokens every pruned "
                         "vocabulary keeps (special tokens, single characters and their subword forms, so that "
                         f"any text still tokenizes); give --vocab_size {len(required)} or more")
        try:
            examples = load_squad(args.prune_vocab_file)
        except (FileNotFoundError, SquadFormatError) as e:
            parser.error(str(e))
        texts = list(dict.fromkeys(examples["context"])) + list(examples["question"])  # each paragraph once
        counts = token_counts(tokenizer_json, texts)
        keep = sorted(choose_tokens(counts, required, merge_parents(vocab_model), args.vocab_size,
                                    args.vocab_coverage or 1.0))
        prune = {"data_file": args.prune_vocab_file, "teacher_vocab_size": config.vocab_size,
                 "vocab_size": len(keep), "required_tokens": len(required),
                 "requested": ({"vocab_size": args.vocab_size} if args.vocab_size else
                               {"vocab_coverage": args.vocab_coverage or 1.0}),
                 "coverage": round(coverage(counts, set(keep)), 6), "data_tokens": sum(counts.values())}

    auto = AutoModelForQuestionAnswering if args.head == "qa" else AutoModel
    teacher = auto.from_pretrained(args.teacher_name_or_path)
    speed = None
    if sized:  # time the teacher and every smaller depth here, side by side; keep the largest that is fast enough
        if args.max_seq_length > usable_positions(config):
            parser.error(f"--max_seq_length {args.max_seq_length} exceeds the {usable_positions(config)} positions "
                         f"of {args.teacher_name_or_path}")
        with tempfile.TemporaryDirectory() as onnx_dir:
            rows = candidate_table(teacher, tokenizer, list(range(1, config.num_hidden_layers)),
                                   seq_len=args.max_seq_length, batch_size=args.per_device_eval_batch_size,
                                   warmup=args.warmup_batches, rounds=args.timing_batches, onnx_dir=onnx_dir,
                                   vocab_size=prune["vocab_size"] if prune else None)
        chosen = choose(rows, args.target_speedup, args.target_latency_ms)
        table = speed_markdown(rows, chosen)
        print(table, end="")
        if chosen is None:
            best = max((r for r in rows if not r["is_teacher"]), key=lambda r: r["speedup"], default=None)
            wanted = (f"a speed-up of {args.target_speedup:g}x" if args.target_speedup is not None else
                      f"a median latency of {args.target_latency_ms:g} ms")
            parser.error(f"no student of {args.teacher_name_or_path} reaches {wanted} here (the fastest, "
                         f"{best['layers'] if best else []}, gives {best['speedup'] if best else 0:.2f}x, "
                         f"{best['latency_ms_p50'] if best else 0:.1f} ms); lower the target or the window")
        layers = chosen["layers"]
        speed = {"target_speedup": args.target_speedup, "target_latency_ms": args.target_latency_ms,
                 "max_seq_length": args.max_seq_length, "batch_size": args.per_device_eval_batch_size,
                 "timing_batches": args.timing_batches, "chosen_layers": layers, "rows": rows}
    student = student_from_teacher_layers(teacher, layers) if layers else teacher
    layers = layers or list(range(1, config.num_hidden_layers + 1))
    if prune:
        student = prune_model_vocab(student, keep)
        pruned_json = prune_tokenizer_json(tokenizer_json, keep)
        # the data in the student's tokens: words whose pieces were dropped now split into more, shorter ones
        prune["data_tokens_after"] = sum(token_counts(pruned_json, texts).values())

    os.makedirs(args.output_dir, exist_ok=True)
    save_weights(student, args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    if prune:  # the same tokenizer class and settings, over the pruned tokenizer.json
        write_text_atomic(os.path.join(args.output_dir, "tokenizer.json"), json.dumps(pruned_json, ensure_ascii=False))
        reloaded = AutoTokenizer.from_pretrained(args.output_dir)
        assert reloaded.is_fast and len(reloaded) == len(keep), "the pruned tokenizer did not load back whole"
    # the teacher's windows suit the student (same positions, tokens no longer); its no-answer threshold does not
    windows = {k: v for k, v in load_qa_settings(args.teacher_name_or_path).items() if k in WINDOW_KEYS + ANSWER_KEYS}
    if windows:
        save_qa_settings(args.output_dir, windows)
    parameters = {"teacher_parameters": sum(p.numel() for p in teacher.parameters()),
                  "student_parameters": sum(p.numel() for p in student.parameters())}
    origin = {"teacher": args.teacher_name_or_path, "teacher_layers_kept": layers, **parameters,
              **({"vocab": prune} if prune else {}), **({"speed": speed} if speed else {})}
    if speed:
        write_text_atomic(os.path.join(args.output_dir, "speed_table.md"), table)
    write_model_card(args.output_dir, {**command_record(vars(args), "make_student.py", argv),  # README.md
                                       "student": {**origin, "head": args.head}})
    with open(os.path.join(args.output_dir, "student_origin.json"), "w") as f:  # last: marks the dir finished
        json.dump(origin, f, indent=2)
    if prune:
        print(f"vocabulary: {prune['teacher_vocab_size']} -> {prune['vocab_size']} tokens ({prune['required_tokens']}"
              f" required), covering {100 * prune['coverage']:.1f}% of the {prune['data_tokens']} tokens of "
              f"{args.prune_vocab_file} ({prune['data_tokens_after']} tokens with the pruned vocabulary, "
              f"{100 * (prune['data_tokens_after'] / max(prune['data_tokens'], 1) - 1):+.1f}%)")
    print(f"parameters: {parameters['teacher_parameters'] / 1e6:.1f}M (teacher) -> "
          f"{parameters['student_parameters'] / 1e6:.1f}M (student, "
          f"{100 * parameters['student_parameters'] / parameters['teacher_parameters']:.0f}%)")
    print(f"student with teacher blocks {layers} of {config.num_hidden_layers} saved to {args.output_dir} "
          f"({parameters['student_parameters'] / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()

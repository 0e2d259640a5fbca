"""One saved extractive QA model, measured whole: quality (the official SQuAD metrics of its predictions), size
(parameters, bytes of weights on disk) and speed (median forward latency and throughput after warm-up).

The one evaluation path of evaluate.py and report.py: both call :func:`evaluate_model`, so a model scores the
same in a report as on its own.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForQuestionAnswering

from kd.features import prepare_eval_features
from kd.qa_eval import evaluate_qa, make_eval_dataloader
from kd.squad import has_unanswerable

NON_WEIGHT_BIN_FILES = {"training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin"}


def model_size_on_disk(model_name_or_path: str) -> int | None:
    """Bytes of the weight files in a local model directory (None for a hub name).

    Counts *.safetensors files, or *.bin files when there are none (what from_pretrained loads;
    a directory holding both formats would otherwise count twice), skipping non-weight .bin files.
    """
    path = Path(model_name_or_path)
    if not path.is_dir():
        return None
    files = [f for f in path.iterdir() if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"] or [
        f for f in files if f.suffix == ".bin" and f.name not in NON_WEIGHT_BIN_FILES
    ]
    return sum(f.stat().st_size for f in weights)


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings cover the work, not just its launch."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_forward(accelerator: Accelerator, model, features, batch_size: int, warmup: int, timed: int) -> dict:
    """Latency of the model on the first ``batch_size`` features: ``warmup`` untimed, then ``timed`` runs.

    Uses a plain (unprepared) loader so the prepared evaluation loader is never left half-read.
    Returns the median and 95th-percentile latency in ms, features per second at the median, and the batch size.
    """
    from kd.speed import percentiles

    batch = next(iter(make_eval_dataloader(features, batch_size)))
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    latencies = []
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        for step in range(warmup + timed):
            _synchronize(accelerator.device)
            start = time.perf_counter()
            model(**batch)
            _synchronize(accelerator.device)
            if step >= warmup:
                latencies.append(time.perf_counter() - start)
    median = statistics.median(latencies)
    size = len(batch["input_ids"])
    return {"latency_ms_per_batch_median": 1000.0 * median,
            "latency_ms_per_batch_p95": percentiles(latencies)["latency_ms_p95"],
            "throughput_samples_per_s": size / median, "eval_batch_size": size}


def evaluate_model(accelerator: Accelerator, model_name_or_path: str, tokenizer, examples, *, max_seq_length: int,
                   doc_stride: int, max_query_length: int, n_best_size: int = 20, max_answer_length: int = 30,
                   no_answer_threshold: float = 0.0, version_2_with_negative: bool | None = None,
                   eval_batch_size: int = 32, timing_batch_sizes: tuple[int, ...] = (), warmup_batches: int = 2,
                   timing_batches: int = 5, num_proc: int | None = None, model=None,
                   features=None) -> tuple[dict, dict, dict]:
    """Predict, score and time one model on ``examples`` (same windows for every model compared).

    Returns (results, predictions, null_odds) on every process. results: the SQuAD metrics (``exact``, ``f1``,
    ``HasAns_*``, ``NoAns_*``, ``best_*``), ``num_parameters``, ``model_size_on_disk_bytes``, the timing of
    one ``eval_batch_size`` batch (``latency_ms_per_batch_median`` and ``_p95``, ``throughput_samples_per_s``) and,
    per size b of ``timing_batch_sizes``, ``latency_ms_batch{b}`` (median), ``latency_ms_batch{b}_p95`` and
    ``throughput_batch{b}`` (features/s).

    ``model``: an already-built model to run instead of loading ``model_name_or_path`` (which then only names it).
    One that is not a torch module (kd.onnx_qa.OnnxQAModel) is run as it is, only its batches prepared, and
    reports its own ``num_parameters()`` and ``size_on_disk_bytes()``.
    ``features``: the evaluation windows of ``examples`` in these window settings when already made (e.g. read
    from kd.feature_cache); else they are made here.
    """
    if features is None:
        features = prepare_eval_features(examples, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                                         max_query_length=max_query_length, num_proc=num_proc)
    if model is None:
        model = AutoModelForQuestionAnswering.from_pretrained(model_name_or_path)
    dataloader = make_eval_dataloader(features, eval_batch_size)
    if isinstance(model, torch.nn.Module):
        num_parameters = sum(p.numel() for p in model.parameters())
        size_on_disk = model_size_on_disk(model_name_or_path)
        model, dataloader = accelerator.prepare(model, dataloader)
    else:  # e.g. an ONNX Runtime session: nothing for Accelerate to place or wrap (DDP needs parameters)
        num_parameters, size_on_disk = model.num_parameters(), model.size_on_disk_bytes()
        dataloader = accelerator.prepare(dataloader)
    timing = time_forward(accelerator, model, features, eval_batch_size, warmup_batches, timing_batches)
    for b in timing_batch_sizes:
        t = time_forward(accelerator, model, features, b, warmup_batches, timing_batches)
        timing.update({f"latency_ms_batch{b}": t["latency_ms_per_batch_median"],
                       f"latency_ms_batch{b}_p95": t["latency_ms_per_batch_p95"],
                       f"throughput_batch{b}": t["throughput_samples_per_s"]})
    if version_2_with_negative is None:
        version_2_with_negative = has_unanswerable(examples)
    metrics, predictions, null_odds = evaluate_qa(
        accelerator, model, examples, features, dataloader, n_best_size=n_best_size,
        max_answer_length=max_answer_length, version_2_with_negative=version_2_with_negative,
        no_answer_threshold=no_answer_threshold)
    results = {**metrics, "num_parameters": num_parameters,
               "model_size_on_disk_bytes": size_on_disk, **timing,
               "warmup_batches": warmup_batches, "timing_batches": timing_batches,
               "max_seq_length": max_seq_length, "doc_stride": doc_stride, "max_query_length": max_query_length,
               "device": str(accelerator.device), "num_processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision, "num_examples": len(examples),
               "num_features": len(features), "version_2_with_negative": version_2_with_negative,
               "no_answer_threshold": no_answer_threshold, "model_name_or_path": model_name_or_path}
    accelerator.free_memory(model)
    return results, predictions, null_odds

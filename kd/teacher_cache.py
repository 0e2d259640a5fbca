"""Teacher start/end logits for prediction-layer distillation, computed once and cached on disk.

The cache key hashes what the logits depend on: the teacher's weights and config, the exact model inputs of
every feature (so data, tokenizer and windowing settings are all covered) and the teacher's precision. The
same key is found again across epochs, restarts and later runs; a different file, stride or teacher misses.

Layout: ``<cache_dir>/<key>/{start_logits.npy,end_logits.npy,meta.json}``, published by renaming a finished
temporary dir, so a pass killed mid-way is never read back. Arrays are loaded memory-mapped: the student's
process holds neither the teacher nor a copy of all logits.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
import uuid

import numpy as np
import torch

from kd.files import cache_dir as kd_cache_dir
from kd.files import publish_dir, writing

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


def resolve_model_dir(name_or_path: str) -> str:
    """A local dir as is; a hub name through the hub cache (downloading it the first time, as from_pretrained would)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES])


def fingerprint_model_dir(model_dir: str) -> str:
    """Hash of the files that define the model's outputs (weights, config), by content."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if not (os.path.isfile(path) and name.endswith((".safetensors", ".bin", "config.json"))):
            continue
        h.update(name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint_inputs(columns: dict[str, np.ndarray]) -> str:
    """Hash of the model inputs of all features, in order. columns: name -> [N, L] integer array."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(columns):
        arr = np.ascontiguousarray(columns[name], dtype=np.int64)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU (where bf16 matmuls are slow)."""
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cache_key(model_fingerprint: str, inputs_fingerprint: str, dtype: torch.dtype) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{model_fingerprint}|{inputs_fingerprint}|{dtype}|v1".encode())
    return h.hexdigest()


def _load(entry: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(os.path.join(entry, "start_logits.npy"), mmap_mode="r"),
            np.load(os.path.join(entry, "end_logits.npy"), mmap_mode="r"))


def _publish(entry: str, start: np.ndarray, end: np.ndarray, meta: dict) -> None:
    """Write into a private temp dir, then rename it into place; a concurrent writer of the same key loses
    the race harmlessly (same content)."""
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        with writing(tmp, "teacher logits"):
            np.save(os.path.join(tmp, "start_logits.npy"), start)
            np.save(os.path.join(tmp, "end_logits.npy"), end)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
        publish_dir(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def teacher_logits(
    accelerator,
    teacher_name_or_path: str,
    input_columns: dict[str, np.ndarray],
    *,
    cache_dir: str | None = None,
    batch_size: int = 64,
    dtype_choice: str = "auto",
    predict_logits=None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Teacher start/end logits [N, L] for every feature, from the cache or from one sharded no-grad pass.

    input_columns: the model inputs of the training features, name -> [N, L] array, in feature order.
    predict_logits: ``(accelerator, model, dataloader) -> (start, end)``, gathered over processes in order
    (kd.qa_eval.predict_logits by default).
    Returns (start, end, info) where info says whether the cache was hit and where it lives.
    """
    from transformers import AutoModelForQuestionAnswering

    from kd.data import TensorDictDataset, batch_is_ready

    if predict_logits is None:
        from kd.qa_eval import predict_logits
    cache_dir = cache_dir or kd_cache_dir("teacher_logits")
    dtype = teacher_dtype(dtype_choice, accelerator.device)
    model_dir = resolve_model_dir(teacher_name_or_path)
    key = cache_key(fingerprint_model_dir(model_dir), fingerprint_inputs(input_columns), dtype)
    entry = os.path.join(cache_dir, key)
    info = {"teacher_cache_dir": entry, "teacher_dtype": str(dtype).replace("torch.", "")}

    if os.path.isfile(os.path.join(entry, "meta.json")):
        logger.info("Teacher logits: cache hit %s (the teacher is not run).", entry)
        start, end = _load(entry)
        return start, end, {**info, "teacher_cache_hit": True, "teacher_pass_s": 0.0}

    logger.info("Teacher logits: cache miss; running %s once over %d features in %s.",
                teacher_name_or_path, len(next(iter(input_columns.values()))), info["teacher_dtype"])
    t0 = time.perf_counter()
    # The pass leaves every random generator as it found it (a DataLoader iterator draws its base seed from the
    # global one, a head missing from the checkpoint is initialised from it): the same seed then trains the same
    # student whether the cache was cold or warm, and whatever number of processes filled it.
    cuda = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        teacher = AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=dtype).to(accelerator.device)
        teacher.eval()
        loader = torch.utils.data.DataLoader(TensorDictDataset(input_columns), batch_size=batch_size,
                                             collate_fn=batch_is_ready)
        start, end = predict_logits(accelerator, teacher, accelerator.prepare_data_loader(loader))
    elapsed = time.perf_counter() - t0
    # The student must not share memory with the teacher while it trains.
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if accelerator.is_local_main_process:
        _publish(entry, start.astype(np.float32), end.astype(np.float32),
                 {"teacher": teacher_name_or_path, "model_dir": os.path.abspath(model_dir), "dtype": info["teacher_dtype"],
                  "num_features": int(start.shape[0]), "seq_len": int(start.shape[1]), "pass_seconds": elapsed})
    accelerator.wait_for_everyone()
    start, end = _load(entry)
    return start, end, {**info, "teacher_cache_hit": False, "teacher_pass_s": elapsed}

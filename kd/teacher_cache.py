"""Teacher start/end logits for prediction-layer distillation, computed once and cached on disk.

The cache key hashes what the logits depend on: the teacher's weights and config, the exact model inputs of
every feature (so data, tokenizer and windowing settings are all covered) and the teacher's precision. The
same key is found again across epochs, restarts and later runs; a different file, stride or teacher misses.

Layout: ``<cache_dir>/<key>/{start_logits.npy,end_logits.npy,meta.json}``, published by renaming a finished
temporary dir, so a pass killed mid-way is never read back. meta.json holds a checksum of each array file,
verified on every read: an entry damaged since (rows rewritten, truncated, a broken header) is recomputed and
replaced, and the log names it. Arrays are loaded memory-mapped: the student's process holds neither the teacher
nor a copy of all logits.

Before the pass the entry's size is logged and checked against the room on the cache dir's file system: a disk
without room for it is refused up front, on every process, saying what is needed and what is free (at scale the
in-memory fallback would hold that much again in every process, and the run's checkpoints would fill the disk
next). A cache dir that cannot be written (read-only), or a write that fails all the same, costs the caching,
never the pass: its logits are then kept in memory for this run. With several processes every one verifies the
entry and they agree before the (collective) pass; each node's local main process writes, the others read what it
wrote.
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
from kd.files import file_digest, format_bytes, free_bytes, publish_dir, writing
from kd.files import unwritable as _unwritable

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
    """Hash of the model inputs of all features, in order. columns: name -> [N, L] integer array (or ArrowColumn)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(columns):
        column = columns[name]  # an array, or a kd.data.ArrowColumn: hashed in row chunks, never copied whole
        h.update(name.encode())
        h.update(str(tuple(np.shape(column) if isinstance(column, np.ndarray) else column.shape)).encode())
        for start in range(0, len(column), 8192):
            h.update(np.ascontiguousarray(column[start:start + 8192], dtype=np.int64).tobytes())
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


ARRAY_FILES = ("start_logits.npy", "end_logits.npy")
STORED_DTYPE = np.float32  # whatever --teacher_dtype the pass ran in
NPY_HEADER_BYTES = 128  # np.save's header of a 2-D array (format 1.0, padded to a multiple of 64)
META_BYTES = 1024  # meta.json, with room for long paths


class DamagedEntryError(ValueError):
    pass


class CacheSpaceError(OSError):
    """The cache dir's file system lacks room for the entry: said before the pass, with the fixes."""


def entry_bytes(num_features: int, seq_len: int) -> int:
    """Bytes on disk of an entry of [N, L] start and end logits (:data:`STORED_DTYPE`), meta.json included."""
    return 2 * (NPY_HEADER_BYTES + num_features * seq_len * np.dtype(STORED_DTYPE).itemsize) + META_BYTES


def _load(entry: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The entry's (start, end) [N, L], memory-mapped, after checking them against meta.json's checksums and the
    expected ``shape`` (N features of L tokens). Raises DamagedEntryError saying what is wrong."""
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            checksums = json.load(f).get("checksums")
    except (OSError, ValueError, AttributeError) as err:
        raise DamagedEntryError(f"meta.json unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(checksums, dict):  # an entry from before checksums were kept cannot be verified
        raise DamagedEntryError("meta.json holds no checksums")
    arrays = []
    for name in ARRAY_FILES:
        path = os.path.join(entry, name)
        try:
            intact = file_digest(path) == checksums.get(name)
            array = np.load(path, mmap_mode="r") if intact else None
        except (OSError, ValueError) as err:  # ValueError: a header numpy cannot read
            raise DamagedEntryError(f"{name} unreadable ({type(err).__name__}: {err})") from None
        if not intact:
            raise DamagedEntryError(f"{name} does not match its checksum")
        if array.shape != shape:
            raise DamagedEntryError(f"{name} holds {array.shape}, not {shape}")
        arrays.append(array)
    return arrays[0], arrays[1]


def _publish(entry: str, start: np.ndarray, end: np.ndarray, meta: dict, replace: bool = False) -> None:
    """Write into a private temp dir (checksums in meta.json), then rename it into place; a concurrent writer of
    the same key loses the race harmlessly (same content). replace: move a (damaged) entry there aside first."""
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        with writing(tmp, "teacher logits"):
            for name, array in zip(ARRAY_FILES, (start, end)):
                np.save(os.path.join(tmp, name), array)
            meta = {**meta, "checksums": {name: file_digest(os.path.join(tmp, name)) for name in ARRAY_FILES}}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
        if replace and os.path.isdir(entry):
            aside = os.path.join(parent, f".damaged-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
            os.rename(entry, aside)  # readers that mapped its files keep them; new readers find ours
            shutil.rmtree(aside, ignore_errors=True)
        publish_dir(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _all(accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (each decides alone on one process)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).min().item())


def _first_problem(accelerator, problem: str | None) -> str | None:
    """The first ``problem`` any process has (None: none has one), the same on every process."""
    if accelerator.num_processes == 1:
        return problem
    from accelerate.utils import gather_object

    return next((p for p in gather_object([problem]) if p), None)


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
    Returns (start, end, info) where info says whether the cache was hit (else whether the new entry was
    written: False when the cache could not take it and the logits are held in memory), where it lives and its size.

    Raises:
        CacheSpaceError: on a miss, before the teacher is loaded, when the cache dir's file system (that of any
            node's writer) has less room than the entry needs; every process raises it.
    """
    from kd.data import TensorDictDataset, batch_is_ready
    from kd.models import UntrainedQAHeadError, load_qa_model, untrained_qa_head_message

    if predict_logits is None:
        from kd.qa_eval import predict_logits
    cache_dir = cache_dir or kd_cache_dir("teacher_logits")
    dtype = teacher_dtype(dtype_choice, accelerator.device)
    model_dir = resolve_model_dir(teacher_name_or_path)
    key = cache_key(fingerprint_model_dir(model_dir), fingerprint_inputs(input_columns), dtype)
    entry = os.path.join(cache_dir, key)
    num_features = len(next(iter(input_columns.values())))
    shape = (num_features, next(iter(input_columns.values())).shape[1])
    info = {"teacher_cache_dir": entry, "teacher_dtype": str(dtype).replace("torch.", ""),
            "teacher_cache_bytes": entry_bytes(*shape)}
    found, damage = None, None
    if os.path.isfile(os.path.join(entry, "meta.json")):
        try:
            found = _load(entry, shape)
        except DamagedEntryError as err:
            damage = str(err)
    # Every process decided alone; the pass is collective, so all run it unless all found the entry intact.
    if _all(accelerator, found is not None):
        logger.info("Teacher logits: cache hit %s (the teacher is not run).", entry)
        return found[0], found[1], {**info, "teacher_cache_hit": True, "teacher_pass_s": 0.0}
    found = None
    writer = accelerator.is_local_main_process
    if damage and writer:
        logger.warning("Teacher logits: cache entry %s is damaged (%s); recomputing it.", entry, damage)
    cannot_write = _unwritable(cache_dir) if writer else None
    if cannot_write:
        logger.warning("Teacher logits: cannot write to the cache dir %s (%s); the teacher runs and its logits "
                       "are kept in memory for this run only (pass a writable --teacher_cache_dir to cache them).",
                       cache_dir, cannot_write)
    need = info["teacher_cache_bytes"]
    free = free_bytes(cache_dir) if writer and not cannot_write else None
    size = (f"{format_bytes(need)} for {num_features:,} windows at {shape[1]} tokens "
            f"({np.dtype(STORED_DTYPE).name} start and end logits)")
    logger.info("Teacher logits cache: %s in %s%s.", size, entry,
                f" ({format_bytes(free)} free there)" if free is not None else "")
    short = None
    if free is not None and free < need:
        short = (f"the teacher logits cache needs {size} in {cache_dir}, but its file system has only "
                 f"{format_bytes(free)} free. Pass --teacher_cache_dir on a disk with room, point KD_CACHE at one, or "
                 "free some space.")
    short = _first_problem(accelerator, short)  # every process stops, before the (collective) pass
    if short:
        raise CacheSpaceError(short)

    logger.info("Teacher logits: cache miss; running %s once over %d features in %s.",
                teacher_name_or_path, num_features, info["teacher_dtype"])
    t0 = time.perf_counter()
    # The pass leaves every random generator as it found it (a DataLoader iterator draws its base seed from the
    # global one): the same seed then trains the same student whether the cache was cold or warm, and whatever
    # number of processes filled it.
    cuda = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        teacher, head = load_qa_model(model_dir, dtype=dtype)
        if head:  # its logits would be noise (train_prediction.py refuses such a teacher up front)
            raise UntrainedQAHeadError(untrained_qa_head_message(teacher_name_or_path, head))
        teacher.to(accelerator.device).eval()
        loader = torch.utils.data.DataLoader(TensorDictDataset(input_columns), batch_size=batch_size,
                                             collate_fn=batch_is_ready)
        start, end = predict_logits(accelerator, teacher, accelerator.prepare_data_loader(loader))
    elapsed = time.perf_counter() - t0
    # The student must not share memory with the teacher while it trains.
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    start, end = start.astype(STORED_DTYPE), end.astype(STORED_DTYPE)  # what a cache hit gives
    written = not writer
    if writer and not cannot_write:
        try:
            _publish(entry, start, end,
                     {"teacher": teacher_name_or_path, "model_dir": os.path.abspath(model_dir),
                      "dtype": info["teacher_dtype"], "num_features": int(start.shape[0]),
                      "seq_len": int(start.shape[1]), "pass_seconds": elapsed}, replace=damage is not None)
            written = True
        except OSError as err:  # the pass is done: a cache that cannot take it costs the caching only
            logger.warning("Teacher logits: writing cache entry %s failed (%s: %s); training goes on from the "
                           "logits kept in memory (not cached).", entry, type(err).__name__, err)
    accelerator.wait_for_everyone()
    cached = _all(accelerator, written)
    if cached:  # read back memory-mapped: this process keeps no copy of all logits
        try:
            start, end = _load(entry, shape)
        except DamagedEntryError as err:
            logger.warning("Teacher logits: cache entry %s unreadable right after writing it (%s); training goes "
                           "on from the logits kept in memory.", entry, err)
    return start, end, {**info, "teacher_cache_hit": False, "teacher_cache_written": cached,
                        "teacher_pass_s": elapsed}

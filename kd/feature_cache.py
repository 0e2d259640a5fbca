"""SQuAD examples and their model windows, built once and cached on disk as memory-mapped Arrow data.

Featurizing a large training file takes minutes to hours and, held as Python and numpy objects, more memory than
the model. Here each dataset is built once (by one process per node, the others wait and then read it), written
with ``datasets`` ``save_to_disk`` and read back with ``load_from_disk``, which memory-maps it: every rank and every
restart of a run with the same inputs shares the one copy on disk and holds only the batches it reads.

Keys (blake2b, as :mod:`kd.teacher_cache` keys its logits) hash what the data depends on:
- examples: a local file's content (:func:`kd.files.file_digest`), ``skip_invalid``, ``max_samples`` and the
  loader's own code (kd/squad.py); a ``datasets`` hub source is loaded as before and its records hashed instead;
- windows: the examples' key, the kind (``train`` / ``eval``), the tokenizer (its serialized ``tokenizer.json``,
  class, padding side, special ids), the window settings and the featurizer's code (kd/features.py).

Layout: ``<cache_dir>/examples-<key>/`` and ``<cache_dir>/<kind>-<key>/``, each ``data/`` (save_to_disk) plus
``meta.json``, the marker written last. An entry is built in ``.tmp-<entry>-<random>`` beside it and renamed into
place when whole, so a build killed mid-way is never read back (its temp dir is ignored, and removed by a later
build once a day old). A cache dir that cannot be written costs the caching only: the data is built in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid

import datasets

from kd.files import cache_dir as kd_cache_dir
from kd.files import file_digest, publish_dir, unwritable

logger = logging.getLogger(__name__)

VERSION = "v1"
STALE_TMP_S = 24 * 3600  # a temp dir this old belongs to a build that was killed, not to one still running
_HERE = os.path.dirname(os.path.abspath(__file__))


def default_cache_dir() -> str:
    """``$KD_CACHE/features`` or ``~/.cache/kd-qa/features``."""
    return kd_cache_dir("features")


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything about a fast tokenizer that its windows depend on (not where it was loaded from)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    # the backend keeps the truncation/padding of its last call: per-call settings, already in the key as the window
    state.pop("truncation", None)
    state.pop("padding", None)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(state, sort_keys=True).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.padding_side, tokenizer.cls_token_id,
                         tokenizer.pad_token_id, tokenizer.pad_token_type_id]).encode())
    return h.hexdigest()


def examples_fingerprint(examples: datasets.Dataset) -> str:
    """Hash of the records themselves (for sources that are not one local file), batch by batch."""
    h = hashlib.blake2b(digest_size=16)
    for batch in examples.with_format("arrow").iter(batch_size=10_000):
        for name in sorted(batch.column_names):
            h.update(name.encode())
            h.update(json.dumps(batch.column(name).to_pylist()).encode())
    return h.hexdigest()


def _is_entry(entry: str) -> bool:
    return os.path.isfile(os.path.join(entry, "meta.json"))


def _clean_stale_tmp(cache_dir: str) -> None:
    """Remove temp dirs of builds killed long ago (a live build's own temp dir is younger)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(cache_dir):
            path = os.path.join(cache_dir, name)
            if name.startswith(".tmp-") and time.time() - os.path.getmtime(path) > STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)


def _build_entry(entry: str, build, meta: dict, num_proc: int | None) -> bool:
    """``build(tmp_dir) -> Dataset`` saved into a temp dir beside ``entry``, then published; False when the
    cache dir cannot take it (the caller then builds in memory)."""
    parent = os.path.dirname(entry)
    why = unwritable(parent)
    if why:
        logger.warning("Features cache: cannot write to %s (%s); building in memory for this run only (pass a "
                       "writable --features_cache_dir to cache it).", parent, why)
        return False
    _clean_stale_tmp(parent)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        t0 = time.perf_counter()
        dataset = build(tmp)
        dataset.save_to_disk(os.path.join(tmp, "data"), num_proc=num_proc)
        del dataset
        for name in os.listdir(tmp):  # map's working file: the saved copy is what is read back
            if name != "data":
                path = os.path.join(tmp, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        meta = {**meta, "num_rows": len(datasets.load_from_disk(os.path.join(tmp, "data"))),
                "build_seconds": round(time.perf_counter() - t0, 3)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # the marker: written last
            json.dump(meta, f, indent=2)
        publish_dir(tmp, entry)
        return True
    except OSError as err:
        logger.warning("Features cache: writing %s failed (%s: %s); building in memory for this run only.",
                       entry, type(err).__name__, err)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_main_first(accelerator):
    return accelerator.local_main_process_first() if accelerator is not None else contextlib.nullcontext()


def cached_dataset(accelerator, cache_dir: str, name: str, key: str, build, meta: dict,
                   num_proc: int | None = None) -> tuple[datasets.Dataset, dict]:
    """The entry ``<cache_dir>/<name>-<key>``, memory-mapped: read when finished, else built (``build(tmp_dir)
    -> Dataset``, by each node's local main process while the others wait) and published.

    Returns (dataset, info) with info ``{"key", "entry", "hit"}``: hit False on the process that built it.
    """
    entry = os.path.join(cache_dir, f"{name}-{key}")
    hit = True
    with _local_main_first(accelerator):
        if not _is_entry(entry):
            hit = False
            writer = accelerator is None or accelerator.is_local_main_process
            if writer:
                logger.info("Features cache: miss, building %s.", entry)
            else:  # the local main process went first and could not publish it
                logger.warning("Features cache: %s was not written by the local main process; building it in "
                               "memory on process %d too.", entry, accelerator.process_index)
            rank = 0 if accelerator is None else accelerator.process_index
            if not (writer and _build_entry(entry, build, {"name": name, "key": key, "built_by_process": rank,
                                                           **meta}, num_proc)):
                return build(None), {"key": key, "entry": None, "hit": False}
        dataset = datasets.load_from_disk(os.path.join(entry, "data"))
    if hit:
        logger.info("Features cache: hit %s (%d rows).", entry, len(dataset))
    return dataset, {"key": key, "entry": entry, "hit": hit}


def load_examples(accelerator, source: str, *, split: str = "train", config: str | None = None,
                  skip_invalid: bool = False, max_samples: int | None = None,
                  cache_dir: str | None = None) -> tuple[datasets.Dataset, dict]:
    """:func:`kd.squad.load_squad`, from the cache for a local file. Returns (examples, info) with info's
    ``"source_key"`` the key windows build on."""
    from kd.squad import _is_local_source, load_squad

    def load(tmp):  # into the build's temp dir: written as read, never held whole
        return load_squad(source, split=split, config=config, skip_invalid=skip_invalid, max_samples=max_samples,
                          arrow_path=os.path.join(tmp, "examples.arrow") if tmp else None)

    if not _is_local_source(os.fspath(source)):
        with _local_main_first(accelerator):
            examples = load(None)
        key = _digest("records", examples_fingerprint(examples))
        return examples, {"key": key, "entry": None, "hit": False, "source_key": key}
    cache_dir = cache_dir or default_cache_dir()
    key = _digest("examples", file_digest(source), skip_invalid, max_samples,
                  file_digest(os.path.join(_HERE, "squad.py")))
    examples, info = cached_dataset(accelerator, cache_dir, "examples", key, load,
                                    {"source": os.path.abspath(source), "skip_invalid": skip_invalid,
                                     "max_samples": max_samples})
    return examples, {**info, "source_key": key}


def load_splits(accelerator, train_file, validation_file, dataset_name, dataset_config_name=None, *,
                skip_invalid=False, max_train_samples=None, max_eval_samples=None, cache_dir=None):
    """:func:`kd.squad.load_squad_splits` through :func:`load_examples`: (train, validation or None, info)."""
    train, train_info = load_examples(accelerator, train_file or dataset_name, split="train",
                                      config=dataset_config_name, skip_invalid=skip_invalid,
                                      max_samples=max_train_samples, cache_dir=cache_dir)
    validation, info = None, {"train_examples": train_info}
    if validation_file or dataset_name:
        validation, info["validation_examples"] = load_examples(
            accelerator, validation_file or dataset_name, split="validation", config=dataset_config_name,
            skip_invalid=skip_invalid, max_samples=max_eval_samples, cache_dir=cache_dir)
    return train, validation, info


def cached_windows(accelerator, kind: str, examples: datasets.Dataset, source_key: str, tokenizer, *,
                   max_seq_length: int = 384, doc_stride: int = 128, max_query_length: int = 64,
                   num_proc: int | None = None, cache_dir: str | None = None) -> tuple[datasets.Dataset, dict]:
    """``kd.features.prepare_{kind}_features`` of ``examples`` (kind: ``train`` or ``eval``), from the cache.

    ``source_key``: the examples' key (from :func:`load_examples`); the windows are exactly those of the
    uncached call, in the same order.
    """
    from kd import features

    prepare = {"train": features.prepare_train_features, "eval": features.prepare_eval_features}[kind]
    window = dict(max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=max_query_length)

    def build(tmp):
        return prepare(examples, tokenizer, **window, num_proc=num_proc,
                       cache_file_name=os.path.join(tmp, "map.arrow") if tmp else None)

    key = _digest("windows", kind, source_key, tokenizer_fingerprint(tokenizer), window,
                  file_digest(os.path.join(_HERE, "features.py")))
    return cached_dataset(accelerator, cache_dir or default_cache_dir(), kind, key, build,
                          {"kind": kind, "source_key": source_key, "tokenizer": tokenizer.name_or_path, **window},
                          num_proc=num_proc)

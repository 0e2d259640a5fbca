"""Streaming (``--streaming``) training data, for corpora that fit neither memory nor disk: endless, per process,
exactly resumable.

Each process reads only its own shard (:class:`FileShardReader`: byte ranges of text/JSONL files and parquet row
groups dealt round-robin to processes, in a seeded order per epoch; :class:`DatasetShardReader`: datasets'
``split_dataset_by_node``); :class:`PackedStream` tokenizes on the fly, packs (kd.packing's rules), shuffles
packed sequences through a seeded buffer and yields batches, endlessly (a new epoch starts when the shard is
exhausted). It is stateful: ``state_dict()`` after a batch records the reading position, the packer's partial
sequence, the shuffle buffer and its RNG, and ``load_state_dict`` makes a new stream yield exactly the batches
that would have followed: reading restarts right after the last document packed, nothing is read and thrown away.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
from collections import deque
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch

from kd.corpus import DatasetCorpus, FileCorpus
from kd.packing import (FORMAT_VERSION, Packer, collate, concatenated, document_tokenizer, special_ids,
                        tokenizer_fingerprint)

logger = logging.getLogger(__name__)


class FileShardReader:
    """The documents of one process's shard of a FileCorpus, epoch after epoch, with a resumable position.

    Units (byte ranges of about ``shard_bytes``, at most total/num_processes so every process gets some, and
    parquet row groups) are dealt round-robin: process r reads units r, r + P, ... When there are fewer units than
    processes (a few parquet files with one row group each), every process reads every unit and keeps every P-th
    document instead. Each epoch visits the process's units in a fresh order seeded by (seed, epoch).
    """

    def __init__(self, corpus: FileCorpus, rank: int, num_processes: int, *, seed: int = 0,
                 shard_bytes: int = 256 << 20):
        text_bytes = sum(s for s, fmt in zip(corpus.sizes, corpus.formats) if fmt != "parquet")
        chunk = max(1, min(shard_bytes, math.ceil(text_bytes / num_processes) if text_bytes else shard_bytes))
        units = corpus.units(chunk)
        self.corpus, self.rank, self.num_processes, self.seed = corpus, rank, num_processes, seed
        self.by_document = len(units) < num_processes
        self.units = units if self.by_document else units[rank::num_processes]

    def describe(self) -> dict:
        """What a saved position is only valid for."""
        return {"source": self.corpus.fingerprint(strict=False), "rank": self.rank,
                "num_processes": self.num_processes, "seed": self.seed, "units": len(self.units),
                "by_document": self.by_document}

    def _order(self, epoch: int) -> list[int]:
        """The order of this process's units in ``epoch``: a permutation that depends only on (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.units)).tolist()

    def documents(self, position: dict | None = None) -> Iterator[tuple[str, dict]]:
        """Endless (text, position after it); ``position`` resumes right after a document this yielded."""
        pos = dict(position) if position else {"epoch": 0, "slot": 0, "offset": None, "counter": 0}
        epoch, slot, offset, counter = pos["epoch"], pos["slot"], pos["offset"], pos["counter"]
        while True:
            from_start, yielded = slot == 0 and offset is None, False
            order = self._order(epoch)
            for slot in range(slot, len(order)):
                for text, after in self.corpus.read(self.units[order[slot]], offset):
                    counter += 1
                    if not self.by_document or (counter - 1) % self.num_processes == self.rank:
                        yielded = True
                        yield text, {"epoch": epoch, "slot": slot, "offset": after, "counter": counter}
                offset = None
            if from_start and not yielded:
                raise RuntimeError(f"process {self.rank} of {self.num_processes} found no document in its shard "
                                   f"({len(self.units)} units of {self.corpus.files[:3]}...): the corpus is too small "
                                   "for this many processes")
            epoch, slot, offset, counter = epoch + 1, 0, None, 0


class DatasetShardReader:
    """The documents of one process's shard of a streaming ``datasets`` corpus, epoch after epoch.

    Sharding is ``datasets.distributed.split_dataset_by_node`` (whole shards when their number divides by the
    process count, else every P-th example); the position is the IterableDataset's own ``state_dict()``.
    The shard order is the dataset's (no shuffle here: PackedStream shuffles packed sequences).
    """

    def __init__(self, corpus: DatasetCorpus, rank: int, num_processes: int):
        from datasets.distributed import split_dataset_by_node

        self.corpus, self.rank, self.num_processes = corpus, rank, num_processes
        self.dataset = split_dataset_by_node(corpus.dataset, rank=rank, world_size=num_processes)
        self.initial = self.dataset.state_dict()
        shards = corpus.dataset.num_shards
        if num_processes > 1 and shards % num_processes and rank == 0:
            logger.warning(f"{corpus.name}: {shards} shards do not divide among {num_processes} processes, so every "
                           f"process reads the whole stream and keeps one document in {num_processes} (correct, "
                           f"but reading costs {num_processes}x); a process count that divides {shards} reads "
                           "whole shards")

    def describe(self) -> dict:
        """What a saved position is only valid for."""
        return {"source": self.corpus.fingerprint(), "rank": self.rank, "num_processes": self.num_processes}

    def documents(self, position: dict | None = None) -> Iterator[tuple[str, dict]]:
        """Endless (text, position after it); ``position`` resumes right after a document this yielded."""
        epoch, state = (position["epoch"], position["dataset"]) if position else (0, None)
        column = self.corpus.text_column
        while True:
            self.dataset.load_state_dict(state if state is not None else self.initial)
            yielded = False
            for example in self.dataset:
                if example.get(column):
                    yielded = True
                    yield example[column], {"epoch": epoch, "dataset": self.dataset.state_dict()}
            if state is None and not yielded:
                raise RuntimeError(f"process {self.rank} of {self.num_processes} found no document in its shard of "
                                   f"{self.corpus.name}")
            epoch, state = epoch + 1, None


class PackedStream:
    """Endless stream of packed batches from one process's shard; stateful and exactly resumable.

    Iterating yields {"input_ids", "attention_mask"}: LongTensor [B, T] on the CPU (T = max_seq_length, or the
    longest in the batch with respect_document_boundaries). Pipeline: reader -> tokenize (batches of
    ``tokenize_batch_size`` documents) -> Packer -> shuffle buffer of ``shuffle_buffer_size`` packed sequences
    (a sequence is drawn at random, by a seeded RNG, once the buffer is full; 0 = no shuffle, FIFO) -> batch.
    A buffer larger than the shard holds sequences of several passes.

    ``state_dict()`` (JSON-able) taken between two batches describes exactly the stream's position: the reader
    position after the last document fed to the packer, the packer's partial sequence, the buffered sequences
    and the RNG. Documents read and tokenized ahead but not yet packed are not part of it: a stream that loads
    the state reads them again. Do not wrap it in a DataLoader with workers or prefetching (the state would run
    ahead of what training consumed), nor in accelerator.prepare (each process already reads its own shard).
    """

    def __init__(self, reader, tokenizer, *, max_seq_length: int, batch_size: int,
                 respect_document_boundaries: bool = False, shuffle_buffer_size: int = 1000, seed: int = 0,
                 tokenize_batch_size: int = 64):
        self.reader, self.batch_size, self._encode = reader, batch_size, document_tokenizer(tokenizer)
        self.shuffle_buffer_size, self.tokenize_batch_size = shuffle_buffer_size, tokenize_batch_size
        start_id, sep_id, self.pad_id = special_ids(tokenizer)
        self.packer = Packer(max_seq_length, start_id, sep_id, respect_document_boundaries)
        self.settings = {"reader": reader.describe(), "tokenizer": tokenizer_fingerprint(tokenizer),
                         "max_seq_length": max_seq_length, "respect_document_boundaries": respect_document_boundaries,
                         "shuffle_buffer_size": shuffle_buffer_size, "seed": seed, "batch_size": batch_size}
        # the seed string predates kd.streaming: changing it would change every stream's order
        self.rng = random.Random(f"kd.corpus/{seed}/{getattr(reader, 'rank', 0)}")
        self.pool: list | deque = [] if shuffle_buffer_size > 1 else deque()
        self.position = None  # reader position after the last document given to the packer
        self.batches = 0
        self._documents = None  # (ids, position) iterator, rebuilt from self.position on demand

    # --- iteration ----------------------------------------------------------------------------------------------
    def __iter__(self):
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: {"input_ids", "attention_mask"}: LongTensor [batch_size, T]."""
        batch = collate([self._next_sequence() for _ in range(self.batch_size)], self.pad_id)
        self.batches += 1
        return batch

    def _next_sequence(self) -> list[int]:
        """One packed sequence out of the pool, after filling the pool up to the buffer size."""
        while len(self.pool) < max(1, self.shuffle_buffer_size):
            self._feed_document()
        if isinstance(self.pool, deque):
            return self.pool.popleft()
        i = self.rng.randrange(len(self.pool))
        self.pool[i], self.pool[-1] = self.pool[-1], self.pool[i]
        return self.pool.pop()

    def _feed_document(self) -> None:
        """Pack the next document into the pool and advance ``self.position`` past it."""
        if self._documents is None:
            self._documents = self._tokenized(self.position)
        ids, self.position = next(self._documents)
        self.pool.extend(self.packer.add(ids))

    def _tokenized(self, position) -> Iterator[tuple[list[int], object]]:
        """(token ids, reader position after the document), reading on from ``position``; tokenizes
        ``tokenize_batch_size`` documents per call because the tokenizer is much faster on batches."""
        docs = self.reader.documents(position)
        while True:
            chunk = list(islice(docs, self.tokenize_batch_size))
            yield from zip(self._encode([text for text, _ in chunk]), [p for _, p in chunk])

    # --- state --------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch of the shard that the last packed document belongs to."""
        return self.position["epoch"] if self.position else 0

    def state_dict(self) -> dict:
        """JSON-able position of the stream between two batches (see the class docstring)."""
        return {"format_version": FORMAT_VERSION, "settings": self.settings, "batches": self.batches,
                "position": self.position, "packer": self.packer.state_dict(), "pool": _encode_ids(list(self.pool)),
                "rng": _rng_to_json(self.rng.getstate())}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch at which ``state`` was taken.

        Raises ValueError when the state was written for another corpus, tokenizer, process layout or settings.
        """
        saved = json.loads(json.dumps(state["settings"]))
        ours = json.loads(json.dumps(self.settings))  # tuples -> lists, as they come back from JSON
        if state.get("format_version") != FORMAT_VERSION or saved != ours:
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise ValueError(
                f"the saved data stream state does not match this run (differs in: {diff or ['format_version']}). "
                "Resume with the same corpus files, tokenizer, number of processes, --seed, --max_seq_length, "
                "--per_device_train_batch_size and --shuffle_buffer_size, or start a fresh run.")
        self.batches, self.position = state["batches"], state["position"]
        self.packer.load_state_dict(state["packer"])
        sequences = _decode_ids(state["pool"])
        self.pool = sequences if self.shuffle_buffer_size > 1 else deque(sequences)
        self.rng.setstate(_rng_from_json(state["rng"]))
        self._documents = None


def _encode_ids(sequences: list[list[int]]) -> dict:
    """Sequences as compact JSON: lengths plus all ids as base64 int32 (a shuffle buffer holds ~10^5 ids)."""
    flat = concatenated(sequences, np.int32)
    return {"lengths": [len(s) for s in sequences], "ids": base64.b64encode(flat.tobytes()).decode("ascii")}


def _decode_ids(encoded: dict) -> list[list[int]]:
    """The inverse of :func:`_encode_ids`."""
    flat = np.frombuffer(base64.b64decode(encoded["ids"]), dtype=np.int32).tolist()
    out, i = [], 0
    for n in encoded["lengths"]:
        out.append(flat[i:i + n])
        i += n
    return out


def _rng_to_json(state: tuple) -> list:
    """random.Random.getstate() -> JSON-able list (the internal state tuple becomes a list)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    """The inverse of :func:`_rng_to_json`, for random.Random.setstate()."""
    version, internal, gauss = state
    return version, tuple(internal), gauss

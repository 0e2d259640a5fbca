"""Raw-text corpora for general distillation: read, shard, tokenize, pack, shuffle, cache, resume.

Sources
    Local files (glob patterns allowed), by extension: ``.parquet`` (a text column), ``.jsonl``/``.json``/
    ``.ndjson`` (JSON Lines with a text column), anything else plain UTF-8 text, where a document is a block of
    non-blank lines separated by blank lines, or, with ``line_by_line``, a single non-blank line. Or a
    ``datasets`` name and config (``wikimedia/wikipedia`` ``20231101.en``), read with ``datasets``.

Packing (:class:`Packer`; C = max_seq_length - 2 content tokens per sequence, framed as ``[CLS] .. [SEP]``,
or ``<s> .. </s>`` for RoBERTa-style tokenizers)
    default: the documents are concatenated into one token stream with one separator token ([SEP] / </s>)
        between consecutive documents, and the stream is cut into pieces of exactly C tokens, so every sequence
        is exactly max_seq_length long and no padding is ever needed. A sequence may hold the end of one
        document and the start of the next (the separator tells them apart). A separator is never the first
        token of a piece; it can be the last one (the sequence then ends ``[SEP] [SEP]``).
    respect_document_boundaries: a sequence never spans two documents: each document is cut into pieces of C
        tokens, its last piece is shorter, and a batch is padded to its longest sequence (attention_mask 0 on
        the padding). No separators are inserted.
    Either way every token of every non-empty document lands in exactly one sequence, in order.

Two ways to feed training
    :func:`build_packed_corpus` + :class:`PackedCorpus` (map-style, corpora that fit on disk): the main process
    reads, tokenizes and packs the whole corpus once into a cache dir keyed by the files (path, size, mtime) or
    the dataset fingerprint, the tokenizer and the packing settings; every later run memory-maps it.
    Shuffling is kd.training.EpochSampler's seeded permutation per epoch, sharding accelerate's batch split.

    :class:`PackedStream` (``--streaming``, corpora that fit neither memory nor disk): each process reads only
    its own shard (:class:`FileShardReader`: byte ranges of text/JSONL files and parquet row groups dealt
    round-robin to processes, in a seeded order per epoch; :class:`DatasetShardReader`: datasets'
    ``split_dataset_by_node``), tokenizes on the fly, packs, shuffles packed sequences through a seeded
    buffer and yields batches, endlessly (a new epoch starts when the shard is exhausted). It is stateful:
    ``state_dict()`` after a batch records the reading position, the packer's partial sequence, the shuffle
    buffer and its RNG, and ``load_state_dict`` makes a new stream yield exactly the batches that would have
    followed: reading restarts right after the last document packed, nothing is read and thrown away.
"""

from __future__ import annotations

import array
import base64
import glob
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from kd.checkpoint import publish_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the packed layout or the packing rules change: old cache entries are then missed
PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------
def resolve_files(patterns: Iterable[str]) -> list[str]:
    """Paths and glob patterns -> sorted, de-duplicated absolute file paths.

    Raises FileNotFoundError naming every pattern that matched no file, ValueError for compressed files.
    """
    files, unmatched = set(), []
    for pattern in patterns:
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matched:
            unmatched.append(pattern)
        files.update(os.path.abspath(p) for p in matched)
    if unmatched:
        raise FileNotFoundError(f"no file matches {unmatched} (quote glob patterns so the shell leaves them to us)")
    compressed = [f for f in files if f.endswith(COMPRESSED_SUFFIXES)]
    if compressed:
        raise ValueError(f"compressed corpus files are not supported ({compressed[:3]}...): decompress them, or "
                         "read them through datasets (--dataset_name json/text with its data_files).")
    return sorted(files)


def file_format(path: str) -> str:
    """'parquet', 'jsonl' or 'text', from the file name."""
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus that one process reads whole: the documents that START in bytes [start, end) of a
    text or JSONL file, or row group ``start`` of a parquet file (end = start + 1)."""

    file: int
    start: int
    end: int


class FileCorpus:
    """Local text / JSONL / parquet files; documents are read per :class:`Unit`, resumably.

    files: resolved paths (see :func:`resolve_files`); text_column: the field holding the text in JSONL and
    parquet; line_by_line: for text files, one document per non-blank line instead of per blank-line block.
    """

    def __init__(self, files: list[str], text_column: str = "text", line_by_line: bool = False):
        if not files:
            raise ValueError("FileCorpus needs at least one file")
        self.files, self.text_column, self.line_by_line = list(files), text_column, line_by_line
        self.formats = [file_format(f) for f in self.files]
        self.sizes = [os.path.getsize(f) for f in self.files]
        self._parquet: dict[int, object] = {}

    def validate(self) -> None:
        """Fail fast on a missing text column (first record of each JSONL file, parquet schemas)."""
        for i, (path, fmt) in enumerate(zip(self.files, self.formats)):
            if fmt == "parquet":
                names = self._parquet_file(i).schema_arrow.names
                if self.text_column not in names:
                    raise ValueError(f"{path} has no column {self.text_column!r} (columns: {names}); pass "
                                     "--text_column NAME")
            elif fmt == "jsonl":
                with open(path, "rb") as f:
                    first = next((line for line in f if line.strip()), None)
                if first is not None:
                    self._jsonl_text(first, path, 0)

    def fingerprint(self, strict: bool = True) -> dict:
        """What the corpus content depends on, cheaply: paths, sizes, modification times, reading settings.

        strict=False leaves out where the files are and when they were written (paths relative to their common
        directory, sizes only): a stream position stays valid for a corpus copied to node-local disk per job.
        """
        if strict:
            stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]
        else:
            root = os.path.dirname(self.files[0]) if len(self.files) == 1 else os.path.commonpath(self.files)
            stats = [(os.path.relpath(f, root), size) for f, size in zip(self.files, self.sizes)]
        return {"files": stats, "text_column": self.text_column, "line_by_line": self.line_by_line}

    def units(self, chunk_bytes: int | None = None) -> list[Unit]:
        """Text/JSONL files cut into byte ranges of about chunk_bytes (whole files when None), parquet files into
        their row groups; in file order."""
        units = []
        for i, (fmt, size) in enumerate(zip(self.formats, self.sizes)):
            if fmt == "parquet":
                units += [Unit(i, g, g + 1) for g in range(self._parquet_file(i).num_row_groups)]
            else:
                step = max(1, chunk_bytes or size or 1)
                units += [Unit(i, s, min(s + step, size)) for s in range(0, max(size, 1), step)]
        return units

    def documents(self) -> Iterator[str]:
        """Every document of every file, in corpus order."""
        for unit in self.units():
            for text, _ in self.read(unit):
                yield text

    def read(self, unit: Unit, position=None) -> Iterator[tuple[str, object]]:
        """(text, position after it) for the documents of ``unit``; reading resumes after ``position`` when given
        (a value this generator yielded: a byte offset, or a row index for parquet)."""
        fmt = self.formats[unit.file]
        if fmt == "parquet":
            yield from self._read_parquet(unit, position)
        else:
            yield from self._read_lines(unit, position, jsonl=fmt == "jsonl")

    # --- text and JSON Lines ------------------------------------------------------------------------------------
    def _read_lines(self, unit: Unit, position, jsonl: bool):
        path = self.files[unit.file]
        by_line = jsonl or self.line_by_line
        with open(path, "rb") as f:
            if position is not None:
                pos = position
            else:
                pos = _first_line_start(f, unit.start)
                if not by_line and 0 < pos < unit.end and not _previous_line_blank(f, pos):
                    # pos is inside a block that started in the previous unit, which reads it whole
                    pos = _skip_block(f, pos)
            f.seek(pos)
            if by_line:
                while pos < unit.end:
                    line = f.readline()
                    if not line:
                        break
                    line_start, pos = pos, pos + len(line)
                    if line.strip():
                        text = self._jsonl_text(line, path, line_start) if jsonl else _decode(line).strip()
                        if text:
                            yield text, pos
                return
            lines: list[bytes] = []
            while True:
                line = f.readline()
                line_start, pos = pos, pos + len(line)
                if not line.strip():
                    if lines:
                        yield _decode(b"\n".join(ln.rstrip(b"\r\n") for ln in lines)).strip(), pos
                        lines = []
                    if not line:
                        return
                    continue
                if not lines and line_start >= unit.end:  # the next block starts in the next unit
                    return
                lines.append(line)

    def _jsonl_text(self, line: bytes, path: str, offset: int) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line starting at byte {offset}: not valid JSON ({e}). JSON Lines files need "
                             "one JSON object per line.") from None
        if not isinstance(record, dict) or self.text_column not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}, line starting at byte {offset}: no field {self.text_column!r} (found "
                             f"{fields}); pass --text_column NAME")
        text = record[self.text_column]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}, line starting at byte {offset}: field {self.text_column!r} is a "
                             f"{type(text).__name__}, not a string")
        return text or ""

    # --- parquet ------------------------------------------------------------------------------------------------
    def _parquet_file(self, i: int):
        if i not in self._parquet:
            import pyarrow.parquet as pq

            self._parquet[i] = pq.ParquetFile(self.files[i])
        return self._parquet[i]

    def _read_parquet(self, unit: Unit, position):
        table = self._parquet_file(unit.file).read_row_group(unit.start, columns=[self.text_column])
        texts = table.column(0).to_pylist()
        for row in range(position or 0, len(texts)):
            if texts[row]:
                yield texts[row], row + 1


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _first_line_start(f, offset: int) -> int:
    """The first line start at or after byte ``offset``."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())


def _previous_line_blank(f, pos: int) -> bool:
    """Whether the line ending just before line start ``pos`` (> 0) is blank (ASCII whitespace only)."""
    end = pos - 1  # the newline that ends the previous line
    while end > 0:
        start = max(0, end - 4096)
        f.seek(start)
        chunk = f.read(end - start)
        for b in reversed(chunk):
            if b == 0x0A:
                return True
            if b not in _WHITESPACE:
                return False
        end = start
    return True


def _skip_block(f, pos: int) -> int:
    """From line start ``pos``, the offset just after the next blank line (or the end of the file)."""
    f.seek(pos)
    for line in iter(f.readline, b""):
        pos += len(line)
        if not line.strip():
            break
    return pos


class DatasetCorpus:
    """A ``datasets`` corpus by name and config; ``streaming`` picks an IterableDataset."""

    def __init__(self, name: str, config: str | None = None, split: str = "train", text_column: str = "text",
                 streaming: bool = False, data_files=None):
        import datasets

        self.name, self.config, self.split, self.text_column = name, config, split, text_column
        self.data_files = data_files  # for builders such as "json" / "text" / "parquet"
        self.dataset = datasets.load_dataset(name, config, split=split, streaming=streaming, data_files=data_files)
        columns = self.dataset.column_names
        if columns is not None and text_column not in columns:
            raise ValueError(f"dataset {name} ({config}, {split}) has no column {text_column!r} (columns: {columns}); "
                             "pass --text_column NAME")

    def validate(self) -> None:
        pass

    def fingerprint(self, strict: bool = True) -> dict:
        return {"dataset": [self.name, self.config, self.split, self.data_files],
                "fingerprint": getattr(self.dataset, "_fingerprint", None), "text_column": self.text_column}

    def documents(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1000):
            yield from (t for t in batch[self.text_column] if t)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ---------------------------------------------------------------------------------------------------------------
def special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, end/separator, pad) ids: [CLS] [SEP] [PAD] for BERT, <s> </s> <pad> for RoBERTa."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if start is None or sep is None or pad is None:
        raise ValueError(f"{type(tokenizer).__name__} lacks a cls/bos, sep/eos or pad token; packing needs all three "
                         "(BERT- and RoBERTa-style tokenizers have them)")
    return start, sep, pad


def document_tokenizer(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """A function texts -> token ids of each text, without special tokens, padding or truncation.

    A fast tokenizer runs through a private copy of its Rust backend: the same ids, ~25% faster (no offsets, no
    BatchEncoding), and immune to the padding or truncation that a padded call of the tokenizer leaves enabled
    on its shared backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                       return_token_type_ids=False, verbose=False)["input_ids"]
    from tokenizers import Tokenizer

    private = Tokenizer.from_str(backend.to_str())
    private.no_padding()
    private.no_truncation()
    encode = getattr(private, "encode_batch_fast", private.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (see :func:`document_tokenizer`, better for many calls)."""
    return document_tokenizer(tokenizer)(texts)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides the token ids: the backend's full definition (vocab, normalizer,
    pre-tokenizer, model; not its current padding/truncation state), or the vocabulary for slow tokenizers;
    the class and special tokens."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"{type(tokenizer).__name__}|{special_ids(tokenizer)}".encode())
    return h.hexdigest()


class Packer:
    """Cuts documents' token ids into model sequences; see the module docstring for the two rules.

    add(ids) -> the sequences completed by this document (lists of ids, specials included); flush() -> the
    last, shorter sequence of a finite corpus ([] if none). Stateful (the partial sequence) and resumable.
    """

    def __init__(self, max_seq_length: int, start_id: int, sep_id: int, respect_document_boundaries: bool = False):
        if max_seq_length < 3:
            raise ValueError(f"max_seq_length must leave room for one token besides the 2 special ones, got "
                             f"{max_seq_length}")
        self.capacity = max_seq_length - 2
        self.start_id, self.sep_id, self.respect = start_id, sep_id, respect_document_boundaries
        self.buffer: list[int] = []  # content tokens of the sequence being filled, len < capacity
        self.after_document = False  # a document ended: the next one is preceded by a separator

    def _frame(self, content: list[int]) -> list[int]:
        return [self.start_id, *content, self.sep_id]

    def add(self, ids: list[int]) -> list[list[int]]:
        if not ids:
            return []
        c = self.capacity
        if self.respect:
            return [self._frame(ids[i:i + c]) for i in range(0, len(ids), c)]
        out, buf = [], self.buffer
        if buf and self.after_document:
            buf.append(self.sep_id)
            if len(buf) == c:
                out.append(self._frame(buf))
                buf = []
        i = 0
        while i < len(ids):
            take = min(c - len(buf), len(ids) - i)
            buf.extend(ids[i:i + take])
            i += take
            if len(buf) == c:
                out.append(self._frame(buf))
                buf = []
        self.buffer, self.after_document = buf, True
        return out

    def flush(self) -> list[list[int]]:
        out = [self._frame(self.buffer)] if self.buffer else []
        self.buffer, self.after_document = [], False
        return out

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer), "after_document": self.after_document}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.after_document = list(state["buffer"]), bool(state["after_document"])


def collate(sequences: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences of ids -> {"input_ids", "attention_mask"}: LongTensor [B, T], T = the longest, right-padded."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


# ---------------------------------------------------------------------------------------------------------------
# Non-streaming: tokenize and pack once, cache, memory-map
# ---------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    root = os.environ.get("KD_CACHE")
    return os.path.join(root, "corpus") if root else os.path.join(os.path.expanduser("~"), ".cache", "kd-qa", "corpus")


def corpus_cache_key(source, tokenizer, max_seq_length: int, respect_document_boundaries: bool) -> str:
    spec = {"version": FORMAT_VERSION, "source": source.fingerprint(), "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_seq_length": max_seq_length, "respect_document_boundaries": respect_document_boundaries}
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=12).hexdigest()


def build_packed_corpus(source, tokenizer, *, max_seq_length: int, respect_document_boundaries: bool = False,
                        cache_dir: str | None = None, tokenize_batch_size: int = 512) -> tuple[str, bool]:
    """Read, tokenize and pack the whole corpus once; returns (entry dir, cache hit).

    source: FileCorpus or DatasetCorpus (non-streaming). The entry holds ``tokens.bin`` (all sequences back to
    back, uint16 when the vocabulary fits, else int32), ``offsets.bin`` (int64 [N + 1]) and ``meta.json``; it is
    written under a temporary name and renamed when complete, so an interrupted build is never read. Call it on
    the main process first (``accelerator.main_process_first()``): the others then hit the cache.
    """
    cache_dir = cache_dir or default_cache_dir()
    key = corpus_cache_key(source, tokenizer, max_seq_length, respect_document_boundaries)
    entry = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(entry, "meta.json")):
        return entry, True
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    start_id, sep_id, _ = special_ids(tokenizer)
    packer = Packer(max_seq_length, start_id, sep_id, respect_document_boundaries)
    encode = document_tokenizer(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    t0, num_docs, num_tokens = time.perf_counter(), 0, 0
    lengths = array.array("q")  # 8 bytes a sequence, not a Python int each
    try:
        with open(os.path.join(tmp, "tokens.bin"), "wb") as tokens_file:
            def write(sequences):
                nonlocal num_tokens
                for seq in sequences:
                    lengths.append(len(seq))
                    num_tokens += len(seq)
                if sequences:
                    np.fromiter((t for s in sequences for t in s), dtype=dtype).tofile(tokens_file)

            docs = source.documents()
            while texts := list(islice(docs, tokenize_batch_size)):
                num_docs += len(texts)
                write([seq for ids in encode(texts) for seq in packer.add(ids)])
            write(packer.flush())
        if not lengths:
            raise ValueError(f"the corpus {source.fingerprint()} has no non-empty document")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
        offsets.tofile(os.path.join(tmp, "offsets.bin"))
        meta = {"format_version": FORMAT_VERSION, "key": key, "num_sequences": len(lengths),
                "num_tokens": num_tokens, "num_documents": num_docs, "dtype": np.dtype(dtype).name,
                "max_seq_length": max_seq_length, "respect_document_boundaries": respect_document_boundaries,
                "source": source.fingerprint(), "tokenizer": tokenizer_fingerprint(tokenizer),
                "build_seconds": round(time.perf_counter() - t0, 3)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        publish_dir(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, False


class PackedCorpus(torch.utils.data.Dataset):
    """The packed sequences of a :func:`build_packed_corpus` entry, memory-mapped (the corpus is not loaded).

    ``__getitems__(indices)`` returns a collated batch {"input_ids", "attention_mask"}: LongTensor [B, T]
    (use kd.training.make_train_dataloader, which passes it through).
    """

    def __init__(self, entry: str, pad_id: int):
        with open(os.path.join(entry, "meta.json")) as f:
            self.meta = json.load(f)
        self.pad_id = pad_id
        self.tokens = np.memmap(os.path.join(entry, "tokens.bin"), dtype=self.meta["dtype"], mode="r",
                                shape=(self.meta["num_tokens"],))
        self.offsets = np.fromfile(os.path.join(entry, "offsets.bin"), dtype=np.int64)

    def __len__(self) -> int:
        return self.meta["num_sequences"]

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.sequence(i) for i in indices], self.pad_id)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


# ---------------------------------------------------------------------------------------------------------------
# Streaming: per-process shards, endless, stateful
# ---------------------------------------------------------------------------------------------------------------
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
        return {"source": self.corpus.fingerprint(), "rank": self.rank, "num_processes": self.num_processes}

    def documents(self, position: dict | None = None) -> Iterator[tuple[str, dict]]:
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
        batch = collate([self._next_sequence() for _ in range(self.batch_size)], self.pad_id)
        self.batches += 1
        return batch

    def _next_sequence(self) -> list[int]:
        while len(self.pool) < max(1, self.shuffle_buffer_size):
            self._feed_document()
        if isinstance(self.pool, deque):
            return self.pool.popleft()
        i = self.rng.randrange(len(self.pool))
        self.pool[i], self.pool[-1] = self.pool[-1], self.pool[i]
        return self.pool.pop()

    def _feed_document(self) -> None:
        if self._documents is None:
            self._documents = self._tokenized(self.position)
        ids, self.position = next(self._documents)
        self.pool.extend(self.packer.add(ids))

    def _tokenized(self, position) -> Iterator[tuple[list[int], object]]:
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
        return {"format_version": FORMAT_VERSION, "settings": self.settings, "batches": self.batches,
                "position": self.position, "packer": self.packer.state_dict(), "pool": _encode(list(self.pool)),
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


def _encode(sequences: list[list[int]]) -> dict:
    """Sequences as compact JSON: lengths plus all ids as base64 int32 (a shuffle buffer holds ~10^5 ids)."""
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32)
    return {"lengths": [len(s) for s in sequences], "ids": base64.b64encode(flat.tobytes()).decode("ascii")}


def _decode_ids(encoded: dict) -> list[list[int]]:
    flat = np.frombuffer(base64.b64decode(encoded["ids"]), dtype=np.int32).tolist()
    out, i = [], 0
    for n in encoded["lengths"]:
        out.append(flat[i:i + n])
        i += n
    return out


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


# ---------------------------------------------------------------------------------------------------------------
# Audit trail
# ---------------------------------------------------------------------------------------------------------------
class DataTrace:
    """Appends every training batch's sequences (ids without padding) to ``<dir>/rank{R}.jsonl``, one line per
    batch: to check sharding and resumption on small runs (it writes every token, so not for real ones)."""

    def __init__(self, directory: str, rank: int):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"rank{rank}.jsonl")

    def write(self, batch: dict[str, torch.Tensor]) -> None:
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        rows = [row[m].tolist() for row, m in zip(ids, mask)]
        with open(self.path, "a") as f:
            f.write(json.dumps({"sequences": rows}) + "\n")

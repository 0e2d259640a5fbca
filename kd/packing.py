"""Documents -> packed model sequences: tokenizing, packing, collating, and the packed cache of non-streaming runs.

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

Non-streaming training (corpora that fit on disk): :func:`build_packed_corpus` reads, tokenizes and packs the whole
corpus once (on the main process) into a cache dir keyed by the source's fingerprint (files: path, size, mtime;
or the dataset fingerprint), the tokenizer and the packing settings; :class:`PackedCorpus` memory-maps the entry
in every run. Shuffling is kd.data.EpochSampler's seeded permutation per epoch, sharding accelerate's batch split.
Streaming runs pack on the fly instead (kd.streaming). :class:`DataTrace` records the batches either way.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from itertools import islice

import numpy as np
import torch

from kd.files import cache_dir as kd_cache_dir
from kd.files import publish_dir

# bump when the packed layout or the packing rules change: old cache entries are then missed, and saved stream
# states (kd.streaming) refused
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing, packing, collating
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


def concatenated(sequences: list[list[int]], dtype) -> np.ndarray:
    """Sequences of ids -> their ids back to back: a 1-D array [sum of lengths] of ``dtype``."""
    return np.fromiter((t for s in sequences for t in s), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Non-streaming: tokenize and pack once, cache, memory-map
# ---------------------------------------------------------------------------------------------------------------
def corpus_cache_key(source, tokenizer, max_seq_length: int, respect_document_boundaries: bool) -> str:
    """The cache entry name: a hash of what the packed sequences depend on (source, tokenizer, settings)."""
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
    cache_dir = cache_dir or kd_cache_dir("corpus")
    key = corpus_cache_key(source, tokenizer, max_seq_length, respect_document_boundaries)
    entry = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(entry, "meta.json")):
        return entry, True
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        t0 = time.perf_counter()
        packer = Packer(max_seq_length, *special_ids(tokenizer)[:2], respect_document_boundaries)
        counts = _pack_into(tmp, source, tokenizer, packer, tokenize_batch_size)
        meta = {"format_version": FORMAT_VERSION, "key": key, **counts,
                "max_seq_length": max_seq_length, "respect_document_boundaries": respect_document_boundaries,
                "source": source.fingerprint(), "tokenizer": tokenizer_fingerprint(tokenizer),
                "build_seconds": round(time.perf_counter() - t0, 3)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        publish_dir(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, False


def _pack_into(directory: str, source, tokenizer, packer: Packer, tokenize_batch_size: int) -> dict:
    """Write ``tokens.bin`` and ``offsets.bin`` of every document of ``source`` into ``directory``.

    Returns {"num_sequences", "num_tokens", "num_documents", "dtype"}; ValueError when nothing was packed.
    """
    encode = document_tokenizer(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    num_docs, num_tokens = 0, 0
    lengths = array.array("q")  # 8 bytes a sequence, not a Python int each
    with open(os.path.join(directory, "tokens.bin"), "wb") as tokens_file:
        def write(sequences):
            nonlocal num_tokens
            for seq in sequences:
                lengths.append(len(seq))
                num_tokens += len(seq)
            if sequences:
                concatenated(sequences, dtype).tofile(tokens_file)

        docs = source.documents()
        while texts := list(islice(docs, tokenize_batch_size)):
            num_docs += len(texts)
            write([seq for ids in encode(texts) for seq in packer.add(ids)])
        write(packer.flush())
    if not lengths:
        raise ValueError(f"the corpus {source.fingerprint()} has no non-empty document")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
    offsets.tofile(os.path.join(directory, "offsets.bin"))
    return {"num_sequences": len(lengths), "num_tokens": num_tokens, "num_documents": num_docs,
            "dtype": np.dtype(dtype).name}


class PackedCorpus(torch.utils.data.Dataset):
    """The packed sequences of a :func:`build_packed_corpus` entry, memory-mapped (the corpus is not loaded).

    ``__getitems__(indices)`` returns a collated batch {"input_ids", "attention_mask"}: LongTensor [B, T]
    (use kd.data.make_train_dataloader, which passes it through).
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
        """Sequence i's ids, specials included: a 1-D view into the memory map."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.sequence(i) for i in indices], self.pad_id)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


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

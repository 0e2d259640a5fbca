"""Sliding-window features of SQuAD records for extractive QA models.

Windows follow the usual recipe for long contexts: the question plus as much context as fits in
``max_seq_length`` tokens, consecutive windows overlapping by ``doc_stride`` tokens. Training
features carry start/end token labels (the CLS position when the answer is not fully inside the
window); evaluation features carry, per token, the character span in the context (None outside
the context) so that predicted token spans map back to text. Records are those of
:func:`kd.squad.load_squad`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import datasets
import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _require_fast(tokenizer) -> None:
    """Raise TypeError unless ``tokenizer`` is fast: windows need its offset mappings."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; QA features need "
            "offset mappings, which only fast tokenizers provide. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) or pick a model that has a tokenizer.json."
        )


def check_window_args(
    special_tokens: int | PreTrainedTokenizerBase, max_seq_length: int, doc_stride: int, max_query_length: int
) -> None:
    """Raise ValueError unless the window sizes fit together.

    ``special_tokens``: how many special tokens the model adds to a (question, context) pair
    (BERT 3, RoBERTa 4), or a tokenizer to ask (only ``num_special_tokens_to_add(pair=True)`` is
    read), so that argument checks can run before any tokenizer is loaded.

    The context part of a window holds ``max_seq_length - question tokens - special tokens``
    tokens, and the tokenizer needs ``doc_stride`` strictly below that (it aborts otherwise).
    Checking with the longest allowed question makes the check hold for every question.
    """
    for name, value in (
        ("max_seq_length", max_seq_length),
        ("doc_stride", doc_stride),
        ("max_query_length", max_query_length),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    special = _pair_special_tokens(special_tokens)
    room = max_seq_length - max_query_length - special
    if room <= 0:
        raise ValueError(
            f"max_seq_length ({max_seq_length}) leaves no room for the context after a question of "
            f"max_query_length ({max_query_length}) tokens and {special} special tokens: --max_query_length "
            "must be smaller than --max_seq_length minus the special tokens; raise --max_seq_length or lower "
            "--max_query_length."
        )
    if doc_stride >= room:
        raise ValueError(
            f"doc_stride ({doc_stride}) must be smaller than the context room of a window: "
            f"max_seq_length ({max_seq_length}) - max_query_length ({max_query_length}) - {special} special "
            f"tokens = {room}. Lower --doc_stride (e.g. {max(1, room // 2)}) or --max_query_length, or raise "
            "--max_seq_length."
        )


def _pair_special_tokens(special_tokens: int | PreTrainedTokenizerBase) -> int:
    """The count itself, or what the tokenizer adds to a pair; ValueError for a negative count."""
    if not isinstance(special_tokens, int):
        return special_tokens.num_special_tokens_to_add(pair=True)
    if special_tokens < 0:
        raise ValueError(f"special_tokens must be >= 0, got {special_tokens}.")
    return special_tokens


def _truncate_question(question: str, offsets: Sequence, tokenizer, max_query_length: int) -> str:
    """Cut ``question`` after its ``max_query_length``-th token (character offsets ``offsets``).

    Cutting the text rather than the ids keeps tokenizer offsets valid. Re-tokenizing a cut string
    can merge differently (BPE), and byte-level pieces of one character share its span, so drop
    tokens until the cut really fits.
    """
    for keep in range(max_query_length, 0, -1):
        cut = question[: offsets[keep - 1][1]]
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= max_query_length:
            return cut
    # Even the first character takes more tokens than allowed (tiny max_query_length): an empty
    # question keeps the window arithmetic, which assumes at most max_query_length tokens, valid.
    return ""


def _prepare_questions(questions: Sequence[str], tokenizer, max_query_length: int) -> list[str]:
    """Strip leading whitespace (it only wastes tokens) and cut to ``max_query_length`` tokens."""
    questions = [q.lstrip() for q in questions]
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        q if len(offsets) <= max_query_length else _truncate_question(q, offsets, tokenizer, max_query_length)
        for q, offsets in zip(questions, encoded["offset_mapping"])
    ]


def _context_sequence_id(tokenizer) -> int:
    """Index of the context in the (question, context) pair: second unless padding on the left.

    Left-padding models (e.g. XLNet) put the context first so that truncation cuts its end.
    """
    return 1 if tokenizer.padding_side == "right" else 0


def _tokenize_windows(examples: Mapping, tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int):
    """Tokenize a batch of examples into padded overlapping windows.

    Returns:
        (encoding, sample_of, offsets): the BatchEncoding without its bookkeeping columns (one row
        per window), the example index of each window, and each window's per-token ``(start, end)``
        character offsets (into the question or the context, see ``encoding.sequence_ids(i)``).
    """
    questions = _prepare_questions(examples["question"], tokenizer, max_query_length)
    contexts = examples["context"]
    context_first = _context_sequence_id(tokenizer) == 0
    encoded = tokenizer(
        contexts if context_first else questions,
        questions if context_first else contexts,
        truncation="only_first" if context_first else "only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    return encoded, encoded.pop("overflow_to_sample_mapping"), encoded.pop("offset_mapping")


def _cls_index(input_ids: Sequence[int], attention_mask: Sequence[int], cls_token_id: int | None) -> int:
    """Position of the CLS token, or of the first real token when there is no CLS token."""
    if cls_token_id is not None and cls_token_id in input_ids:
        return input_ids.index(cls_token_id)
    return _first_attended(attention_mask)


def _first_attended(attention_mask: Sequence[int]) -> int:
    """Index of the first attended token (0 when none is)."""
    for position, flag in enumerate(attention_mask):
        if flag:
            return position
    return 0


def _answer_token_span(
    offsets: Sequence, sequence_ids: Sequence, context_id: int, start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token span (inclusive) of characters [start_char, end_char) within one window.

    None when the answer is not entirely inside the window's context. Works on offsets only, so
    it does not matter whether a byte-level BPE token's offset includes its leading space.
    """
    context_positions = [k for k, s in enumerate(sequence_ids) if s == context_id]
    if not context_positions:
        return None
    first, last = context_positions[0], context_positions[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = first
    while start < last and offsets[start + 1][0] <= start_char:
        start += 1
    end = last
    while end > first and offsets[end - 1][1] >= end_char:
        end -= 1
    return (start, end) if start <= end else None


def _train_batch(examples, tokenizer, max_seq_length, doc_stride, max_query_length) -> dict:
    """Batched ``map`` function: examples -> training windows with start/end labels."""
    encoded, sample_of, all_offsets = _tokenize_windows(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length
    )
    context_id = _context_sequence_id(tokenizer)
    starts, ends = [], []
    for i, offsets in enumerate(all_offsets):
        cls = _cls_index(encoded["input_ids"][i], encoded["attention_mask"][i], tokenizer.cls_token_id)
        answers = examples["answers"][sample_of[i]]
        span = None
        if answers["text"]:
            # Like the reference recipe, train on the first gold answer only.
            start_char = answers["answer_start"][0]
            span = _answer_token_span(
                offsets, encoded.sequence_ids(i), context_id, start_char, start_char + len(answers["text"][0])
            )
        start, end = span if span is not None else (cls, cls)
        starts.append(start)
        ends.append(end)
    return {**encoded, "start_positions": starts, "end_positions": ends}


def _eval_batch(examples, tokenizer, max_seq_length, doc_stride, max_query_length) -> dict:
    """Batched ``map`` function: examples -> evaluation windows with example ids and offsets."""
    encoded, sample_of, all_offsets = _tokenize_windows(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length
    )
    context_id = _context_sequence_id(tokenizer)
    example_ids = [examples["id"][j] for j in sample_of]
    context_offsets = [
        [list(o) if s == context_id else None for o, s in zip(offsets, encoded.sequence_ids(i))]
        for i, offsets in enumerate(all_offsets)
    ]
    return {**encoded, "example_id": example_ids, "offset_mapping": context_offsets}


def _align_batch(examples, indices, tokenizer, max_seq_length, doc_stride, max_query_length) -> dict:
    """Batched ``map`` function: examples -> each window's token alignment (kd.cross_tokenizer)."""
    encoded, sample_of, all_offsets = _tokenize_windows(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length
    )
    context_id = _context_sequence_id(tokenizer)
    segments, starts, ends, cls = [], [], [], []
    for i, offsets in enumerate(all_offsets):
        mask = encoded["attention_mask"][i]
        segments.append([-2 if not m else -1 if s is None else int(s == context_id)
                         for s, m in zip(encoded.sequence_ids(i), mask)])
        starts.append([o[0] for o in offsets])
        ends.append([o[1] for o in offsets])
        cls.append(_cls_index(encoded["input_ids"][i], mask, tokenizer.cls_token_id))
    return {"example_index": [indices[j] for j in sample_of], "segment": segments, "char_start": starts,
            "char_end": ends, "cls_index": cls}


def prepare_alignment_features(dataset: datasets.Dataset, tokenizer, max_seq_length: int = 384,
                               doc_stride: int = 128, max_query_length: int = 64,
                               num_proc: int | None = None) -> dict[str, np.ndarray]:
    """Examples -> the token alignment of each training window (same windows, same order), as arrays.

    Returns ``example_index`` [N] (row of ``dataset``), ``cls_index`` [N], and per token [N, max_seq_length]:
    ``segment`` (0 question, 1 context, -1 special, -2 padding), ``char_start`` / ``char_end`` (offsets into the
    question or the context). What kd.cross_tokenizer aligns two tokenizers' windows by.
    """
    _require_fast(tokenizer)
    check_window_args(tokenizer, max_seq_length, doc_stride, max_query_length)
    fn = functools.partial(_align_batch, tokenizer=tokenizer, max_seq_length=max_seq_length,
                           doc_stride=doc_stride, max_query_length=max_query_length)
    table = dataset.map(fn, batched=True, with_indices=True, remove_columns=dataset.column_names,
                        num_proc=num_proc, desc="Aligning windows").with_format("numpy")
    types = {"example_index": np.int64, "cls_index": np.int64, "segment": np.int8, "char_start": np.int32,
             "char_end": np.int32}
    return {name: np.asarray(table[name], dtype=dtype) for name, dtype in types.items()}


def _map_windows(batch_fn, desc, dataset, tokenizer, max_seq_length, doc_stride, max_query_length, num_proc,
                 cache_file_name=None):
    """The one implementation behind ``prepare_*_features``: check, then ``map`` ``batch_fn`` (into the Arrow file
    ``cache_file_name`` when given, so that the windows are written to disk as they are made, not held in memory)."""
    _require_fast(tokenizer)
    check_window_args(tokenizer, max_seq_length, doc_stride, max_query_length)
    fn = functools.partial(
        batch_fn,
        tokenizer=tokenizer,
        max_seq_length=max_seq_length,
        doc_stride=doc_stride,
        max_query_length=max_query_length,
    )
    return dataset.map(fn, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc,
                       cache_file_name=cache_file_name, keep_in_memory=False)


def prepare_train_features(dataset: datasets.Dataset, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                           max_query_length: int = 64, num_proc: int | None = None,
                          cache_file_name: str | None = None) -> datasets.Dataset:
    """Examples -> training windows (one row per window, so usually more rows than examples).

    Columns: input_ids, attention_mask, [token_type_ids], start_positions, end_positions, all
    padded to ``max_seq_length``. Positions are token indices of the first gold answer, or both
    the CLS index when the question is unanswerable or the answer is not fully in the window.
    """
    return _map_windows(_train_batch, "Tokenizing training windows", dataset, tokenizer,
                        max_seq_length, doc_stride, max_query_length, num_proc, cache_file_name)


def prepare_eval_features(dataset: datasets.Dataset, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                          max_query_length: int = 64, num_proc: int | None = None,
                          cache_file_name: str | None = None) -> datasets.Dataset:
    """Examples -> evaluation windows (same windows, in the same order, as for training).

    Columns: input_ids, attention_mask, [token_type_ids] (padded to ``max_seq_length``),
    example_id (the question id of the window) and offset_mapping (per token ``[start, end)``
    character span in the context, None for question, special and padding tokens).
    """
    return _map_windows(_eval_batch, "Tokenizing evaluation windows", dataset, tokenizer,
                        max_seq_length, doc_stride, max_query_length, num_proc, cache_file_name)


def model_input_columns(features: datasets.Dataset) -> list[str]:
    """The feature columns a QA model takes as keyword inputs."""
    return [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.column_names]


def model_input_arrays(features: datasets.Dataset) -> dict[str, np.ndarray]:
    """The model-input columns of windows as int32 arrays, each [num_windows, max_seq_length]."""
    numpy_features = features.with_format("numpy")
    return {c: np.asarray(numpy_features[c], dtype=np.int32) for c in model_input_columns(features)}


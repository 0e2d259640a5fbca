"""SQuAD-style extractive QA data: load, validate, tokenize into sliding windows, post-process.

Records are flat, with the columns of the hub ``squad`` / ``squad_v2`` datasets::

    {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}

An unanswerable (SQuAD 2.0) question has empty answer lists.

Windows follow the usual recipe for long contexts: the question plus as much context as fits in
``max_seq_length`` tokens, consecutive windows overlapping by ``doc_stride`` tokens. Training
features carry start/end token labels (the CLS position when the answer is not fully inside the
window); evaluation features carry, per token, the character span in the context (None outside
the context) so that predicted token spans map back to text.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("id", "title", "context", "question", "answers")

SQUAD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {
            "text": datasets.List(datasets.Value("string")),
            "answer_start": datasets.List(datasets.Value("int32")),
        },
    }
)

# How many problems an error message lists before summarising the rest as a count.
_MAX_LISTED_PROBLEMS = 5


class SquadFormatError(ValueError):
    """The data is not valid SQuAD-format QA data; the message says where and what."""


# --------------------------------------------------------------------------------------------
# Reading and flattening the nested SQuAD JSON
# --------------------------------------------------------------------------------------------


def read_squad_json(path: str | os.PathLike) -> dict:
    """Read a nested SQuAD JSON file and check its outer shape.

    Checks ``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}`` down to the list of
    questions; the questions themselves are checked by :func:`validate_records`.

    Raises:
        FileNotFoundError: the file does not exist.
        SquadFormatError: the file is not JSON, or not shaped like SQuAD (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path} (expected a SQuAD-format .json file).")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise SquadFormatError(f"{path}: not valid JSON ({err}).") from err
    except UnicodeDecodeError as err:
        raise SquadFormatError(f"{path}: not UTF-8 text ({err}).") from err
    _check_nested_shape(data, str(path))
    return data


def _check_nested_shape(data: object, source: str) -> None:
    """Raise SquadFormatError unless ``data`` has SQuAD's article/paragraph/qas nesting."""
    hint = 'expected {"version": ..., "data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [...]}]}]}'
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SquadFormatError(f"{source}: not SQuAD format: no top-level \"data\" list; {hint}.")
    for a, article in enumerate(data["data"]):
        where = f"{source}: data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise SquadFormatError(f"{where} (article {_title_of(article)!r}) has no \"paragraphs\" list; {hint}.")
        for p, paragraph in enumerate(article["paragraphs"]):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise SquadFormatError(
                    f"{where}.paragraphs[{p}] (article {_title_of(article)!r}) has no \"qas\" list; {hint}."
                )
            if not all(isinstance(qa, dict) for qa in paragraph["qas"]):
                raise SquadFormatError(
                    f"{where}.paragraphs[{p}] (article {_title_of(article)!r}): every entry of \"qas\" "
                    "must be an object with id, question and answers."
                )


def _title_of(article: object) -> str:
    return article.get("title", "") if isinstance(article, dict) else ""


def flatten_squad(data: dict, source: str) -> list[dict]:
    """Nested SQuAD dict -> flat records (hub ``squad_v2`` columns), in file order.

    Nothing is checked here beyond the nesting: absent question fields become None and are
    reported by :func:`validate_records`. ``plausible_answers`` is dropped. When a question has an
    ``is_impossible`` flag it is kept under that key so that validation can check it against the
    answers; :func:`validate_records` removes it.
    """
    _check_nested_shape(data, source)
    records = []
    for article in data["data"]:
        title = article.get("title", "")
        for paragraph in article["paragraphs"]:
            context = paragraph.get("context")
            for qa in paragraph["qas"]:
                record = {
                    "id": qa.get("id"),
                    "title": title,
                    "context": context,
                    "question": qa.get("question"),
                    "answers": _flatten_answers(qa.get("answers")),
                }
                if "is_impossible" in qa:
                    record["is_impossible"] = qa["is_impossible"]
                records.append(record)
    return records


def _flatten_answers(answers: object) -> dict | object:
    """``[{"text", "answer_start"}, ...]`` -> ``{"text": [...], "answer_start": [...]}``.

    Anything that is not a list of objects is passed through unchanged for validation to report.
    """
    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
        return answers
    return {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _field_problems(record: Mapping) -> list[str]:
    """Problems with the presence and type of the record's fields."""
    problems = []
    for field in ("id", "context", "question"):
        value = record.get(field)
        if value is None:
            problems.append(f"missing field {field!r}")
        elif not isinstance(value, str):
            problems.append(f"field {field!r} must be a string, got {type(value).__name__}")
    if isinstance(record.get("context"), str) and not record["context"].strip():
        problems.append("empty context")
    if isinstance(record.get("question"), str) and not record["question"].strip():
        problems.append("empty question")
    if isinstance(record.get("id"), str) and not record["id"]:
        problems.append("empty id")
    if record.get("title") is not None and not isinstance(record["title"], str):
        problems.append(f"field 'title' must be a string, got {type(record['title']).__name__}")
    return problems


def _answer_problems(record: Mapping) -> list[str]:
    """Problems with the answers: shape, empty texts, offsets that do not point at the text."""
    answers = record.get("answers")
    if answers is None:
        return ["missing field 'answers' (use an empty list for an unanswerable question)"]
    if not isinstance(answers, Mapping) or not isinstance(answers.get("text"), list) or not isinstance(
        answers.get("answer_start"), list
    ):
        return ["'answers' must be a list of {\"text\", \"answer_start\"} objects"]
    texts, starts = answers["text"], answers["answer_start"]
    if len(texts) != len(starts):
        return [f"answers have {len(texts)} texts but {len(starts)} answer_start values"]
    context = record.get("context") if isinstance(record.get("context"), str) else None
    problems = []
    for k, (text, start) in enumerate(zip(texts, starts)):
        label = f"answer {k}"
        if not isinstance(text, str):
            problems.append(f"{label}: missing or non-string 'text'")
        elif not text.strip():
            problems.append(f"{label}: empty answer text")
        elif isinstance(start, bool) or not isinstance(start, int):
            problems.append(f"{label}: missing or non-integer 'answer_start' ({start!r})")
        elif context is not None and not 0 <= start <= len(context) - len(text):
            problems.append(
                f"{label}: answer_start {start} out of range for text of length {len(text)} "
                f"in a context of {len(context)} characters"
            )
        elif context is not None and context[start : start + len(text)] != text:
            found = context[start : start + len(text)]
            problems.append(
                f"{label}: answer text {text!r} not found at answer_start {start} (context has {found!r} there)"
            )
    impossible = record.get("is_impossible")
    if impossible is True and texts:
        problems.append("is_impossible is true but the question has answers")
    elif impossible is False and not texts:
        problems.append("is_impossible is false but the question has no answers")
    return problems


def _describe(record: Mapping, source: str, problems: list[str]) -> str:
    return (
        f"{source}: article {record.get('title') or ''!r}, question id {record.get('id')!r}: "
        + "; ".join(problems)
    )


def _clean_record(record: Mapping) -> dict:
    """Only the standard fields, with answers as plain lists."""
    return {
        "id": record["id"],
        "title": record.get("title") or "",
        "context": record["context"],
        "question": record["question"],
        "answers": {
            "text": list(record["answers"]["text"]),
            "answer_start": [int(s) for s in record["answers"]["answer_start"]],
        },
    }


def validate_records(
    records: Iterable[Mapping], source: str, skip_invalid: bool = False
) -> tuple[list[dict], list[str]]:
    """Check every record; return the valid ones and one problem line per invalid record.

    Checks: missing/non-string fields, empty id/context/question, answers shape, empty answer
    text, answer_start out of range, answer text not found at answer_start, ``is_impossible``
    disagreeing with the answers, and duplicate ids (every occurrence after the first is invalid).

    Raises:
        SquadFormatError: when any record is invalid and ``skip_invalid`` is False; the message
            lists the first few problems (source file, article title, question id, problem) and
            the total count, and points at ``--skip_invalid``.
    """
    valid, problems = [], []
    seen_ids: set[str] = set()
    for record in records:
        issues = _field_problems(record) + _answer_problems(record)
        qid = record.get("id")
        if isinstance(qid, str) and qid in seen_ids:
            issues.append("duplicate question id")
        if isinstance(qid, str):
            seen_ids.add(qid)
        if issues:
            problems.append(_describe(record, source, issues))
        else:
            valid.append(_clean_record(record))
    if problems and not skip_invalid:
        listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise SquadFormatError(
            f"{len(problems)} invalid record(s) in {source}:\n{listed}{tail}\n"
            "Fix the data, or pass --skip_invalid (skip_invalid=True) to drop invalid records."
        )
    return valid, problems


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _is_local_source(source: str) -> bool:
    return source.endswith(".json") or os.path.exists(source)


def _hub_records(name: str, config: str | None, split: str) -> list[dict]:
    """Records of a ``datasets`` dataset (hub name or loading script) in flat form."""
    dataset = datasets.load_dataset(name, config, split=split)
    required = {"id", "context", "question", "answers"}
    missing = required - set(dataset.column_names)
    if missing:
        raise SquadFormatError(
            f"{name} (split {split!r}): missing column(s) {sorted(missing)}; a SQuAD-style dataset "
            f"needs id, title, context, question, answers (has {dataset.column_names})."
        )
    records = dataset.to_list()
    if "title" not in dataset.column_names:
        for record in records:
            record["title"] = ""
    return records


def load_squad(
    source: str, split: str = "train", config: str | None = None, skip_invalid: bool = False,
    max_samples: int | None = None,
) -> datasets.Dataset:
    """Load validated flat SQuAD records as a ``datasets.Dataset``.

    Args:
        source: a local nested SQuAD ``.json`` file, or a ``datasets`` name such as "squad_v2".
        split, config: used for ``datasets`` names only (a local file is one split).
        skip_invalid: drop invalid records (logging how many) instead of raising.
        max_samples: keep only the first N valid questions (debugging, quick runs); None keeps all.

    Returns:
        Dataset with columns id, title, context, question, answers (see :data:`SQUAD_FEATURES`).
    """
    source = os.fspath(source)
    if _is_local_source(source):
        records = flatten_squad(read_squad_json(source), source)
    else:
        records = _hub_records(source, config, split)
        source = f"{source} ({split})"
    total = len(records)
    records, problems = validate_records(records, source, skip_invalid=skip_invalid)
    if problems:
        logger.warning(
            "Skipped %d invalid record(s) of %d in %s; first: %s", len(problems), total, source, problems[0]
        )
    if not records:
        raise SquadFormatError(f"{source}: no valid questions to use.")
    if max_samples is not None:
        records = records[:max_samples]
    logger.info("Loaded %d questions from %s", len(records), source)
    return datasets.Dataset.from_list(records, features=SQUAD_FEATURES)


def has_unanswerable(dataset: datasets.Dataset | Iterable[Mapping]) -> bool:
    """True when any question has no answer (SQuAD 2.0-style data)."""
    answers = dataset["answers"] if isinstance(dataset, datasets.Dataset) else (r["answers"] for r in dataset)
    return any(len(a["text"]) == 0 for a in answers)


# --------------------------------------------------------------------------------------------
# Tokenization into sliding windows
# --------------------------------------------------------------------------------------------


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; QA features need "
            "offset mappings, which only fast tokenizers provide. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) or pick a model that has a tokenizer.json."
        )


def check_window_args(tokenizer, max_seq_length: int, doc_stride: int, max_query_length: int) -> None:
    """Raise ValueError unless the window sizes fit together for this tokenizer.

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
    special = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_seq_length - max_query_length - special
    if room <= 0:
        raise ValueError(
            f"max_seq_length ({max_seq_length}) leaves no room for the context after a question of "
            f"max_query_length ({max_query_length}) tokens and {special} special tokens; raise "
            "--max_seq_length or lower --max_query_length."
        )
    if doc_stride >= room:
        raise ValueError(
            f"doc_stride ({doc_stride}) must be smaller than the context room of a window: "
            f"max_seq_length ({max_seq_length}) - max_query_length ({max_query_length}) - {special} special "
            f"tokens = {room}. Lower --doc_stride (e.g. {max(1, room // 2)}) or --max_query_length, or raise "
            "--max_seq_length."
        )


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
    """Tokenize a batch of examples into padded overlapping windows (a BatchEncoding)."""
    questions = _prepare_questions(examples["question"], tokenizer, max_query_length)
    contexts = examples["context"]
    context_first = _context_sequence_id(tokenizer) == 0
    return tokenizer(
        contexts if context_first else questions,
        questions if context_first else contexts,
        truncation="only_first" if context_first else "only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def _cls_index(input_ids: Sequence[int], attention_mask: Sequence[int], cls_token_id: int | None) -> int:
    """Position of the CLS token, or of the first real token when there is no CLS token."""
    if cls_token_id is not None and cls_token_id in input_ids:
        return input_ids.index(cls_token_id)
    return _first_attended(attention_mask)


def _first_attended(attention_mask: Sequence[int]) -> int:
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
    encoded = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    sample_of = encoded.pop("overflow_to_sample_mapping")
    all_offsets = encoded.pop("offset_mapping")
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
    encoded = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    sample_of = encoded.pop("overflow_to_sample_mapping")
    all_offsets = encoded.pop("offset_mapping")
    context_id = _context_sequence_id(tokenizer)
    example_ids = [examples["id"][j] for j in sample_of]
    context_offsets = [
        [list(o) if s == context_id else None for o, s in zip(offsets, encoded.sequence_ids(i))]
        for i, offsets in enumerate(all_offsets)
    ]
    return {**encoded, "example_id": example_ids, "offset_mapping": context_offsets}


def _map_windows(batch_fn, dataset, tokenizer, max_seq_length, doc_stride, max_query_length, num_proc, desc):
    _require_fast(tokenizer)
    check_window_args(tokenizer, max_seq_length, doc_stride, max_query_length)
    fn = functools.partial(
        batch_fn,
        tokenizer=tokenizer,
        max_seq_length=max_seq_length,
        doc_stride=doc_stride,
        max_query_length=max_query_length,
    )
    return dataset.map(fn, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc)


def prepare_train_features(
    dataset: datasets.Dataset,
    tokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Examples -> training windows (one row per window, so usually more rows than examples).

    Columns: input_ids, attention_mask, [token_type_ids], start_positions, end_positions, all
    padded to ``max_seq_length``. Positions are token indices of the first gold answer, or both
    the CLS index when the question is unanswerable or the answer is not fully in the window.
    """
    return _map_windows(
        _train_batch, dataset, tokenizer, max_seq_length, doc_stride, max_query_length, num_proc,
        "Tokenizing training windows",
    )


def prepare_eval_features(
    dataset: datasets.Dataset,
    tokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Examples -> evaluation windows.

    Columns: input_ids, attention_mask, [token_type_ids] (padded to ``max_seq_length``),
    example_id (the question id of the window) and offset_mapping (per token ``[start, end)``
    character span in the context, None for question, special and padding tokens).
    """
    return _map_windows(
        _eval_batch, dataset, tokenizer, max_seq_length, doc_stride, max_query_length, num_proc,
        "Tokenizing evaluation windows",
    )


def model_input_columns(features: datasets.Dataset) -> list[str]:
    """The feature columns a QA model takes as keyword inputs."""
    return [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.column_names]


def model_input_arrays(features: datasets.Dataset) -> dict[str, np.ndarray]:
    """The model-input columns of windows as int32 arrays, each [num_windows, max_seq_length]."""
    numpy_features = features.with_format("numpy")
    return {c: np.asarray(numpy_features[c], dtype=np.int32) for c in model_input_columns(features)}


# --------------------------------------------------------------------------------------------
# Post-processing: logits -> answer texts
# --------------------------------------------------------------------------------------------


def _column(records, name: str) -> list:
    """One column as a list, from a ``datasets.Dataset`` or a sequence of dict records."""
    if isinstance(records, datasets.Dataset):
        return list(records[name])
    return [r[name] for r in records]


def _offset_arrays(features: datasets.Dataset, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets of every feature as arrays via Arrow (fast on 10k+ windows).

    Returns:
        in_context [N, L] bool, char_start [N, L] int64, char_end [N, L] int64 (0 outside the
        context). Tokens beyond a feature's offset list count as outside the context.
    """
    column = features.select_columns(["offset_mapping"]).with_format("arrow")[:]["offset_mapping"]
    per_feature = column.combine_chunks()
    lengths = per_feature.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    per_token = per_feature.flatten()
    valid = per_token.is_valid().to_numpy(zero_copy_only=False)
    pairs = per_token.drop_null().flatten().to_numpy(zero_copy_only=False).reshape(-1, 2)
    if lengths.max(initial=0) > seq_len:
        raise ValueError(f"Features have up to {lengths.max()} tokens but the logits only {seq_len}.")
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    shape = (len(lengths), seq_len)
    in_context = np.zeros(shape, dtype=bool)
    char_start = np.zeros(shape, dtype=np.int64)
    char_end = np.zeros(shape, dtype=np.int64)
    in_context[rows[valid], cols[valid]] = True
    char_start[rows[valid], cols[valid]] = pairs[:, 0]
    char_end[rows[valid], cols[valid]] = pairs[:, 1]
    return in_context, char_start, char_end


def _null_positions(features: datasets.Dataset, num_features: int) -> np.ndarray:
    """CLS index per feature: the first attended token (index 0 when there is no attention_mask).

    For CLS-first models (BERT, RoBERTa, ...) this is the CLS token for right and left padding.
    """
    if "attention_mask" not in features.column_names:
        return np.zeros(num_features, dtype=np.int64)
    mask = np.asarray(features.with_format("numpy")["attention_mask"][:])
    return np.argmax(mask != 0, axis=1)


def _best_spans_top_k(
    start_logits: np.ndarray, end_logits: np.ndarray, in_context: np.ndarray, n_best_size: int, max_answer_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best valid (start, end) among each feature's top-``n_best_size`` starts x ends.

    Valid: both tokens in the context, end >= start, at most ``max_answer_length`` tokens.

    Args: logits [N, L] float, in_context [N, L] bool.
    Returns: start [N], end [N] token indices and score [N] (-inf where no pair was valid).
    """
    k = min(n_best_size, start_logits.shape[1])
    top_start = np.argsort(-start_logits, axis=1, kind="stable")[:, :k]
    top_end = np.argsort(-end_logits, axis=1, kind="stable")[:, :k]
    s_logit = np.take_along_axis(start_logits, top_start, axis=1)
    e_logit = np.take_along_axis(end_logits, top_end, axis=1)
    s_ok = np.take_along_axis(in_context, top_start, axis=1)
    e_ok = np.take_along_axis(in_context, top_end, axis=1)
    length = top_end[:, None, :] - top_start[:, :, None] + 1  # [N, k, k]
    valid = s_ok[:, :, None] & e_ok[:, None, :] & (length >= 1) & (length <= max_answer_length)
    scores = np.where(valid, s_logit[:, :, None] + e_logit[:, None, :], -np.inf)
    flat_best = scores.reshape(len(scores), -1).argmax(axis=1)
    i, j = np.divmod(flat_best, k)
    rows = np.arange(len(scores))
    return top_start[rows, i], top_end[rows, j], scores.reshape(len(scores), -1)[rows, flat_best]


def _best_span_exhaustive(
    start_logits: np.ndarray, end_logits: np.ndarray, in_context: np.ndarray, max_answer_length: int
) -> tuple[int, int, float]:
    """Best valid span of one feature over all start/end pairs (fallback when the top-k fail).

    Args: logits [L], in_context [L]. Returns (start, end, score), score -inf if none is valid.
    """
    seq_len = len(start_logits)
    starts = np.arange(seq_len)[:, None]
    ends = starts + np.arange(max_answer_length)[None, :]  # [L, max_answer_length]
    inside = ends < seq_len
    ends_clipped = np.minimum(ends, seq_len - 1)
    valid = inside & in_context[:, None] & in_context[ends_clipped]
    scores = np.where(valid, start_logits[:, None] + end_logits[ends_clipped], -np.inf)
    s, offset = np.unravel_index(np.argmax(scores), scores.shape)
    return int(s), int(ends_clipped[s, offset]), float(scores[s, offset])


def _feature_best_spans(start_logits, end_logits, in_context, n_best_size, max_answer_length, chunk=4096):
    """Per-feature best span: top-k search in chunks (bounded memory), exhaustive where it fails."""
    parts = [
        _best_spans_top_k(
            start_logits[i : i + chunk], end_logits[i : i + chunk], in_context[i : i + chunk],
            n_best_size, max_answer_length,
        )
        for i in range(0, len(start_logits), chunk)
    ]
    best_start, best_end, best_score = (np.concatenate(p) for p in zip(*parts))
    best_score = best_score.astype(np.float64)
    for f in np.flatnonzero(np.isneginf(best_score)):
        best_start[f], best_end[f], best_score[f] = _best_span_exhaustive(
            start_logits[f], end_logits[f], in_context[f], max_answer_length
        )
    return best_start, best_end, best_score


def postprocess_qa_predictions(
    examples,
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Turn per-window start/end logits into one answer text per question.

    Per window, the ``n_best_size`` highest start and end logits are paired; pairs outside the
    context, reversed, or longer than ``max_answer_length`` tokens are skipped (if no top pair is
    valid, all pairs of that window are searched). A question's best span is the best over its
    windows. Its null score is the minimum over its windows of start+end logit at the CLS token,
    and ``null_odds = null score - best span score``.

    Args:
        examples: Dataset/records with ``id`` and ``context``.
        features: evaluation features from :func:`prepare_eval_features` (example_id,
            offset_mapping, attention_mask), in the same order as the logits.
        start_logits, end_logits: float arrays [num_features, seq_len].
        version_2_with_negative: predict "" when null_odds > ``null_score_diff_threshold``;
            otherwise always the best span.

    Returns:
        (predictions {id: text}, null_odds {id: float}). Questions without any window are left out.
    """
    start_logits = np.asarray(start_logits, dtype=np.float32)
    end_logits = np.asarray(end_logits, dtype=np.float32)
    if start_logits.ndim != 2 or start_logits.shape != end_logits.shape or len(start_logits) != len(features):
        raise ValueError(
            f"Expected start/end logits of shape [num_features={len(features)}, seq_len]; got "
            f"{start_logits.shape} and {end_logits.shape}."
        )
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError("n_best_size and max_answer_length must be positive.")
    num_features = len(features)
    in_context, char_start, char_end = _offset_arrays(features, start_logits.shape[1])
    null_pos = _null_positions(features, num_features)
    rows = np.arange(num_features)
    null_scores = start_logits[rows, null_pos].astype(np.float64) + end_logits[rows, null_pos]
    best_start, best_end, best_score = _feature_best_spans(
        start_logits, end_logits, in_context, n_best_size, max_answer_length
    )

    example_ids = _column(examples, "id")
    contexts = _column(examples, "context")
    position = {qid: i for i, qid in enumerate(example_ids)}
    feature_qids = list(features["example_id"])
    feature_example = [position.get(qid, -1) for qid in feature_qids]
    if -1 in feature_example:
        unknown = feature_qids[feature_example.index(-1)]
        raise ValueError(f"Feature for question id {unknown!r} has no matching example.")

    # Per example: the best window by span score, and the smallest null score.
    best_feature = np.full(len(example_ids), -1, dtype=np.int64)
    null_of_example = np.full(len(example_ids), np.inf)
    for f, e in enumerate(feature_example):
        if best_feature[e] < 0 or best_score[f] > best_score[best_feature[e]]:
            best_feature[e] = f
        null_of_example[e] = min(null_of_example[e], null_scores[f])

    predictions, null_odds = {}, {}
    for e, qid in enumerate(example_ids):
        f = best_feature[e]
        if f < 0:
            continue
        text = ""
        if np.isfinite(best_score[f]):
            text = contexts[e][char_start[f, best_start[f]] : char_end[f, best_end[f]]]
        odds = float(null_of_example[e] - best_score[f])
        null_odds[qid] = odds
        predictions[qid] = "" if version_2_with_negative and odds > null_score_diff_threshold else text
    missing = len(example_ids) - len(predictions)
    if missing:
        logger.warning("%d question(s) have no feature and get no prediction.", missing)
    return predictions, null_odds

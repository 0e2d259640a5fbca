"""SQuAD-style extractive QA data: read, validate and load it as flat records.

Records are flat, with the columns of the hub ``squad`` / ``squad_v2`` datasets::

    {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}

An unanswerable (SQuAD 2.0) question has empty answer lists. Tokenizing records into model windows
is :mod:`kd.features`; turning a model's logits back into answers is :mod:`kd.qa_eval`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import datasets
import datasets.arrow_writer
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

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

# Records converted to Arrow at a time while loading.
_CHUNK_RECORDS = 10_000

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
        raise SquadFormatError(f"{path}: not valid JSON ({err}){_format_hint(path, err)}.") from err
    except UnicodeDecodeError as err:
        raise SquadFormatError(f"{path}: not UTF-8 text ({err}).") from err
    _check_nested_shape(data, str(path))
    return data


def _format_hint(path: Path, err: json.JSONDecodeError) -> str:
    """Why a file that is not JSON may have been passed: it is empty, or it is JSON Lines."""
    expected = '; expected one SQuAD JSON document {"version": ..., "data": [{"title": ..., "paragraphs": [...]}]}'
    if path.stat().st_size == 0 or not err.doc.strip():
        return f": the file is empty{expected}"
    if err.msg == "Extra data" and err.lineno > 1 and err.doc[:err.pos].count("\n") == err.lineno - 1:
        return (f": it looks like JSON Lines (one JSON object per line){expected}; convert it, e.g. "
                "{\"data\": [one article per line]}")
    return ""


_SHAPE_HINT = 'expected {"version": ..., "data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [...]}]}]}'


def _check_nested_shape(data: object, source: str) -> None:
    """Raise SquadFormatError unless ``data`` has SQuAD's article/paragraph/qas nesting."""
    hint = _SHAPE_HINT
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SquadFormatError(f"{source}: not SQuAD format: no top-level \"data\" list; {hint}.")
    for a, article in enumerate(data["data"]):
        _check_article(article, a, source)


def _check_article(article: object, a: int, source: str) -> None:
    """Raise SquadFormatError unless ``article`` (``data[a]``) has SQuAD's paragraph/qas nesting."""
    hint = _SHAPE_HINT
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


class _NotStreamable(Exception):
    """The file is not one plain SQuAD document the streaming reader can follow (it is then read whole)."""


_READ_CHARS = 1 << 20


def iter_squad_articles(path: str | os.PathLike):
    """The articles of a SQuAD JSON file's ``data`` list one at a time, from a buffered read: the file is never
    held whole, nor all its questions as Python objects. Each article's nesting is checked as
    :func:`read_squad_json` checks it; any problem the stream cannot name exactly (bad JSON, no ``data`` list, a
    byte order mark, ...) is reported by reading the file as :func:`read_squad_json` does, with its messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path} (expected a SQuAD-format .json file).")
    try:
        yield from _stream_articles(path)
    except (_NotStreamable, json.JSONDecodeError, UnicodeDecodeError):
        read_squad_json(path)  # raises the error the whole document gets
        raise SquadFormatError(f"{path}: not SQuAD format: no top-level \"data\" list, or more than one.") from None


def _stream_articles(path: Path):
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill(need_more: bool) -> None:
            nonlocal buf, pos, eof
            if eof:
                if need_more:
                    raise _NotStreamable
                return
            chunk = f.read(max(_READ_CHARS, len(buf) - pos))  # grows with what one value needs
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\n\r":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                fill(need_more=True)

        def value():
            nonlocal pos
            while True:
                skip_space()  # raw_decode takes none
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        raise
                    fill(need_more=False)
                    continue
                if end == len(buf) and not eof:  # a number may go on in the next chunk
                    fill(need_more=False)
                    continue
                pos = end
                return obj

        def expect(char: str) -> None:
            nonlocal pos
            if skip_space() != char:
                raise _NotStreamable
            pos += 1

        fill(need_more=True)
        expect("{")
        found, a = False, 0
        if skip_space() == "}":
            raise _NotStreamable
        while True:
            key = value()
            if not isinstance(key, str):
                raise _NotStreamable
            expect(":")
            if key == "data" and skip_space() == "[" and not found:
                found, pos = True, pos + 1
                if skip_space() == "]":
                    pos += 1
                else:
                    while True:
                        article = value()
                        _check_article(article, a, str(path))
                        yield article
                        a += 1
                        if skip_space() == "]":
                            pos += 1
                            break
                        expect(",")
            elif key == "data":
                raise _NotStreamable
            else:
                value()
            if skip_space() == "}":
                pos += 1
                break
            expect(",")
        while True:  # nothing but white space may follow
            while pos < len(buf) and buf[pos] in " \t\n\r":
                pos += 1
            if pos < len(buf) or not found:
                raise _NotStreamable
            if eof:
                return
            fill(need_more=False)


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
    return [record for article in data["data"] for record in _article_records(article)]


def _article_records(article: dict) -> list[dict]:
    """One (shape-checked) article's questions as flat records (see :func:`flatten_squad`)."""
    records = []
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


SKIP_INVALID_HINT = "Fix the data, or pass --skip_invalid (skip_invalid=True) to drop invalid records."


def validate_records(
    records: Iterable[Mapping], source: str, skip_invalid: bool = False, fix_hint: str = SKIP_INVALID_HINT
) -> tuple[list[dict], list[str]]:
    """Check every record; return the valid ones and one problem line per invalid record.

    Checks: missing/non-string fields, empty id/context/question, answers shape, empty answer
    text, answer_start out of range, answer text not found at answer_start, ``is_impossible``
    disagreeing with the answers, and duplicate ids (every occurrence after the first is invalid).

    Raises:
        SquadFormatError: when any record is invalid and ``skip_invalid`` is False; the message
            lists the first few problems (source file, article title, question id, problem) and
            the total count, and ``fix_hint`` (by default: how to fix it, or ``--skip_invalid``).
    """
    validator = _Validator(source)
    valid = [clean for clean in map(validator.check, records) if clean is not None]
    validator.finish(skip_invalid, fix_hint)
    return valid, validator.problems


class _Validator:
    """:func:`validate_records` a record at a time (state: the ids seen, the problems found)."""

    def __init__(self, source: str):
        self.source, self.problems, self.seen_ids = source, [], set()

    def check(self, record: Mapping) -> dict | None:
        """The clean record, or None (its problems noted) when it is invalid."""
        issues = _field_problems(record) + _answer_problems(record)
        qid = record.get("id")
        if isinstance(qid, str) and qid in self.seen_ids:
            issues.append("duplicate question id")
        if isinstance(qid, str):
            self.seen_ids.add(qid)
        if issues:
            self.problems.append(_describe(record, self.source, issues))
            return None
        return _clean_record(record)

    def finish(self, skip_invalid: bool, fix_hint: str = SKIP_INVALID_HINT) -> None:
        """Raise SquadFormatError (the first problems and their count) unless there are none or they are skipped."""
        problems = self.problems
        if problems and not skip_invalid:
            listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED_PROBLEMS])
            more = len(problems) - _MAX_LISTED_PROBLEMS
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise SquadFormatError(
                f"{len(problems)} invalid record(s) in {self.source}:\n{listed}{tail}\n{fix_hint}"
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


QUESTION_LINE = 'one JSON object per line: {"id": "...", "question": "...", "context": "..."} ("id" optional)'


def read_question_lines(path: str | os.PathLike) -> list[dict]:
    """Questions to answer from a JSON Lines file, checked as strictly as a SQuAD file's (no answers needed).

    Each non-blank line is an object with string ``question`` and ``context`` (an empty context is allowed: it
    has no answer) and an optional ``id`` (string or integer; default: the line number); ids are unique.

    Returns:
        records ``{"id", "question", "context"}`` in file order.

    Raises:
        SquadFormatError: at the first bad line, as ``FILE:LINE: what is wrong; how to fix it``.
    """
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    records, first_line_of = [], {}
    for n, raw in enumerate(raw_lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte order mark is no error
        except UnicodeDecodeError as err:
            raise SquadFormatError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                   f"{err.start + 1}); save the file as UTF-8.") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SquadFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); write "
                                   f"{QUESTION_LINE}.") from None
        if not isinstance(row, dict):
            raise SquadFormatError(f"{where}: a JSON {_json_type(row)}, not an object; write {QUESTION_LINE}.")
        problems = _line_problems(row)
        if problems:
            raise SquadFormatError(f"{where}: {', '.join(problems)}; write {QUESTION_LINE}.")
        qid = str(row.get("id", n))
        if qid in first_line_of:
            raise SquadFormatError(f"{where}: id {qid!r} is also the id of line {first_line_of[qid]}; give each "
                                   "question its own id (answers are keyed by id).")
        first_line_of[qid] = n
        records.append({"id": qid, "question": row["question"], "context": row["context"]})
    if not records:
        raise SquadFormatError(f"{path}: no questions; write {QUESTION_LINE}.")
    return records


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _line_problems(row: Mapping) -> list[str]:
    """What is wrong with the fields of one JSON Lines question (the SQuAD checks less the answers)."""
    problems = []
    for field in ("question", "context"):
        if field not in row:
            problems.append(f"missing field {field!r}")
        elif not isinstance(row[field], str):
            problems.append(f"field {field!r} must be a string, got {_json_type(row[field])}")
    if isinstance(row.get("question"), str) and not row["question"].strip():
        problems.append("empty question")
    qid = row.get("id", 0)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        problems.append(f"field 'id' must be a string or an integer, got {_json_type(qid)}")
    elif qid == "":
        problems.append("empty id")
    return problems



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
    max_samples: int | None = None, arrow_path: str | None = None,
) -> datasets.Dataset:
    """Load validated flat SQuAD records as a ``datasets.Dataset``.

    Args:
        source: a local nested SQuAD ``.json`` file, or a ``datasets`` name such as "squad_v2".
        split, config: used for ``datasets`` names only (a local file is one split).
        skip_invalid: drop invalid records (logging how many) instead of raising.
        max_samples: keep only the first N valid questions (debugging, quick runs); None keeps all.
        arrow_path: write the records to this Arrow file as they are read and return it memory-mapped (memory
            stays flat in the file's size); None keeps them in memory (as Arrow).

    Returns:
        Dataset with columns id, title, context, question, answers (see :data:`SQUAD_FEATURES`).
    """
    source = os.fspath(source)
    if _is_local_source(source):  # streamed article by article: never all questions as Python objects at once
        records = (r for article in iter_squad_articles(source) for r in _article_records(article))
    else:
        records = iter(_hub_records(source, config, split))
        source = f"{source} ({split})"
    validator = _Validator(source)
    chunks, chunk, total, kept = [], [], 0, 0
    writer = None if arrow_path is None else datasets.arrow_writer.ArrowWriter(features=SQUAD_FEATURES,
                                                                              path=arrow_path)

    def flush() -> None:
        table = pa.Table.from_pylist(chunk, schema=SQUAD_FEATURES.arrow_schema)
        writer.write_table(table) if writer is not None else chunks.append(table)
        chunk.clear()

    for record in records:
        total += 1
        clean = validator.check(record)
        if clean is None or (max_samples is not None and kept >= max_samples):
            continue  # every record is still checked: a bad one past max_samples is an error all the same
        chunk.append(clean)
        kept += 1
        if len(chunk) == _CHUNK_RECORDS:
            flush()
    flush()
    if writer is not None:
        writer.finalize()
    validator.finish(skip_invalid)
    problems = validator.problems
    if problems:
        logger.warning(
            "Skipped %d invalid record(s) of %d in %s; first: %s", len(problems), total, source, problems[0]
        )
    if not kept:
        raise SquadFormatError(f"{source}: no valid questions to use.")
    logger.info("Loaded %d questions from %s", kept, source)
    if writer is not None:
        return datasets.Dataset.from_file(arrow_path)
    # Arrow holds the records compactly (a fraction of their Python objects' size)
    return datasets.Dataset(pa.concat_tables(chunks), info=datasets.DatasetInfo(features=SQUAD_FEATURES))


def load_squad_splits(
    train_file: str | None, validation_file: str | None, dataset_name: str | None,
    dataset_config_name: str | None = None, *, skip_invalid: bool = False, max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training questions, validation questions or None) as a training script's flags name them: each split
    from its local file when given, else from ``dataset_name``'s ``train`` / ``validation`` split."""
    train = load_squad(train_file or dataset_name, split="train", config=dataset_config_name,
                       skip_invalid=skip_invalid, max_samples=max_train_samples)
    validation = None
    if validation_file or dataset_name:
        validation = load_squad(validation_file or dataset_name, split="validation", config=dataset_config_name,
                                skip_invalid=skip_invalid, max_samples=max_eval_samples)
    return train, validation


def has_unanswerable(dataset: datasets.Dataset | Iterable[Mapping]) -> bool:
    """True when any question has no answer (SQuAD 2.0-style data)."""
    if isinstance(dataset, datasets.Dataset):  # through Arrow: no Python object per question
        return len(dataset) > 0 and pc.min(answer_counts(dataset)).as_py() == 0
    return any(len(r["answers"]["text"]) == 0 for r in dataset)


def has_answerable(dataset: datasets.Dataset) -> bool:
    """True when any question has an answer."""
    return len(dataset) > 0 and pc.max(answer_counts(dataset)).as_py() > 0


def answer_counts(dataset: datasets.Dataset) -> pa.ChunkedArray:
    """How many gold answers each question has, read through Arrow."""
    answers = dataset.with_format("arrow")[:]["answers"]
    return pc.list_value_length(pc.struct_field(answers, "text"))


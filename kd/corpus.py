"""Raw-text corpus sources for general distillation: which documents a corpus holds, and reading them a piece at a time.

Local files (glob patterns allowed), by extension: ``.parquet`` (a text column), ``.jsonl``/``.json``/``.ndjson``
(JSON Lines with a text column), anything else plain UTF-8 text (strictly: a byte that is not UTF-8, or a NUL
byte, stops reading with CorpusFormatError naming the file, byte offset and line, since replacing them would train on
a binary or mis-encoded file's noise), where a document is a block of non-blank lines
separated by blank lines, or, with ``line_by_line``, a single non-blank line (:class:`FileCorpus`). Or a
``datasets`` name and config (``wikimedia/wikipedia`` ``20231101.en``), read with ``datasets`` (:class:`DatasetCorpus`).

A :class:`FileCorpus` also cuts its files into units (:class:`Unit`: byte ranges of text/JSONL files, parquet row
groups) and reads one unit resumably from a position inside it, so that kd.streaming can deal units to processes
and resume mid-unit. Tokenizing, packing and the packed cache are kd.packing's job.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")
SNIFF_BYTES = 1 << 16  # what FileCorpus.validate reads of each text/JSONL file: enough to tell a binary file


class CorpusFormatError(ValueError):
    """A corpus file that cannot be read as its format says (not UTF-8 text, not JSON Lines, no text field)."""


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
        """Fail fast on a missing text column (first record of each JSONL file, parquet schemas) and on a text or
        JSONL file that does not start as UTF-8 text (its first SNIFF_BYTES: a binary file shows there; a bad byte
        further on stops the reading where it is)."""
        for i, (path, fmt) in enumerate(zip(self.files, self.formats)):
            if fmt == "parquet":
                names = self._parquet_file(i).schema_arrow.names
                if self.text_column not in names:
                    raise ValueError(f"{path} has no column {self.text_column!r} (columns: {names}); pass "
                                     "--text_column NAME")
                continue
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
            _decode(head, path, 0, final=len(head) < SNIFF_BYTES)  # a character cut at the end is no error
            if fmt == "jsonl":
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
        """(text, byte offset after it) for the lines (JSONL, line_by_line) or blocks that start in ``unit``."""
        path = self.files[unit.file]
        by_line = jsonl or self.line_by_line
        with open(path, "rb") as f:
            pos = position if position is not None else _unit_start(f, unit, by_line)
            f.seek(pos)
            if by_line:
                yield from self._read_single_lines(f, pos, unit.end, path, jsonl)
            else:
                yield from _read_blocks(f, pos, unit.end, path)

    def _read_single_lines(self, f, pos: int, end: int, path: str, jsonl: bool) -> Iterator[tuple[str, int]]:
        """(text, offset after its line) for the non-empty lines starting in [pos, end); ``f`` is at ``pos``."""
        while pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if line.strip():
                text = (self._jsonl_text(line, path, line_start) if jsonl
                        else _decode(line, path, line_start).strip())
                if text:
                    yield text, pos

    def _jsonl_text(self, line: bytes, path: str, offset: int) -> str:
        try:
            record = json.loads(_decode(line, path, offset))
        except json.JSONDecodeError as e:
            raise CorpusFormatError(f"{path}, line starting at byte {offset}: not valid JSON ({e}). JSON Lines files need "
                             "one JSON object per line.") from None
        if not isinstance(record, dict) or self.text_column not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CorpusFormatError(f"{path}, line starting at byte {offset}: no field {self.text_column!r} (found "
                             f"{fields}); pass --text_column NAME")
        text = record[self.text_column]
        if text is not None and not isinstance(text, str):
            raise CorpusFormatError(f"{path}, line starting at byte {offset}: field {self.text_column!r} is a "
                             f"{type(text).__name__}, not a string")
        return text or ""

    # --- parquet ------------------------------------------------------------------------------------------------
    def _parquet_file(self, i: int):
        """File i's pyarrow ParquetFile, opened once (its footer is read on opening)."""
        if i not in self._parquet:
            import pyarrow.parquet as pq

            self._parquet[i] = pq.ParquetFile(self.files[i])
        return self._parquet[i]

    def _read_parquet(self, unit: Unit, position):
        """(text, row index after it) for the non-empty rows of row group ``unit.start``, from row ``position``."""
        table = self._parquet_file(unit.file).read_row_group(unit.start, columns=[self.text_column])
        texts = table.column(0).to_pylist()
        for row in range(position or 0, len(texts)):
            if texts[row]:
                yield texts[row], row + 1


def _decode(raw: bytes, path: str, offset: int, final: bool = True) -> str:
    """``raw``, read from byte ``offset`` of ``path``, as strict UTF-8 text without NUL bytes. Replacing what is not
    text would train on a binary or mis-encoded file as if it were text: CorpusFormatError says where instead.
    final=False: a multi-byte character cut at the end of ``raw`` is left out, not an error."""
    bad = None
    try:
        text = raw.decode("utf-8") if final else codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError as e:
        bad, what = e.start, f"byte {raw[e.start]:#04x} is not UTF-8"
    nul = raw.find(b"\x00")
    if nul >= 0 and (bad is None or nul < bad):  # the first of the two problems
        bad, what = nul, "a NUL byte (a binary file?)"
    if bad is None:
        return text
    at = offset + bad
    with open(path, "rb") as f:
        line = f.read(at).count(b"\n") + 1
    raise CorpusFormatError(f"{path} is not UTF-8 text: {what} at byte offset {at} (line {line}). Convert it to UTF-8 "
                            "(e.g. iconv -f latin1 -t utf-8), or leave it out of the corpus.")


def _unit_start(f, unit: Unit, by_line: bool) -> int:
    """Where reading ``unit`` from its beginning starts: its first line start, or, in block mode, after a block
    that started in the previous unit (which reads that block whole)."""
    pos = _first_line_start(f, unit.start)
    if not by_line and 0 < pos < unit.end and not _previous_line_blank(f, pos):
        pos = _skip_block(f, pos)
    return pos


def _read_blocks(f, pos: int, end: int, path: str) -> Iterator[tuple[str, int]]:
    """(block text, offset after the blank line ending it) for the blocks that start in [pos, end); ``f`` is at
    ``pos``, a line start outside any block begun before it (``path``: its name, for errors)."""
    lines: list[str] = []
    while True:
        line = f.readline()
        line_start, pos = pos, pos + len(line)
        if not line.strip():
            if lines:
                yield "\n".join(lines).strip(), pos
                lines = []
            if not line:
                return
            continue
        if not lines and line_start >= end:  # the next block starts in the next unit
            return
        lines.append(_decode(line.rstrip(b"\r\n"), path, line_start))


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
    """A ``datasets`` corpus by name and config; ``streaming`` picks an IterableDataset.

    The text column is checked on construction (ValueError when missing), so unlike FileCorpus there is nothing
    left to validate.
    """

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

    def fingerprint(self, strict: bool = True) -> dict:
        """What the corpus content depends on: name, config, split, data files and datasets' own fingerprint
        (``strict`` is accepted for FileCorpus's signature and changes nothing here)."""
        return {"dataset": [self.name, self.config, self.split, self.data_files],
                "fingerprint": getattr(self.dataset, "_fingerprint", None), "text_column": self.text_column}

    def documents(self) -> Iterator[str]:
        """Every non-empty text of the split, in dataset order."""
        for batch in self.dataset.iter(batch_size=1000):
            yield from (t for t in batch[self.text_column] if t)


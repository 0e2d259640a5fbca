"""TinyBERT-style word replacement for SQuAD data, answers kept: the words, texts, copies and blocks of ``augment.py``.

Every word of a context (and of a question, when asked) is a *replaceable word* unless it overlaps an answer
span of any question of the paragraph (``answers`` and ``plausible_answers``). Its candidates are computed
once and serve all copies:

- a word that is one token for the masked LM: the masked LM's top-k whole-word tokens at that position
  (:mod:`kd.masked_lm`);
- any other word: its k nearest GloVe neighbours (cosine; :mod:`kd.glove`).

Each copy then replaces each replaceable word with probability p by a candidate drawn uniformly; the random
numbers come from a generator seeded by (seed, paragraph index, copy index, text index), so a copy does not
depend on batching, sharding or the number of processes.

Words are maximal runs of letters and digits, joined by inner hyphens or apostrophes (``well-known``,
``Normandy's`` are one word each): see :data:`WORD_RE`. A replacement is always one such word, spliced into
the original string at the word's character span, so everything else keeps its casing and spacing.

This module holds what both candidate sources share (what a word is, how candidates are picked from a
ranking), the input checks, the analysis of texts into :class:`Segment`, the copies, and the block files;
:mod:`kd.masked_lm` and :mod:`kd.glove` build on it.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kd.files import write_json_atomic, write_text_atomic
from kd.squad import SquadFormatError, flatten_squad, validate_records

if TYPE_CHECKING:  # only an annotation here: kd.glove imports this module
    from kd.glove import GloVe

# Letters/digits, with inner hyphens or apostrophes; "_" is excluded on purpose (not a word character in text).
WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")


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
# Candidates from a ranking (shared by kd.masked_lm and kd.glove)
# --------------------------------------------------------------------------------------------

# Extra top-k entries fetched so that dropping the word itself and case duplicates still leaves k candidates.
_TOPK_SLACK = 8


def topk_fetch_size(k: int, available: int) -> int:
    """How many of the ``available`` best-ranked entries to fetch for :func:`distinct_candidates` to find k."""
    return min(available, 2 * k + _TOPK_SLACK)


def distinct_candidates(ranked: Iterable[str], word: str, k: int) -> list[str]:
    """The first k words of ``ranked`` (best first) that are neither ``word`` nor a case variant of one
    already taken: how both candidate sources turn a ranking into candidates."""
    seen, picked = {word.lower()}, []
    for candidate in ranked:
        key = candidate.lower()
        if key not in seen:
            seen.add(key)
            picked.append(candidate)
            if len(picked) == k:
                break
    return picked


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def validate_squad_for_augmentation(data: dict, source: str, copies: int) -> None:
    """Check a nested SQuAD dict before any work: every question, every plausible answer, the new ids.

    Raises:
        SquadFormatError: what is wrong and where (file, article, question id).
    """
    records = flatten_squad(data, source)
    validate_records(records, source, fix_hint="Fix the data: every question is copied with its answers, so each "
                                               "must be valid.")
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
    """Segments for ``texts`` (one tokenizer call for all); ``protected[i]`` are spans never replaced.

    tokenizer: the masked LM's, or None for GloVe only (every word through GloVe, no token ids)."""
    if not texts:
        return []
    if tokenizer is None:
        return [Segment(text, spans, [], (0, 0), [-1] * len(spans), [glove.row(text[s:e]) for s, e in spans])
                for text, spans in ((t, free_words(t, p)) for t, p in zip(texts, protected))]
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
# Sharding, block files (what a killed run leaves to resume from) and the merged output
# --------------------------------------------------------------------------------------------

PARTS_SETTINGS = "settings.json"
BLOCK_FILE_RE = re.compile(r"block-(\d{8})\.jsonl")
# augment.py's arguments that decide what a block file holds (the number of processes does not).
OUTPUT_ARGS = ("multiplication_factor", "replace_probability", "word_possibilities", "mlm_name_or_path", "glove_path",
               "glove_vocab_size", "seed", "include_original", "augment_questions", "block_size",
               "per_device_batch_size", "max_seq_length", "mask_groups")


def blocks_of_process(num_paragraphs: int, block_size: int, num_processes: int, process_index: int) -> list[range]:
    """The contiguous run of paragraph blocks a process handles.

    Blocks are fixed by ``block_size`` alone and each block is batched on its own, so the masked-LM
    batches, hence the output, do not depend on the number of processes. Block ``b`` is paragraphs
    ``b * block_size`` onwards, whichever process takes it.
    """
    blocks = [range(s, min(s + block_size, num_paragraphs)) for s in range(0, num_paragraphs, block_size)]
    lo = process_index * len(blocks) // num_processes
    hi = (process_index + 1) * len(blocks) // num_processes
    return blocks[lo:hi]


def parts_settings(args: dict, train_file_digest: str) -> dict:
    """What decides the contents of the block files: the input's content hash and :data:`OUTPUT_ARGS` (local
    paths made absolute, so that a rerun from another directory still matches)."""
    settings = {"format": 1, "train_file_blake2b": train_file_digest}
    for name in OUTPUT_ARGS:
        value = args[name]
        if name in ("glove_path", "mlm_name_or_path") and value is not None and os.path.exists(value):
            value = os.path.abspath(value)
        settings[name] = value
    return settings


def settings_change(old: dict | None, new: dict) -> str | None:
    """None when the ``old`` settings of a parts dir (None: it has none) are ``new``, else what differs."""
    if old is None:
        return "it records no settings"
    changed = ["the content of --train_file" if k == "train_file_blake2b" else
               "the block format" if k == "format" else f"--{k} {old.get(k)!r} -> {v!r}"
               for k, v in new.items() if old.get(k, ...) != v]
    return f"other settings: {', '.join(changed)}" if changed else None


def open_parts_dir(parts_dir: str, settings: dict) -> str | None:
    """Make ``parts_dir`` ready for a run with ``settings``. The block files of an earlier run with the same
    settings are kept (a resume; temp files of a block being written when it was killed are removed); anything
    else there is discarded and the settings are written first. Returns why earlier parts were discarded
    (None when nothing was)."""
    path = os.path.join(parts_dir, PARTS_SETTINGS)
    reason = None
    if os.path.isdir(parts_dir):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        reason = settings_change(old if isinstance(old, dict) else None, settings)
        if reason is None:
            for name in os.listdir(parts_dir):
                if ".tmp-" in name:
                    os.remove(os.path.join(parts_dir, name))
            return None
        shutil.rmtree(parts_dir)
    os.makedirs(parts_dir)
    write_json_atomic(path, settings)
    return reason


def block_path(parts_dir: str, index: int) -> str:
    """The file of block ``index`` (global, see :func:`blocks_of_process`)."""
    return os.path.join(parts_dir, f"block-{index:08d}.jsonl")


def finished_blocks(parts_dir: str) -> set[int]:
    """Indices of the blocks whose file is in ``parts_dir``. Only :func:`write_block` makes such a name, by renaming
    a whole file: the temp file of a block cut off mid-write never counts."""
    return {int(m.group(1)) for m in map(BLOCK_FILE_RE.fullmatch, os.listdir(parts_dir)) if m}


def write_block(path: str, lines: Sequence[str], counts: dict) -> None:
    """A block file: its counts (one JSON line, for the final summary), then its :func:`shard_line` lines. Written
    to a temp file beside ``path``, fsynced, then renamed: a block file that exists is whole."""
    write_text_atomic(path, json.dumps(counts) + "\n" + "".join(lines))


def block_counts(path: str) -> dict:
    """The counts a block file holds on its first line."""
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def shard_line(article_index: int, paragraph: dict) -> str:
    """One output paragraph as a line of a block file: ``article index <TAB> paragraph JSON``."""
    return f"{article_index}\t{json.dumps(paragraph, ensure_ascii=False)}\n"


def _read_block_lines(paths: Sequence[str]) -> Iterator[tuple[int, str]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            f.readline()  # the block's counts
            for line in f:
                article, paragraph = line.rstrip("\n").split("\t", 1)
                yield int(article), paragraph


def merge_blocks(block_paths: Sequence[str], output_file: str, version, titles: Sequence[str]) -> None:
    """Write nested SQuAD JSON from block files (in paragraph order), whole or not at all.

    Streams: paragraphs are copied as text, never all held in memory. Written to a temp file beside
    ``output_file``, fsynced, then renamed over it.
    """
    tmp = f"{output_file}.tmp-{os.getpid()}"
    lines = _read_block_lines(block_paths)
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
                raise RuntimeError(f"bug: block line for article {current[0]} out of order.")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

"""Prediction-layer targets across tokenizers: a teacher's start/end distributions, computed on its own windows
and tokens, carried onto a student's windows and tokens through character offsets of the shared text.

Extractive QA predicts character spans of one context, so any two tokenizers can be aligned there:
- a teacher token's start probability goes to the student token holding its first character, its end probability
  to the student token holding its last character (a character in a gap between student tokens: the next student
  token for starts, the previous one for ends); question tokens map the same way inside the question;
- the no-answer position (CLS) goes to the student's; the k-th other special token to the student's k-th (dropped
  when the student has fewer); padding and whatever falls outside the student window is dropped; what is left is
  renormalised over the student window;
- overlapping teacher windows: a student window takes its targets from the teacher window sharing the most context
  characters with it (its primary window, which also gives the no-answer mass); context tokens that window lacks
  come from the other teacher windows, each from the one where it has most context (as BERT's max-context rule).

Same tokenizer, same windows: every token maps to itself and the targets are the teacher's own distributions
(tests/test_cross_tokenizer.py checks the loss to 1e-6). The result is returned as *equivalent logits*
``T * log p`` (a large negative number where p = 0), so that kd.losses.soft_target_loss at temperature T gives back
p and the training loop does not change. Memory: one [student windows, student length] array per side, like the
teacher's logits themselves; no [teacher x student] map is ever built.

A window's alignment (from kd.features.prepare_alignment_features) is, per token: ``segment`` (0 question,
1 context, -1 special, -2 padding), ``char_start`` / ``char_end`` (offsets into that segment's text), plus the
window's ``example_index`` and ``cls_index``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

QUESTION, CONTEXT, SPECIAL, PAD = 0, 1, -1, -2
ZERO_MASS_LOGIT = -1e9  # stands for log 0; finite, so that 0 * log 0 stays 0 in the loss


def softmax(logits: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """[L] logits -> [L] probabilities at ``temperature`` over the ``valid`` positions (0 elsewhere)."""
    z = np.where(valid, logits.astype(np.float64) / temperature, -np.inf)
    z = np.exp(z - z.max())
    return z / z.sum()


def _lookup(starts: np.ndarray, ends: np.ndarray, chars: np.ndarray, for_starts: bool) -> np.ndarray:
    """Index into one segment's student tokens (``starts``/``ends`` [n], in order) of the token holding each of
    ``chars`` [m]; in a gap, the next token (starts) or the previous one (ends); -1 outside the tokens' range."""
    if len(starts) == 0:
        return np.full(len(chars), -1)
    j = np.searchsorted(starts, chars, side="right") - 1  # the last token starting at or before the character
    inside = (j >= 0) & (chars < ends[np.clip(j, 0, None)])
    if for_starts:  # pieces of one character share its span: a start goes to the first of them
        first = np.searchsorted(starts, starts[np.clip(j, 0, None)], side="left")
        out = np.where(inside, first, j + 1)
    else:
        out = j
    in_range = (chars >= starts[0]) & (chars < ends[-1])
    return np.where(in_range & (out >= 0) & (out < len(starts)), out, -1)


def position_map(teacher: dict, student: dict, for_starts: bool) -> np.ndarray:
    """[Lt] student position for each teacher position of one window pair (-1: dropped).

    teacher, student: one window's alignment each (``segment``, ``char_start``, ``char_end`` [L], ``cls_index``).
    """
    seg_t, seg_s = teacher["segment"], student["segment"]
    out = np.full(len(seg_t), -1)
    for segment in (QUESTION, CONTEXT):
        t_pos, s_pos = np.flatnonzero(seg_t == segment), np.flatnonzero(seg_s == segment)
        if not len(t_pos) or not len(s_pos):
            continue
        first, last = teacher["char_start"][t_pos], np.maximum(teacher["char_end"][t_pos] - 1,
                                                               teacher["char_start"][t_pos])
        found = _lookup(student["char_start"][s_pos], student["char_end"][s_pos],
                        first if for_starts else last, for_starts)
        out[t_pos] = np.where(found >= 0, s_pos[np.clip(found, 0, None)], -1)
    t_special = [p for p in np.flatnonzero(seg_t == SPECIAL) if p != teacher["cls_index"]]
    s_special = [p for p in np.flatnonzero(seg_s == SPECIAL) if p != student["cls_index"]]
    for k, p in enumerate(t_special[:len(s_special)]):
        out[p] = s_special[k]
    out[teacher["cls_index"]] = student["cls_index"]
    return out


def _context_range(window: dict) -> tuple[int, int]:
    """[first, last) context characters a window holds ((0, 0) when it holds none)."""
    ctx = window["segment"] == CONTEXT
    return (int(window["char_start"][ctx].min()), int(window["char_end"][ctx].max())) if ctx.any() else (0, 0)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def _max_context_sources(windows: list[dict], candidates: list[int]) -> dict[int, tuple[int, int]]:
    """For each context token (keyed by its first character) of the ``candidates`` windows: (window, position)
    of the window where it has most context (min of tokens to its left and right, then the longer window)."""
    best: dict[int, tuple[float, int, int]] = {}
    for w in candidates:
        pos = np.flatnonzero(windows[w]["segment"] == CONTEXT)
        n = len(pos)
        for k, p in enumerate(pos):
            score = min(k, n - 1 - k) + 0.01 * n
            key = int(windows[w]["char_start"][p])
            if key not in best or score > best[key][0]:
                best[key] = (score, w, int(p))
    return {key: (w, p) for key, (_, w, p) in best.items()}


def window(alignment: dict, i: int) -> dict:
    """Window ``i`` of an alignment table (arrays [N, L] and [N]) as one window's dict."""
    return {k: v[i] for k, v in alignment.items()}


def project_targets(teacher_logits: np.ndarray, teacher_alignment: dict, student_alignment: dict,
                    temperature: float, for_starts: bool) -> np.ndarray:
    """The teacher's start (or end) distributions at ``temperature`` carried onto the student's windows.

    teacher_logits: [Nt, Lt]; teacher_alignment / student_alignment: alignment tables ([Nt, Lt] / [Ns, Ls] token
    columns, [N] ``example_index`` and ``cls_index``). Returns [Ns, Ls] equivalent logits ``T * log p``, float32
    (float64 for float64 teacher logits, so that exactness can be checked beyond float32 rounding).
    """
    by_example = defaultdict(list)
    for i, e in enumerate(teacher_alignment["example_index"]):
        by_example[int(e)].append(i)
    n_s, l_s = student_alignment["segment"].shape
    out = np.full((n_s, l_s), ZERO_MASS_LOGIT, dtype=np.result_type(teacher_logits.dtype, np.float32))
    probs: dict[int, np.ndarray] = {}  # teacher window -> its distribution (each computed once)

    def dist(i: int) -> np.ndarray:
        if i not in probs:
            probs[i] = softmax(teacher_logits[i], teacher_alignment["segment"][i] != PAD, temperature)
        return probs[i]

    for s in range(n_s):
        student = window(student_alignment, s)
        ids = by_example.get(int(student["example_index"]), [])
        if not ids:
            raise ValueError(f"student window {s}: no teacher window of example {student['example_index']}")
        windows = [window(teacher_alignment, i) for i in ids]
        s_range = _context_range(student)
        ranges = [_context_range(w) for w in windows]
        primary = max(range(len(ids)), key=lambda k: (_overlap(s_range, ranges[k]), -k))
        target = np.zeros(l_s)
        where = position_map(windows[primary], student, for_starts)
        keep = where >= 0
        np.add.at(target, where[keep], dist(ids[primary])[keep])
        lo, hi = ranges[primary]
        others = [k for k in range(len(ids)) if k != primary and _overlap(s_range, ranges[k])]
        for key, (k, p) in _max_context_sources(windows, others).items():
            if (lo <= key < hi) or not (s_range[0] <= key < s_range[1]):
                continue  # the primary window has it, or the student window does not
            where = position_map({**windows[k], "segment": _only(windows[k]["segment"], p)}, student, for_starts)
            if where[p] >= 0:
                target[where[p]] += dist(ids[k])[p]
        valid = student["segment"] != PAD
        target = np.where(valid, target, 0.0)
        total = target.sum()
        if total > 0:
            target /= total
        out[s] = np.where(target > 0, temperature * np.log(np.maximum(target, 1e-300)), ZERO_MASS_LOGIT)
    return out


def _only(segment: np.ndarray, position: int) -> np.ndarray:
    """A segment row with every position but ``position`` turned into padding (so only it is mapped)."""
    out = np.full_like(segment, PAD)
    out[position] = segment[position]
    return out


ALIGNMENT_RULE = ("character offsets (kd.cross_tokenizer): starts to the student token holding the teacher token's "
                  "first character, ends its last; no-answer to no-answer; the student window's primary teacher "
                  "window shares most context with it, other context from the window where it has most context; "
                  "mass outside the student window dropped, the rest renormalised")


def cross_tokenizer_targets(teacher_start: np.ndarray, teacher_end: np.ndarray, examples, teacher_tokenizer,
                            teacher_window: dict, student_tokenizer, student_window: dict,
                            temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's start/end logits [Nt, Lt] on its own windows -> equivalent logits [Ns, Ls] on the student's
    (windows: kd.features.prepare_train_features settings of each, the same examples in the same order)."""
    from kd.features import prepare_alignment_features

    teacher = prepare_alignment_features(examples, teacher_tokenizer, **teacher_window)
    student = prepare_alignment_features(examples, student_tokenizer, **student_window)
    if teacher["segment"].shape != teacher_start.shape:
        raise ValueError(f"teacher logits {teacher_start.shape} do not match its windows {teacher['segment'].shape}")
    return (project_targets(teacher_start, teacher, student, temperature, for_starts=True),
            project_targets(teacher_end, teacher, student, temperature, for_starts=False))

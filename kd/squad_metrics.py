"""SQuAD 2.0 evaluation, reimplemented to give the same numbers as the official script.

The official script is ``evaluate-v2.0.py`` from https://rajpurkar.github.io/SQuAD-explorer/.
:func:`squad_evaluate` returns the dictionary that script prints (same keys, same order, values in
percent), computed the same way: answer normalization, max over gold answers, "" as the only gold
answer of an unanswerable question, the ``na_prob_thresh`` rule and the best-threshold search.

One deliberate difference: a question without a prediction. The official v2.0 script prints
``Missing prediction for <id>`` and then crashes with a ``KeyError`` while computing the
HasAns/NoAns breakdown, so it never reports numbers in that case. Here such a question scores 0 on
both metrics and stays in every ``total`` (the rule of the official SQuAD 1.1 script), and a
warning names the missing ids. With a prediction for every question the numbers are the official
ones exactly.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Iterable, Mapping

logger = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The order of the steps matters (punctuation goes before articles are matched, so "the-end"
    keeps no article), and matches the official script.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _answer_tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalized answer; the empty answer has no tokens."""
    if not text:
        return []
    return normalize_answer(text).split()


def compute_exact(gold: str, pred: str) -> int:
    """1 if the normalized strings are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    """Token-overlap F1 between normalized answers.

    When either side is empty (a no-answer) F1 is 1 if both are empty and 0 otherwise.
    """
    gold_tokens = _answer_tokens(gold)
    pred_tokens = _answer_tokens(pred)
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    overlap = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_answers(examples: Iterable[Mapping]) -> dict[str, list[str]]:
    """Map question id -> its gold answer texts, in dataset order ([] for unanswerable).

    Accepts flat records (``{"id", "answers": {"text": [...]}}``) or a ``datasets.Dataset``.
    """
    if hasattr(examples, "select_columns"):
        # A datasets.Dataset: avoid decoding contexts and questions we never look at.
        examples = examples.select_columns(["id", "answers"])
    gold: dict[str, list[str]] = {}
    for record in examples:
        qid = record["id"]
        if qid in gold:
            raise ValueError(f"Duplicate question id {qid!r} in the evaluation examples.")
        gold[qid] = list(record["answers"]["text"])
    if not gold:
        raise ValueError("No questions to evaluate: the evaluation examples are empty.")
    return gold


def _check_predictions(predictions: Mapping, na_probs: Mapping | None, scored_ids: list[str]) -> None:
    """Fail early on inputs the official script would crash on halfway through."""
    bad = [qid for qid in scored_ids if not isinstance(predictions[qid], str)]
    if bad:
        raise ValueError(
            f"Predictions must be strings (\"\" for no answer); {len(bad)} are not, "
            f"e.g. {bad[0]!r}: {predictions[bad[0]]!r}."
        )
    if na_probs is not None:
        lacking = [qid for qid in scored_ids if qid not in na_probs]
        if lacking:
            raise ValueError(
                f"The no-answer probabilities lack {len(lacking)} predicted question(s), "
                f"e.g. {lacking[:3]}; give a value for every predicted question."
            )


def _raw_scores(gold: dict[str, list[str]], predictions: Mapping) -> tuple[dict, dict]:
    """Exact and F1 per predicted question, max over gold answers (official ``get_raw_scores``).

    Gold answers that normalize to nothing are dropped; an unanswerable question has gold [""].
    """
    exact, f1 = {}, {}
    for qid, answers in gold.items():
        if qid not in predictions:
            continue
        golds = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions[qid]
        exact[qid] = max(compute_exact(a, pred) for a in golds)
        f1[qid] = max(compute_f1(a, pred) for a in golds)
    return exact, f1


def _apply_no_answer_threshold(scores: dict, na_probs: Mapping, has_answer: dict, threshold: float) -> dict:
    """Where the no-answer probability exceeds ``threshold``, score the question as predicted ""."""
    return {
        qid: float(not has_answer[qid]) if na_probs[qid] > threshold else score
        for qid, score in scores.items()
    }


def _summary(exact: dict, f1: dict, qids: list[str]) -> dict:
    """exact / f1 in percent and the count over ``qids``; unscored (missing) questions count 0."""
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact.get(q, 0) for q in qids) / total,
        "f1": 100.0 * sum(f1.get(q, 0) for q in qids) / total,
        "total": total,
    }


def _best_threshold(
    predictions: Mapping, scores: dict, na_probs: Mapping, has_answer: dict, total: int
) -> tuple[float, float]:
    """Best score over all no-answer thresholds, and that threshold (official ``find_best_thresh``).

    Start from "every question predicted no-answer" and admit questions in increasing order of
    no-answer probability (a stable sort in ``na_probs`` order, as the official script does; ties
    are therefore resolved exactly as there). The score of an unanswerable question moves by -1
    when its prediction is a non-empty string, answerable ones move by their raw score.
    """
    score = sum(1 for qid in scores if not has_answer[qid])
    best_score, best_thresh = score, 0.0
    for qid, prob in sorted(na_probs.items(), key=lambda item: item[1]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            score += scores[qid]
        elif predictions[qid]:
            score -= 1
        if score > best_score:
            best_score, best_thresh = score, prob
    return 100.0 * best_score / total, best_thresh


def squad_evaluate(
    examples: Iterable[Mapping],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """Score predictions like the official SQuAD 2.0 script.

    Args:
        examples: flat records with ``id`` and ``answers["text"]`` (or a ``datasets.Dataset``).
        predictions: question id -> predicted answer text ("" = no answer). Ids not in
            ``examples`` are ignored.
        na_probs: question id -> a no-answer score (probability or null-odds; only the order and
            ``na_prob_thresh`` matter). When given, ``best_*`` keys are added.
        na_prob_thresh: predictions whose na_prob exceeds this count as "" (official default 1.0).

    Returns:
        dict with ``exact``, ``f1``, ``total``, then ``HasAns_*`` / ``NoAns_*`` when such questions
        exist, then ``best_exact``, ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` when
        ``na_probs`` is given. Scores are percentages.
    """
    gold = _gold_answers(examples)
    has_answer = {qid: bool(answers) for qid, answers in gold.items()}
    scored_ids = [qid for qid in gold if qid in predictions]
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        logger.warning(
            "Missing prediction for %d of %d questions (e.g. %s); they score 0.",
            len(missing), len(gold), ", ".join(missing[:5]),
        )
    _check_predictions(predictions, na_probs, scored_ids)

    exact_raw, f1_raw = _raw_scores(gold, predictions)
    probs = na_probs if na_probs is not None else {qid: 0.0 for qid in scored_ids}
    exact = _apply_no_answer_threshold(exact_raw, probs, has_answer, na_prob_thresh)
    f1 = _apply_no_answer_threshold(f1_raw, probs, has_answer, na_prob_thresh)

    all_ids = list(gold)
    result = _summary(exact, f1, all_ids)
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        subset = [qid for qid in all_ids if has_answer[qid] == wanted]
        if subset:
            result.update({f"{prefix}_{k}": v for k, v in _summary(exact, f1, subset).items()})
    if na_probs is not None:
        best_exact, exact_thresh = _best_threshold(predictions, exact_raw, na_probs, has_answer, len(gold))
        best_f1, f1_thresh = _best_threshold(predictions, f1_raw, na_probs, has_answer, len(gold))
        result.update(
            best_exact=best_exact, best_exact_thresh=exact_thresh, best_f1=best_f1, best_f1_thresh=f1_thresh
        )
    return result

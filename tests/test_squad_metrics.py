"""kd.squad_metrics against hand-computed SQuAD 2.0 scores.

The expected numbers follow the official evaluate-v2.0.py rules; the module docstring of
kd/squad_metrics.py describes the one documented difference (missing predictions).
"""

import logging

import datasets
import pytest

from kd.squad_metrics import compute_exact, compute_f1, normalize_answer, squad_evaluate

OFFICIAL_KEYS = [
    "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1", "NoAns_total",
]
BEST_KEYS = ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


def record(qid, answers):
    return {"id": qid, "answers": {"text": list(answers), "answer_start": [0] * len(answers)}}


# q1/q2 answerable, q3/q4 unanswerable.
EXAMPLES = [
    record("q1", ["Denmark, Iceland and Norway", "Denmark", "Norway"]),
    record("q2", ["10th century"]),
    record("q3", []),
    record("q4", []),
]
# q1: exact via the 2nd gold answer (case/punctuation differ) -> EM 1, F1 1
# q2: "in the 10th century" vs "10th century": EM 0, F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8
# q3: "" for a no-answer question -> 1, 1;  q4: an answer for a no-answer question -> 0, 0
PREDICTIONS = {"q1": "denmark.", "q2": "in the 10th century", "q3": "", "q4": "France"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Quick, brown FOX!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("theater Anthem", "theater anthem"),  # articles only as whole words
        ("A-team", "ateam"),  # punctuation goes first, so "a" is no longer a separate word
        ("  \t\n ", ""),
        ("Élan's", "élans"),  # only ASCII punctuation is removed; non-ASCII letters stay
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_compute_exact_ignores_case_punctuation_articles_and_spacing():
    assert compute_exact("Normans", "the  normans.") == 1
    assert compute_exact("Normans", "Norman") == 0
    assert compute_exact("", "the") == 1  # both normalize to empty


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        ("the cat sat on the mat", "cat on a mat today", 0.75),  # 3 shared of 4 and 4 tokens
        ("new york city", "York", 0.5),  # P = 1, R = 1/3
        ("red red blue", "red red red", 2 / 3),  # shared counts are clipped per token
        ("Normans", "Vikings", 0.0),
        ("", "", 1.0),  # both no-answer
        ("", "something", 0.0),
        ("the", "", 1.0),  # the gold normalizes to empty, i.e. no-answer
    ],
)
def test_compute_f1(gold, pred, expected):
    assert compute_f1(gold, pred) == pytest.approx(expected, abs=1e-12)


def test_squad_evaluate_hand_computed_without_na_probs():
    result = squad_evaluate(EXAMPLES, PREDICTIONS)
    assert list(result) == OFFICIAL_KEYS  # official order, no best_* without na_probs
    assert result["exact"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert result["total"] == 4
    assert result["HasAns_exact"] == pytest.approx(50.0)
    assert result["HasAns_f1"] == pytest.approx(90.0)
    assert result["HasAns_total"] == 2
    assert result["NoAns_exact"] == pytest.approx(50.0)
    assert result["NoAns_f1"] == pytest.approx(50.0)
    assert result["NoAns_total"] == 2


def test_datasets_input_gives_the_same_result():
    dataset = datasets.Dataset.from_list(
        [{**r, "context": "c", "question": "q", "title": "t"} for r in EXAMPLES]
    )
    assert squad_evaluate(dataset, PREDICTIONS) == squad_evaluate(EXAMPLES, PREDICTIONS)


def test_multiple_gold_answers_take_the_max():
    examples = [record("q", ["Denmark, Iceland and Norway", "Iceland"])]
    # Gold 1 normalizes to 4 tokens: denmark iceland and norway.
    # vs gold 1: P = 1, R = 1/4 -> 0.4; vs gold 2: exact match -> 1
    assert squad_evaluate(examples, {"q": "iceland"})["f1"] == pytest.approx(100.0)
    # vs gold 1: P = 1, R = 3/4 -> 6/7; vs gold 2: P = 1/3, R = 1 -> 1/2
    assert squad_evaluate(examples, {"q": "Denmark, Iceland and"})["f1"] == pytest.approx(100 * 6 / 7)


def test_gold_answers_that_normalize_to_empty_are_dropped():
    # A question with only "the" as gold answer still counts as HasAns (it has answers) but its
    # only gold is "", as in the official script.
    examples = [record("q1", ["the", "Paris"]), record("q2", ["the"])]
    result = squad_evaluate(examples, {"q1": "Paris", "q2": ""})
    assert result["exact"] == pytest.approx(100.0)
    assert result["HasAns_total"] == 2 and "NoAns_total" not in result


def test_na_prob_thresh_blanks_predictions_above_it():
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.8}
    # Default threshold 1.0: no probability exceeds it, nothing changes.
    assert squad_evaluate(EXAMPLES, PREDICTIONS, na_probs)["exact"] == pytest.approx(50.0)
    # Threshold 0.5: q2 (answerable) now counts as "", scoring 0; q3 and q4 count as "", scoring 1.
    result = squad_evaluate(EXAMPLES, PREDICTIONS, na_probs, na_prob_thresh=0.5)
    assert result["exact"] == pytest.approx(75.0)
    assert result["f1"] == pytest.approx(75.0)
    assert result["HasAns_f1"] == pytest.approx(50.0)
    assert result["NoAns_exact"] == pytest.approx(100.0)


def test_best_thresholds_hand_computed():
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.8}
    result = squad_evaluate(EXAMPLES, PREDICTIONS, na_probs)
    assert list(result) == OFFICIAL_KEYS + BEST_KEYS
    # Start with all predicted "": 2 correct (the no-answer questions). Admit in order of na_prob:
    # EM:  q1 +1 -> 3 (best, thresh 0.1), q2 +0, q4 -1 (non-empty answer), q3 +0.
    assert result["best_exact"] == pytest.approx(75.0)
    assert result["best_exact_thresh"] == pytest.approx(0.1)
    # F1:  q1 +1 -> 3, q2 +0.8 -> 3.8 (best, thresh 0.6), q4 -1, q3 +0.
    assert result["best_f1"] == pytest.approx(95.0)
    assert result["best_f1_thresh"] == pytest.approx(0.6)


def test_best_threshold_is_zero_when_predicting_all_empty_is_best():
    # Only wrong answers: admitting any question lowers the score.
    examples = [record("a", ["x"]), record("b", [])]
    result = squad_evaluate(examples, {"a": "y", "b": "z"}, {"a": 0.3, "b": 0.7})
    assert result["best_exact"] == pytest.approx(50.0)
    assert result["best_exact_thresh"] == 0.0


def test_best_threshold_ties_follow_na_prob_order_like_the_official_script():
    # Equal na_probs: the official script walks them in the na_prob file's order, so the order
    # decides whether the +1 is counted before the -1.
    examples = [record("a", ["x"]), record("b", [])]
    predictions = {"a": "x", "b": "wrong"}
    first = squad_evaluate(examples, predictions, {"a": 0.5, "b": 0.5})
    second = squad_evaluate(examples, predictions, {"b": 0.5, "a": 0.5})
    assert first["best_exact"] == pytest.approx(100.0) and first["best_exact_thresh"] == 0.5
    assert second["best_exact"] == pytest.approx(50.0) and second["best_exact_thresh"] == 0.0


def test_missing_predictions_score_zero_and_stay_in_totals(caplog):
    predictions = {k: v for k, v in PREDICTIONS.items() if k != "q3"}  # q3 would have scored 1
    with caplog.at_level(logging.WARNING, logger="kd.squad_metrics"):
        result = squad_evaluate(EXAMPLES, predictions)
    assert "Missing prediction for 1 of 4 questions" in caplog.text and "q3" in caplog.text
    assert result["total"] == 4 and result["NoAns_total"] == 2
    assert result["exact"] == pytest.approx(25.0)
    assert result["NoAns_exact"] == pytest.approx(0.0)
    assert result["HasAns_exact"] == pytest.approx(50.0)


def test_predictions_for_unknown_ids_are_ignored():
    assert squad_evaluate(EXAMPLES, {**PREDICTIONS, "zzz": "x"}) == squad_evaluate(EXAMPLES, PREDICTIONS)


def test_breakdown_keys_only_when_applicable():
    only_answerable = squad_evaluate(EXAMPLES[:2], PREDICTIONS)
    assert list(only_answerable) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"]
    only_unanswerable = squad_evaluate(EXAMPLES[2:], PREDICTIONS)
    assert list(only_unanswerable) == ["exact", "f1", "total", "NoAns_exact", "NoAns_f1", "NoAns_total"]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="lack 1 predicted question"):
        squad_evaluate(EXAMPLES, PREDICTIONS, {"q1": 0.0, "q2": 0.0, "q3": 0.0})
    with pytest.raises(ValueError, match="must be strings"):
        squad_evaluate(EXAMPLES, {**PREDICTIONS, "q1": None})
    with pytest.raises(ValueError, match="Duplicate question id"):
        squad_evaluate(EXAMPLES + EXAMPLES[:1], PREDICTIONS)
    with pytest.raises(ValueError, match="empty"):
        squad_evaluate([], PREDICTIONS)

"""Checks that a student and a teacher can be distilled together."""

from __future__ import annotations

import numpy as np


class TokenizerMismatchError(ValueError):
    pass


def tokenization_difference(student_tok, teacher_tok, examples, student_window: dict, teacher_window: dict,
                            sample_size: int = 64) -> str | None:
    """How the teacher's windows differ from the student's (None: identical token ids in identical windows).

    The vocabularies are compared whole, then the features of the first ``sample_size`` examples.
    student_window / teacher_window: kd.features.prepare_train_features settings of each.
    """
    from kd.features import prepare_train_features

    if student_tok.get_vocab() != teacher_tok.get_vocab():
        return f"vocabularies differ ({len(student_tok)} vs {len(teacher_tok)} entries)"
    sample = examples.select(range(min(sample_size, len(examples))))
    ours = prepare_train_features(sample, student_tok, **student_window)
    theirs = prepare_train_features(sample, teacher_tok, **teacher_window)
    if len(ours) != len(theirs):
        return f"{len(ours)} vs {len(theirs)} windows on the first {len(sample)} questions"
    for column in ("input_ids", "attention_mask", "token_type_ids"):
        if (column in ours.column_names) != (column in theirs.column_names):
            return f"only one of them produces {column}"
        if column in ours.column_names and not np.array_equal(np.asarray(ours[column]), np.asarray(theirs[column])):
            return f"{column} differ on the first {len(sample)} questions"
    return None


def assert_same_tokenization(student_name: str, student_tok, teacher_name: str, teacher_tok, examples,
                             window: dict, sample_size: int = 64) -> None:
    """Raise TokenizerMismatchError unless both tokenizers give identical features in the same ``window``.

    Intermediate-layer distillation compares hidden states and attention position by position, so the two
    models must see the same token ids in the same windows.
    """
    why = tokenization_difference(student_tok, teacher_tok, examples, window, window, sample_size)
    if why is not None:
        raise TokenizerMismatchError(
            f"The student tokenizer ({student_name}) and the teacher tokenizer ({teacher_name}) differ: {why}. "
            "Intermediate-layer distillation needs identical features; build the student from the teacher's "
            "tokenizer (e.g. save the teacher's tokenizer into the student dir). Prediction-layer distillation "
            "(train_prediction.py) takes any teacher.")

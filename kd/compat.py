"""Checks that a student and a teacher can be distilled together."""

from __future__ import annotations

import numpy as np


class TokenizerMismatchError(ValueError):
    pass


def assert_same_tokenization(student_name: str, student_tok, teacher_name: str, teacher_tok, examples,
                             featurize, sample_size: int = 64) -> None:
    """Raise TokenizerMismatchError unless both tokenizers give identical features.

    Distillation compares outputs position by position, so the two models must see the same token ids in the
    same windows. The vocabularies are compared whole, then the features of the first ``sample_size``
    examples. featurize: ``(examples, tokenizer) -> datasets.Dataset`` of features (the script's own settings).
    """
    def fail(why: str):
        raise TokenizerMismatchError(
            f"The student tokenizer ({student_name}) and the teacher tokenizer ({teacher_name}) differ: {why}. "
            "Distillation needs identical features; build the student from the teacher's tokenizer "
            "(e.g. save the teacher's tokenizer into the student dir).")

    if student_tok.get_vocab() != teacher_tok.get_vocab():
        fail(f"vocabularies differ ({len(student_tok)} vs {len(teacher_tok)} entries)")
    sample = examples.select(range(min(sample_size, len(examples))))
    ours, theirs = featurize(sample, student_tok), featurize(sample, teacher_tok)
    if len(ours) != len(theirs):
        fail(f"{len(ours)} vs {len(theirs)} windows on the first {len(sample)} questions")
    for column in ("input_ids", "attention_mask", "token_type_ids"):
        if (column in ours.column_names) != (column in theirs.column_names):
            fail(f"only one of them produces {column}")
        if column in ours.column_names and not np.array_equal(np.asarray(ours[column]), np.asarray(theirs[column])):
            fail(f"{column} differ on the first {len(sample)} questions")

"""Teacher distributions carried onto a student's tokens through character offsets (kd.cross_tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.cross_tokenizer import CONTEXT, PAD, ZERO_MASS_LOGIT, position_map, project_targets, window
from kd.features import prepare_alignment_features, prepare_train_features
from kd.losses import soft_target_loss

WINDOW = dict(max_seq_length=96, doc_stride=32, max_query_length=24)


def features(examples, tokenizer, **window_args):
    window_args = {**WINDOW, **window_args}
    train = prepare_train_features(examples, tokenizer, **window_args)
    return train, prepare_alignment_features(examples, tokenizer, **window_args)


def random_logits(alignment, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, alignment["segment"].shape).astype(np.float32)
    return np.where(alignment["segment"] == PAD, -30.0, logits).astype(np.float32)


def test_alignment_windows_are_the_training_windows(squad_fixture_examples, tiny_roberta_tokenizer):
    train, align = features(squad_fixture_examples, tiny_roberta_tokenizer)
    assert align["segment"].shape == np.asarray(train["input_ids"]).shape
    assert np.array_equal(align["segment"] != PAD, np.asarray(train["attention_mask"]) == 1)
    assert (align["segment"][np.arange(len(align["cls_index"])), align["cls_index"]] == -1).all()  # CLS: special
    contexts = squad_fixture_examples["context"]
    i = int(np.flatnonzero(np.asarray(train["start_positions"]) > align["cls_index"])[0])  # an answer in window
    s, e = train["start_positions"][i], train["end_positions"][i]
    answer = squad_fixture_examples[int(align["example_index"][i])]["answers"]
    text = contexts[int(align["example_index"][i])][align["char_start"][i][s]:align["char_end"][i][e]]
    assert text.strip() == answer["text"][0].strip()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_same_tokenizer_gives_the_same_loss(squad_fixture_examples, tiny_bert_tokenizer, temperature):
    train, align = features(squad_fixture_examples, tiny_bert_tokenizer)
    assert len(set(align["example_index"])) < len(align["example_index"])  # overlapping windows are exercised
    mask = torch.as_tensor(np.asarray(train["attention_mask"]))
    # float64: the 1e-6 on the loss; float32 (the cache's dtype): 1e-6 relative, a few ulps of a loss ~10
    for dtype, relative in ((np.float64, False), (np.float32, True)):
        teacher = random_logits(align).astype(dtype)
        student = torch.as_tensor(random_logits(align, seed=1).astype(dtype))
        for for_starts in (True, False):
            projected = project_targets(teacher, align, align, temperature, for_starts)
            assert projected.dtype == dtype
            direct = soft_target_loss(student, torch.as_tensor(teacher), mask, temperature)
            carried = soft_target_loss(student, torch.as_tensor(projected), mask, temperature)
            assert abs(direct.item() - carried.item()) < 1e-6 * (abs(direct.item()) if relative else 1.0)


def test_a_teacher_certain_of_a_character_teaches_the_student_token_holding_it(
        squad_fixture_examples, tiny_bert_tokenizer, tiny_roberta_tokenizer):
    # a WordPiece teacher seeing each question in one window, a BPE student seeing it in several
    _, t_align = features(squad_fixture_examples, tiny_bert_tokenizer, max_seq_length=384, doc_stride=64)
    _, s_align = features(squad_fixture_examples, tiny_roberta_tokenizer, max_seq_length=64, doc_stride=16)
    examples, counts = np.unique(t_align["example_index"], return_counts=True)
    logits = np.full(t_align["segment"].shape, -50.0, dtype=np.float32)
    hot = {}  # example -> (first, last) character of the token its teacher is certain of
    for i in np.flatnonzero(np.isin(t_align["example_index"], examples[counts == 1]))[::3]:
        ctx = np.flatnonzero(t_align["segment"][i] == CONTEXT)
        p = int(ctx[len(ctx) // 2])
        logits[i, p] = 50.0
        hot[int(t_align["example_index"][i])] = (int(t_align["char_start"][i][p]), int(t_align["char_end"][i][p]) - 1)
    checked = 0
    for for_starts in (True, False):
        targets = project_targets(logits, t_align, s_align, 1.0, for_starts=for_starts)
        for s in np.flatnonzero(np.isin(s_align["example_index"], list(hot))):
            student = window(s_align, s)
            char = hot[int(student["example_index"])][0 if for_starts else 1]
            target = np.exp(targets[s]) / np.exp(targets[s]).sum()
            assert target[student["segment"] == PAD].sum() == 0
            holds = np.flatnonzero((student["segment"] == CONTEXT) & (student["char_start"] <= char)
                                   & (char < student["char_end"]))
            if len(holds):  # the student window has the character: all the mass on the token holding it
                assert target[holds[0]] > 0.99
                checked += 1
            else:  # it has not: the teacher's (tiny) rest, renormalised, is spread over what it has
                assert target.max() < 0.99
    assert checked >= 6


def test_position_map_drops_what_the_student_window_lacks():
    teacher = {"segment": np.array([-1, 0, -1, 1, 1, 1, -1, -2]), "char_start": np.array([0, 0, 0, 0, 4, 9, 0, 0]),
               "char_end": np.array([0, 3, 0, 3, 8, 12, 0, 0]), "cls_index": 0}
    student = {"segment": np.array([-1, 0, -1, -1, 1, 1, -1, -2]), "char_start": np.array([0, 0, 0, 0, 4, 6, 0, 0]),
               "char_end": np.array([0, 3, 0, 0, 6, 8, 0, 0]), "cls_index": 0}
    # CLS -> CLS; question token -> question token; first SEP -> first SEP; context "0-3" is before the student's
    # context (dropped); "4-8" starts in student token 4 and ends in token 5; "9-12" is past it (dropped); the
    # teacher's second SEP -> the student's second special; padding dropped
    assert position_map(teacher, student, for_starts=True).tolist() == [0, 1, 2, -1, 4, -1, 3, -1]
    assert position_map(teacher, student, for_starts=False).tolist() == [0, 1, 2, -1, 5, -1, 3, -1]


def test_context_the_primary_window_lacks_comes_from_the_other_teacher_windows(squad_fixture_examples,
                                                                               tiny_bert_tokenizer):
    # the teacher sees short windows, the student one long window per question: its targets reach beyond the
    # teacher window it shares most with
    _, t_align = features(squad_fixture_examples, tiny_bert_tokenizer, max_seq_length=48, doc_stride=16)
    _, s_align = features(squad_fixture_examples, tiny_bert_tokenizer, max_seq_length=256, doc_stride=64)
    teacher = random_logits(t_align)
    starts = project_targets(teacher, t_align, s_align, 2.0, for_starts=True)
    widest = max(range(len(s_align["segment"])), key=lambda s: (s_align["segment"][s] == CONTEXT).sum())
    example = s_align["example_index"][widest]
    longest_teacher = max((t_align["segment"][j] == CONTEXT).sum()
                          for j in np.flatnonzero(t_align["example_index"] == example))
    reached = ((starts[widest] > ZERO_MASS_LOGIT) & (s_align["segment"][widest] == CONTEXT)).sum()
    assert reached > longest_teacher

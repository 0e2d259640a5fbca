import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForQuestionAnswering

from kd.capture import capture_teacher
from kd.intermediate import IntermediateDistiller, TeacherDims
from kd.layer_map import parse_layer_map
from kd.losses import attention_score_loss, embedding_loss, hidden_state_loss, relation_loss

MASK = torch.tensor([[1, 1, 0]])  # one example, two real tokens, one padded


# --- attention-score loss ------------------------------------------------------------------------------------------
def scores_with_padding(fill):
    """[1, 1, 3, 3] scores whose real 2x2 block is [[1, 2], [3, 4]]; the padded row/column hold `fill`."""
    s = torch.full((1, 1, 3, 3), float(fill))
    s[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    return s


def test_attention_score_loss_hand_computed_over_real_pairs_only():
    teacher = torch.zeros(1, 1, 3, 3)
    # (1 + 4 + 9 + 16) / 4 real (query, key) pairs; counting the 5 padded pairs would give 30 / 9
    assert attention_score_loss(scores_with_padding(0.0), teacher, MASK).item() == pytest.approx(7.5)


@pytest.mark.parametrize("fill", [1e30, -1e30, float("-inf"), torch.finfo(torch.float32).min])
def test_attention_score_loss_ignores_padded_values_and_their_gradient(fill):
    student = scores_with_padding(fill).requires_grad_()
    teacher = scores_with_padding(fill) * 0  # -inf * 0 = nan: the teacher's padding is garbage too
    loss = attention_score_loss(student, teacher, MASK)
    loss.backward()
    assert loss.item() == pytest.approx(7.5)
    assert torch.isfinite(student.grad).all()
    assert student.grad[0, 0, 2].abs().sum() == 0 and student.grad[0, 0, :, 2].abs().sum() == 0
    # d/ds mean((s - 0)^2) = 2 s / 4 on the real block
    assert torch.allclose(student.grad[0, 0, :2, :2], torch.tensor([[0.5, 1.0], [1.5, 2.0]]))


def test_attention_score_loss_zero_when_identical_and_batch_padding_per_example():
    torch.manual_seed(0)
    s = torch.randn(2, 4, 5, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert attention_score_loss(s, s.clone(), mask).item() == 0.0
    t = s + 1.0
    t[1, :, 3:, :] = 1e6
    t[1, :, :, 3:] = 1e6
    # real pairs: 4 heads * (25 + 9); every real difference is exactly 1
    assert attention_score_loss(s, t, mask).item() == pytest.approx(1.0)


def test_attention_score_loss_with_different_head_counts_points_to_relation_loss():
    with pytest.raises(ValueError, match="relation loss"):
        attention_score_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3), MASK)


def test_attention_score_loss_rejects_a_mask_of_another_length():
    with pytest.raises(ValueError, match="same tokenizer"):
        attention_score_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 4))


# --- hidden-state and embedding losses -----------------------------------------------------------------------------
def hidden_with_padding(fill, width=2):
    h = torch.full((1, 3, width), float(fill))
    h[0, :2] = torch.arange(1.0, 2 * width + 1).view(2, width)
    return h


def test_hidden_state_loss_hand_computed_over_real_tokens():
    # real tokens [[1, 2], [3, 4]] vs 0: (1 + 4 + 9 + 16) / (2 tokens * 2 features); padding counted would be /6
    assert hidden_state_loss(hidden_with_padding(0), torch.zeros(1, 3, 2), MASK).item() == pytest.approx(7.5)


@pytest.mark.parametrize("fill", [1e30, float("inf"), float("nan")])
def test_hidden_state_loss_ignores_padded_values(fill):
    student = hidden_with_padding(fill).requires_grad_()
    loss = hidden_state_loss(student, hidden_with_padding(fill) * 0, MASK)
    loss.backward()
    assert loss.item() == pytest.approx(7.5)
    assert torch.isfinite(student.grad).all() and student.grad[0, 2].abs().sum() == 0


def test_hidden_state_loss_zero_when_identical():
    h = torch.randn(2, 4, 6)
    assert hidden_state_loss(h, h.clone(), torch.ones(2, 4)).item() == 0.0


def test_hidden_state_loss_projection_gets_gradient_and_maps_widths():
    torch.manual_seed(0)
    projection = torch.nn.Linear(2, 3)
    student, teacher = torch.randn(2, 3, 2), torch.randn(2, 3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = hidden_state_loss(student, teacher, mask, projection)
    loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    with torch.no_grad():
        expected = ((projection(student) - teacher) ** 2)[mask.bool()].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_state_loss_without_projection_on_different_widths_says_how_to_fix():
    with pytest.raises(ValueError, match=r"nn.Linear\(2, 3\)"):
        hidden_state_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, 3), MASK)


def test_embedding_loss_is_hidden_state_loss_on_layer_zero():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert embedding_loss(s, t, mask).item() == pytest.approx(hidden_state_loss(s, t, mask).item())


# --- MiniLMv2 relation loss ----------------------------------------------------------------------------------------
def reference_relation_loss(student_qkv, teacher_qkv, mask, num_relation_heads):
    """Loop-based MiniLMv2 loss: crop each example to its real tokens, then KL per relation head."""
    total = 0.0
    for s_x, t_x in zip(student_qkv, teacher_qkv):
        per_query = []
        for b in range(mask.shape[0]):
            n = int(mask[b].sum())
            for x_full, store in ((s_x, "s"), (t_x, "t")):
                x = x_full[b, :, :n].transpose(0, 1).reshape(n, -1)  # [n, width]
                d_r = x.shape[1] // num_relation_heads
                heads = x.view(n, num_relation_heads, d_r).transpose(0, 1)  # [R, n, d_r]
                rel = torch.log_softmax(heads @ heads.transpose(1, 2) / math.sqrt(d_r), -1)
                if store == "s":
                    log_s = rel
                else:
                    log_t = rel
            kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # [R, n]
            per_query.append(kl.flatten())
        total += torch.cat(per_query).mean().item()
    return total


def random_qkv(batch, heads, seq, d_head, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, d_head, generator=g) for _ in range(3))


def test_relation_loss_matches_reference_with_different_heads_and_widths():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    student = random_qkv(2, 2, 5, 6, seed=0)  # 2 heads, width 12
    teacher = random_qkv(2, 4, 5, 8, seed=1)  # 4 heads, width 32
    loss = relation_loss(student, teacher, mask, num_relation_heads=4)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(reference_relation_loss(student, teacher, mask, 4), rel=1e-5)


def test_relation_loss_does_not_depend_on_the_attention_head_split():
    mask = torch.tensor([[1, 1, 1, 0]])
    student = random_qkv(1, 2, 4, 6, seed=0)
    teacher = random_qkv(1, 4, 4, 8, seed=1)

    def resplit(x, heads):  # same [B, T, 12] projections seen as a different number of attention heads
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, heads, h * d // heads).transpose(1, 2)

    student3 = tuple(resplit(x, 3) for x in student)
    a = relation_loss(student, teacher, mask, num_relation_heads=2)
    b = relation_loss(student3, teacher, mask, num_relation_heads=2)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_relation_loss_zero_for_identical_qkv():
    qkv = random_qkv(2, 4, 5, 8, seed=0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert relation_loss(qkv, tuple(x.clone() for x in qkv), mask, 8).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fill", [1e30, float("inf"), float("nan")])
def test_relation_loss_ignores_padded_tokens(fill):
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    student = random_qkv(1, 2, 5, 6, seed=0)
    teacher = random_qkv(1, 4, 5, 8, seed=1)
    clean = relation_loss(student, teacher, mask, 2)

    def pad_with(x):
        x = x.clone()
        x[:, :, 3:] = fill
        return x

    dirty_student = tuple(pad_with(x).requires_grad_() for x in student)
    dirty = relation_loss(dirty_student, tuple(pad_with(x) for x in teacher), mask, 2)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    for x in dirty_student:
        assert torch.isfinite(x.grad).all() and x.grad[:, :, 3:].abs().sum() == 0


def test_relation_loss_rejects_relation_heads_that_do_not_divide_both_widths():
    student = random_qkv(1, 2, 3, 6, seed=0)  # width 12
    teacher = random_qkv(1, 4, 3, 8, seed=1)  # width 32
    with pytest.raises(ValueError, match=r"Valid choices: \[1, 2, 4\]"):
        relation_loss(student, teacher, MASK, num_relation_heads=8)


# --- IntermediateDistiller -----------------------------------------------------------------------------------------
def tiny_bert(hidden, layers, heads, seed):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2,  # large enough that attention scores are not all ~0
    )
    return BertForQuestionAnswering(config)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    return {
        "input_ids": torch.randint(1, 99, (2, 8), generator=g) * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(2, 8, dtype=torch.long),
        "start_positions": torch.tensor([1, 2]),  # not an encoder input: must be ignored
    }


def train(distiller, teacher, batch, steps, lr):
    optimizer = torch.optim.SGD(distiller.parameters(), lr=lr)  # built AFTER the distiller, projections included
    teacher_result = capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what)
    history = []
    for _ in range(steps):
        terms = distiller(batch, teacher_result)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in terms.items()})
    return history


def test_tinybert_distiller_trains_student_and_projections(batch):
    teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=0)
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    distiller = IntermediateDistiller(student, parse_layer_map("uniform", 2, 4), teacher.config)
    projection_before = distiller.hidden_projection.weight.detach().clone()
    student_before = student.bert.encoder.layer[0].attention.self.query.weight.detach().clone()

    history = train(distiller, teacher, batch, steps=6, lr=0.05)

    assert set(history[0]) == {"loss", "loss_att", "loss_hidden", "loss_emb"}
    assert history[0]["loss"] == pytest.approx(
        history[0]["loss_att"] + history[0]["loss_hidden"] + history[0]["loss_emb"], rel=1e-5)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["loss_att"] < history[0]["loss_att"]
    assert not torch.equal(distiller.hidden_projection.weight, projection_before)
    assert not torch.equal(student.bert.encoder.layer[0].attention.self.query.weight, student_before)
    keys = distiller.state_dict().keys()
    assert {"hidden_projection.weight", "embedding_projection.weight"} <= keys
    assert all(k.startswith(("student.", "hidden_projection.", "embedding_projection.")) for k in keys)
    assert not any("projection" in k for k in student.state_dict())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_minilm_relation_distiller_works_with_different_head_counts(batch):
    teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=0)
    student = tiny_bert(hidden=24, layers=2, heads=2, seed=1)
    distiller = IntermediateDistiller(student, parse_layer_map("last", 2, 4), teacher.config,
                                      loss_kind="minilm_relation")
    assert distiller.relation_heads == 4  # the teacher's head count; divides 24 and 32
    assert distiller.capture_what == {"qkv"}
    assert distiller.hidden_projection is None and distiller.embedding_projection is None

    history = train(distiller, teacher, batch, steps=6, lr=0.5)
    assert set(history[0]) == {"loss", "loss_rel"}
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_equal_widths_need_no_projection(batch):
    teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=0)
    student = tiny_bert(hidden=32, layers=2, heads=4, seed=1)
    distiller = IntermediateDistiller(student, parse_layer_map("uniform", 2, 4), teacher.config)
    assert distiller.hidden_projection is None and distiller.embedding_projection is None
    terms = distiller(batch, capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what))
    assert torch.isfinite(terms["loss"])


def test_score_loss_with_different_head_counts_is_refused_at_construction():
    student = tiny_bert(hidden=24, layers=2, heads=2, seed=1)
    with pytest.raises(ValueError, match="minilm_relation"):
        IntermediateDistiller(student, parse_layer_map("uniform", 2, 4), TeacherDims(32, 4, 4))


def test_weights_select_terms_and_capture(batch):
    teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=0)
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    distiller = IntermediateDistiller(student, parse_layer_map("last", 2, 4), teacher.config,
                                      weights={"attention": 0.0, "hidden": 2.0})
    assert distiller.capture_what == {"hidden"}
    assert distiller.embedding_projection is None  # "last" has no 0:0, so the preset drops the embedding term
    terms = distiller(batch, capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what))
    assert set(terms) == {"loss", "loss_hidden"}
    assert terms["loss"].item() == pytest.approx(2.0 * terms["loss_hidden"].item())


def test_embedding_weight_without_embedding_pair_is_an_error():
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    with pytest.raises(ValueError, match="needs the pair 0:0"):
        IntermediateDistiller(student, parse_layer_map("last", 2, 4), TeacherDims(32, 4, 4),
                              weights={"embedding": 1.0})


def test_layer_map_must_fit_the_models():
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        IntermediateDistiller(student, parse_layer_map("uniform", 2, 6), TeacherDims(32, 4, 4))


def test_unknown_weight_and_kind():
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    layer_map = parse_layer_map("uniform", 2, 4)
    with pytest.raises(ValueError, match="Unknown loss weight"):
        IntermediateDistiller(student, layer_map, TeacherDims(32, 4, 4), weights={"attn": 1.0})
    with pytest.raises(ValueError, match="loss_kind must be one of"):
        IntermediateDistiller(student, layer_map, TeacherDims(32, 4, 4), loss_kind="haystack")


def test_missing_teacher_layer_says_how_to_capture(batch):
    teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=0)
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    distiller = IntermediateDistiller(student, parse_layer_map("uniform", 2, 4), teacher.config)
    partial = capture_teacher(teacher, parse_layer_map("last", 2, 4), batch, distiller.capture_what)
    with pytest.raises(KeyError, match="capture_teacher"):
        distiller(batch, partial)


def test_distiller_works_with_activation_checkpointing(batch):
    teacher = tiny_bert(hidden=32, layers=4, heads=4, seed=0)
    student = tiny_bert(hidden=24, layers=2, heads=4, seed=1)
    student.gradient_checkpointing_enable()
    distiller = IntermediateDistiller(student, parse_layer_map("uniform", 2, 4), teacher.config,
                                      weights={"relation": 1.0}, relation_heads=4)
    distiller.train()
    history = train(distiller, teacher, batch, steps=2, lr=0.05)
    assert set(history[0]) == {"loss", "loss_att", "loss_hidden", "loss_emb", "loss_rel"}
    assert history[1]["loss"] < history[0]["loss"]

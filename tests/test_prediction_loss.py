"""Prediction-layer loss: the properties the issue asks for, on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import prediction_distillation_loss, soft_target_loss, span_ce_loss


def _batch(B=3, L=7, pad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, L - pad:] = 0
    return {
        "attention_mask": mask,
        "start_positions": torch.tensor([0, 2, 4])[:B],
        "end_positions": torch.tensor([0, 3, 4])[:B],
        "teacher_start_logits": torch.randn(B, L, generator=g),
        "teacher_end_logits": torch.randn(B, L, generator=g),
    }, torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)


@pytest.mark.parametrize("loss_type", ["kl_div", "mse"])
def test_zero_for_identical_logits(loss_type):
    batch, _, _ = _batch()
    t = batch["teacher_start_logits"]
    assert soft_target_loss(t, t.clone(), batch["attention_mask"], 3.0, loss_type).item() == pytest.approx(0, abs=1e-6)


def test_kl_matches_hand_computation_and_t2_scaling():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    for T in (1.0, 2.0, 4.0):
        p_t = torch.softmax(t / T, -1)
        expected = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum() * T**2
        assert soft_target_loss(s, t, None, T).item() == pytest.approx(expected.item(), rel=1e-5)
    # T^2 keeps the gradient magnitude comparable across temperatures (Hinton et al.): for large T the gradient
    # of the scaled loss tends to (s - t)/L with zero-mean logits, independent of T.
    s0, t0 = s - s.mean(), t - t.mean()
    grads = []
    for T in (100.0, 200.0):
        x = s0.clone().requires_grad_(True)
        soft_target_loss(x, t0, None, T).backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=5e-3)
    assert torch.allclose(grads[1], (s0 - t0) / 3, atol=5e-3)
    assert not torch.allclose(grads[1], (s0 - t0) / 3 / 200, atol=5e-3)  # without T^2 it would vanish


@pytest.mark.parametrize("loss_type", ["kl_div", "mse", "ce"])
def test_padding_logits_do_not_change_the_loss(loss_type):
    batch, s, _ = _batch()
    pad = batch["attention_mask"] == 0
    base = soft_target_loss(s, batch["teacher_start_logits"], batch["attention_mask"], 2.0, loss_type)
    s2, t2 = s.clone(), batch["teacher_start_logits"].clone()
    s2[pad] = 1e4
    t2[pad] = -1e4
    changed = soft_target_loss(s2, t2, batch["attention_mask"], 2.0, loss_type)
    assert changed.item() == pytest.approx(base.item(), rel=1e-6)
    # and the masked loss equals the loss computed on the real positions alone
    real = batch["attention_mask"][0].bool()
    alone = soft_target_loss(s[:, real], batch["teacher_start_logits"][:, real], None, 2.0, loss_type)
    assert base.item() == pytest.approx(alone.item(), rel=1e-5)


def test_w0_equals_gold_cross_entropy_and_needs_no_teacher():
    batch, s, e = _batch()
    del batch["teacher_start_logits"], batch["teacher_end_logits"]
    terms = prediction_distillation_loss(s, e, batch, distillation_loss_weight=0.0)
    assert "loss_kd" not in terms
    mask = batch["attention_mask"].bool()
    expected = (F.cross_entropy(s.masked_fill(~mask, -1e9), batch["start_positions"])
                + F.cross_entropy(e.masked_fill(~mask, -1e9), batch["end_positions"])) / 2
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_total_is_weighted_sum_of_logged_terms():
    batch, s, e = _batch()
    terms = prediction_distillation_loss(s, e, batch, temperature=2.0, distillation_loss_weight=0.3)
    assert terms["loss"].item() == pytest.approx(0.3 * terms["loss_kd"].item() + 0.7 * terms["loss_ce"].item(),
                                                 rel=1e-6)
    kd = (soft_target_loss(s, batch["teacher_start_logits"], batch["attention_mask"], 2.0)
          + soft_target_loss(e, batch["teacher_end_logits"], batch["attention_mask"], 2.0)) / 2
    assert terms["loss_kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    only_kd = prediction_distillation_loss(s, e, batch, temperature=2.0, distillation_loss_weight=1.0)
    assert "loss_ce" not in only_kd and only_kd["loss"].item() == pytest.approx(kd.item(), rel=1e-6)


def test_ce_option_differs_from_kl_by_teacher_entropy():
    batch, s, _ = _batch()
    t, m = batch["teacher_start_logits"], batch["attention_mask"]
    p = torch.softmax(t[:, :5], -1)
    entropy = -(p * p.log()).sum(-1).mean()
    diff = soft_target_loss(s, t, m, 1.0, "ce") - soft_target_loss(s, t, m, 1.0, "kl_div")
    assert diff.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_span_ce_ignores_padding():
    batch, s, e = _batch()
    base = span_ce_loss(s, e, batch["start_positions"], batch["end_positions"], batch["attention_mask"])
    s2 = s.clone()
    s2[batch["attention_mask"] == 0] = 50.0
    again = span_ce_loss(s2, e, batch["start_positions"], batch["end_positions"], batch["attention_mask"])
    assert again.item() == pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [({"temperature": 0.0}, "temperature"),
                                             ({"temperature": -1.0}, "temperature"),
                                             ({"distillation_loss_weight": 1.5}, "distillation_loss_weight"),
                                             ({"distillation_loss_weight": -0.1}, "distillation_loss_weight"),
                                             ({"loss_type": "l1"}, "loss_type")])
def test_invalid_settings_raise(kwargs, message):
    batch, s, e = _batch()
    with pytest.raises(ValueError, match=message):
        prediction_distillation_loss(s, e, batch, **{"distillation_loss_weight": 0.5, **kwargs})


def test_bf16_inputs_are_computed_in_float32():
    batch, s, _ = _batch()
    full = soft_target_loss(s, batch["teacher_start_logits"], batch["attention_mask"], 2.0)
    half = soft_target_loss(s.bfloat16(), batch["teacher_start_logits"].bfloat16(), batch["attention_mask"], 2.0)
    assert half.dtype == torch.float32 and math.isclose(half.item(), full.item(), rel_tol=0.05)

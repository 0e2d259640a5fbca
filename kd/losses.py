"""Distillation losses. Torch-pure: tensors in, scalar tensors out.

Prediction layer (Hinton et al. 2015) for extractive QA: the student matches the teacher's start and end
distributions over sequence positions, softened by a temperature. Padding positions are removed from both
softmaxes (unlike Haystack 1.x, which spreads probability mass onto padding).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

PREDICTION_LOSS_TYPES = ("kl_div", "mse", "ce")


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim with masked positions given zero probability.

    logits: [B, L]; mask: [B, L] (1/True = real position). Returns [B, L]; masked entries hold a large
    negative number (not -inf) so that 0 * log p stays 0 instead of NaN.
    """
    fill = torch.finfo(logits.dtype).min
    return torch.log_softmax(logits.masked_fill(~mask, fill), dim=-1)


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    loss_type: str = "kl_div",
) -> torch.Tensor:
    """Distance between teacher and student distributions over positions, mean over the batch.

    student_logits, teacher_logits: [B, L]; mask: [B, L], 1 for positions that exist (attention mask).
    - kl_div: KL(softmax(t/T) || softmax(s/T)) * T^2 (the T^2 keeps gradient scale independent of T).
    - mse: mean squared error between the tempered probabilities * T^2, over real positions.
    - ce: cross-entropy of the student against the teacher's tempered probabilities * T^2 (KL plus the
      teacher's entropy, a constant: same gradients, different value).
    Computed in at least float32 (float64 stays float64), since the log-softmax of bf16 logits is too coarse.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if loss_type not in PREDICTION_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PREDICTION_LOSS_TYPES}, got {loss_type!r}")
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.to(dtype) / temperature
    mask = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.bool()
    log_p_s = _masked_log_softmax(s, mask)
    log_p_t = _masked_log_softmax(t, mask)
    p_t = log_p_t.exp() * mask
    if loss_type == "kl_div":
        per_example = (p_t * (log_p_t - log_p_s)).sum(-1)
    elif loss_type == "ce":
        per_example = -(p_t * log_p_s).sum(-1)
    else:
        sq = (log_p_s.exp() * mask - p_t) ** 2
        per_example = sq.sum(-1) / mask.sum(-1).clamp(min=1)
    return per_example.mean() * temperature**2


def span_ce_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy against gold start/end indices, averaged over start and end (as transformers' QA heads).

    start_logits, end_logits: [B, L]; start_positions, end_positions: [B] (CLS index for no answer);
    mask: [B, L]. Padding is masked out of the softmax, which the transformers head does not do.
    """
    def one(logits, target):
        logits = logits.float()
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits, target)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2


def prediction_distillation_loss(
    student_start: torch.Tensor,
    student_end: torch.Tensor,
    batch: dict,
    *,
    temperature: float = 1.0,
    distillation_loss_weight: float = 0.5,
    loss_type: str = "kl_div",
) -> dict[str, torch.Tensor]:
    """Total = w * KD + (1 - w) * CE(gold spans), with every term returned for logging.

    student_start, student_end: [B, L]. batch holds attention_mask [B, L], start_positions/end_positions [B]
    and, when w > 0, teacher_start_logits/teacher_end_logits [B, L]. Returns {"loss", "loss_kd", "loss_ce"};
    a term whose weight is zero is not computed (so no teacher logits are needed for w = 0).
    """
    if not 0.0 <= distillation_loss_weight <= 1.0:
        raise ValueError(f"distillation_loss_weight must be in [0, 1], got {distillation_loss_weight}")
    mask = batch["attention_mask"].bool()
    w = distillation_loss_weight
    terms: dict[str, torch.Tensor] = {}
    total = student_start.new_zeros((), dtype=torch.float32)
    if w > 0:
        kd = (
            soft_target_loss(student_start, batch["teacher_start_logits"], mask, temperature, loss_type)
            + soft_target_loss(student_end, batch["teacher_end_logits"], mask, temperature, loss_type)
        ) / 2
        terms["loss_kd"] = kd
        total = total + w * kd
    if w < 1:
        ce = span_ce_loss(student_start, student_end, batch["start_positions"], batch["end_positions"], mask)
        terms["loss_ce"] = ce
        total = total + (1 - w) * ce
    terms["loss"] = total
    return terms


# --- Intermediate layers (TinyBERT, Jiao et al. 2020; MiniLMv2, Wang et al. 2021) -------------------------------
# Every function below excludes padding: only real tokens (attention_mask == 1) enter the sums and the counts, and
# values at padded positions are selected away with torch.where before any arithmetic, so whatever sits there
# (garbage, huge numbers, -inf from an added mask) changes neither the loss nor its gradient.


class IntermediateTerm(NamedTuple):
    """One intermediate loss term: the key its unweighted value is returned and logged under, and a help text."""

    logged_as: str
    description: str


# The one list of intermediate loss terms, keyed by the name their weights go by (e.g. --attention_loss_weight).
INTERMEDIATE_TERMS = {
    "attention": IntermediateTerm("loss_att", "pre-softmax attention-score MSE"),
    "hidden": IntermediateTerm("loss_hidden", "hidden-state MSE"),
    "embedding": IntermediateTerm("loss_emb", "embedding-output MSE (needs 0:0 in the layer map)"),
    "relation": IntermediateTerm("loss_rel", "MiniLMv2 self-attention relation KL"),
}


def _preset(*terms: str) -> dict[str, float]:
    return {term: float(term in terms) for term in INTERMEDIATE_TERMS}


# A loss kind is a preset of weights; explicit weights override it term by term.
INTERMEDIATE_LOSS_KINDS = {
    "tinybert": _preset("attention", "hidden", "embedding"),
    "minilm_relation": _preset("relation"),
}


def _token_mask(attention_mask: torch.Tensor, states: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """[B, T] 0/1 mask -> bool mask on the states' device, checking B and T against states.shape[0, seq_dim]."""
    expected = (states.shape[0], states.shape[seq_dim])
    if tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the states {tuple(states.shape)} imply "
            f"{expected}; student and teacher must see the same tokens (same tokenizer, same batch)."
        )
    return attention_mask.to(device=states.device).bool()


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str, fix: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}. {fix}")


def attention_score_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """TinyBERT attention loss: MSE between pre-softmax attention scores, over real query/key pairs.

    student_scores, teacher_scores: [B, heads, T, T], Q Kᵀ / sqrt(d_head) before the mask, softmax and dropout
    (kd.capture records exactly that). attention_mask: [B, T]. Mean over batch, heads and the (query, key) pairs
    where both tokens are real; the count excludes padded pairs. Needs equal head counts.
    """
    if student_scores.shape[1] != teacher_scores.shape[1]:
        raise ValueError(
            f"The attention-score loss compares heads one to one, but the student has {student_scores.shape[1]} "
            f"heads and the teacher {teacher_scores.shape[1]}. Use the self-attention relation loss instead "
            "(loss kind 'minilm_relation' / relation_loss), which works with any head counts and hidden sizes."
        )
    _check_same_shape(student_scores, teacher_scores, "attention scores differ in shape",
                      "Student and teacher must see the same tokens (same tokenizer, same batch).")
    tokens = _token_mask(attention_mask, student_scores, seq_dim=2)
    pairs = (tokens[:, None, :, None] & tokens[:, None, None, :]).expand_as(student_scores)  # [B, h, T, T]
    diff = torch.where(pairs, student_scores.float() - teacher_scores.float(), 0.0)
    return diff.pow(2).sum() / pairs.sum().clamp(min=1)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    projection: torch.nn.Module | None = None,
) -> torch.Tensor:
    """TinyBERT hidden-state loss: MSE(projection(student), teacher) over real tokens.

    student_hidden: [B, T, H_s]; teacher_hidden: [B, T, H_t]; attention_mask: [B, T]; projection: a trainable
    module H_s -> H_t (an nn.Linear), needed when H_s != H_t. Mean over real tokens and the H_t features.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"Student hidden size {student_hidden.shape[-1]} != teacher hidden size {teacher_hidden.shape[-1]}: "
            f"pass projection=nn.Linear({student_hidden.shape[-1]}, {teacher_hidden.shape[-1]}) "
            "(kd.intermediate.IntermediateDistiller creates and trains it)."
        )
    _check_same_shape(student_hidden, teacher_hidden, "hidden states differ in shape",
                      "Student and teacher must see the same tokens (same tokenizer, same batch).")
    tokens = _token_mask(attention_mask, student_hidden, seq_dim=1)[..., None].expand_as(student_hidden)  # [B, T, H_t]
    diff = torch.where(tokens, student_hidden.float() - teacher_hidden.float(), 0.0)
    return diff.pow(2).sum() / tokens.sum().clamp(min=1)


# TinyBERT's embedding-layer loss is the hidden-state loss on the embedding outputs (layer 0): [B, T, H_s] vs
# [B, T, H_t]. It keeps its own weight and its own projection (TinyBERT's W_e) in kd.intermediate.
embedding_loss = hidden_state_loss


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads * d], undoing the attention modules' head split."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _relation_log_probs(x: torch.Tensor, num_relation_heads: int, keys: torch.Tensor) -> torch.Tensor:
    """Self-attention relation log-distributions, MiniLMv2 style.

    x: [B, heads, T, d] (q, k or v of one layer); keys: [B, T] bool. The full width heads * d is re-split into
    num_relation_heads heads of d_r = width / R: returns log softmax(x_r x_rᵀ / sqrt(d_r)) over real keys,
    [B, R, T, T], float32.
    """
    # Zeroing padded tokens first keeps non-finite padding out of the matmul (and so out of the gradient).
    merged = torch.where(keys[..., None], _merge_heads(x.float()), 0.0)  # [B, T, W]
    b, t, width = merged.shape
    d_r = width // num_relation_heads
    xr = merged.view(b, t, num_relation_heads, d_r).transpose(1, 2)  # [B, R, T, d_r]
    logits = torch.matmul(xr, xr.transpose(-1, -2)) / d_r**0.5
    logits = logits.masked_fill(~keys[:, None, None, :], torch.finfo(logits.dtype).min)
    return torch.log_softmax(logits, dim=-1)


def _qkv_width(x: torch.Tensor) -> int:
    """heads * d_head of a [B, heads, T, d_head] tensor."""
    return x.shape[1] * x.shape[3]


def check_relation_heads(num_relation_heads: int, student_width: int, teacher_width: int) -> None:
    """Raise a ValueError suggesting valid values unless num_relation_heads divides both q/k/v widths."""
    if isinstance(num_relation_heads, int) and num_relation_heads >= 1 and not (
        student_width % num_relation_heads or teacher_width % num_relation_heads
    ):
        return
    common = math.gcd(student_width, teacher_width)
    divisors = [r for r in range(1, common + 1) if common % r == 0]
    raise ValueError(
        f"Relation heads must be a positive int dividing both the student q/k/v width ({student_width}) and the "
        f"teacher's ({teacher_width}); got {num_relation_heads!r}. Valid choices: {divisors}."
    )


def relation_loss(
    student_qkv: tuple[torch.Tensor, ...],
    teacher_qkv: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor,
    num_relation_heads: int,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation loss: sum over Q-Q, K-K, V-V of KL(teacher relation || student relation).

    student_qkv: (q, k, v), each [B, heads_s, T, d_s]; teacher_qkv: (q, k, v), each [B, heads_t, T, d_t];
    attention_mask: [B, T]. Each relation is softmax(x xᵀ / sqrt(d_r)) per relation head, x being the full q/k/v
    width split into num_relation_heads heads (so neither head counts nor hidden sizes need to match; R must divide
    both widths). Padded keys get zero probability; the KL is averaged over real query tokens, relation heads and
    the batch, then the three relations are summed as in the paper.
    """
    if len(student_qkv) != len(teacher_qkv):
        raise ValueError(f"Got {len(student_qkv)} student and {len(teacher_qkv)} teacher relation inputs")
    check_relation_heads(num_relation_heads, _qkv_width(student_qkv[0]), _qkv_width(teacher_qkv[0]))
    tokens = _token_mask(attention_mask, student_qkv[0], seq_dim=2)  # [B, T]
    _token_mask(attention_mask, teacher_qkv[0], seq_dim=2)
    queries = tokens[:, None, :].expand(-1, num_relation_heads, -1)  # [B, R, T]
    total = student_qkv[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_qkv, teacher_qkv):
        log_p_s = _relation_log_probs(s, num_relation_heads, tokens)
        log_p_t = _relation_log_probs(t, num_relation_heads, tokens)
        # Padded keys have p_t = 0; where() keeps their 0 * (huge - huge) out of the sum entirely.
        kl = torch.where(tokens[:, None, None, :], log_p_t.exp() * (log_p_t - log_p_s), 0.0).sum(-1)  # [B, R, T]
        total = total + torch.where(queries, kl, 0.0).sum() / queries.sum().clamp(min=1)
    return total

"""Memory-lean versions of the [B, heads, T, T] intermediate losses of kd.losses: same values and gradients.

The attention-score and relation losses compare [B, heads, T, T] tensors: at B 16, 12 heads, T 256 that is 50 MB
per tensor and layer in fp32, and computing them whole keeps the teacher's and the student's scores plus the
loss's saved differences alive for backward, several times the student's own activations.
- Attention scores: one fused autograd function (_ScoreMSE) takes the queries and keys. Padded query and key rows
  are zeroed, so D = c_s Q_s K_s^T - c_t Q_t K_t^T = [c_s Q_s | -c_t Q_t] [K_s | K_t]^T is zero on every padded
  pair with no T x T mask pass; forward sums D^2 (one GEMM and a norm per chunk of examples, in fp32), backward
  needs no T x T tensor at all (the gradient regroups into small Gram matrices, see _ScoreMSE.backward). Only
  Q/K (alive anyway) are kept. Versus the whole-tensor loss: ~20 fewer T x T passes and none of its T x T
  tensors kept for backward. Same value and gradient as kd.losses.attention_score_loss (tested).
- Relations: the kd.losses function on a few examples at a time, each chunk under non-reentrant activation
  checkpointing (nothing saved but its q/k/v views; the chunk is recomputed in backward), the chunk results
  recombined with their counts.
- Hidden states (embeddings included): kd.losses under checkpointing (whole: they are only [B, T, H]), so their
  differences and projected states are not kept for backward either.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.losses import attention_score_loss, hidden_state_loss, relation_loss

LEAN_CHUNK_BYTES = 8 * 2**20  # fp32 bytes of one chunk's [b, heads, T, T] tensor (relation loss: ~6 such alive)
SCORE_CHUNK_BYTES = 8 * 2**20  # the same for the fused score loss's forward (one such tensor alive)


def _chunk_size(heads: int, seq_len: int, batch: int, budget: int | None = None) -> int:
    """Examples per chunk (1 to batch) so that one fp32 [chunk, heads, T, T] tensor fits in budget bytes."""
    # Read at call time, not bound as a default, so that tests can shrink the chunks.
    budget = LEAN_CHUNK_BYTES if budget is None else budget
    return max(1, min(batch, budget // max(1, heads * seq_len * seq_len * 4)))


def _checkpointed(fn, *tensors):
    """fn(*tensors) under non-reentrant activation checkpointing, or plain when no input needs a gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False)  # fn draws no random numbers
    return fn(*tensors)


def _chunked_mean(fn, count, student: tuple, teacher: tuple, attention_mask: torch.Tensor, heads: int):
    """sum_c fn(chunk_c) * count(mask_c) / sum_c count(mask_c) over batch chunks, each checkpointed.

    student, teacher: tensors [B, ...] sliced together along B; attention_mask: [B, T]; heads: the widest head
    count of the [b, heads, T, T] tensors fn makes (sizes the chunks). fn(*student, *teacher, mask) must return
    (sum over the chunk) / max(count(chunk), 1), as the kd.losses functions do. Returns a float32 scalar.
    """
    b, t = attention_mask.shape
    step = _chunk_size(heads, t, b)
    mask = attention_mask.to(student[0].device)
    total = student[0].new_zeros((), dtype=torch.float32)
    counts = mask.new_zeros((), dtype=torch.float32)
    for i in range(0, b, step):
        chunk = slice(i, i + step)
        n = count(mask[chunk])
        total = total + _checkpointed(fn, *(x[chunk] for x in student), *(x[chunk] for x in teacher), mask[chunk]) * n
        counts = counts + n
    return total / counts.clamp(min=1)


def _factors(qs, ks, qt, kt, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [c_s Q_s | -c_t Q_t], B = [K_s | K_t], fp32 [b * h, T, d_s + d_t], padded rows zero, so that
    A B^T = c_s Q_s K_s^T - c_t Q_t K_t^T = D (student minus teacher scores, 0 on every padded pair).

    q/k are transposed views of the projections' [b, T, h * d] outputs; each half is written by one multiply with
    the (scaled) 0/1 mask straight into a contiguous buffer, so masking, scaling, the heads-first layout and the
    concatenation cost one pass. A multiply rather than where() (7x slower on CPU): any finite value at a padded
    position is zeroed, an inf or NaN there would leak (q/k are projections of hidden states, finite in any
    working model)."""
    b, h, t, d_s = qs.shape
    d_t = qt.shape[-1]
    keep = tokens[:, None, :, None].float()  # [b, 1, T, 1]
    a = torch.empty((b, h, t, d_s + d_t), dtype=torch.float32, device=qs.device)
    bb = torch.empty_like(a)
    torch.mul(qs, keep * d_s**-0.5, out=a[..., :d_s])
    torch.mul(qt, keep * -(d_t**-0.5), out=a[..., d_s:])
    torch.mul(ks, keep, out=bb[..., :d_s])
    torch.mul(kt, keep, out=bb[..., d_s:])
    return a.view(b * h, t, d_s + d_t), bb.view(b * h, t, d_s + d_t)


class _ScoreMSE(torch.autograd.Function):
    """sum over real (query, key) pairs and heads of (student score - teacher score)^2; see the module docstring.

    qs, ks: [B, heads, T, d_s]; qt, kt: [B, heads, T, d_t] (no gradient); tokens: [B, T] bool; step: examples per
    chunk. Returns a float32 scalar; gradients for qs and ks only.
    """

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, tokens, step):
        ctx.save_for_backward(qs, ks, qt, kt, tokens)
        ctx.step = step
        total = torch.zeros((), dtype=torch.float32, device=qs.device)
        with torch.autocast(qs.device.type, enabled=False):
            for i in range(0, qs.shape[0], step):
                c = slice(i, i + step)
                a, b = _factors(qs[c], ks[c], qt[c], kt[c], tokens[c])
                total += torch.linalg.vector_norm(torch.bmm(a, b.transpose(1, 2))).square()  # ||D||^2, one GEMM
        return total

    @staticmethod
    def backward(ctx, grad):
        # With D = A B^T: dL/dQ_s = 2 c_s D K_s = 2 c_s A (B^T K_s) and dL/dK_s = 2 c_s D^T Q_s = 2 B (A^T (c_s Q_s)):
        # (d_s + d_t) x d Gram matrices, no T x T product, O(T d^2) instead of O(T^2 d).
        qs, ks, qt, kt, tokens = ctx.saved_tensors
        b, h, t, d = qs.shape
        grad_q = torch.empty(b, h, t, d, dtype=torch.float32, device=qs.device)
        grad_k = torch.empty_like(grad_q)
        with torch.autocast(qs.device.type, enabled=False):
            for i in range(0, b, ctx.step):
                c = slice(i, i + ctx.step)
                a, bb = _factors(qs[c], ks[c], qt[c], kt[c], tokens[c])
                n = a.shape[0]
                torch.bmm(a, torch.bmm(bb.transpose(1, 2), bb[..., :d]), out=grad_q[c].view(n, t, d))
                torch.bmm(bb, torch.bmm(a.transpose(1, 2), a[..., :d]), out=grad_k[c].view(n, t, d))
        grad = grad.float()
        return (grad_q.mul_(grad * (2 * d**-0.5)).to(qs.dtype), grad_k.mul_(grad * 2).to(ks.dtype),
                None, None, None, None)


def lean_attention_score_loss(student_qk: tuple[torch.Tensor, torch.Tensor], teacher_qk: tuple[torch.Tensor, ...],
                              attention_mask: torch.Tensor) -> torch.Tensor:
    """kd.losses.attention_score_loss of the scores Q K^T / sqrt(d_head), from the queries and keys, fused.

    student_qk, teacher_qk: (q, k), each [B, heads, T, d_head] (kd.capture "qkv"; a v is ignored); heads must be
    equal, d_head may differ; values at padded positions may be anything finite. attention_mask: [B, T].
    Same value and gradient as the whole-tensor loss up to float rounding (computed in fp32 whatever the inputs),
    with one chunk of [b, heads, T, T] alive at a time and no T x T tensor kept for backward. Returns a float32 scalar.
    """
    qs, ks = student_qk[0], student_qk[1]
    qt, kt = teacher_qk[0], teacher_qk[1]
    if qs.shape[1] != qt.shape[1]:
        # the same error, and message, as the whole-tensor loss
        return attention_score_loss(qs[:, :, :1, :1], qt[:, :, :1, :1], attention_mask[:, :1])
    if qs.shape[:3] != qt.shape[:3] or qs.shape[0] != attention_mask.shape[0] or qs.shape[2] != attention_mask.shape[1]:
        raise ValueError(f"attention scores differ in shape: student q {tuple(qs.shape)}, teacher q "
                         f"{tuple(qt.shape)}, attention_mask {tuple(attention_mask.shape)}. Student and teacher must "
                         "see the same tokens (same tokenizer, same batch).")
    tokens = attention_mask.to(qs.device).bool()
    b, h, t, _ = qs.shape
    step = _chunk_size(h, t, b, SCORE_CHUNK_BYTES)
    total = _ScoreMSE.apply(qs, ks, qt.detach(), kt.detach(), tokens, step)
    pairs = h * tokens.sum(-1).float().pow(2).sum()  # real (query, key) pairs x heads
    return total / pairs.clamp(min=1)


def lean_relation_loss(student_qkv: tuple[torch.Tensor, ...], teacher_qkv: tuple[torch.Tensor, ...],
                       attention_mask: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """kd.losses.relation_loss computed a few examples at a time under checkpointing (see the module docstring).

    student_qkv: (q, k, v), each [B, heads_s, T, d_s]; teacher_qkv: (q, k, v), each [B, heads_t, T, d_t];
    attention_mask: [B, T]. Returns a float32 scalar.
    """
    n = len(student_qkv)

    def fn(*args):
        return relation_loss(args[:n], args[n:2 * n], args[-1], num_relation_heads)

    queries = lambda mask: num_relation_heads * mask.float().sum()  # noqa: E731  real queries x relation heads
    return _chunked_mean(fn, queries, tuple(student_qkv), tuple(teacher_qkv), attention_mask,
                         max(num_relation_heads, student_qkv[0].shape[1], teacher_qkv[0].shape[1]))


def lean_hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                           projection: nn.Module | None = None) -> torch.Tensor:
    """kd.losses.hidden_state_loss (also the embedding loss) under activation checkpointing: the projected states
    and the differences are recomputed in backward instead of being kept (the student's graph keeps its hidden
    states anyway).

    student_hidden: [B, T, H_s]; teacher_hidden: [B, T, H_t]; attention_mask: [B, T]; projection: H_s -> H_t.
    Returns a float32 scalar.
    """
    def fn(s, t, mask):
        return hidden_state_loss(s, t, mask, projection)

    return _checkpointed(fn, student_hidden, teacher_hidden, attention_mask)


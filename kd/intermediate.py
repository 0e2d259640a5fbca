"""Intermediate-layer distillation (TinyBERT, MiniLMv2) as one trainable module.

:class:`IntermediateDistiller` owns the student AND the projections that map student hidden states to the
teacher's width, so a single ``accelerator.prepare(distiller, optimizer, ...)`` puts the projections in the
optimizer (build the optimizer from ``distiller.parameters()`` after constructing the distiller), in
``accelerator.save_state`` checkpoints and on the right device. Haystack 1.x created its projection after the
optimizer, so it was never trained nor saved. The student stays reachable as ``distiller.student`` so that
``distiller.student.save_pretrained(...)`` exports the plain student without projections.

One training step::

    teacher_result = capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what)
    terms = distiller(batch, teacher_result)       # {"loss", "loss_att", "loss_hidden", ...}
    accelerator.backward(terms["loss"])

This stage trains the encoder only: the student's QA head gets no gradient, so under DDP pass
``DistributedDataParallelKwargs(find_unused_parameters=True)`` to the Accelerator (or freeze the head).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from kd.capture import Captured, LayerCapture, base_encoder, capture_teacher, model_inputs, num_layers
from kd.layer_map import LayerMap
from kd.losses import (
    INTERMEDIATE_LOSS_WEIGHTS,
    attention_score_loss,
    check_relation_heads,
    embedding_loss,
    hidden_state_loss,
    relation_loss,
)

__all__ = ["IntermediateDistiller", "TeacherDims", "capture_teacher", "LOSS_KINDS"]

# A loss kind is a preset of weights; explicit weights override it term by term.
LOSS_KINDS = {
    "tinybert": {"attention": 1.0, "hidden": 1.0, "embedding": 1.0, "relation": 0.0},
    "minilm_relation": {"attention": 0.0, "hidden": 0.0, "embedding": 0.0, "relation": 1.0},
}
_TERM_NAMES = {"attention": "loss_att", "hidden": "loss_hidden", "embedding": "loss_emb", "relation": "loss_rel"}


class TeacherDims(NamedTuple):
    """The teacher sizes the distiller needs; num_hidden_layers (optional) lets it check the layer map."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int | None = None

    @classmethod
    def from_config(cls, config) -> TeacherDims:
        # DistilBertConfig maps these names onto dim / n_heads / n_layers, so one spelling fits all supported models.
        return cls(config.hidden_size, config.num_attention_heads, config.num_hidden_layers)


class IntermediateDistiller(nn.Module):
    """Student + projections; forward returns the weighted intermediate losses of one batch.

    student: a model kd.capture supports (QA head or not); it is trained in place.
    layer_map: kd.layer_map.LayerMap (student layer <- teacher layer; 0:0 = embeddings).
    teacher: the teacher's config (PretrainedConfig) or TeacherDims.
    weights: per-term weights among "attention" (TinyBERT pre-softmax score MSE), "hidden" (hidden-state MSE),
        "embedding" (layer-0 MSE), "relation" (MiniLMv2 Q-Q/K-K/V-V KL); overrides the loss_kind preset.
    loss_kind: "tinybert" (attention + hidden + embedding) or "minilm_relation" (relation only).
    relation_heads: relation heads for the relation loss; default: the teacher's attention head count.

    Per-layer terms are summed over the mapped layers, as in TinyBERT (so "uniform" maps weigh more than "last").

    Projection layout (TinyBERT's): ONE Linear W_h shared by all Transformer layers for the hidden-state loss, plus a
    separate W_e for the embeddings, created only when student and teacher widths differ. Why shared rather than
    one per layer: the residual stream keeps one basis through the layers, so one map into the teacher's basis is
    a consistent constraint, it is the paper's recipe (its hyperparameters transfer), and it adds one matrix
    whatever the map. W_e is kept separate as in the paper, so the embedding term (own weight) can be switched
    off without touching the map the hidden layers learn through.
    """

    def __init__(
        self,
        student: nn.Module,
        layer_map: LayerMap,
        teacher,
        *,
        weights: Mapping[str, float] | None = None,
        loss_kind: str = "tinybert",
        relation_heads: int | None = None,
    ):
        super().__init__()
        self.student = student
        self.layer_map = layer_map
        self.teacher_dims = teacher if isinstance(teacher, TeacherDims) else TeacherDims.from_config(teacher)
        self.loss_kind = loss_kind
        student_config = base_encoder(student)[0].config
        self.student_hidden_size = student_config.hidden_size
        self._check_layer_map()
        self.weights = self._resolve_weights(loss_kind, weights or {}, student_config.num_attention_heads)
        self.relation_heads = self._resolve_relation_heads(relation_heads)
        self.hidden_projection = self._projection_if_needed("hidden")
        self.embedding_projection = self._projection_if_needed("embedding")

    # --- construction helpers ----------------------------------------------------------------------------------
    def _check_layer_map(self) -> None:
        n_student = num_layers(self.student)
        n_teacher = self.teacher_dims.num_hidden_layers
        for s, t in self.layer_map:
            if s > n_student or (n_teacher is not None and t > n_teacher):
                raise ValueError(
                    f"Layer map pair {s}:{t} does not fit a {n_student}-layer student and a {n_teacher}-layer "
                    "teacher; build the map with kd.layer_map.parse_layer_map(spec, student layers, teacher layers)."
                )

    def _resolve_weights(self, loss_kind: str, overrides: Mapping[str, float], student_heads: int) -> dict:
        if loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {sorted(LOSS_KINDS)}, got {loss_kind!r}")
        unknown = set(overrides) - set(INTERMEDIATE_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"Unknown loss weight(s) {sorted(unknown)}; valid: {list(INTERMEDIATE_LOSS_WEIGHTS)}")
        weights = dict(LOSS_KINDS[loss_kind])
        # Presets only switch on terms the map can feed; an explicit weight for a term it cannot is an error below.
        if not self.layer_map.has_embeddings:
            weights["embedding"] = 0.0
        if not self.layer_map.transformer_pairs:
            weights.update(attention=0.0, hidden=0.0, relation=0.0)
        weights.update({k: float(v) for k, v in overrides.items()})
        self._check_weights(weights, student_heads)
        return weights

    def _check_weights(self, weights: dict, student_heads: int) -> None:
        for name, w in weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"Loss weight {name!r} must be a finite number >= 0, got {w}")
        if not any(weights.values()):
            raise ValueError(f"All intermediate loss weights are zero for layer map {self.layer_map}: nothing to learn")
        if weights["embedding"] > 0 and not self.layer_map.has_embeddings:
            raise ValueError(f"The embedding loss needs the pair 0:0 in the layer map (got {self.layer_map}); "
                             "use 'uniform' or add '0:0', or set the embedding weight to 0.")
        needs_layers = [k for k in ("attention", "hidden", "relation") if weights[k] > 0]
        if needs_layers and not self.layer_map.transformer_pairs:
            raise ValueError(f"The {needs_layers} loss(es) need at least one Transformer-layer pair (student layer "
                             f">= 1) in the layer map, got {self.layer_map}.")
        if weights["attention"] > 0 and student_heads != self.teacher_dims.num_attention_heads:
            raise ValueError(
                f"The attention-score loss needs equal head counts (student {student_heads}, teacher "
                f"{self.teacher_dims.num_attention_heads}). Use loss_kind='minilm_relation' (the relation loss "
                "works with any head count), or set the attention weight to 0."
            )

    def _resolve_relation_heads(self, relation_heads: int | None) -> int | None:
        if self.weights["relation"] == 0:
            return None
        r = self.teacher_dims.num_attention_heads if relation_heads is None else relation_heads
        # q/k/v are hidden_size wide in every supported model (all_head_size == hidden_size).
        check_relation_heads(r, self.student_hidden_size, self.teacher_dims.hidden_size)
        return r

    def _projection_if_needed(self, term: str) -> nn.Linear | None:
        if self.weights[term] == 0 or self.student_hidden_size == self.teacher_dims.hidden_size:
            return None
        return nn.Linear(self.student_hidden_size, self.teacher_dims.hidden_size)

    # --- what to capture ---------------------------------------------------------------------------------------
    @property
    def capture_what(self) -> frozenset[str]:
        """Capture kinds (kd.capture) this distiller reads, on the student and the teacher alike."""
        what = set()
        if self.weights["attention"] > 0:
            what.add("scores")
        if self.weights["hidden"] > 0 or self.weights["embedding"] > 0:
            what.add("hidden")
        if self.weights["relation"] > 0:
            what.add("qkv")
        return frozenset(what)

    def describe(self) -> dict:
        """JSON-friendly settings for run records."""
        return {
            "layer_map": str(self.layer_map),
            "loss_kind": self.loss_kind,
            "weights": dict(self.weights),
            "relation_heads": self.relation_heads,
            "hidden_projection": self.hidden_projection is not None,
            "embedding_projection": self.embedding_projection is not None,
        }

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor], teacher: Captured) -> dict[str, torch.Tensor]:
        """Student forward with capture, then the active loss terms.

        batch: input_ids / attention_mask [B, T] (token_type_ids when the student takes them); other keys ignored.
        teacher: what kd.capture.capture_teacher returned for this batch (a Captured or a LayerCapture).
        Returns {"loss": weighted sum, plus "loss_att" / "loss_hidden" / "loss_emb" / "loss_rel" for the active
        terms}, each an unweighted float32 scalar; only "loss" carries the weights.
        """
        base = base_encoder(self.student)[0]
        # The encoder only: the QA head's logits play no part in these losses.
        with LayerCapture(self.student, self.layer_map.student_layers, self.capture_what) as student:
            base(**model_inputs(base, batch))
            terms = self._loss_terms(student, teacher, batch["attention_mask"])
        total = sum(self.weights[name] * value for name, value in terms.items())
        out = {_TERM_NAMES[name]: value for name, value in terms.items()}
        out["loss"] = total
        return out

    def _loss_terms(self, student: LayerCapture, teacher: Captured, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {}
        pairs = self.layer_map.transformer_pairs
        if self.weights["embedding"] > 0:
            terms["embedding"] = embedding_loss(student.hidden_states[0], _get(teacher, "hidden_states", 0), mask,
                                                self.embedding_projection)
        if self.weights["hidden"] > 0:
            terms["hidden"] = sum(
                hidden_state_loss(student.hidden_states[s], _get(teacher, "hidden_states", t), mask,
                                  self.hidden_projection)
                for s, t in pairs
            )
        if self.weights["attention"] > 0:
            terms["attention"] = sum(
                attention_score_loss(student.attention_scores[s], _get(teacher, "attention_scores", t), mask)
                for s, t in pairs
            )
        if self.weights["relation"] > 0:
            terms["relation"] = sum(
                relation_loss(student.qkv[s], _get(teacher, "qkv", t), mask, self.relation_heads) for s, t in pairs
            )
        return terms


def _get(teacher: Captured, kind: str, layer: int):
    try:
        return getattr(teacher, kind)[layer]
    except KeyError:
        raise KeyError(
            f"The teacher capture has no {kind} for teacher layer {layer}. Capture the teacher with "
            "capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what)."
        ) from None

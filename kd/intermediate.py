"""Intermediate-layer distillation (TinyBERT, MiniLMv2) as one trainable module.

:class:`IntermediateDistiller` owns the student AND the projections that map student hidden states to the
teacher's width, so a single ``accelerator.prepare(distiller, optimizer, ...)`` puts the projections in the
optimizer (build the optimizer from ``distiller.parameters()`` after constructing the distiller), in
``accelerator.save_state`` checkpoints and on the right device. Haystack 1.x created its projection after the
optimizer, so it was never trained nor saved. The student stays reachable as ``distiller.student`` so that
kd.models.export_student saves the plain student without projections.

A stage with these helpers, in order (kd.models loads and exports the models)::

    check_distillation_setup(...)                        # at argument parsing: configs only, nothing loaded
    teacher = load_teacher(path, accelerator, "auto")    # frozen, eval, on device; NOT passed to prepare
    with no_zero3_init(accelerator): student = AutoModelFor...from_pretrained(...)
    distiller = build_distiller(student, teacher.config, spec, ...)
    freeze_outside_encoder(student); distiller.to(accelerator.device)
    freeze_unreached_parameters(distiller, teacher, probe_batch)
    optimizer = ...(distiller.parameters())              # AFTER the distiller, so the projections are in it
    model, optimizer, loader = accelerator.prepare(distiller, optimizer, loader)
    compute_loss = make_compute_loss(teacher, distiller)
    for batch in loader:                                 # the script's own loop
        terms = compute_loss(model, batch)               # {"loss", "loss_att", "loss_hidden", ...}
        accelerator.backward(terms["loss"])
    export_student(accelerator, model, tokenizer, output_dir)

This stage trains the encoder only: the student's QA head gets no gradient, nor do layers above the highest mapped
one; freeze them before building the optimizer (:func:`freeze_outside_encoder`, :func:`freeze_unreached_parameters`)
rather than running DDP with ``find_unused_parameters=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from kd.capture import (SUPPORTED_LAYOUTS, Captured, LayerCapture, base_encoder, capture_teacher, model_inputs,
                        num_layers)
from kd.layer_map import LayerMap
from kd.lean_losses import lean_attention_score_loss, lean_hidden_state_loss, lean_relation_loss
from kd.losses import (INTERMEDIATE_LOSS_KINDS, INTERMEDIATE_TERMS, attention_score_loss, check_relation_heads,
                       hidden_state_loss, relation_loss)

__all__ = ["IntermediateDistiller", "TeacherDims", "build_distiller", "check_distillation_setup",
           "freeze_outside_encoder", "freeze_unreached_parameters", "make_compute_loss", "heldout_loss"]


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
    weights: per-term weights, keyed as kd.losses.INTERMEDIATE_TERMS ("attention", "hidden", "embedding",
        "relation"); they override the loss_kind preset term by term.
    loss_kind: "tinybert" (attention + hidden + embedding) or "minilm_relation" (relation only).
    relation_heads: relation heads for the relation loss; default: the teacher's attention head count.
    lean_loss: compute the [B, heads, T, T] terms (attention scores, relations) a few examples at a time under
        activation checkpointing, from captured Q/K/V, so no full T x T tensor is stored or kept for backward, and
        the hidden-state terms under checkpointing too (kd.lean_losses); same values up to float summation order.
        False: capture and hold the full score tensors (kd.capture "scores") and keep every loss intermediate for
        backward, as the plain kd.losses functions do.

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
        lean_loss: bool = True,
    ):
        super().__init__()
        self.lean_loss = lean_loss
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
        if loss_kind not in INTERMEDIATE_LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {sorted(INTERMEDIATE_LOSS_KINDS)}, got {loss_kind!r}")
        unknown = set(overrides) - set(INTERMEDIATE_TERMS)
        if unknown:
            raise ValueError(f"Unknown loss weight(s) {sorted(unknown)}; valid: {list(INTERMEDIATE_TERMS)}")
        weights = dict(INTERMEDIATE_LOSS_KINDS[loss_kind])
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
            what.add("qkv" if self.lean_loss else "scores")
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
            "lean_loss": self.lean_loss,
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
        out = {INTERMEDIATE_TERMS[name].logged_as: value for name, value in terms.items()}
        out["loss"] = total
        return out

    def _loss_terms(self, student: LayerCapture, teacher: Captured, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {}
        pairs = self.layer_map.transformer_pairs
        # TinyBERT's embedding loss is the hidden-state loss on layer 0 (with its own projection).
        hid_loss = lean_hidden_state_loss if self.lean_loss else hidden_state_loss
        if self.weights["embedding"] > 0:
            terms["embedding"] = hid_loss(student.hidden_states[0], _get(teacher, "hidden_states", 0), mask,
                                          self.embedding_projection)
        if self.weights["hidden"] > 0:
            terms["hidden"] = sum(
                hid_loss(student.hidden_states[s], _get(teacher, "hidden_states", t), mask, self.hidden_projection)
                for s, t in pairs
            )
        if self.weights["attention"] > 0 and self.lean_loss:
            terms["attention"] = sum(
                lean_attention_score_loss(student.qkv[s][:2], _get(teacher, "qkv", t)[:2], mask) for s, t in pairs
            )
        elif self.weights["attention"] > 0:
            terms["attention"] = sum(
                attention_score_loss(student.attention_scores[s], _get(teacher, "attention_scores", t), mask)
                for s, t in pairs
            )
        if self.weights["relation"] > 0:
            loss = lean_relation_loss if self.lean_loss else relation_loss
            terms["relation"] = sum(
                loss(student.qkv[s], _get(teacher, "qkv", t), mask, self.relation_heads) for s, t in pairs
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


# ---------------------------------------------------------------------------------------------------------------
# What the entry scripts share (train_task_intermediate.py, train_general.py)
# ---------------------------------------------------------------------------------------------------------------

def build_distiller(student: nn.Module, teacher_config, layer_map_spec: str, *, loss_kind: str = "tinybert",
                    weights: Mapping[str, float] | None = None,
                    relation_heads: int | None = None) -> IntermediateDistiller:
    """IntermediateDistiller for a layer-map spec (kd.layer_map.parse_layer_map: uniform, last, pairs, JSON),
    checked against the student's and the teacher's layer counts. Build it before the optimizer."""
    from kd.layer_map import parse_layer_map

    layer_map = parse_layer_map(layer_map_spec, num_layers(student), teacher_config.num_hidden_layers)
    return IntermediateDistiller(student, layer_map, teacher_config, weights=weights, loss_kind=loss_kind,
                                 relation_heads=relation_heads)


def check_distillation_setup(student_name_or_path: str, teacher_name_or_path: str, layer_map_spec: str, *,
                             loss_kind: str = "tinybert", weights: Mapping[str, float] | None = None,
                             relation_heads: int | None = None) -> dict:
    """Every check :func:`build_distiller` makes (layer map vs depths, head counts for the score loss, relation
    heads vs widths, weights), from the two configs alone: the models are built on the meta device, so nothing
    is loaded or allocated. Meant for argument parsing, so a bad combination fails in seconds.

    Returns the would-be distiller's ``describe()``. Raises ValueError (bad combination) or OSError (no config).
    """
    from transformers import AutoConfig, AutoModel

    student_config = AutoConfig.from_pretrained(student_name_or_path)
    teacher_config = AutoConfig.from_pretrained(teacher_name_or_path)
    for side, name, config in (("student", student_name_or_path, student_config),
                               ("teacher", teacher_name_or_path, teacher_config)):
        if getattr(config, "model_type", None) not in SUPPORTED_LAYOUTS:
            raise ValueError(f"The {side} {name} is a {config.model_type!r} model; intermediate-layer distillation "
                             f"supports {', '.join(sorted(SUPPORTED_LAYOUTS))}.")
    with torch.device("meta"):
        student = AutoModel.from_config(student_config)
        distiller = build_distiller(student, teacher_config, layer_map_spec, loss_kind=loss_kind, weights=weights,
                                    relation_heads=relation_heads)
    return distiller.describe()


def freeze_outside_encoder(model: nn.Module) -> list[str]:
    """requires_grad False on every parameter outside the model's base encoder (a QA or MLM head); returns
    their names. The head keeps its initial weights, so the exported student still has it (train_prediction.py
    then trains it). Intermediate losses never reach a head, and a frozen head costs DDP nothing, where
    ``find_unused_parameters=True`` would search the graph every step. Weights tied to the encoder (an MLM
    decoder tied to the word embeddings) stay trainable: they are encoder parameters."""
    encoder_params = {id(p) for p in base_encoder(model)[0].parameters()}
    frozen = []
    for name, p in model.named_parameters():
        if id(p) not in encoder_params and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def freeze_unreached_parameters(distiller: IntermediateDistiller, teacher: nn.Module,
                                batch: Mapping[str, torch.Tensor]) -> list[str]:
    """Freeze the trainable parameters that the loss cannot reach; returns their names (distiller's naming).

    Which parameters the intermediate losses reach depends on the layer map and the loss kind: above the highest
    mapped student layer nothing is reached, and in that layer, when only attention scores or Q/K/V are read
    (the MiniLMv2 relation loss on the last layer), its attention output and feed-forward are not. DDP without
    ``find_unused_parameters`` fails on such parameters, and they would only carry weight decay. Found by one
    gradient probe on ``batch`` (a few real rows, on the distiller's device; models whole, i.e. before
    ``accelerator.prepare``), the RNG state restored after it so that it changes no later random draw. Every
    process probes the same rows and freezes the same parameters. Frozen parameters keep their initial values.
    """
    trainable = [(n, p) for n, p in distiller.named_parameters() if p.requires_grad]
    device = next(iter(batch.values())).device
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        teacher_result = capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what)
        loss = distiller(batch, teacher_result)["loss"]
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    frozen = []
    for (name, p), grad in zip(trainable, grads):
        if grad is None:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def make_compute_loss(teacher: nn.Module, distiller: IntermediateDistiller):
    """``compute_loss(model, batch)``, the per-step loss of the script's training loop: one teacher capture (no
    grad, eval mode, only the mapped layers kept) and the prepared distiller's forward (student with capture +
    losses). It returns the distiller's terms, {"loss", "loss_att", ...}; backward ``terms["loss"]``.

    distiller: the unwrapped IntermediateDistiller (its layer map and capture kinds); ``model`` at call time is
    whatever accelerator.prepare made of it (DDP, DeepSpeed engine, autocast wrapper).
    """
    layer_map, what = distiller.layer_map, distiller.capture_what
    values_unused = distiller.weights["relation"] == 0  # the score loss reads Q and K only

    def compute_loss(model, batch):
        teacher_result = capture_teacher(teacher, layer_map, batch, what)
        if values_unused and teacher_result.qkv:  # let the teacher's V go before the student's forward
            teacher_result.qkv = {m: qkv[:2] for m, qkv in teacher_result.qkv.items()}
        return model(batch, teacher_result)

    return compute_loss


def heldout_loss(accelerator, model, compute_loss, columns: Mapping, batch_size: int) -> dict[str, float]:
    """Mean intermediate loss terms on held-out features, over all processes: {"loss", "loss_att", ...}.

    columns: model-input arrays [N, L] (every feature is scored once: process r takes rows r, r + P, ...).
    Each batch's terms are weighted by its number of features. Every process runs the same number of forwards
    (a process with fewer batches repeats one with weight 0), so ZeRO-3's per-forward collectives stay in step.
    Leaves the model in eval mode: the training loop sets train mode again.
    """
    from kd.data import TensorDictDataset

    rank, world = accelerator.process_index, accelerator.num_processes
    n = len(next(iter(columns.values())))
    rows = list(range(rank, n, world)) or [0]
    weight_of_rows = 1.0 if rank < n else 0.0
    dataset = TensorDictDataset({k: v for k, v in columns.items()})
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    max_batches = math.ceil(math.ceil(n / world) / batch_size)
    module = accelerator.unwrap_model(model)  # not through DDP: no collective in an eval forward
    module.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for i in range(max_batches):
            real = i < len(batches)
            indices = batches[i] if real else batches[0]
            batch = {k: v.to(accelerator.device) for k, v in dataset.__getitems__(indices).items()}
            weight = len(indices) * weight_of_rows if real else 0.0
            for name, value in compute_loss(module, batch).items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * weight
            count += weight
    names = sorted(sums)
    packed = torch.stack([sums[k] for k in names] + [count]).to(accelerator.device)
    if world > 1:
        packed = accelerator.reduce(packed, reduction="sum")
    packed = packed.tolist()
    return {name: value / max(packed[-1], 1e-12) for name, value in zip(names, packed[:-1])}

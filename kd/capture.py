"""Capture of pre-softmax attention scores, Q/K/V and hidden states of chosen layers of an HF encoder.

Why hooks rather than ``output_attentions=True`` / ``output_hidden_states=True``:
- ``output_attentions`` forces the eager attention path and returns post-softmax probabilities (after dropout in
  training), while TinyBERT distils the pre-softmax scores; the capture here recomputes the scores
  Q Kᵀ / √d_head from the query/key projections of the mapped layers, so the model keeps whatever attention kernel
  it runs (SDPA, flash, eager) and the scores are taken before the padding mask, softmax and attention dropout.
- both flags keep every layer; here nothing is stored for unmapped layers.

Layer numbering follows :mod:`kd.layer_map`: 0 is the embedding output, m >= 1 the output of Transformer layer m.
Layer 0 is taken as the input of the first Transformer layer, i.e. the embedding output as the encoder sees it
(after ELECTRA's ``embeddings_project`` when embedding_size != hidden_size), which is also what transformers
returns as ``hidden_states[0]``.

Typical use::

    with LayerCapture(student, layers=(0, 2, 4), what={"scores", "hidden"}) as cap:
        student(input_ids=..., attention_mask=...)
        cap.attention_scores[2]  # [B, heads, T, T]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

CAPTURE_KINDS = frozenset({"scores", "hidden", "qkv"})
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class _Layout:
    """Where the Transformer layers and the Q/K/V projections live inside a base model."""

    layers: str  # dotted path from the base model to the nn.ModuleList of Transformer layers
    attention: str  # dotted path from one layer to the module holding the projections (and `scaling`)
    query: str
    key: str
    value: str


_BERT_LIKE = _Layout("encoder.layer", "attention.self", "query", "key", "value")
SUPPORTED_LAYOUTS: dict[str, _Layout] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _Layout("transformer.layer", "attention", "q_lin", "k_lin", "v_lin"),
}


@dataclass
class Captured:
    """What one forward left behind, keyed by layer index (see the module docstring for the numbering).

    hidden_states[m]: [B, T, H]; attention_scores[m]: [B, heads, T, T] (pre-mask, pre-softmax, pre-dropout);
    qkv[m]: (q, k, v), each [B, heads, T, d_head]. Layer 0 only ever has hidden_states.
    """

    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers, as accelerate does."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def base_encoder(model: nn.Module) -> tuple[nn.Module, _Layout]:
    """The bare encoder (e.g. BertModel) inside a possibly wrapped model with a QA/MLM head, and its layout.

    Raises ValueError listing the supported model types when the architecture is not one of them.
    """
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_LAYOUTS:
        raise ValueError(
            f"Layer capture does not support model type {model_type!r} ({type(model).__name__}). Supported model "
            f"types: {', '.join(sorted(SUPPORTED_LAYOUTS))}. Use one of these for intermediate-layer distillation, "
            "or add its module layout to kd.capture.SUPPORTED_LAYOUTS."
        )
    # PreTrainedModel.base_model is the encoder under a head (model.bert, model.roberta, ...) or the model itself.
    return getattr(model, "base_model", model), SUPPORTED_LAYOUTS[model_type]


def num_layers(model: nn.Module) -> int:
    """Number of Transformer layers of a supported model (the highest valid layer index)."""
    base, layout = base_encoder(model)
    return len(base.get_submodule(layout.layers))


class LayerCapture:
    """Forward hooks that record, for the given layers only, what a distillation loss needs.

    model: a supported HF model (bare encoder or with a head; DDP/accelerate/torch.compile wrappers are fine).
    layers: layer indices, 0 = embeddings (see the module docstring).
    what: subset of {"scores", "hidden", "qkv"}: "scores" and "qkv" apply to layers >= 1 only.

    After each forward of the model, ``hidden_states``, ``attention_scores`` and ``qkv`` hold that forward's
    tensors (shapes in :class:`Captured`); they are emptied when the next forward starts. Tensors are not detached:
    the student's keep their graph; run the teacher under no_grad (see :func:`teacher_forward`).
    Use as a context manager, or call ``register()`` / ``remove()`` for long-lived capture (e.g. a teacher).
    """

    def __init__(self, model: nn.Module, layers: Iterable[int], what: Iterable[str] = ("scores", "hidden")):
        self.what = frozenset(what)
        unknown = self.what - CAPTURE_KINDS
        if unknown or not self.what:
            raise ValueError(f"what must be a non-empty subset of {sorted(CAPTURE_KINDS)}, got {sorted(self.what)}")
        self.base, self.layout = base_encoder(model)
        self.layer_modules = self.base.get_submodule(self.layout.layers)
        self.layers = tuple(sorted(set(layers)))
        self._check_layers()
        self.captured = Captured()
        self._pending: dict[int, dict] = {}  # layer -> q/k/v of the running forward, and its attention module
        self._handles: list = []
        # Record only while the encoder's forward runs: gradient checkpointing replays layers during backward,
        # and what the replay produces must neither replace the tensors the loss was built from nor linger.
        self._recording = False

    @property
    def hidden_states(self) -> dict[int, torch.Tensor]:
        return self.captured.hidden_states

    @property
    def attention_scores(self) -> dict[int, torch.Tensor]:
        return self.captured.attention_scores

    @property
    def qkv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.captured.qkv

    def _check_layers(self) -> None:
        n = len(self.layer_modules)
        bad = [m for m in self.layers if not (isinstance(m, int) and 0 <= m <= n)]
        if bad or not self.layers:
            raise ValueError(f"Layers to capture must be ints from 0 (embeddings) to {n}; got {list(self.layers)}")

    # --- hook management -------------------------------------------------------------------------------------
    def register(self) -> LayerCapture:
        if self._handles:
            raise RuntimeError("LayerCapture is already registered; call remove() first")
        self._handles.append(self.base.register_forward_pre_hook(self._on_forward_start))
        self._handles.append(self.base.register_forward_hook(self._on_forward_end, always_call=True))
        for m in self.layers:
            if "hidden" in self.what:
                self._register_hidden_hook(m)
            if m > 0 and self.what & {"scores", "qkv"}:
                self._register_projection_hooks(m)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop the tensors of the last forward (frees the memory they hold)."""
        self.captured = Captured()
        self._pending.clear()

    def snapshot(self) -> Captured:
        """The last forward's tensors, in a container that outlives the next forward."""
        c = self.captured
        return Captured(dict(c.hidden_states), dict(c.attention_scores), dict(c.qkv))

    def __enter__(self) -> LayerCapture:
        return self.register()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _register_hidden_hook(self, m: int) -> None:
        if m == 0:
            hook = self.layer_modules[0].register_forward_pre_hook(self._on_encoder_input, with_kwargs=True)
        else:
            hook = self.layer_modules[m - 1].register_forward_hook(self._hidden_output_hook(m))
        self._handles.append(hook)

    def _register_projection_hooks(self, m: int) -> None:
        attention = self.layer_modules[m - 1].get_submodule(self.layout.attention)
        names = {"q": self.layout.query, "k": self.layout.key}
        if "qkv" in self.what:
            names["v"] = self.layout.value
        for slot, name in names.items():
            linear = attention.get_submodule(name)
            self._handles.append(linear.register_forward_hook(self._projection_hook(m, slot, attention)))

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _on_forward_start(self, module, args) -> None:
        self.clear()
        self._recording = True

    def _on_forward_end(self, module, args, output) -> None:
        self._recording = False
        for m, pending in self._pending.items():
            self._finish_layer(m, pending)
        self._pending.clear()

    def _on_encoder_input(self, module, args, kwargs) -> None:
        if self._recording:
            self.captured.hidden_states[0] = args[0] if args else kwargs["hidden_states"]

    def _hidden_output_hook(self, m: int):
        def hook(module, args, output):
            if not self._recording:
                return
            # transformers 5 layers return a tensor; older ones a tuple whose first item is the hidden state.
            self.captured.hidden_states[m] = output[0] if isinstance(output, tuple) else output

        return hook

    def _projection_hook(self, m: int, slot: str, attention: nn.Module):
        # Only views here, no arithmetic: these hooks run inside gradient-checkpointed layers, and any op that
        # saves tensors for backward would make the replay (where the hook does nothing) save fewer, which
        # non-reentrant checkpointing rejects. The scores are computed once the encoder's forward is over.
        def hook(module, args, output):
            if self._recording:
                self._pending.setdefault(m, {"attention": attention})[slot] = split_heads(
                    output, attention.attention_head_size)

        return hook

    def _finish_layer(self, m: int, pending: dict) -> None:
        if not {"q", "k"} <= pending.keys():  # the forward stopped early (it raised)
            return
        q, k = pending["q"], pending["k"]
        if "scores" in self.what:
            # The scaling the model itself uses (d_head ** -0.5), so the scores match its attention exactly.
            self.captured.attention_scores[m] = torch.matmul(q, k.transpose(-1, -2)) * pending["attention"].scaling
        if "qkv" in self.what and "v" in pending:
            self.captured.qkv[m] = (q, k, pending["v"])


def split_heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d], as the attention modules reshape their projections."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_size).transpose(1, 2)


def model_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder inputs in batch that the model's forward accepts (DistilBERT takes no token_type_ids).

    Labels and teacher logits are left out so the model does not compute a loss nobody reads.
    """
    accepted = inspect.signature(unwrap_model(model).forward).parameters
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and k in accepted}


def teacher_forward(teacher: nn.Module, capture: LayerCapture, batch: Mapping[str, torch.Tensor]):
    """Run the teacher so that ``capture`` (registered on it) fills; returns the teacher's model output.

    Sets teacher.eval() (and leaves it so: the teacher is never trained) so no dropout, attention dropout included,
    touches what the student learns; runs under torch.no_grad. It does not open an autocast context itself: call it
    inside ``accelerator.autocast()`` to run the teacher in mixed precision.
    """
    teacher.eval()
    with torch.no_grad():
        return teacher(**model_inputs(teacher, batch))


def capture_teacher(
    teacher: nn.Module, layer_map, batch: Mapping[str, torch.Tensor], what: Iterable[str]
) -> Captured:
    """Teacher tensors for the teacher side of ``layer_map`` (a kd.layer_map.LayerMap), nothing for other layers.

    Registers hooks for this one forward; for many steps, keep a registered LayerCapture and call
    :func:`teacher_forward` plus ``capture.snapshot()`` instead.
    """
    with LayerCapture(teacher, layer_map.teacher_layers, what) as capture:
        teacher_forward(teacher, capture, batch)
        return capture.snapshot()

"""QA students as ONNX graphs: export, an ONNX Runtime model that evaluates like a PyTorch one, parity, int8.

- :func:`export_qa_onnx`: a transformers QA model -> ONNX fp32 (``torch.onnx.export(dynamo=True)``), inputs
  ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when the tokenizer makes them), outputs ``start_logits``,
  ``end_logits``, all [batch, sequence] with both axes dynamic.
- :class:`OnnxQAModel`: the graph under ONNX Runtime, called as ``model(**batch)`` on torch tensors and answering
  with ``.start_logits`` / ``.end_logits``, so that kd.qa_eval.evaluate_qa and kd.model_eval.time_forward run it
  exactly as they run a PyTorch model.
- :func:`max_abs_logit_diff`: parity of two such models on the same batches.
- :func:`quantize_int8`: ONNX Runtime dynamic quantization (int8 weights, activations quantized per batch).

onnx, onnxscript and onnxruntime are export-only needs (requirements-test.txt): they are imported where they are
used, and only export_onnx.py and evaluate.py --onnx_file import this module.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import numpy as np
import torch

QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
QA_OUTPUTS = ("start_logits", "end_logits")

# ONNX Runtime's integer input types; the exporter writes int64 (torch's index type).
_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def tokenizer_input_names(tokenizer) -> list[str]:
    """The QA inputs (of :data:`QA_INPUTS`, in that order) that ``tokenizer`` makes for a (question, context)
    pair: BERT's make all three, RoBERTa's no ``token_type_ids``."""
    made = tokenizer("Who?", "Someone.")
    return [name for name in QA_INPUTS if name in made]


class StartEndLogits(torch.nn.Module):
    """A transformers QA model with positional inputs and a plain (start_logits, end_logits) tuple as output: the
    flat signature an ONNX graph has (no ModelOutput, no optional kwargs at run time)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """[B, L] int tensors -> (start_logits [B, L], end_logits [B, L])."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        outputs = self.model(**inputs)
        return outputs.start_logits, outputs.end_logits


def sample_inputs(tokenizer, names: list[str]) -> tuple[torch.Tensor, ...]:
    """Two (question, context) windows of different lengths, padded alike: [2, L] tensors in ``names`` order.

    Tracing with a batch of 2, a padded row and more than one token keeps the exporter from specialising either
    axis to a constant (it does so for sizes 0 and 1) or an all-ones mask away.
    """
    encoded = tokenizer(
        ["Who wrote the report?", "When?"],
        ["The report was written by the committee in 1998 after two years of hearings.", "In 1998."],
        padding="longest", truncation="only_second", max_length=64, return_tensors="pt",
    )
    return tuple(encoded[name] for name in names)


def export_qa_onnx(model: torch.nn.Module, tokenizer, path: str | os.PathLike, opset: int | None = None) -> list[str]:
    """Write ``model`` (a transformers QA model, fp32) as an ONNX graph to ``path``; returns its input names.

    Both axes of every input and output are dynamic ("batch", "sequence"), so the graph runs on any batch of
    windows up to the model's position limit. ``opset=None``: the exporter's default opset.
    """
    names = tokenizer_input_names(tokenizer)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = StartEndLogits(model).eval()
    with warnings.catch_warnings():
        # Each input names its axes with the same Dim; the exporter warns that it keeps one of the equal names.
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
        program = torch.onnx.export(
            wrapper, sample_inputs(tokenizer, names), input_names=names, output_names=list(QA_OUTPUTS),
            dynamic_shapes={name: {0: batch, 1: sequence} for name in names}, opset_version=opset, dynamo=True,
            verbose=False,
        )
    # The exporter tags every node with its Python stack trace and module path: debug info that would ship this
    # machine's file paths inside the model (and, for a small model, double its size).
    for function in program.model.functions.values():
        for node in function:
            node.metadata_props.clear()
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.save(os.fspath(path))
    return names


def onnx_file_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX model file plus the external-data files it names (graphs over 2 GB keep weights there)."""
    import onnx

    path = os.fspath(path)
    proto = onnx.load(path, load_external_data=False)
    external = {
        entry.value
        for init in proto.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    folder = os.path.dirname(path)
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, name)) for name in external)


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain ONNX opset a model file was written for."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


class OnnxQAModel:
    """An ONNX QA graph under ONNX Runtime, called like a transformers QA model.

    ``model(**batch)``: [B, L] torch integer tensors named as the graph's inputs -> an object with
    ``.start_logits`` and ``.end_logits``, float32 torch tensors [B, L] on the inputs' device (where
    ``accelerator.gather_for_metrics`` expects them). It is not a torch module: nothing for
    ``accelerator.prepare`` to place or wrap (kd.model_eval.evaluate_model prepares only its batches), and
    ``torch.no_grad`` / ``accelerator.autocast`` around a call change nothing.

    ``num_threads`` (default: ``torch.get_num_threads()``): ONNX Runtime intra-op threads, by default as many as
    torch uses, so that latencies of the two compare like for like. ``providers``: ONNX Runtime execution
    providers, CPU by default (the onnxruntime wheel of requirements-test.txt has no other).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._dtypes = {i.name: _ORT_INT_TYPES.get(i.type, np.int64) for i in self.session.get_inputs()}
        missing = set(QA_OUTPUTS) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise ValueError(f"{self.path} has no output(s) {sorted(missing)}: not a QA graph of export_qa_onnx.")

    def eval(self) -> OnnxQAModel:
        """Nothing to switch (an exported graph has no dropout); here so callers can treat it as a torch model."""
        return self

    def __call__(self, **batch: torch.Tensor):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        if set(batch) != set(self.input_names):
            raise ValueError(
                f"{self.path} takes inputs {self.input_names}, got {sorted(batch)}: use the tokenizer the graph "
                "was exported with (export_onnx.py copies it beside model.onnx)."
            )
        device = batch["input_ids"].device
        feed = {name: batch[name].detach().cpu().numpy().astype(self._dtypes[name], copy=False)
                for name in self.input_names}
        start, end = self.session.run(list(QA_OUTPUTS), feed)
        return QuestionAnsweringModelOutput(
            start_logits=torch.from_numpy(start).to(device), end_logits=torch.from_numpy(end).to(device)
        )

    def num_parameters(self) -> int:
        """Elements of the graph's initializers: its weights as stored (for an int8 graph: int8 weights plus their
        scales and zero points)."""
        import onnx

        proto = onnx.load(self.path, load_external_data=False)
        return sum(math.prod(init.dims) for init in proto.graph.initializer)

    def size_on_disk_bytes(self) -> int:
        return onnx_file_bytes(self.path)


def max_abs_logit_diff(reference, candidate, dataloader) -> dict[str, float]:
    """Largest |reference - candidate| of start and end logits over every window of ``dataloader``.

    Both models get the same batches (dicts of [B, L] tensors) and are called as ``model(**batch)``; every position
    counts, padding included (it is computed the same way, so it must agree too).
    """
    worst = {"start": 0.0, "end": 0.0}
    with torch.no_grad():
        for batch in dataloader:
            ref, cand = reference(**batch), candidate(**batch)
            for key in worst:
                diff = (getattr(ref, f"{key}_logits").float() - getattr(cand, f"{key}_logits").float()).abs()
                worst[key] = max(worst[key], float(diff.max()))
    return {"max_abs_diff_start": worst["start"], "max_abs_diff_end": worst["end"]}


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """ONNX Runtime dynamic quantization of ``source`` to ``target``: MatMul (and embedding Gather) weights stored
    as int8, activations quantized batch by batch at run time; no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs "Please consider (to run) pre-processing" on the root logger at every call. That
    # pre-processing (quant_pre_process) fails on the dynamo exporter's graphs (incomplete symbolic shape
    # inference); with that step skipped it left a MiniLM student's int8 logits unchanged and its speed within noise.
    def not_the_hint(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")

    root = logging.getLogger()
    root.addFilter(not_the_hint)
    try:
        quantize_dynamic(os.fspath(source), os.fspath(target), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(not_the_hint)

"""The models of a stage: how long an input they take, loading them whole, a frozen teacher, the plain student out,
and the two checks every load from a model dir needs: a QA head that was trained, a tokenizer that was saved.

Separate from kd.intermediate because none of this depends on the losses: the teacher and the student are loaded
before the distiller exists, and the export only needs the distiller's ``student.`` prefix.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

from torch import nn

from kd.capture import base_encoder


# RoBERTa-style models number positions from pad_token_id + 1, so they hold 2 positions fewer than they have
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def usable_positions(config) -> int:
    """The longest input (special tokens included) a model of ``config`` takes."""
    return config.max_position_embeddings - POSITION_OFFSET.get(config.model_type, 0)


class UntrainedQAHeadError(ValueError):
    pass


class NoTokenizerError(ValueError):
    pass


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_load_report():
    """transformers' multi-line load report (missing/unexpected keys) gives way to our own one-line verdict. A
    filter, not a level: transformers 5.24 runs another (tensor-parallel) check that warns when the level is set."""
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        report.removeFilter(_not_a_load_report)


def load_qa_model(name_or_path: str, **kwargs) -> tuple[nn.Module, list[str]]:
    """``AutoModelForQuestionAnswering.from_pretrained(name_or_path, **kwargs)`` and the QA-head tensors it
    initialised at random because the checkpoint has none (a bare encoder saved with save_pretrained, a masked
    LM): [] for a trained QA model. Encoder tensors the checkpoint lacks are not the head's and not listed."""
    from transformers import AutoModelForQuestionAnswering

    with _quiet_load_report():
        model, loading = AutoModelForQuestionAnswering.from_pretrained(name_or_path, output_loading_info=True,
                                                                       **kwargs)
    encoder = f"{model.base_model_prefix}."
    return model, sorted(k for k in loading["missing_keys"] if not k.startswith(encoder))


def untrained_qa_head(name_or_path: str) -> list[str]:
    """:func:`load_qa_model`'s list, without loading the model when the checkpoint's safetensors headers already
    name every QA-head tensor of its class (the usual case, a QA model). Otherwise the model is loaded on the CPU
    and transformers' loading info decides (``device_map="meta"`` would not read weights, but transformers 5.2
    reports no missing key there)."""
    import glob
    import os

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    files = glob.glob(os.path.join(name_or_path, "*.safetensors")) if os.path.isdir(name_or_path) else []
    if files:
        saved = set()
        for file in files:
            with safe_open(file, "pt") as f:
                saved.update(f.keys())
        with torch.device("meta"):
            model = AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(name_or_path))
        encoder = f"{model.base_model_prefix}."
        if all(k in saved for k in model.state_dict() if not k.startswith(encoder)):
            return []
    return load_qa_model(name_or_path)[1]


def untrained_qa_head_message(name_or_path: str, head: list[str]) -> str:
    """What is wrong with a model whose QA head is ``head`` (from :func:`load_qa_model`), and the usual fix."""
    return (f"{name_or_path} has no trained QA head: from_pretrained initialises {', '.join(head)} at random (a bare "
            "encoder or a masked LM, not a QA model), so its start/end logits are noise. Fine-tune it first, e.g. "
            f"train_prediction.py --model_name_or_path {name_or_path} without a teacher")


def load_tokenizer(name_or_path: str, what: str = "model"):
    """``AutoTokenizer.from_pretrained(name_or_path)``, refused (NoTokenizerError naming ``what`` and the dir) when
    there is no tokenizer there: transformers then builds one from the config alone, with an empty vocabulary
    (its special tokens only), which turns every word into [UNK] and still gives answers."""
    from transformers import AutoTokenizer

    fix = (f"Save the tokenizer of the model it was made from there (tokenizer.save_pretrained({name_or_path!r})), "
           "or pass a model dir that has one.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NoTokenizerError(f"{what} {name_or_path}: no usable tokenizer ({first}). {fix}") from None
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    if all(token in specials for token in tokenizer.get_vocab()):
        raise NoTokenizerError(f"{what} {name_or_path}: no tokenizer files there (AutoTokenizer made a "
                               f"{type(tokenizer).__name__} of {len(tokenizer)} special tokens only, so every word "
                               f"would be {tokenizer.unk_token or 'unknown'}). {fix}")
    return tokenizer


@contextlib.contextmanager
def no_zero3_init(accelerator):
    """Load models whole on every process even when DeepSpeed ZeRO-3's ``zero3_init_flag`` is on.

    The teacher never enters DeepSpeed (it must stay whole: capture reads its layers directly), and the student
    must be whole until ``accelerator.prepare`` for kd.intermediate.freeze_unreached_parameters; ZeRO-3 partitions it
    in prepare. A no-op without DeepSpeed.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None) if accelerator is not None else None
    if plugin is None:
        yield
    else:
        with plugin.zero3_init_context_manager(enable=False):
            yield


def load_teacher(name_or_path: str, accelerator, dtype_choice: str = "auto") -> nn.Module:
    """The teacher's bare encoder, ready to be captured: eval mode, requires_grad False, on ``accelerator.device``,
    in the teacher precision.

    dtype_choice: "auto" (bf16 on a GPU that has it, else fp16; fp32 on CPU: kd.teacher_cache.teacher_dtype),
    "float32", "bfloat16" or "float16". Loaded with AutoModel, so any head the checkpoint has (QA, MLM) is left
    out (capture needs the encoder only), and so is the pooler when the class lets us (``add_pooling_layer``).
    The teacher is outside the optimizer and outside DeepSpeed: do not pass it to ``accelerator.prepare``.
    Run it with :func:`kd.capture.capture_teacher` (no_grad, eval, so no dropout of any kind).
    """
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from kd.teacher_cache import teacher_dtype

    device = accelerator.device
    dtype = teacher_dtype(dtype_choice, device)
    config = AutoConfig.from_pretrained(name_or_path)
    kwargs = {}
    try:
        if "add_pooling_layer" in inspect.signature(MODEL_MAPPING[type(config)].__init__).parameters:
            kwargs["add_pooling_layer"] = False
    except KeyError:
        pass  # AutoModel below raises its own error naming the unsupported config
    with no_zero3_init(accelerator):
        teacher = AutoModel.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    base_encoder(teacher)  # fails early, listing the supported model types, when capture cannot read it
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def save_weights(model, output_dir: str, state_dict: dict | None = None) -> None:
    """``model.save_pretrained`` (safetensors) under the parameter names the model has.

    transformers 5.x "reverts" the renamings it may apply when loading (save_original_format); under DeepSpeed
    ZeRO-3 it reverted its legacy LayerNorm ``gamma``/``beta`` one on a BERT loaded with ``weight``/``bias`` keys,
    writing keys that no other tool reads (seen with 5.24). Our models are saved as they are named.
    """
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True, save_original_format=False)


def export_student(accelerator, model, tokenizer, output_dir: str) -> None:
    """Save the plain student (no projections) and the tokenizer, loadable with from_pretrained, e.g. as
    train_prediction.py's --model_name_or_path.

    model: the prepared distiller (or the IntermediateDistiller itself). Call on EVERY process:
    ``accelerator.get_state_dict`` gathers ZeRO-3 shards collectively; the ``student.`` prefix is stripped and
    the projections dropped, and the main process writes ``save_pretrained`` (safetensors) + the tokenizer.
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    distiller = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        prefix = "student."
        student_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        save_weights(distiller.student, output_dir, student_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()

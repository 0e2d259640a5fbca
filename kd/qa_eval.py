"""Inference and SQuAD evaluation of extractive QA models under HF Accelerate.

Typical use (the same on every process)::

    features = prepare_eval_features(examples, tokenizer, ...)
    dataloader = accelerator.prepare(make_eval_dataloader(features, batch_size))
    metrics, predictions, null_odds = evaluate_qa(accelerator, model, examples, features, dataloader)
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from kd.checkpoint import write_json_atomic
from kd.squad import has_unanswerable, model_input_columns, postprocess_qa_predictions
from kd.squad_metrics import squad_evaluate

# Pads logits of shorter windows when batches differ in length; far below any real logit so a
# padded position can never be picked (they are outside the context anyway).
_LOGIT_PAD = -1e4


def make_eval_dataloader(features: datasets.Dataset, batch_size: int) -> DataLoader:
    """Unshuffled DataLoader over the model-input columns of evaluation features.

    Batches are dicts of tensors (input_ids, attention_mask, [token_type_ids]), each [B, L].
    """
    inputs = features.select_columns(model_input_columns(features)).with_format("torch")
    return DataLoader(inputs, batch_size=batch_size, shuffle=False, collate_fn=default_data_collator)


def _pad_to(array: np.ndarray, length: int) -> np.ndarray:
    """Right-pad a [B, L] array to [B, length] with a very low logit."""
    if array.shape[1] == length:
        return array
    return np.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=_LOGIT_PAD)


def predict_logits(accelerator, model, dataloader) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over every feature; return (start_logits, end_logits), float32 [N, L].

    Rows are in dataset order on every process: ``gather_for_metrics`` collects all processes'
    batches and drops the duplicates the distributed sampler added to even out the last batch.
    ``model`` may be wrapped (DDP etc.); it is only called as ``model(**batch)``.
    """
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for batch in dataloader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                outputs = model(**batch)
            # Processes may hold windows of different lengths if features were not padded alike.
            start = accelerator.pad_across_processes(outputs.start_logits, dim=1, pad_index=_LOGIT_PAD)
            end = accelerator.pad_across_processes(outputs.end_logits, dim=1, pad_index=_LOGIT_PAD)
            start, end = accelerator.gather_for_metrics((start.contiguous(), end.contiguous()))
            starts.append(start.float().cpu().numpy())
            ends.append(end.float().cpu().numpy())
    if not starts:
        raise ValueError("The evaluation dataloader is empty: no features to run the model on.")
    length = max(a.shape[1] for a in starts)
    return (
        np.concatenate([_pad_to(a, length) for a in starts]),
        np.concatenate([_pad_to(a, length) for a in ends]),
    )


def evaluate_qa(
    accelerator,
    model,
    examples: datasets.Dataset,
    features: datasets.Dataset,
    dataloader,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool | None = None,
    no_answer_threshold: float = 0.0,
) -> tuple[dict, dict[str, str], dict[str, float]]:
    """Predict, post-process and score; returns (metrics, predictions, null_odds).

    ``version_2_with_negative=None`` decides from the data (any unanswerable question). Metrics
    are the official SQuAD 2.0 numbers (see :func:`score_predictions`) including the ``best_*``
    threshold keys. Every process computes the same result.
    """
    start_logits, end_logits = predict_logits(accelerator, model, dataloader)
    if len(start_logits) != len(features):
        raise ValueError(
            f"Got logits for {len(start_logits)} windows but there are {len(features)} features; pass the "
            "dataloader built from these features (make_eval_dataloader + accelerator.prepare)."
        )
    if version_2_with_negative is None:
        version_2_with_negative = has_unanswerable(examples)
    predictions, null_odds = postprocess_qa_predictions(
        examples,
        features,
        start_logits,
        end_logits,
        n_best_size=n_best_size,
        max_answer_length=max_answer_length,
        version_2_with_negative=version_2_with_negative,
        null_score_diff_threshold=no_answer_threshold,
    )
    metrics = score_predictions(examples, predictions, null_odds)
    return metrics, predictions, null_odds


def score_predictions(examples, predictions: dict[str, str], null_odds: dict[str, float]) -> dict:
    """Official SQuAD 2.0 metrics of post-processed predictions, with ``null_odds`` as na_probs.

    The predictions already contain the no-answer decision (""), so the official
    ``na_prob_thresh`` rule is switched off (an infinite threshold): with its default of 1.0 it
    would blank every answer whose null odds exceed 1, even on SQuAD 1.1 data. ``null_odds`` then
    only drives the ``best_*`` threshold search.
    """
    return squad_evaluate(examples, predictions, na_probs=null_odds, na_prob_thresh=float("inf"))


def save_eval_outputs(output_dir: str | os.PathLike, results: dict, predictions: dict, null_odds: dict) -> None:
    """Write predictions.json, null_odds.json and eval_results.json (call on the main process only).

    The first two are in the format the official SQuAD 2.0 script reads (pred file, na-prob file).
    Each file is written atomically (temp file + rename), so readers never see half a file.
    """
    os.makedirs(output_dir, exist_ok=True)
    for name, obj in (("predictions.json", predictions), ("null_odds.json", null_odds), ("eval_results.json", results)):
        write_json_atomic(os.path.join(output_dir, name), obj)

"""Evaluation of extractive QA models under HF Accelerate: windows -> logits -> answers -> SQuAD metrics.

Typical use (the same on every process)::

    features = kd.features.prepare_eval_features(examples, tokenizer, ...)
    dataloader = accelerator.prepare(make_eval_dataloader(features, batch_size))
    metrics, predictions, null_odds = evaluate_qa(accelerator, model, examples, features, dataloader)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from kd.files import write_json_atomic
from kd.features import model_input_columns
from kd.squad import has_unanswerable
from kd.squad_metrics import squad_evaluate

logger = logging.getLogger(__name__)

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
    ``accelerator=None``: one process, batches go to ``model.device`` (transformers models have one), else the
    CPU (kd.inference's use: serving needs no distributed state).
    """
    device = accelerator.device if accelerator is not None else getattr(model, "device", torch.device("cpu"))
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for batch in dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                outputs = model(**batch)
            start, end = outputs.start_logits, outputs.end_logits
            if accelerator is not None:
                # Processes may hold windows of different lengths if features were not padded alike.
                start = accelerator.pad_across_processes(start, dim=1, pad_index=_LOGIT_PAD)
                end = accelerator.pad_across_processes(end, dim=1, pad_index=_LOGIT_PAD)
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


# --------------------------------------------------------------------------------------------
# Post-processing: logits -> answer texts
# --------------------------------------------------------------------------------------------


def _column(records, name: str) -> list:
    """One column as a list, from a ``datasets.Dataset`` or a sequence of dict records."""
    if isinstance(records, datasets.Dataset):
        return list(records[name])
    return [r[name] for r in records]


def _checked_logits(start_logits, end_logits, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Both logits as float32 arrays [num_features, seq_len]; ValueError for any other shape."""
    start_logits = np.asarray(start_logits, dtype=np.float32)
    end_logits = np.asarray(end_logits, dtype=np.float32)
    if start_logits.ndim != 2 or start_logits.shape != end_logits.shape or len(start_logits) != num_features:
        raise ValueError(
            f"Expected start/end logits of shape [num_features={num_features}, seq_len]; got "
            f"{start_logits.shape} and {end_logits.shape}."
        )
    return start_logits, end_logits


def _offset_arrays(features: datasets.Dataset, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets of every feature as arrays via Arrow (fast on 10k+ windows).

    Returns:
        in_context [N, L] bool, char_start [N, L] int64, char_end [N, L] int64 (0 outside the
        context). Tokens beyond a feature's offset list count as outside the context.
    """
    column = features.select_columns(["offset_mapping"]).with_format("arrow")[:]["offset_mapping"]
    per_feature = column.combine_chunks()
    lengths = per_feature.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    per_token = per_feature.flatten()
    valid = per_token.is_valid().to_numpy(zero_copy_only=False)
    # no context token in any window (empty contexts): Arrow then types the offsets as null, without pairs
    pairs = (per_token.drop_null().flatten().to_numpy(zero_copy_only=False).reshape(-1, 2) if valid.any()
             else np.zeros((0, 2), dtype=np.int64))
    if lengths.max(initial=0) > seq_len:
        raise ValueError(f"Features have up to {lengths.max()} tokens but the logits only {seq_len}.")
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    shape = (len(lengths), seq_len)
    in_context = np.zeros(shape, dtype=bool)
    char_start = np.zeros(shape, dtype=np.int64)
    char_end = np.zeros(shape, dtype=np.int64)
    in_context[rows[valid], cols[valid]] = True
    char_start[rows[valid], cols[valid]] = pairs[:, 0]
    char_end[rows[valid], cols[valid]] = pairs[:, 1]
    return in_context, char_start, char_end


def _null_positions(features: datasets.Dataset, num_features: int) -> np.ndarray:
    """CLS index per feature: the first attended token (index 0 when there is no attention_mask).

    For CLS-first models (BERT, RoBERTa, ...) this is the CLS token for right and left padding.
    """
    if "attention_mask" not in features.column_names:
        return np.zeros(num_features, dtype=np.int64)
    mask = np.asarray(features.with_format("numpy")["attention_mask"][:])
    return np.argmax(mask != 0, axis=1)


def _top_k_grid(
    start_logits: np.ndarray, end_logits: np.ndarray, in_context: np.ndarray, n_best_size: int, max_answer_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each feature's top-``n_best_size`` starts x ends and the score of every pair (start + end logit).

    Valid: both tokens in the context, end >= start, at most ``max_answer_length`` tokens.

    Args: logits [N, L] float, in_context [N, L] bool.
    Returns: top_start [N, k], top_end [N, k] token indices, scores [N, k, k] (-inf where the pair is invalid).
    """
    k = min(n_best_size, start_logits.shape[1])
    top_start = np.argsort(-start_logits, axis=1, kind="stable")[:, :k]
    top_end = np.argsort(-end_logits, axis=1, kind="stable")[:, :k]
    s_logit = np.take_along_axis(start_logits, top_start, axis=1)
    e_logit = np.take_along_axis(end_logits, top_end, axis=1)
    s_ok = np.take_along_axis(in_context, top_start, axis=1)
    e_ok = np.take_along_axis(in_context, top_end, axis=1)
    length = top_end[:, None, :] - top_start[:, :, None] + 1  # [N, k, k]
    valid = s_ok[:, :, None] & e_ok[:, None, :] & (length >= 1) & (length <= max_answer_length)
    return top_start, top_end, np.where(valid, s_logit[:, :, None] + e_logit[:, None, :], -np.inf)


def _best_spans_top_k(
    start_logits: np.ndarray, end_logits: np.ndarray, in_context: np.ndarray, n_best_size: int, max_answer_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best valid (start, end) of each feature's :func:`_top_k_grid`.

    Returns: start [N], end [N] token indices and score [N] (-inf where no pair was valid).
    """
    top_start, top_end, scores = _top_k_grid(start_logits, end_logits, in_context, n_best_size, max_answer_length)
    k = top_start.shape[1]
    flat_best = scores.reshape(len(scores), -1).argmax(axis=1)
    i, j = np.divmod(flat_best, k)
    rows = np.arange(len(scores))
    return top_start[rows, i], top_end[rows, j], scores.reshape(len(scores), -1)[rows, flat_best]


def _best_span_exhaustive(
    start_logits: np.ndarray, end_logits: np.ndarray, in_context: np.ndarray, max_answer_length: int
) -> tuple[int, int, float]:
    """Best valid span of one feature over all start/end pairs (fallback when the top-k fail).

    Args: logits [L], in_context [L]. Returns (start, end, score), score -inf if none is valid.
    """
    seq_len = len(start_logits)
    starts = np.arange(seq_len)[:, None]
    ends = starts + np.arange(max_answer_length)[None, :]  # [L, max_answer_length]
    inside = ends < seq_len
    ends_clipped = np.minimum(ends, seq_len - 1)
    valid = inside & in_context[:, None] & in_context[ends_clipped]
    scores = np.where(valid, start_logits[:, None] + end_logits[ends_clipped], -np.inf)
    s, offset = np.unravel_index(np.argmax(scores), scores.shape)
    return int(s), int(ends_clipped[s, offset]), float(scores[s, offset])


def _feature_best_spans(start_logits, end_logits, in_context, n_best_size, max_answer_length, chunk=4096):
    """Per-feature best span: top-k search in chunks (bounded memory), exhaustive where it fails."""
    parts = [
        _best_spans_top_k(
            start_logits[i : i + chunk], end_logits[i : i + chunk], in_context[i : i + chunk],
            n_best_size, max_answer_length,
        )
        for i in range(0, len(start_logits), chunk)
    ]
    best_start, best_end, best_score = (np.concatenate(p) for p in zip(*parts))
    best_score = best_score.astype(np.float64)
    for f in np.flatnonzero(np.isneginf(best_score)):
        best_start[f], best_end[f], best_score[f] = _best_span_exhaustive(
            start_logits[f], end_logits[f], in_context[f], max_answer_length
        )
    return best_start, best_end, best_score


def _feature_examples(example_ids: Sequence[str], feature_qids: Sequence[str]) -> list[int]:
    """Index into ``example_ids`` of each feature's question; ValueError for an unknown id."""
    position = {qid: i for i, qid in enumerate(example_ids)}
    feature_example = [position.get(qid, -1) for qid in feature_qids]
    if -1 in feature_example:
        unknown = feature_qids[feature_example.index(-1)]
        raise ValueError(f"Feature for question id {unknown!r} has no matching example.")
    return feature_example


def _per_example(
    feature_example: Sequence[int], best_score: np.ndarray, null_scores: np.ndarray, num_examples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: its best window by span score (-1 if it has none) and its smallest null score.

    Args: feature_example [N] example index per feature; best_score, null_scores [N] float.
    Returns: best_feature [E] int64, null_of_example [E] float64 (inf where there is no window).
    """
    best_feature = np.full(num_examples, -1, dtype=np.int64)
    null_of_example = np.full(num_examples, np.inf)
    for f, e in enumerate(feature_example):
        if best_feature[e] < 0 or best_score[f] > best_score[best_feature[e]]:
            best_feature[e] = f
        null_of_example[e] = min(null_of_example[e], null_scores[f])
    return best_feature, null_of_example


def answer_spans(
    examples,
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    top_k: int = 1,
) -> list[dict | None]:
    """Per question (in ``examples`` order): its best answer spans over all its windows and its null odds.

    Per window, the ``n_best_size`` highest start and end logits are paired; pairs outside the
    context, reversed, or longer than ``max_answer_length`` tokens are skipped (if no top pair is
    valid, all pairs of that window are searched). A question's best span is the best over its
    windows. Its null score is the minimum over its windows of start+end logit at the CLS token,
    and ``null_odds = null score - best span score``.

    Args:
        examples: Dataset/records with ``id`` and ``context``.
        features: evaluation features from :func:`kd.features.prepare_eval_features` (example_id,
            offset_mapping, attention_mask), in the same order as the logits.
        start_logits, end_logits: float arrays [num_features, seq_len].
        top_k: how many spans per question; the first is always the best span above, the others are
            the next best distinct (character start, end) pairs of any of its windows' top-k grids.

    Returns:
        one entry per example: None when it has no window, else ``{"null_odds": float, "spans":
        [{"score", "start", "end"}, ...]}`` (score = start + end logit, start/end = character offsets
        into the context; ``spans`` is empty when no window has any valid span).
    """
    start_logits, end_logits = _checked_logits(start_logits, end_logits, len(features))
    if n_best_size < 1 or max_answer_length < 1 or top_k < 1:
        raise ValueError("n_best_size, max_answer_length and top_k must be positive.")
    num_features = len(features)
    in_context, char_start, char_end = _offset_arrays(features, start_logits.shape[1])
    null_pos = _null_positions(features, num_features)
    rows = np.arange(num_features)
    null_scores = start_logits[rows, null_pos].astype(np.float64) + end_logits[rows, null_pos]
    best_start, best_end, best_score = _feature_best_spans(
        start_logits, end_logits, in_context, n_best_size, max_answer_length
    )

    example_ids = _column(examples, "id")
    feature_example = _feature_examples(example_ids, list(features["example_id"]))
    best_feature, null_of_example = _per_example(feature_example, best_score, null_scores, len(example_ids))

    out: list[dict | None] = []
    for e in range(len(example_ids)):
        f = best_feature[e]
        if f < 0:
            out.append(None)
            continue
        spans = []
        if np.isfinite(best_score[f]):
            spans.append({"score": float(best_score[f]), "start": int(char_start[f, best_start[f]]),
                          "end": int(char_end[f, best_end[f]])})
        out.append({"null_odds": float(null_of_example[e] - best_score[f]), "spans": spans})
    if top_k > 1:
        _add_runner_up_spans(out, feature_example, start_logits, end_logits, in_context, char_start, char_end,
                             n_best_size, max_answer_length, top_k)
    return out


def _add_runner_up_spans(out, feature_example, start_logits, end_logits, in_context, char_start, char_end,
                         n_best_size, max_answer_length, top_k) -> None:
    """Extend each entry's ``spans`` (best first) to ``top_k`` distinct character spans, by score."""
    top_start, top_end, scores = _top_k_grid(start_logits, end_logits, in_context, n_best_size, max_answer_length)
    candidates: dict[int, list[tuple[float, int, int]]] = {}
    for f, e in enumerate(feature_example):  # (a feature's question has a window, so out[e] is not None)
        for i, j in zip(*np.nonzero(np.isfinite(scores[f]))):
            s, t = top_start[f, i], top_end[f, j]
            candidates.setdefault(e, []).append((float(scores[f, i, j]), int(char_start[f, s]), int(char_end[f, t])))
    for e, found in candidates.items():
        spans = out[e]["spans"]
        seen = {(sp["start"], sp["end"]) for sp in spans}
        for score, start, end in sorted(found, key=lambda c: -c[0]):
            if len(spans) >= top_k:
                break
            if (start, end) not in seen:
                seen.add((start, end))
                spans.append({"score": score, "start": start, "end": end})


def postprocess_qa_predictions(
    examples,
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Turn per-window start/end logits into one answer text per question (the best span of
    :func:`answer_spans`, which says how it is chosen).

    version_2_with_negative: predict "" when null_odds > ``null_score_diff_threshold``; otherwise
    always the best span.

    Returns:
        (predictions {id: text}, null_odds {id: float}). Questions without any window are left out.
    """
    spans = answer_spans(examples, features, start_logits, end_logits, n_best_size=n_best_size,
                         max_answer_length=max_answer_length)
    example_ids, contexts = _column(examples, "id"), _column(examples, "context")
    predictions, null_odds = {}, {}
    for qid, context, found in zip(example_ids, contexts, spans):
        if found is None:
            continue
        best = found["spans"][0] if found["spans"] else None
        text = context[best["start"]:best["end"]] if best else ""
        null_odds[qid] = found["null_odds"]
        no_answer = version_2_with_negative and found["null_odds"] > null_score_diff_threshold
        predictions[qid] = "" if no_answer else text
    missing = len(example_ids) - len(predictions)
    if missing:
        logger.warning("%d question(s) have no feature and get no prediction.", missing)
    return predictions, null_odds


# --------------------------------------------------------------------------------------------
# Evaluation: predict, post-process, score
# --------------------------------------------------------------------------------------------


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

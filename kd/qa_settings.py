"""The settings a QA model was trained with, saved beside its weights so that inference uses them by default.

A model dir written by train_prediction.py or train_task_intermediate.py holds ``qa_settings.json``::

    {"max_seq_length": 256, "doc_stride": 128, "max_query_length": 64, "max_answer_length": 30,
     "n_best_size": 20, "version_2_with_negative": true, "no_answer_threshold": -1.7,
     "no_answer_threshold_source": "best_f1_thresh on dev.json"}

Window sizes decide which tokens a model sees together: a student trained on 256-token windows and served on
384-token ones (the default of Haystack's readers and of HF's examples) sees contexts it never learnt from. The
no-answer threshold is the SQuAD 2.0 ``best_f1_thresh`` of the model's last evaluation: null odds above it mean
"no answer". Readers: :func:`load_qa_settings` (a local dir or a hub id) and :func:`resolve_window` (explicit values
win, then the model's, then the HF defaults).
"""

from __future__ import annotations

import json
import logging
import os

from kd.files import write_json_atomic

logger = logging.getLogger(__name__)

QA_SETTINGS_FILE = "qa_settings.json"
WINDOW_KEYS = ("max_seq_length", "doc_stride", "max_query_length")
ANSWER_KEYS = ("max_answer_length", "n_best_size")
# What run_qa_no_trainer.py (and our argparse defaults) use when neither the user nor the model says otherwise.
DEFAULTS = {"max_seq_length": 384, "doc_stride": 128, "max_query_length": 64, "max_answer_length": 30,
            "n_best_size": 20, "no_answer_threshold": 0.0}


def settings_from_args(args, eval_metrics: dict | None = None, validation_file: str | None = None) -> dict:
    """The window/answer settings of a run's ``args`` (a Namespace or dict), plus the best no-answer threshold of
    ``eval_metrics`` when the evaluation had unanswerable questions (its ``best_f1_thresh``)."""
    values = args if isinstance(args, dict) else vars(args)
    settings = {k: values[k] for k in WINDOW_KEYS + ANSWER_KEYS if values.get(k) is not None}
    if eval_metrics:  # evaluated on unanswerable questions too: serve with no-answers on, at the best threshold
        settings["version_2_with_negative"] = "NoAns_total" in eval_metrics
    if eval_metrics and "NoAns_total" in eval_metrics and "best_f1_thresh" in eval_metrics:
        settings["no_answer_threshold"] = float(eval_metrics["best_f1_thresh"])
        where = f" on {os.path.basename(validation_file)}" if validation_file else ""
        settings["no_answer_threshold_source"] = f"best_f1_thresh{where}"
    return settings


def save_qa_settings(model_dir: str, settings: dict) -> None:
    """Write ``qa_settings.json`` into ``model_dir`` (atomically; call on the main process only)."""
    write_json_atomic(os.path.join(model_dir, QA_SETTINGS_FILE), settings)


def load_qa_settings(name_or_path: str) -> dict:
    """The saved settings of a model dir or hub id; {} when it has none (any model not trained here)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, QA_SETTINGS_FILE)
        if not os.path.isfile(path):
            return {}
    else:
        from transformers.utils import cached_file

        try:
            path = cached_file(name_or_path, QA_SETTINGS_FILE, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path is None:
            return {}
    with open(path, encoding="utf-8") as f:
        try:
            settings = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); delete it or write it again.") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of settings, e.g. {{\"max_seq_length\": 384}}.")
    return settings


def resolve_settings(explicit: dict, saved: dict) -> tuple[dict, dict]:
    """Each of DEFAULTS' keys from ``explicit`` (not None), else ``saved``, else the default.

    Returns (values, source) where source[k] is "argument", "model" or "default" (for the log line that says
    which window a run used and why)."""
    values, source = {}, {}
    for key, default in DEFAULTS.items():
        if explicit.get(key) is not None:
            values[key], source[key] = explicit[key], "argument"
        elif saved.get(key) is not None:
            values[key], source[key] = saved[key], "model"
        else:
            values[key], source[key] = default, "default"
    return values, source

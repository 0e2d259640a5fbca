"""Extractive QA inference with a trained student: the documented way to serve it on transformers >= 5.3, which
removed ``pipeline("question-answering")``.

    from kd.inference import QuestionAnswerer
    qa = QuestionAnswerer("runs/student")                      # a model dir or a hub id; device/dtype optional
    qa(["Who wrote Hamlet?"], ["Hamlet is a tragedy written by William Shakespeare."], top_k=3)
    -> [{"id": "0", "answer": "William Shakespeare", "start": 31, "end": 50, "score": 11.2, "no_answer": False,
         "null_odds": -9.8, "candidates": [{"text", "score", "start", "end"}, ...]}]

Long contexts are cut into the same sliding windows as in training and evaluation (kd.features), the model runs
in batches, and answers come from the same post-processing as evaluation (kd.qa_eval.answer_spans), so on a SQuAD
file ``predict.py`` writes exactly the ``predictions.json`` that ``evaluate.py`` writes with the same settings.
Window sizes, the answer length and the no-answer threshold default to what the model was trained and evaluated
with (``qa_settings.json``, kd.qa_settings).

Scores are logits: ``score`` = start + end logit of the span; ``null_odds`` = the no-answer (CLS) score minus the
best span's. The answer is "" (``no_answer`` true) when null odds exceed the no-answer threshold and no-answers
are allowed (``version_2_with_negative``: the model's saved setting, else False as in HF's pipeline). A context
with no span to answer from (empty) gets the answer "", ``no_answer`` true and ``score`` / ``null_odds`` None.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import datasets
import torch

from kd.features import prepare_eval_features
from kd.qa_eval import answer_spans, make_eval_dataloader, predict_logits
from kd.qa_settings import DEFAULTS, load_qa_settings, resolve_settings

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(choice: str = "auto") -> torch.device:
    """"auto": the first GPU when there is one, else the CPU; otherwise a torch device string ("cpu", "cuda:1")."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU that has it, fp16 on another GPU, fp32 on CPU (where half precision is slower)."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ValueError(f"Unknown dtype {choice!r}; use auto, {', '.join(DTYPES)}.")
        return DTYPES[choice]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class QuestionAnswerer:
    """A QA model with its tokenizer and settings, answering batches of (question, context) pairs.

    Settings (``max_seq_length``, ``doc_stride``, ``max_query_length``, ``max_answer_length``, ``n_best_size``,
    ``no_answer_threshold``) given as keyword arguments win over the model's ``qa_settings.json``, which wins over
    the HF defaults; ``self.settings`` holds what is used and ``self.settings_source`` where each came from.
    A model without a trained QA head (kd.models.load_qa_model) is refused (UntrainedQAHeadError) unless
    ``allow_untrained_qa_head``; a dir without a tokenizer always is (NoTokenizerError).
    """

    def __init__(self, model_name_or_path: str, *, device: str = "auto", dtype: str = "auto",
                 version_2_with_negative: bool | None = None, allow_untrained_qa_head: bool = False, **settings):
        from kd.features import check_window_args
        from kd.models import UntrainedQAHeadError, load_qa_model, load_tokenizer, untrained_qa_head_message

        saved = load_qa_settings(model_name_or_path)
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"Unknown setting(s) {sorted(unknown)}.")
        self.settings, self.settings_source = resolve_settings(settings, saved)
        if version_2_with_negative is None:
            version_2_with_negative = bool(saved.get("version_2_with_negative", False))
        self.version_2_with_negative = version_2_with_negative
        self.tokenizer = load_tokenizer(model_name_or_path)  # NoTokenizerError when the dir has none
        check_window_args(self.tokenizer, self.settings["max_seq_length"], self.settings["doc_stride"],
                          self.settings["max_query_length"])
        self.device = pick_device(device)
        self.model, head = load_qa_model(model_name_or_path, dtype=pick_dtype(dtype, self.device))
        if head:  # a bare encoder: its answers would be random spans
            message = untrained_qa_head_message(model_name_or_path, head)
            if not allow_untrained_qa_head:
                raise UntrainedQAHeadError(f"{message}, or pass allow_untrained_qa_head=True (predict.py "
                                           "--allow_untrained_qa_head) to go on anyway.")
            logger.warning("%s. Going on because untrained QA heads are allowed.", message)
        self.model.to(self.device).eval()
        logger.info("QA settings %s", {k: f"{v} ({self.settings_source[k]})" for k, v in self.settings.items()})

    def __call__(self, questions: Sequence[str], contexts: Sequence[str], ids: Sequence[str] | None = None, *,
                 top_k: int = 1, batch_size: int = 32) -> list[dict]:
        """One result per question, in order (see the module docstring for its fields)."""
        if len(questions) != len(contexts):
            raise ValueError(f"Got {len(questions)} questions but {len(contexts)} contexts; pass one context each.")
        ids = [str(i) for i in range(len(questions))] if ids is None else [str(i) for i in ids]
        examples = datasets.Dataset.from_dict({"id": ids, "question": list(questions), "context": list(contexts)})
        return self.answer_examples(examples, top_k=top_k, batch_size=batch_size)

    def answer_examples(self, examples: datasets.Dataset, *, top_k: int = 1, batch_size: int = 32) -> list[dict]:
        """Like calling the answerer, for a Dataset with ``id``, ``question`` and ``context`` columns (e.g.
        kd.squad.load_squad's examples)."""
        if len(set(examples["id"])) != len(examples):
            raise ValueError("Question ids must be unique: answers are gathered per id, so two questions with one "
                             "id would share their windows.")
        s = self.settings
        features = prepare_eval_features(examples, self.tokenizer, max_seq_length=s["max_seq_length"],
                                         doc_stride=s["doc_stride"], max_query_length=s["max_query_length"])
        start, end = predict_logits(None, self.model, make_eval_dataloader(features, batch_size))
        found = answer_spans(examples, features, start, end, n_best_size=s["n_best_size"],
                             max_answer_length=s["max_answer_length"], top_k=top_k)
        return [self._result(qid, context, f) for qid, context, f in zip(examples["id"], examples["context"], found)]

    def _result(self, qid: str, context: str, found: dict | None) -> dict:
        if found is None:  # no window at all (an empty context): nothing to answer from
            return {"id": qid, "answer": "", "start": None, "end": None, "score": None, "no_answer": True,
                    "null_odds": None, "candidates": []}
        candidates = [{"text": context[sp["start"]:sp["end"]], **sp} for sp in found["spans"]]
        # no span at all (a context of no tokens): the odds are infinite, which JSON cannot hold
        null_odds = found["null_odds"] if math.isfinite(found["null_odds"]) else None
        no_answer = not candidates or null_odds is None or null_odds > self.settings["no_answer_threshold"]
        best = None if (no_answer and self.version_2_with_negative) or not candidates else candidates[0]
        return {"id": qid, "answer": best["text"] if best else "", "start": best["start"] if best else None,
                "end": best["end"] if best else None, "score": best["score"] if best else None,
                "no_answer": no_answer, "null_odds": null_odds, "candidates": candidates}

"""The teacher-logit cache: computed once, reused without running (or even loading) the teacher."""

import os

import numpy as np
import pytest
import torch
import transformers
from accelerate import Accelerator

from kd import teacher_cache


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _columns(seed, n=10, length=24, vocab=50):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Spy:
    """Stands in for kd.qa_eval.predict_logits and counts teacher passes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, accelerator, model, dataloader):
        self.calls += 1
        starts, ends = [], []
        with torch.no_grad():
            for batch in dataloader:
                out = model(**batch)
                starts.append(out.start_logits.float().numpy())
                ends.append(out.end_logits.float().numpy())
        return np.concatenate(starts), np.concatenate(ends)


def test_second_call_hits_the_cache_without_the_teacher(accelerator, tiny_bert_qa_dir, tmp_path, monkeypatch):
    spy, cols = Spy(), _columns(0)
    start, end, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                                    batch_size=4, predict_logits=spy)
    assert spy.calls == 1 and info["teacher_cache_hit"] is False
    assert start.shape == (10, 24) and start.dtype == np.float32
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir).eval()
    with torch.no_grad():
        ref = model(**{k: torch.as_tensor(v).long() for k, v in cols.items()})
    assert np.allclose(start, ref.start_logits.numpy(), atol=1e-5)
    assert np.allclose(end, ref.end_logits.numpy(), atol=1e-5)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr(transformers.AutoModelForQuestionAnswering, "from_pretrained", no_teacher)
    start2, end2, info2 = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols,
                                                       cache_dir=str(tmp_path), batch_size=4, predict_logits=spy)
    assert spy.calls == 1 and info2["teacher_cache_hit"] is True
    assert np.array_equal(start, start2) and np.array_equal(end, end2)


def test_key_follows_inputs_teacher_and_precision(tiny_bert_qa_dir, tiny_roberta_qa_dir):
    bert = teacher_cache.fingerprint_model_dir(str(tiny_bert_qa_dir))
    assert bert == teacher_cache.fingerprint_model_dir(str(tiny_bert_qa_dir))
    assert bert != teacher_cache.fingerprint_model_dir(str(tiny_roberta_qa_dir))
    a, b = teacher_cache.fingerprint_inputs(_columns(0)), teacher_cache.fingerprint_inputs(_columns(1))
    assert a != b
    changed = _columns(0)
    changed["input_ids"][3, 7] += 1  # one token differs
    assert teacher_cache.fingerprint_inputs(changed) != a
    assert teacher_cache.cache_key(bert, a, torch.float32) != teacher_cache.cache_key(bert, a, torch.bfloat16)


def test_unfinished_entries_are_not_read(accelerator, tiny_bert_qa_dir, tmp_path):
    spy, cols = Spy(), _columns(2)
    key_dir_count = len(os.listdir(tmp_path))
    teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path), predict_logits=spy)
    (entry,) = [d for d in os.listdir(tmp_path) if not d.startswith(".")]
    assert key_dir_count == 0 and not any(d.startswith(".tmp") for d in os.listdir(tmp_path))
    os.remove(tmp_path / entry / "meta.json")  # as if the writer died before publishing
    os.rename(tmp_path / entry, tmp_path / (entry + "x"))
    os.makedirs(tmp_path / entry)  # an empty dir with the right name is not a cache entry either
    _, _, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                              predict_logits=spy)
    assert spy.calls == 2 and info["teacher_cache_hit"] is False

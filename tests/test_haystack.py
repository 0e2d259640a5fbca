"""A student trained here answers through Haystack 3's extractive reader (transformers-haystack), offline, with the
windows it was trained on (qa_settings.json), as the README shows."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import launch, read_json

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no network here


@pytest.fixture(scope="module")
def trained_student(tiny_bert_qa_dir, squad_fixture_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("haystack") / "student"
    launch("train_prediction.py", [
        "--model_name_or_path", tiny_bert_qa_dir, "--train_file", squad_fixture_path, "--output_dir", out,
        "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--max_seq_length", "96",
        "--doc_stride", "32", "--max_query_length", "24", "--keep_checkpoints", "none"])
    return out


def test_student_answers_through_haystack3_reader(trained_student):
    from haystack import Document
    from haystack_integrations.components.readers.transformers import TransformersExtractiveReader

    settings = json.loads((trained_student / "qa_settings.json").read_text())
    reader = TransformersExtractiveReader(model=str(trained_student), max_seq_length=settings["max_seq_length"],
                                          stride=settings["doc_stride"], top_k=3, device=None)
    reader.warm_up()
    long_text = " ".join(["The Normans gave their name to Normandy, a region in France."] * 12)  # > 96 tokens
    docs = [Document(content=long_text, id="normandy"),
            Document(content="Warsaw is the capital and largest city of Poland.", id="warsaw")]
    result = reader.run(query="Who gave their name to Normandy?", documents=docs)
    answers = result["answers"]
    spans = [a for a in answers if a.data]
    assert len(spans) == 3 and answers[-1].data is None  # top_k spans, then Haystack's no-answer
    for answer in spans:
        assert answer.document.id in {"normandy", "warsaw"}
        start, end = answer.document_offset.start, answer.document_offset.end
        assert answer.document.content[start:end] == answer.data
        assert 0.0 <= answer.score <= 1.0
    assert read_json(trained_student / "all_results.json")["status"] == "finished"

"""Our QA inference (kd.inference + predict.py): the same answers as evaluate.py, settings from the model."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from kd.inference import QuestionAnswerer
from tests.helpers import REPO_ROOT, launch, read_json

SAVED = {"max_seq_length": 96, "doc_stride": 32, "max_query_length": 24, "max_answer_length": 12, "n_best_size": 10,
         "version_2_with_negative": True, "no_answer_threshold": -0.5}  # the random model's median null odds


@pytest.fixture(scope="module")
def model_with_settings(tiny_bert_qa_dir, tmp_path_factory):
    """The tiny QA model with a qa_settings.json unlike every default, as train_prediction.py leaves one."""
    out = tmp_path_factory.mktemp("with_settings") / "model"
    shutil.copytree(tiny_bert_qa_dir, out)
    (out / "qa_settings.json").write_text(json.dumps(SAVED))
    return out


def load_predict():
    spec = importlib.util.spec_from_file_location("predict_script", REPO_ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_writes_exactly_evaluates_predictions(model_with_settings, squad_fixture_path, tmp_path):
    # neither command names a setting: both must take the model's windows, answer length and threshold
    launch("evaluate.py", ["--model_name_or_path", model_with_settings, "--validation_file", squad_fixture_path,
                           "--output_dir", tmp_path / "eval", "--timing_batches", "1", "--warmup_batches", "0"])
    results = read_json(tmp_path / "eval" / "eval_results.json")
    assert (results["max_seq_length"], results["doc_stride"], results["no_answer_threshold"]) == (96, 32, -0.5)
    launch("predict.py", ["--model_name_or_path", model_with_settings, "--input_file", squad_fixture_path,
                          "--output_file", tmp_path / "answers.json", "--predictions_file", tmp_path / "pred.json",
                          "--top_k", "3", "--device", "cpu"])
    expected = read_json(tmp_path / "eval" / "predictions.json")
    assert read_json(tmp_path / "pred.json") == expected
    out = read_json(tmp_path / "answers.json")
    assert out["settings"] == {k: v for k, v in SAVED.items() if k != "version_2_with_negative"}
    assert set(out["settings_source"].values()) == {"model"}
    null_odds = read_json(tmp_path / "eval" / "null_odds.json")
    assert len(out["results"]) == len(expected)
    for r in out["results"]:
        assert r["null_odds"] == pytest.approx(null_odds[r["id"]], abs=1e-5)
        assert r["no_answer"] == (r["null_odds"] > -0.5)
        assert 1 <= len(r["candidates"]) <= 3
    # the random model declines some questions and answers others: both paths were exercised
    assert {r["no_answer"] for r in out["results"]} == {True, False}


def test_top_k_answers_are_distinct_context_spans_best_first(model_with_settings, squad_fixture_examples):
    qa = QuestionAnswerer(str(model_with_settings), device="cpu", version_2_with_negative=False)
    examples = squad_fixture_examples.select(range(12))
    top1 = qa.answer_examples(examples, top_k=1)
    top5 = qa.answer_examples(examples, top_k=5, batch_size=3)  # batching must not change an answer
    for one, five, context in zip(top1, top5, examples["context"]):
        assert one["answer"] == five["answer"] == five["candidates"][0]["text"]  # no-answers off: always a span
        spans = [(c["start"], c["end"]) for c in five["candidates"]]
        assert len(spans) == len(set(spans)) == 5
        assert all(context[c["start"]:c["end"]] == c["text"] for c in five["candidates"])
        scores = [c["score"] for c in five["candidates"]]
        assert scores == sorted(scores, reverse=True)


def test_explicit_settings_win_over_the_models(model_with_settings):
    qa = QuestionAnswerer(str(model_with_settings), device="cpu", max_seq_length=128, no_answer_threshold=0.0)
    assert qa.settings["max_seq_length"] == 128 and qa.settings_source["max_seq_length"] == "argument"
    assert qa.settings["doc_stride"] == 32 and qa.settings_source["doc_stride"] == "model"
    with pytest.raises(ValueError, match="doc_stride"):
        QuestionAnswerer(str(model_with_settings), device="cpu", max_seq_length=40, doc_stride=32)


def test_one_question_and_json_lines(model_with_settings, tmp_path, capsys):
    module = load_predict()
    context = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."
    module.main(["--model_name_or_path", str(model_with_settings), "--question", "Who gave their name?",
                 "--context", context, "--device", "cpu"])
    single = json.loads(capsys.readouterr().out)["results"][0]
    lines = tmp_path / "q.jsonl"
    lines.write_text(json.dumps({"id": "a", "question": "Who gave their name?", "context": context}) + "\n")
    module.main(["--model_name_or_path", str(model_with_settings), "--input_file", str(lines), "--device", "cpu",
                 "--output_file", str(tmp_path / "out.json")])
    (from_file,) = read_json(tmp_path / "out.json")["results"]
    assert from_file["id"] == "a" and from_file["answer"] == single["answer"]
    assert from_file["null_odds"] == pytest.approx(single["null_odds"])


@pytest.mark.parametrize("argv, message", [
    (["--question", "q"], "go together"),
    (["--question", "q", "--context", "c", "--input_file", "x.json"], "either"),
    ([], "either"),
    (["--input_file", "missing.json"], "does not exist"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_predict().parse_args(["--model_name_or_path", "m", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


GOOD_LINE = json.dumps({"id": "a", "question": "Who gave their name?",
                        "context": "The Normans were the people who gave their name to Normandy."})


@pytest.mark.parametrize("lines, bad_line, message", [
    ([GOOD_LINE, json.dumps({"id": "a", "question": "Where?", "context": "Short context."})], 2,
     "id 'a' is also the id of line 1"),
    ([GOOD_LINE, '{"id": "b", "question": "Where?"'], 2, "not valid JSON"),
    ([GOOD_LINE, json.dumps({"id": "b", "question": None, "context": "c"})], 2, "'question' must be a string"),
    ([json.dumps({"id": "b", "question": "q", "context": 14})], 1, "'context' must be a string, got number"),
    ([GOOD_LINE, "", "5"], 3, "a JSON number, not an object"),
    ([json.dumps({"question": "q"})], 1, "missing field 'context'"),
    ([GOOD_LINE, '{"id": "b", "question": "Qui?", "context": "Caf\u00e9"}'.encode("latin-1")], 2, "not UTF-8"),
])
def test_bad_json_lines_are_one_line_errors_naming_file_and_line(model_with_settings, tmp_path, capsys, lines,
                                                                 bad_line, message):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_info:
        load_predict().main(["--model_name_or_path", str(model_with_settings), "--input_file", str(path),
                             "--device", "cpu", "--output_file", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith(f"predict.py: error: {path}:{bad_line}: ") and message in err[0]


def test_empty_context_has_no_answer_and_the_output_is_strict_json(model_with_settings, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([json.dumps({"id": "empty", "question": "Who?", "context": ""}), GOOD_LINE]) + "\n")
    out = tmp_path / "out.json"
    load_predict().main(["--model_name_or_path", str(model_with_settings), "--input_file", str(path), "--device",
                         "cpu", "--output_file", str(out), "--no-version_2_with_negative"])

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    empty, good = json.loads(out.read_text(), parse_constant=refuse)["results"]
    assert empty == {"id": "empty", "answer": "", "start": None, "end": None, "score": None, "no_answer": True,
                     "null_odds": None, "candidates": []}
    assert good["id"] == "a" and good["answer"] and good["null_odds"] is not None  # answered as before


def test_all_contexts_empty(model_with_settings):
    qa = QuestionAnswerer(str(model_with_settings), device="cpu")
    assert [r["answer"] for r in qa(["Who?", "What?"], ["", "  "])] == ["", ""]


def test_duplicate_ids_are_refused_not_merged(model_with_settings):
    qa = QuestionAnswerer(str(model_with_settings), device="cpu")
    with pytest.raises(ValueError, match="unique"):
        qa(["Who?", "Where?"], ["Short context.", "The Normans gave their name to Normandy."], ids=["a", "a"])


def test_a_model_without_a_trained_qa_head_is_refused_unless_allowed(tiny_bert_encoder_dir, capsys, caplog):
    """A bare encoder loads as a QA model with a random head (transformers only says so in its load report): its
    "answers" would be random spans."""
    from kd.models import UntrainedQAHeadError

    module = load_predict()
    argv = ["--model_name_or_path", str(tiny_bert_encoder_dir), "--question", "Who?", "--context", "Me.",
            "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if "error:" in ln]
    assert exit_info.value.code == 2 and captured.out == ""  # no answer printed
    assert f"--model_name_or_path {tiny_bert_encoder_dir} has no trained QA head" in line
    assert "--allow_untrained_qa_head" in line
    with pytest.raises(UntrainedQAHeadError, match="allow_untrained_qa_head=True"):
        QuestionAnswerer(str(tiny_bert_encoder_dir), device="cpu")
    with caplog.at_level("WARNING", logger="kd.inference"):
        module.main([*argv, "--allow_untrained_qa_head"])
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == "0" and "no trained QA head" in caplog.text


def test_a_model_dir_without_tokenizer_files_is_refused(tiny_bert_qa_dir, tmp_path, capsys):
    """transformers builds a tokenizer of 5 special tokens from config.json alone: every word [UNK]."""
    from kd.models import NoTokenizerError

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_qa_dir / name, bare / name)
    with pytest.raises(SystemExit) as exit_info:
        load_predict().main(["--model_name_or_path", str(bare), "--question", "Who?", "--context", "Me.",
                             "--device", "cpu"])
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if "error:" in ln]
    assert exit_info.value.code == 2 and captured.out == ""
    assert f"--model_name_or_path {bare}: no tokenizer files there" in line and "save_pretrained" in line
    with pytest.raises(NoTokenizerError, match="every word would be"):
        QuestionAnswerer(str(bare), device="cpu")

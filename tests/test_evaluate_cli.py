"""evaluate.py as a command: model runs, scoring a predictions file, argument errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForQuestionAnswering

from kd.features import prepare_eval_features
from kd.qa_eval import score_predictions

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "evaluate.py"
METRIC_KEYS = [
    "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
    "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
]
WINDOW_ARGS = ["--max_seq_length", "128", "--doc_stride", "32", "--max_query_length", "64"]


def run_cli(*args):
    """Run ``python evaluate.py ARGS`` from the repo root; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_script():
    """Import evaluate.py under another name (a pip package called `evaluate` may exist)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_run(tiny_bert_qa_dir, squad_fixture_path, tmp_path_factory):
    """One model-mode run of the tiny random BERT on the fixture (shared by the tests below)."""
    out = tmp_path_factory.mktemp("eval_out")
    result = run_cli(
        "--model_name_or_path", tiny_bert_qa_dir, "--validation_file", squad_fixture_path, "--output_dir", out,
        *WINDOW_ARGS, "--per_device_eval_batch_size", 64, "--warmup_batches", 1, "--timing_batches", 2,
    )
    return result, out


def test_model_run_writes_files_with_all_keys(model_run, squad_fixture_examples, tiny_bert_qa_dir):
    result, out = model_run
    assert sorted(p.name for p in out.iterdir()) == ["eval_results.json", "null_odds.json", "predictions.json"]
    results = json.loads((out / "eval_results.json").read_text())
    assert list(results)[: len(METRIC_KEYS)] == METRIC_KEYS
    assert json.loads(result.stdout) == results  # printed at the end

    weights = tiny_bert_qa_dir / "model.safetensors"
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir)
    assert results["model_size_on_disk_bytes"] == weights.stat().st_size
    assert results["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert results["num_examples"] == 128 and results["total"] == 128
    assert results["HasAns_total"] == 50 and results["NoAns_total"] == 78
    assert results["eval_batch_size"] == 64 and results["max_seq_length"] == 128
    assert results["latency_ms_per_batch_median"] > 0
    assert results["throughput_samples_per_s"] == pytest.approx(64 / (results["latency_ms_per_batch_median"] / 1000))
    assert results["device"] == "cpu" and results["num_processes"] == 1
    assert results["version_2_with_negative"] is True  # detected from the unanswerable questions

    from transformers import AutoTokenizer

    features = prepare_eval_features(
        squad_fixture_examples, AutoTokenizer.from_pretrained(tiny_bert_qa_dir), 128, 32, 64
    )
    assert results["num_features"] == len(features)


def test_model_run_metrics_match_the_written_predictions(model_run, squad_fixture_examples):
    _, out = model_run
    predictions = json.loads((out / "predictions.json").read_text())
    null_odds = json.loads((out / "null_odds.json").read_text())
    results = json.loads((out / "eval_results.json").read_text())
    assert set(predictions) == set(null_odds) == set(squad_fixture_examples["id"])
    # SQuAD 2.0 decision at --no_answer_threshold 0.0: "" exactly when null odds exceed 0.
    for qid, text in predictions.items():
        assert (text == "") == (null_odds[qid] > 0.0)
        assert text == "" or text.strip()
    rescored = score_predictions(squad_fixture_examples, predictions, null_odds)
    assert {k: results[k] for k in METRIC_KEYS} == rescored


def test_model_run_answers_are_context_substrings(model_run, squad_fixture_examples):
    _, out = model_run
    predictions = json.loads((out / "predictions.json").read_text())
    contexts = {r["id"]: r["context"] for r in squad_fixture_examples}
    assert all(text in contexts[qid] for qid, text in predictions.items())


# A hand-made 2-article file: a1/a2 answerable, n1/n2 unanswerable.
HAND_DATA = {
    "version": "v2.0",
    "data": [
        {
            "title": "Vikings",
            "paragraphs": [
                {
                    "context": "The Norse came from Denmark, Iceland and Norway in the 10th century.",
                    "qas": [
                        {"id": "a1", "question": "Where from?", "is_impossible": False,
                         "answers": [{"text": "Denmark, Iceland and Norway", "answer_start": 20},
                                     {"text": "Norway", "answer_start": 41}]},
                        {"id": "n1", "question": "Where to?", "is_impossible": True, "answers": [],
                         "plausible_answers": [{"text": "Denmark", "answer_start": 20}]},
                    ],
                }
            ],
        },
        {
            "title": "Dates",
            "paragraphs": [
                {
                    "context": "It happened in the 10th century.",
                    "qas": [
                        {"id": "a2", "question": "When?", "answers": [{"text": "10th century", "answer_start": 19}]},
                        {"id": "n2", "question": "Why?", "answers": []},
                    ],
                }
            ],
        },
    ],
}


def test_predictions_mode_scores_like_the_official_script(tmp_path):
    data = tmp_path / "hand.json"
    data.write_text(json.dumps(HAND_DATA))
    predictions = tmp_path / "pred.json"
    # a1: "norway." exact after normalization; a2: F1 0.8 (P 2/3, R 1); n1 correct ""; n2 wrong.
    predictions.write_text(json.dumps({"a1": "norway.", "a2": "in the 10th century", "n1": "", "n2": "Denmark"}))
    na_probs = tmp_path / "na.json"
    na_probs.write_text(json.dumps({"a1": 0.1, "a2": 0.6, "n1": 0.9, "n2": 0.8}))

    result = run_cli("--validation_file", data, "--predictions", predictions, "--na_prob_file", na_probs)
    assert result.stdout == json.dumps(json.loads(result.stdout), indent=2) + "\n"  # official layout
    metrics = json.loads(result.stdout)
    # No na_prob exceeds the default threshold 1.0: plain scores. best_*: see test_squad_metrics.
    assert metrics == pytest.approx({
        "exact": 50.0, "f1": 70.0, "total": 4,
        "HasAns_exact": 50.0, "HasAns_f1": 90.0, "HasAns_total": 2,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
        "best_exact": 75.0, "best_exact_thresh": 0.1, "best_f1": 95.0, "best_f1_thresh": 0.6,
    })
    assert list(metrics) == METRIC_KEYS

    # With threshold 0.5, a2 (0.6) counts as "" (0) and n1, n2 count as "" (1 each).
    module = load_script()
    strict = module.score_predictions_file(module.parse_args([
        "--validation_file", str(data), "--predictions", str(predictions), "--na_prob_file", str(na_probs),
        "--na_prob_thresh", "0.5",
    ])[0])
    assert strict["exact"] == pytest.approx(75.0) and strict["f1"] == pytest.approx(75.0)


# Usage errors are checked in-process (parse_args exits like the command does, without paying
# for a fresh interpreter that imports torch each time); the runs above cover the real command.
@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "one of the arguments --model_name_or_path --predictions is required"),
        (["--model_name_or_path", "m", "--predictions", "p.json"], "not allowed with argument"),
        (["--predictions", "p.json", "--version_2_with_negative"], "only applies when running a model"),
        (["--model_name_or_path", "m", "--na_prob_file", "n.json"], "only applies to scoring"),
        (["--model_name_or_path", "m", "--doc_stride", "0"], "must be a positive integer"),
        (["--model_name_or_path", "m", "--max_seq_length", "64", "--max_query_length", "64"],
         "must be smaller than --max_seq_length"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    module = load_script()
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--validation_file", "x.json", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_window_sizes_checked_against_the_tokenizer(tiny_roberta_qa_dir, squad_fixture_path):
    module = load_script()
    args, settings = module.parse_args([
        "--model_name_or_path", str(tiny_roberta_qa_dir), "--validation_file", str(squad_fixture_path),
        "--max_seq_length", "128", "--doc_stride", "60", "--max_query_length", "64",
    ])
    with pytest.raises(SystemExit, match=r"doc_stride \(60\) must be smaller .* 4 special tokens = 60"):
        module.load_tokenizer(args, settings)


def test_a_model_dir_without_tokenizer_files_is_refused(tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    """transformers builds a 5-token tokenizer from config.json alone: every word [UNK], and scores computed."""
    import shutil

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_qa_dir / name, bare / name)
    module = load_script()
    args, settings = module.parse_args(["--model_name_or_path", str(bare), "--validation_file",
                                        str(squad_fixture_path), *WINDOW_ARGS])
    with pytest.raises(SystemExit, match=rf"evaluate.py: error: --model_name_or_path {bare}: no tokenizer files "
                                         "there .* every word would be \\[UNK\\]"):
        module.load_tokenizer(args, settings)


def test_invalid_data_is_reported_without_traceback(tmp_path):
    bad = json.loads(json.dumps(HAND_DATA))
    bad["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(bad))
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"a1": "Norway"}))
    module = load_script()
    args, _ = module.parse_args(["--validation_file", str(data), "--predictions", str(predictions)])
    with pytest.raises(SystemExit) as exit_info:
        module.score_predictions_file(args)
    message = str(exit_info.value.code)
    assert "bad.json: article 'Dates', question id 'a2'" in message and "--skip_invalid" in message
    # With --skip_invalid the bad question is dropped and the rest is scored.
    args, _ = module.parse_args(["--validation_file", str(data), "--predictions", str(predictions), "--skip_invalid"])
    assert module.score_predictions_file(args)["total"] == 3

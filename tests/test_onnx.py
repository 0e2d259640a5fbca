"""ONNX export of QA models (kd/onnx_qa.py, export_onnx.py, evaluate.py --onnx_file): parity with PyTorch on real
fixture windows, the same answers through the same evaluation, int8 quality in the report, the command's refusals."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer

from kd.features import prepare_eval_features
from kd.model_eval import evaluate_model
from kd.onnx_qa import OnnxQAModel, export_qa_onnx, max_abs_logit_diff, onnx_file_bytes
from kd.qa_eval import evaluate_qa, make_eval_dataloader
from kd.squad import load_squad
from tests.helpers import REPO_ROOT, read_json, script_env

WINDOWS = {"max_seq_length": 128, "doc_stride": 32, "max_query_length": 64}
WINDOW_ARGS = [f"--{k}={v}" for k, v in WINDOWS.items()]
CLI_QUESTIONS = 64  # --max_eval_samples of the command runs: keeps them quick, still 200+ windows


def run_script(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=REPO_ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exports(tiny_bert_qa_dir, tiny_roberta_qa_dir, tmp_path_factory):
    """{kind: (model dir, model.onnx)}: each tiny model exported in-process."""
    out = {}
    for kind, model_dir in (("bert", tiny_bert_qa_dir), ("roberta", tiny_roberta_qa_dir)):
        path = tmp_path_factory.mktemp(f"onnx_{kind}") / "model.onnx"
        model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
        export_qa_onnx(model, AutoTokenizer.from_pretrained(model_dir), path)
        out[kind] = (model_dir, path)
    return out


def fixture_features(model_dir, examples):
    return prepare_eval_features(examples, AutoTokenizer.from_pretrained(model_dir), **WINDOWS)


@pytest.mark.parametrize("kind, inputs", [
    ("bert", ["input_ids", "attention_mask", "token_type_ids"]),
    ("roberta", ["input_ids", "attention_mask"]),  # its tokenizer makes no token_type_ids
])
def test_export_matches_pytorch_on_fixture_windows(exports, kind, inputs, squad_fixture_examples):
    model_dir, path = exports[kind]
    onnx_model = OnnxQAModel(path)
    assert onnx_model.input_names == inputs
    # Dynamic axes: traced on 2 windows of ~25 tokens, run below on batches of 64 and a remainder of 128 tokens.
    for arg in onnx_model.session.get_inputs() + onnx_model.session.get_outputs():
        assert all(isinstance(d, str) for d in arg.shape), (arg.name, arg.shape)
    # Every 3rd question: all three articles, long contexts cut into full windows and short ones padded.
    features = fixture_features(model_dir, squad_fixture_examples.select(range(0, 128, 3)))
    padded = [0 in mask for mask in features["attention_mask"]]
    assert any(padded) and not all(padded) and len(features) % 64 != 0
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    parity = max_abs_logit_diff(model, onnx_model, make_eval_dataloader(features, 64))
    print(f"{kind}: {len(features)} windows, parity {parity}")
    assert parity["max_abs_diff_start"] <= 1e-4 and parity["max_abs_diff_end"] <= 1e-4


def test_parity_check_sees_a_difference(exports, squad_fixture_examples):
    """max_abs_logit_diff would hide a broken export if it compared nothing: a start bias moved by 0.01 shows."""
    model_dir, path = exports["bert"]
    features = fixture_features(model_dir, squad_fixture_examples.select(range(8)))
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    with torch.no_grad():
        model.qa_outputs.bias[0] += 0.01
    parity = max_abs_logit_diff(model, OnnxQAModel(path), make_eval_dataloader(features, 16))
    assert parity["max_abs_diff_start"] == pytest.approx(0.01, abs=1e-4)
    assert parity["max_abs_diff_end"] <= 1e-4


def test_onnx_model_gives_pytorch_predictions_through_evaluate_qa(exports, squad_fixture_examples):
    model_dir, path = exports["bert"]
    features = fixture_features(model_dir, squad_fixture_examples)
    accelerator = Accelerator(cpu=True)
    runs = {}
    for name, model in (("pytorch", AutoModelForQuestionAnswering.from_pretrained(model_dir)),
                        ("onnx", OnnxQAModel(path))):
        runs[name] = evaluate_qa(accelerator, model, squad_fixture_examples, features,
                                 make_eval_dataloader(features, 64))
    (pt_metrics, pt_predictions, pt_odds), (ox_metrics, ox_predictions, ox_odds) = runs["pytorch"], runs["onnx"]
    assert len(ox_predictions) == 128 and ox_predictions == pt_predictions
    assert ox_odds == pytest.approx(pt_odds, abs=1e-4)
    for key in ("exact", "f1", "HasAns_f1", "NoAns_exact"):
        assert ox_metrics[key] == pt_metrics[key]


def test_onnx_model_refuses_inputs_of_another_tokenizer(exports, squad_fixture_examples, tiny_bert_qa_dir):
    _, roberta_path = exports["roberta"]
    bert_batch = next(iter(make_eval_dataloader(fixture_features(tiny_bert_qa_dir, squad_fixture_examples), 4)))
    with pytest.raises(ValueError, match=r"takes inputs \['input_ids', 'attention_mask'\].*token_type_ids"):
        OnnxQAModel(roberta_path)(**bert_batch)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_model(tiny_bert_qa_dir, tmp_path_factory):
    """The tiny BERT with a qa_settings.json (its windows must travel with the export and drive its checks)."""
    source = tmp_path_factory.mktemp("source") / "student"
    shutil.copytree(tiny_bert_qa_dir, source)
    (source / "qa_settings.json").write_text(json.dumps({**WINDOWS, "n_best_size": 20, "max_answer_length": 30}))
    return source


@pytest.fixture(scope="module")
def cli_export(source_model, squad_fixture_path, tmp_path_factory):
    """export_onnx.py --quantize int8 over an older export (--overwrite_output_dir), whose report lists a file
    that this export does not write: it must go with the rest."""
    out = tmp_path_factory.mktemp("exported") / "student-onnx"
    out.mkdir()
    (out / "model.onnx").write_text("from an older export")
    (out / "vocab.txt").write_text("from an older export")
    (out / "export_report.json").write_text(json.dumps({"files": ["export_report.json", "model.onnx", "vocab.txt"]}))
    result = run_script("export_onnx.py", "--model_name_or_path", source_model, "--output_dir", out,
                        "--validation_file", squad_fixture_path, "--max_eval_samples", CLI_QUESTIONS,
                        "--quantize", "int8", "--overwrite_output_dir")
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_cli_writes_a_self_contained_export(cli_export, source_model):
    out, result = cli_export
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "export_report.json", "model.int8.onnx", "model.onnx", "qa_settings.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert not list(out.parent.glob("student-onnx.*"))  # no temp or old dir left beside it
    assert read_json(out / "qa_settings.json") == read_json(source_model / "qa_settings.json")
    exported, source = (AutoConfig.from_pretrained(d).to_dict() | {"_name_or_path": ""} for d in (out, source_model))
    assert exported == source
    assert AutoTokenizer.from_pretrained(out)("Who?", "Me.")["input_ids"] == \
        AutoTokenizer.from_pretrained(source_model)("Who?", "Me.")["input_ids"]
    report = read_json(out / "export_report.json")
    assert json.loads(result.stdout) == report
    assert report["files"] == sorted(p.name for p in out.iterdir())  # what a later overwrite may delete
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["windows"] == WINDOWS  # from the model's qa_settings.json
    sizes = report["file_sizes_bytes"]
    assert sizes["model.onnx"] == onnx_file_bytes(out / "model.onnx")
    assert sizes["model.int8.onnx"] == onnx_file_bytes(out / "model.int8.onnx") < sizes["model.onnx"]
    assert sizes["pytorch_weights"] == (source_model / "model.safetensors").stat().st_size


def test_cli_report_parity_and_int8_quality_are_the_evaluations_own(cli_export, source_model, squad_fixture_path):
    """The report's figures are what evaluate_qa says of the PyTorch model and of the two graphs written."""
    out, _ = cli_export
    report = read_json(out / "export_report.json")
    examples = load_squad(str(squad_fixture_path), max_samples=CLI_QUESTIONS)
    features = fixture_features(source_model, examples)
    parity = report["parity"]
    assert parity["num_examples"] == CLI_QUESTIONS and parity["num_windows"] == len(features)
    assert parity["passed"] is True and parity["atol"] == 1e-4
    assert 0 <= parity["max_abs_diff_start"] <= 1e-4 and 0 <= parity["max_abs_diff_end"] <= 1e-4

    accelerator = Accelerator(cpu=True)
    f1 = {}
    for name, model in (("pytorch", AutoModelForQuestionAnswering.from_pretrained(source_model)),
                        ("int8", OnnxQAModel(out / "model.int8.onnx"))):
        metrics, _, _ = evaluate_qa(accelerator, model, examples, features, make_eval_dataloader(features, 32))
        f1[name] = metrics["f1"]
    int8 = report["int8"]
    print(f"int8 on {CLI_QUESTIONS} fixture questions: F1 {int8['fp32']['f1']:.2f} -> {int8['int8']['f1']:.2f}")
    assert int8["fp32"]["f1"] == pytest.approx(f1["pytorch"])
    assert int8["int8"]["f1"] == pytest.approx(f1["int8"])
    assert int8["f1_change"] == pytest.approx(int8["int8"]["f1"] - int8["fp32"]["f1"])
    assert int8["exact_change"] == pytest.approx(int8["int8"]["exact"] - int8["fp32"]["exact"])


def test_cli_fails_on_parity_beyond_atol_and_writes_nothing(source_model, squad_fixture_path, tmp_path):
    out = tmp_path / "export"
    result = run_script("export_onnx.py", "--model_name_or_path", source_model, "--output_dir", out,
                        "--validation_file", squad_fixture_path, "--max_eval_samples", 32, "--atol", 0)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "more than --atol 0; nothing was written" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half export, no temp dir


# Refusals are usage errors of parse_args, checked in-process as in test_evaluate_cli (the command runs the same
# parse_args before anything else, without a fresh interpreter importing torch).
def test_cli_refuses_a_non_empty_output_dir(source_model, tmp_path, capsys):
    import export_onnx

    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_text("someone's earlier export")
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model_name_or_path", str(source_model), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert "exists and is not empty; pass --overwrite_output_dir" in capsys.readouterr().err
    assert (out / "model.onnx").read_text() == "someone's earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # refused before any temp dir


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout, message", [
    ("model_inside", "holds --model_name_or_path"),
    ("validation_file_inside", "holds --validation_file"),
    ("foreign_files", "holds notes.txt, not written by export_onnx.py"),
    ("export_plus_foreign", "holds notes.txt, not written by export_onnx.py"),
])
def test_cli_overwrite_never_deletes_an_input_or_what_it_did_not_write(source_model, squad_fixture_path, tmp_path,
                                                                       capsys, layout, message):
    """--overwrite_output_dir replaces the dir whole: refused (exit 2, one line, nothing touched) when that would
    delete the model, the questions, or files that no export wrote."""
    import export_onnx

    out = tmp_path / "runs"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    model, questions = source_model, squad_fixture_path
    if layout == "model_inside":
        model = shutil.copytree(source_model, out / "student")
    elif layout == "validation_file_inside":
        questions = shutil.copy(squad_fixture_path, out / "dev.json")
    elif layout == "export_plus_foreign":
        (out / "model.onnx").write_text("an older export")
        (out / "export_report.json").write_text(json.dumps({"files": ["export_report.json", "model.onnx"]}))
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model_name_or_path", str(model), "--output_dir", str(out), "--validation_file",
                          str(questions), "--max_eval_samples", "4", "--overwrite_output_dir"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("export_onnx.py: error: --output_dir") and message in err[0]
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_publish_rechecks_a_dir_filled_during_the_export(tmp_path):
    """Files that appear in --output_dir while the export runs are not replaced even with --overwrite_output_dir."""
    import export_onnx

    tmp, out = tmp_path / "export.tmp", tmp_path / "export"
    tmp.mkdir()
    (tmp / "model.onnx").write_text("new")
    out.mkdir()
    (out / "notes.txt").write_text("someone's")
    with pytest.raises(SystemExit, match="filled during the export.*notes.txt"):
        export_onnx.publish(str(tmp), str(out), True, [])
    assert (out / "notes.txt").read_text() == "someone's" and (tmp / "model.onnx").exists()


def test_cli_refuses_a_model_without_a_trained_qa_head_unless_allowed(tiny_bert_encoder_dir, squad_fixture_path,
                                                                      tmp_path, capsys, caplog):
    import export_onnx

    argv = ["--model_name_or_path", str(tiny_bert_encoder_dir), "--validation_file", str(squad_fixture_path),
            "--max_eval_samples", "4", *WINDOW_ARGS]
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main([*argv, "--output_dir", str(tmp_path / "refused")])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert exit_info.value.code == 2 and list(tmp_path.iterdir()) == []
    assert f"--model_name_or_path {tiny_bert_encoder_dir} has no trained QA head" in line
    assert "qa_outputs.weight" in line and "--allow_untrained_qa_head" in line
    with caplog.at_level("WARNING", logger="export_onnx"):
        export_onnx.main([*argv, "--output_dir", str(tmp_path / "allowed"), "--allow_untrained_qa_head"])
    assert (tmp_path / "allowed" / "model.onnx").is_file() and "has no trained QA head" in caplog.text


def test_cli_refuses_a_model_dir_without_tokenizer_files(tiny_bert_qa_dir, tmp_path, capsys):
    import export_onnx

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_qa_dir / name, bare / name)
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model_name_or_path", str(bare), "--output_dir", str(tmp_path / "export")])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert exit_info.value.code == 2 and f"--model_name_or_path {bare}: no tokenizer files there" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_tokenizer"]


def test_evaluate_onnx_file_scores_and_times_like_pytorch(cli_export, source_model, squad_fixture_path, tmp_path):
    out, _ = cli_export
    result = run_script("evaluate.py", "--model_name_or_path", out, "--onnx_file", out / "model.onnx",
                        "--validation_file", squad_fixture_path, "--output_dir", tmp_path, *WINDOW_ARGS,
                        "--warmup_batches", 1, "--timing_batches", 2)
    assert result.returncode == 0, result.stderr[-4000:]
    results = read_json(tmp_path / "eval_results.json")
    assert results["onnx_file"] == str(out / "model.onnx")
    assert results["latency_ms_per_batch_median"] > 0 and results["eval_batch_size"] == 32
    assert results["model_size_on_disk_bytes"] == onnx_file_bytes(out / "model.onnx")
    assert results["num_parameters"] > 0

    examples = load_squad(str(squad_fixture_path))
    pt_results, pt_predictions, _ = evaluate_model(
        Accelerator(cpu=True), str(source_model), AutoTokenizer.from_pretrained(source_model), examples, **WINDOWS,
        warmup_batches=0, timing_batches=1)
    assert read_json(tmp_path / "predictions.json") == pt_predictions
    assert results["num_features"] == pt_results["num_features"]
    for key in ("exact", "f1", "HasAns_f1", "NoAns_exact"):
        assert results[key] == pt_results[key]

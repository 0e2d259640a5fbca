"""report.py end to end on tiny models: the table, the diagram, and the same numbers as evaluate.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

import report
from kd.student import student_from_teacher_layers
from tests.helpers import REPO_ROOT, launch, read_json

WINDOW = ["--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"]


@pytest.fixture(scope="module")
def student_dir(tiny_bert_qa_dir, tmp_path_factory):
    student = student_from_teacher_layers(AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir), [2])
    out = tmp_path_factory.mktemp("report_student")
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    return out


def test_report_table_plot_and_evaluate_agree(tiny_bert_qa_dir, student_dir, squad_fixture_path, tmp_path):
    out = tmp_path / "report"
    proc = launch("report.py", ["--models", f"teacher={tiny_bert_qa_dir}", f"student={student_dir}",
                                "--validation_file", squad_fixture_path, "--output_dir", out, *WINDOW,
                                "--warmup_batches", 1, "--timing_batches", 2])
    data = read_json(out / "report.json")
    rows = {r["model"]: r for r in data["rows"]}
    assert list(rows) == ["teacher", "student"] and data["teacher"] == "teacher"
    assert rows["teacher"]["speedup"] == pytest.approx(1.0) and rows["teacher"]["f1_kept_percent"] == pytest.approx(100)
    assert rows["student"]["num_parameters"] < rows["teacher"]["num_parameters"]
    assert rows["student"]["speedup"] == pytest.approx(rows["teacher"]["latency_ms_batch1"]
                                                       / rows["student"]["latency_ms_batch1"])
    for r in rows.values():
        assert r["latency_ms_batch1"] > 0 and r["throughput_batch32"] > 0 and r["size_on_disk_bytes"] > 0
        assert r["latency_ms_batch1_p95"] >= r["latency_ms_batch1"]

    # the markdown table: a header, a rule and one row per model, with the printed figures
    table = (out / "report.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 and lines[2].startswith("| teacher (teacher) |") and lines[3].startswith("| student |")
    assert f"| {rows['student']['f1']:.2f} |" in lines[3] and "report.png" in table
    student = rows["student"]
    assert f"| {student['latency_ms_batch1']:.1f} / {student['latency_ms_batch1_p95']:.1f} |" in lines[3]
    assert lines[2] in proc.stdout

    # the diagram, as PNG and SVG
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "report.svg").read_text()[:2000]
    assert not list(out.glob("*.tmp*"))

    # each model's numbers are evaluate.py's, on the same data and windows
    for name, model_dir in (("teacher", tiny_bert_qa_dir), ("student", student_dir)):
        eval_out = tmp_path / f"eval_{name}"
        subprocess.run([sys.executable, str(REPO_ROOT / "evaluate.py"), "--model_name_or_path", str(model_dir),
                        "--validation_file", str(squad_fixture_path), "--output_dir", str(eval_out), *WINDOW],
                       cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
        expected = read_json(eval_out / "eval_results.json")
        for key in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"):
            assert rows[name][key] == expected[key], key
        assert rows[name]["num_parameters"] == expected["num_parameters"]
        assert read_json(out / name / "predictions.json") == read_json(eval_out / "predictions.json")


@pytest.mark.parametrize("argv, message", [
    (["--models", "teacher"], "NAME=PATH"),
    (["--models", "a=x/y", "a=x/z"], "given twice"),
    (["--models", "a=./no_such_dir"], "no such model directory"),
    (["--models", "a=m", "--teacher", "b"], "none of the --models names"),
    ([], "name the models to compare"),
])
def test_bad_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args([*argv, "--validation_file", "x.json", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and re.search(re.escape(message), capsys.readouterr().err)


def fake_pipeline(out, teacher_dir, student_dir, dev_path, finished=("prediction", "student_nokd")):
    """A pipeline.py output dir as the report reads it: pipeline.json with the stages' command lines, and the
    students' model dirs (one and the same tiny student)."""
    def cmd(stage, teacher=True):
        argv = ["python", "launch.py", "accelerate", "launch", "train_prediction.py",
                "--model_name_or_path", "x", "--validation_file", str(dev_path), *map(str, WINDOW),
                "--output_dir", str(out / stage)]
        return argv + (["--teacher_name_or_path", str(teacher_dir)] if teacher else [])
    stages = {"teacher": {"status": "finished", "command": cmd("teacher", teacher=False)},
              "prediction": {"status": "finished", "command": cmd("prediction")},
              "student_nokd": {"status": "finished", "command": cmd("student_nokd", teacher=False)},
              "student_kd": {"status": "failed", "command": cmd("student_kd")}}
    for name in stages:
        if name not in finished:
            stages[name]["status"] = "failed"
        shutil.copytree(student_dir, out / name)
    (out / "pipeline.json").write_text(json.dumps({"stages": stages}))
    return out


def test_report_of_a_pipeline_dir(tiny_bert_qa_dir, student_dir, squad_fixture_path, tmp_path):
    pipe = fake_pipeline(tmp_path / "pipe", tiny_bert_qa_dir, student_dir, squad_fixture_path)
    out = tmp_path / "report"
    launch("report.py", ["--pipeline_dir", pipe, "--output_dir", out, "--doc_stride", "32",
                         "--warmup_batches", 0, "--timing_batches", 1])
    data = read_json(out / "report.json")
    # the teacher the students were distilled from, then the finished students (student_kd failed: left out)
    assert data["models"] == {"teacher": str(tiny_bert_qa_dir), "student_nokd": str(pipe / "student_nokd"),
                              "student": str(pipe / "prediction")}
    assert [r["model"] for r in data["rows"]] == ["teacher", "student_nokd", "student"]
    settings = data["settings"]
    # the pipeline's dev file and windows, and a flag given beside --pipeline_dir wins
    assert settings["validation_file"] == str(squad_fixture_path)
    assert (settings["max_seq_length"], settings["max_query_length"], settings["doc_stride"]) == (128, 32, 32)
    # the same student twice: the same answers
    assert read_json(out / "student_nokd" / "predictions.json") == read_json(out / "student" / "predictions.json")


def test_pipeline_dir_without_a_distilled_student(tiny_bert_qa_dir, student_dir, squad_fixture_path, tmp_path,
                                                   capsys):
    pipe = fake_pipeline(tmp_path / "pipe", tiny_bert_qa_dir, student_dir, squad_fixture_path,
                         finished=("teacher", "student_nokd"))
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args(["--pipeline_dir", str(pipe), "--output_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "no finished prediction or student_kd stage names a teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.parse_args(["--pipeline_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "r")])
    assert "no readable pipeline.json" in capsys.readouterr().err

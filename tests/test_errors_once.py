"""A script's error reaches the user once, as its own message, with its exit status, however it was started:
``accelerate launch`` (1.16 echoes a failed worker's whole stderr a second time inside a traceback), ``launch.py``
and ``pipeline.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from helpers import CPU_CONFIG, REPO_ROOT, launch, read_json, script_env
from kd.launcher import error_paragraph, quiet_accelerate

BAD_RECORD = "answer text 'zz' not found at answer_start 0"


def bad_squad(tmp_path):
    """SQuAD JSON that parses, with an answer that is not where it says: found only once the script reads it."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": [{"title": "x", "paragraphs": [{"context": "abc", "qas": [
        {"id": "1", "question": "q?", "answers": [{"text": "zz", "answer_start": 0}]}]}]}]}))
    return path


def test_under_accelerate_launch_the_error_is_printed_once(tiny_bert_qa_dir, tmp_path):
    proc = launch("train_prediction.py", ["--model_name_or_path", tiny_bert_qa_dir, "--train_file",
                                          tmp_path / "missing.json", "--output_dir", tmp_path / "out"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("train_prediction.py: error: --train_file") == 1, proc.stderr[-3000:]


def test_under_launch_py_the_error_is_printed_once_with_the_scripts_status(tiny_bert_qa_dir, tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "launch.py"), sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(CPU_CONFIG), str(REPO_ROOT / "train_prediction.py"),
           "--model_name_or_path", str(tiny_bert_qa_dir), "--train_file", str(bad_squad(tmp_path)),
           "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]  # bad input, as the script said (accelerate itself says 1)
    assert proc.stderr.count(BAD_RECORD) == 1 and "train_prediction.py: error: 1 invalid record(s)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_under_the_pipeline_a_failed_stage_shows_its_error_once(tiny_bert_qa_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"launch": "accelerate_configs/cpu.yaml", "stages": {"teacher": {
        "model_name_or_path": str(tiny_bert_qa_dir), "train_file": str(bad_squad(tmp_path)),
        "max_train_steps": 1, "max_seq_length": 64, "doc_stride": 16, "max_query_length": 16}}}))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline.py"), "--recipe", str(recipe),
                           "--output_dir", str(out)], cwd=REPO_ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert said.count(BAD_RECORD) == 1, said[-3000:]
    assert "pipeline.py: stage teacher failed (exit 2): train_prediction.py: error: 1 invalid record(s)" in proc.stderr
    assert f"(the whole output: {out / 'teacher' / 'stage.log'})" in proc.stderr
    assert read_json(out / "pipeline.json")["stages"]["teacher"]["exit_status"] == 2
    assert (out / "teacher" / "stage.log").read_text().count(BAD_RECORD) == 1  # the log has it once too


def test_error_paragraph_is_the_scripts_message_or_the_exception():
    log = ("INFO loading\nx.py: error: first\nmore\nx.py: error: the upload failed (Offline).\n"
           "The local output is complete; upload it with:\n  hf upload a b\n\nbye\n")
    assert error_paragraph(log) == ("x.py: error: the upload failed (Offline).\n"
                                    "The local output is complete; upload it with:\n  hf upload a b")
    trace = 'log\nTraceback (most recent call last):\n  File "x.py", line 1\n    boom()\nValueError: bad value\n'
    assert error_paragraph(trace) == "ValueError: bad value"
    assert error_paragraph("just a line\nlast words\n") == "last words"


def test_quiet_accelerate_silences_only_accelerate_launch():
    assert quiet_accelerate(["accelerate", "launch", "s.py"]) == ["accelerate", "launch", "--quiet", "s.py"]
    assert quiet_accelerate(["accelerate", "launch", "-q", "s.py"]) == ["accelerate", "launch", "-q", "s.py"]
    assert quiet_accelerate(["py", "-m", "accelerate.commands.launch", "--config_file", "c", "s.py", "-q"]) == [
        "py", "-m", "accelerate.commands.launch", "--quiet", "--config_file", "c", "s.py", "-q"]  # the script's -q
    assert quiet_accelerate(["py", "-m", "accelerate.commands.launch", "s.py"]) == [
        "py", "-m", "accelerate.commands.launch", "--quiet", "s.py"]
    assert quiet_accelerate(["torchrun", "--nproc_per_node", "2", "s.py"]) == ["torchrun", "--nproc_per_node", "2",
                                                                                "s.py"]

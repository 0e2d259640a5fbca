"""Students sized to a speed target (kd.speed): layer spreads, timing side by side, the choice of student."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from kd import speed
from kd.speed import choose, markdown, percentiles, spread_layers, synthetic_batch, time_side_by_side
from tests.helpers import REPO_ROOT, read_json, script_env


def test_spread_layers_keeps_the_last_block_and_spreads_the_rest():
    assert spread_layers(6, 3) == [2, 4, 6] and spread_layers(12, 6) == [2, 4, 6, 8, 10, 12]
    assert spread_layers(6, 6) == [1, 2, 3, 4, 5, 6] and spread_layers(6, 1) == [6]
    assert spread_layers(6, 4) == [2, 3, 5, 6]
    for n in range(1, 13):
        for d in range(1, n + 1):
            layers = spread_layers(n, d)
            assert len(layers) == d and layers == sorted(set(layers)) and layers[-1] == n and layers[0] >= 1
    with pytest.raises(ValueError, match="1..6"):
        spread_layers(6, 7)


def test_percentiles_are_median_and_95th():
    assert percentiles([0.001 * i for i in range(1, 101)]) == pytest.approx(
        {"latency_ms_p50": 50.5, "latency_ms_p95": 95.0})
    assert percentiles([0.002]) == pytest.approx({"latency_ms_p50": 2.0, "latency_ms_p95": 2.0})


def test_models_are_timed_in_rounds_after_warm_up(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    def model(name, cost):
        def run():
            calls.append(name)
            clock[0] += cost
        return run

    out = time_side_by_side({"teacher": model("t", 0.010), "student": model("s", 0.004)}, warmup=2, rounds=3)
    assert calls == ["t", "t", "s", "s"] + ["t", "s"] * 3  # warm-up, then one of each per round
    assert out["teacher"]["latency_ms_p50"] == pytest.approx(10) and out["student"]["latency_ms_p95"] == pytest.approx(4)


def test_choose_takes_the_largest_student_meeting_the_target():
    rows = [{"name": "teacher", "is_teacher": True, "layers": [1, 2, 3, 4], "num_parameters": 40, "speedup": 1.0,
             "latency_ms_p50": 40.0},
            *({"name": f"{d} layers", "layers": list(range(d)), "num_parameters": 10 * d, "speedup": 4 / d,
               "latency_ms_p50": 10.0 * d} for d in (1, 2, 3))]
    assert choose(rows, target_speedup=2.0)["name"] == "2 layers"
    assert choose(rows, target_speedup=1.3)["name"] == "3 layers"
    assert choose(rows, target_latency_ms=15)["name"] == "1 layers"
    assert choose(rows, target_speedup=5.0) is None
    with pytest.raises(ValueError, match="exactly one"):
        choose(rows)
    table = markdown([{**r, "vocab_size": 100, "size_bytes": 2**20, "latency_ms_p95": r["latency_ms_p50"]}
                      for r in rows], chosen=None)
    assert table.count("\n") == 2 + len(rows) and "| teacher (teacher) | 1,2,3,4 | 100 |" in table


def test_synthetic_batch_has_the_shapes_and_no_special_tokens(tiny_bert_tokenizer):
    batch = synthetic_batch(tiny_bert_tokenizer, ["input_ids", "attention_mask", "token_type_ids"], 16, 3)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, 16) for k in
                                                             ("input_ids", "attention_mask", "token_type_ids")}
    assert not set(batch["input_ids"].flatten().tolist()) & set(tiny_bert_tokenizer.all_special_ids)
    assert torch.equal(batch["input_ids"], synthetic_batch(tiny_bert_tokenizer, ["input_ids"], 16, 3)["input_ids"])


def test_candidate_table_times_the_teacher_and_each_depth(tiny_bert_qa_dir, tiny_bert_tokenizer, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    teacher = AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir)
    rows = speed.candidate_table(teacher, tiny_bert_tokenizer, [1], seq_len=32, batch_size=2, warmup=1, rounds=3,
                                 onnx_dir=str(tmp_path), vocab_size=50)
    teacher_row, student = rows
    assert teacher_row["is_teacher"] and teacher_row["layers"] == [1, 2] and teacher_row["speedup"] == 1.0
    assert student["layers"] == [2] and student["vocab_size"] == 50
    full = sum(p.numel() for p in teacher.parameters())
    assert teacher_row["num_parameters"] == full and teacher_row["size_bytes"] == 4 * full
    hidden = teacher.config.hidden_size
    block = sum(p.numel() for p in teacher.bert.encoder.layer[0].parameters())
    assert student["num_parameters"] == full - block - (len(tiny_bert_tokenizer) - 50) * hidden
    for r in rows:
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"] and r["onnx_latency_ms_p50"] > 0


def _make_student(*argv):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "make_student.py"), *map(str, argv)], cwd=REPO_ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    return proc


def test_make_student_builds_the_largest_student_meeting_the_target(tiny_bert_qa_dir, tmp_path):
    out = tmp_path / "s"
    proc = _make_student("--teacher_name_or_path", tiny_bert_qa_dir, "--target_latency_ms", 1e6, "--max_seq_length",
                         64, "--timing_batches", 3, "--warmup_batches", 1, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = read_json(out / "student_origin.json")
    assert origin["teacher_layers_kept"] == [2] and origin["speed"]["chosen_layers"] == [2]
    rows = origin["speed"]["rows"]
    assert [r["layers"] for r in rows] == [[1, 2], [2]] and rows[0]["is_teacher"]
    table = (out / "speed_table.md").read_text()
    assert "| student_1 <- built | 2 |" in table and table in proc.stdout and "ONNX" in table
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 1


@pytest.mark.parametrize("flags, message", [
    (["--target_speedup", 1000], "no student of"),
    (["--target_speedup", 2, "--layers", "2"], "give one"),
    (["--target_speedup", 0], "must be a finite number > 0"),
    (["--target_latency_ms", 5, "--max_seq_length", 4096], "exceeds the"),
])
def test_make_student_speed_target_errors_are_one_line(tiny_bert_qa_dir, tmp_path, flags, message):
    proc = _make_student("--teacher_name_or_path", tiny_bert_qa_dir, "--timing_batches", 2, "--warmup_batches", 1,
                         "--output_dir", tmp_path / "s", *flags)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()

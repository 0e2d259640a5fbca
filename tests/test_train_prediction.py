"""train_prediction.py end to end through ``accelerate launch`` on CPU, with tiny random models."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from kd.inference import QuestionAnswerer
from kd.student import student_from_teacher_layers
from tests.helpers import REPO_ROOT, launch, read_json, read_jsonl, script_env

WINDOW = ["--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"]


@pytest.fixture(scope="module")
def student_dir(tiny_bert_qa_dir, tmp_path_factory):
    """1-block student cut from the tiny 2-block BERT teacher (same tokenizer), dropout off so that runs with
    different process counts can be compared."""
    teacher = AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir)
    student = student_from_teacher_layers(teacher, [2])
    student.config.hidden_dropout_prob = student.config.attention_probs_dropout_prob = 0.0
    out = tmp_path_factory.mktemp("student")
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    return out


def _args(student_dir, teacher_dir, fixture, out, cache, *extra):
    args = ["--model_name_or_path", student_dir, "--train_file", fixture, "--output_dir", out,
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--teacher_cache_dir", cache, "--seed", "7", *WINDOW]
    if teacher_dir:
        args += ["--teacher_name_or_path", teacher_dir, "--temperature", "2", "--distillation_loss_weight", "0.5"]
    return args + list(extra)


def _weights(out_dir):
    return load_file(os.path.join(out_dir, "model.safetensors"))


def test_distillation_end_to_end(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    out, cache = tmp_path / "run1", tmp_path / "cache"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, out, cache,
                                        "--validation_file", squad_fixture_path, "--num_train_epochs", "1",
                                        "--report_to", "all"))
    results = read_json(out / "all_results.json")
    assert results["status"] == "finished" and results["teacher_cache_hit"] is False
    assert results["git_sha"] is None or len(results["git_sha"]) >= 40
    assert results["args"]["temperature"] == 2.0
    metrics = results["eval_metrics"]
    for key in ("exact", "f1", "total", "HasAns_exact", "NoAns_exact", "best_f1", "best_f1_thresh"):
        assert key in metrics
    assert metrics["total"] == 128  # every fixture question scored once
    assert set(read_json(out / "predictions.json")) == set(read_json(out / "null_odds.json"))

    log = read_jsonl(out / "train_log.jsonl")
    train = [r for r in log if "train/loss" in r]
    assert len(train) == results["total_steps"]
    first = train[0]
    assert first["train/loss"] == pytest.approx(0.5 * first["train/loss_kd"] + 0.5 * first["train/loss_ce"], rel=1e-4)
    assert any("eval/f1" in r for r in log)

    # TensorBoard received every loss term and the eval metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dir = os.path.dirname(glob.glob(str(out / "logs" / "**" / "events.out.tfevents.*"), recursive=True)[0])
    tags = set(EventAccumulator(event_dir).Reload().Tags()["scalars"])
    assert {"train/loss", "train/loss_kd", "train/loss_ce", "train/lr", "eval/f1", "eval/exact"} <= tags

    # W&B, with no account configured, ran offline into the output dir with the same values
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = open(run_file, "rb").read()
    for key in (b"train/loss_kd", b"train/loss_ce", b"train/lr", b"eval/f1", b"eval/HasAns_exact"):
        assert key in logged

    # the windows it learnt on and the best no-answer threshold of its evaluation travel with it ...
    settings = read_json(out / "qa_settings.json")
    assert {k: settings[k] for k in ("max_seq_length", "doc_stride", "max_query_length")} == {
        "max_seq_length": 128, "doc_stride": 48, "max_query_length": 32}
    assert settings["version_2_with_negative"] is True  # the fixture has unanswerable questions
    assert settings["no_answer_threshold"] == metrics["best_f1_thresh"]
    # ... and our inference (transformers >= 5.3 has no QA pipeline) serves it with them
    qa = QuestionAnswerer(str(out), device="cpu")
    assert qa.settings["max_seq_length"] == 128 and qa.settings_source["no_answer_threshold"] == "model"
    context = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."
    (answer,) = qa(["Who gave their name to Normandy?"], [context], top_k=3)
    best = answer["candidates"][0]
    assert context[best["start"]:best["end"]] == best["text"] and 0 <= best["start"] < best["end"] <= len(context)
    assert answer["no_answer"] == (answer["null_odds"] > metrics["best_f1_thresh"])
    assert answer["answer"] == ("" if answer["no_answer"] else best["text"])

    # second run on the same data: the cached teacher logits are used, the teacher is not run
    out2 = tmp_path / "run2"
    proc = launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, out2, cache,
                                               "--max_train_steps", "2", "--checkpointing_steps", "1",
                                               "--keep_checkpoints", "none"))
    assert read_json(out2 / "all_results.json")["teacher_cache_hit"] is True
    assert os.listdir(out2 / "checkpoints") == [] and read_json(out2 / "all_results.json")["checkpoint"] is None
    assert "cache hit" in proc.stdout + proc.stderr
    # a different window setting is a different cache entry
    out3 = tmp_path / "run3"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, out3, cache,
                                        "--max_train_steps", "1", "--doc_stride", "40"))
    assert read_json(out3 / "all_results.json")["teacher_cache_hit"] is False
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 2


def test_resume_mid_epoch_matches_uninterrupted_run(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    cache = tmp_path / "cache"
    # dropout on: the RNG states are part of the checkpoint, so even the dropout masks must line up
    teacher = AutoModelForQuestionAnswering.from_pretrained(student_dir)
    teacher.config.hidden_dropout_prob = 0.1
    dropout_student = tmp_path / "dropout_student"
    teacher.save_pretrained(dropout_student)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(dropout_student)
    common = ["--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3",
              "--checkpoints_total_limit", "0"]
    full = tmp_path / "full"
    launch("train_prediction.py", _args(dropout_student, tiny_bert_qa_dir, squad_fixture_path, full, cache, *common))
    steps = read_json(full / "all_results.json")["total_steps"]
    mid = full / "checkpoints" / "step_00000003"
    state = read_json(mid / "kd_state.json")
    assert state["epoch"] == 0 and 0 < state["batches_in_epoch"] < steps  # really inside the first epoch

    resumed = tmp_path / "resumed"
    launch("train_prediction.py", _args(dropout_student, tiny_bert_qa_dir, squad_fixture_path, resumed, cache,
                                        *common, "--resume_from_checkpoint", mid))
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # the logged losses after the resume point are the same ones
    log_a = {r["step"]: r["train/loss"] for r in read_jsonl(full / "train_log.jsonl") if "train/loss" in r}
    log_b = {r["step"]: r["train/loss"] for r in read_jsonl(resumed / "train_log.jsonl") if "train/loss" in r}
    assert min(log_b) == 4 and all(log_b[s] == pytest.approx(log_a[s], abs=1e-6) for s in log_b)


def test_two_processes_match_one_process(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    cache = tmp_path / "cache"
    # a small learning rate: Adam turns float reduction-order noise in near-zero gradients into full-size
    # updates, and a large one would let that noise, not a bug, dominate the comparison
    steps = ["--max_train_steps", "6", "--validation_file", squad_fixture_path, "--learning_rate", "5e-5"]
    one = tmp_path / "one"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, one, cache, *steps,
                                        "--per_device_train_batch_size", "8"))
    two = tmp_path / "two"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, two, cache, *steps,
                                        "--per_device_train_batch_size", "4"), processes=2)
    r1, r2 = read_json(one / "all_results.json"), read_json(two / "all_results.json")
    assert r2["num_processes"] == 2 and r2["teacher_cache_hit"] is True
    loss1 = [r["train/loss"] for r in read_jsonl(one / "train_log.jsonl") if "train/loss" in r]
    loss2 = [r["train/loss"] for r in read_jsonl(two / "train_log.jsonl") if "train/loss" in r]
    assert len(loss1) == len(loss2) == 6
    assert np.allclose(loss1, loss2, atol=1e-4), (loss1, loss2)
    # evaluation gathered over both processes scores every question once
    assert r2["eval_metrics"]["total"] == r1["eval_metrics"]["total"] == 128
    assert r2["eval_metrics"]["f1"] == pytest.approx(r1["eval_metrics"]["f1"], abs=1.0)


def test_deepspeed_zero2_matches_ddp_and_resumes(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    """The repo's ZeRO-2 accelerate config, on 2 CPU processes: same losses as DDP, exact resume from its
    sharded checkpoints, and an exported student."""
    cache = tmp_path / "cache"
    common = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "5e-5",
              "--per_device_train_batch_size", "4", "--checkpoints_total_limit", "0"]
    ddp, zero = tmp_path / "ddp", tmp_path / "zero"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, ddp, cache, *common),
           processes=2)
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, zero, cache, *common),
           processes=2, deepspeed=True)
    assert read_json(zero / "all_results.json")["distributed_type"] == "DistributedType.DEEPSPEED"
    loss_ddp = [r["train/loss"] for r in read_jsonl(ddp / "train_log.jsonl") if "train/loss" in r]
    loss_zero = [r["train/loss"] for r in read_jsonl(zero / "train_log.jsonl") if "train/loss" in r]
    assert len(loss_zero) == 6 and np.allclose(loss_ddp, loss_zero, atol=1e-4), (loss_ddp, loss_zero)
    assert os.path.isdir(zero / "checkpoints" / "step_00000003" / "pytorch_model")  # ZeRO's own shards

    resumed = tmp_path / "zero_resumed"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, resumed, cache, *common,
                                        "--resume_from_checkpoint", zero / "checkpoints" / "step_00000003"),
           processes=2, deepspeed=True)
    a, b = _weights(zero), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    AutoModelForQuestionAnswering.from_pretrained(zero)  # the exported student is a plain model


@pytest.mark.slow
def test_deepspeed_zero3_matches_ddp_resumes_and_exports_the_whole_student(student_dir, tiny_bert_qa_dir,
                                                                            squad_fixture_path, tmp_path):
    """The repo's ZeRO-3 config on 2 CPU processes: parameters sharded, same losses as DDP, exact resume, and the
    exported student whole (gathered from the shards), equal to the resumed run's."""
    cache = tmp_path / "cache"
    common = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "5e-5",
              "--per_device_train_batch_size", "4", "--checkpoints_total_limit", "0"]
    ddp, zero = tmp_path / "ddp", tmp_path / "zero3"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, ddp, cache, *common),
           processes=2)
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, zero, cache, *common),
           processes=2, deepspeed="deepspeed_zero3.yaml")
    loss_ddp = [r["train/loss"] for r in read_jsonl(ddp / "train_log.jsonl") if "train/loss" in r]
    loss_zero = [r["train/loss"] for r in read_jsonl(zero / "train_log.jsonl") if "train/loss" in r]
    assert len(loss_zero) == 6 and np.allclose(loss_ddp, loss_zero, atol=1e-4), (loss_ddp, loss_zero)
    resumed = tmp_path / "zero3_resumed"
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, resumed, cache, *common,
                                        "--resume_from_checkpoint", zero / "checkpoints" / "step_00000003"),
           processes=2, deepspeed="deepspeed_zero3.yaml")
    a, b, d = _weights(zero), _weights(resumed), _weights(ddp)
    reference = AutoModelForQuestionAnswering.from_pretrained(student_dir).state_dict()
    exported = AutoModelForQuestionAnswering.from_pretrained(zero).state_dict()
    assert a.keys() == d.keys() and all(exported[k].shape == reference[k].shape for k in reference)  # not shards
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - d[k]).abs().max().item() for k in a) <= 1e-4


def test_teacher_logits_computed_across_two_processes_match_one(student_dir, tiny_bert_qa_dir, squad_fixture_path,
                                                                tmp_path):
    caches = []
    for n in (1, 2):
        cache = tmp_path / f"cache{n}"
        launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path / f"r{n}",
                                            cache, "--max_train_steps", "1", "--per_device_train_batch_size", "2"),
               processes=n)
        caches.append(glob.glob(str(cache / "*" / "start_logits.npy"))[0])
    a, b = np.load(caches[0]), np.load(caches[1])
    assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)


def test_sigusr1_saves_a_loadable_checkpoint(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    out, cache = tmp_path / "pre", tmp_path / "cache"
    cmd = [sys.executable, str(REPO_ROOT / "train_prediction.py"),
           *map(str, _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, out, cache, "--num_train_epochs", "200"))]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(read_jsonl(log)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the signal"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "Preempted by SIGUSR1" in output
    record = read_json(out / "preempted.json")
    checkpoint = record["checkpoint"]
    assert os.path.isfile(os.path.join(checkpoint, "kd_state.json")) and not checkpoint.endswith(".partial")
    assert not (out / "all_results.json").exists()
    # the checkpoint loads: resuming continues from it and finishes
    launch("train_prediction.py", _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, out, cache,
                                        "--num_train_epochs", "200", "--max_train_steps",
                                        str(record["state"]["completed_steps"] + 2),
                                        "--resume_from_checkpoint", "latest"))
    log_steps = [r["step"] for r in read_jsonl(log) if "train/loss" in r]
    assert log_steps[-1] == record["state"]["completed_steps"] + 2
    assert read_json(out / "all_results.json")["status"] == "finished"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(student_dir, squad_fixture_path, tmp_path):
    out = tmp_path / "nan"
    proc = launch("train_prediction.py", _args(student_dir, None, squad_fixture_path, out, tmp_path / "c",
                                               "--learning_rate", "1e35", "--max_grad_norm", "0",
                                               "--checkpointing_steps", "1", "--num_train_epochs", "1",
                                               "--lr_scheduler_type", "constant", "--num_warmup_steps", "0"),
                  check=False)
    assert proc.returncode != 0
    assert "Non-finite loss" in proc.stderr and "Last good checkpoint" in proc.stderr
    done = sorted(os.listdir(out / "checkpoints"))
    assert done and all(not d.endswith(".partial") for d in done)
    last = read_json(out / "checkpoints" / done[-1] / "kd_state.json")
    weights = load_file(str(out / "checkpoints" / done[-1] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "all_results.json").exists() and last["completed_steps"] >= 1


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-2"], "--temperature must be > 0"),
    (["--distillation_loss_weight", "1.2"], "--distillation_loss_weight must be in [0, 1]"),
    (["--distillation_loss_weight", "-0.5"], "--distillation_loss_weight must be in [0, 1]"),
    (["--temperature", "inf"], "--temperature must be > 0 and finite, got inf"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
    (["--max_seq_length", "600"], "--max_seq_length 600 exceeds the 512 positions of --model_name_or_path"),
    (["--teacher_name_or_path", "/no/such/teacher"],
     "--teacher_name_or_path /no/such/teacher: no such directory, and no model config could be loaded"),
])
def test_invalid_distillation_arguments(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path, capsys, extra,
                                        message):
    import train_prediction

    with pytest.raises(SystemExit) as exit_info:
        train_prediction.parse_args(list(map(str, _args(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path,
                                                        tmp_path, *extra))))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # rejected before anything was written


def _tree(root) -> dict:
    return {os.path.relpath(p, root): open(p, "rb").read() for p in glob.glob(f"{root}/**", recursive=True)
            if os.path.isfile(p)}


@pytest.mark.parametrize("layout, message", [
    ("output_is_the_student", "is --model_name_or_path"),  # a finished run's dir, trained on from itself
    ("output_holds_the_student", "holds --model_name_or_path"),
    ("output_holds_a_foreign_model", "not written by a training run (it has no run.json)"),
])
def test_overwrite_never_deletes_an_input_or_what_no_run_wrote(student_dir, squad_fixture_path, tmp_path, layout,
                                                               message):
    from kd.run_dir import claim_output_dir

    runs = tmp_path / "runs"
    student = shutil.copytree(student_dir, runs / "student")
    claim_output_dir(str(student), resume=False, overwrite=False, script="train_prediction.py")  # a run's output
    out = {"output_is_the_student": student, "output_holds_the_student": runs,
           "output_holds_a_foreign_model": tmp_path / "downloaded"}[layout]
    if layout == "output_holds_a_foreign_model":
        shutil.copytree(student_dir, out)  # config.json, model.safetensors, no run.json
    before = _tree(tmp_path)
    proc = launch("train_prediction.py", _args(student, None, squad_fixture_path, out, tmp_path / "cache",
                                               "--max_train_steps", "1", "--overwrite_output_dir"), check=False)
    assert proc.returncode != 0
    assert f"train_prediction.py: error: --output_dir {out}" in proc.stderr and message in proc.stderr
    assert _tree(tmp_path) == before  # nothing deleted, nothing written


def test_input_paths_are_the_local_files_and_dirs_of_the_arguments(tmp_path):
    import argparse

    from kd.run_dir import input_paths

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x")
    args = argparse.Namespace(output_dir=str(tmp_path), model_name_or_path=str(tmp_path / "a.txt"),
                              teacher_name_or_path="some/hub-model", corpus_files=[str(tmp_path / "*.txt")],
                              seed=3, run_name=None)
    assert input_paths(args) == [("--model_name_or_path", str(tmp_path / "a.txt")),
                                 ("--corpus_files", str(tmp_path / "a.txt")),
                                 ("--corpus_files", str(tmp_path / "b.txt"))]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_teacher_with_another_tokenizer_teaches_across_tokenizers(tiny_roberta_qa_dir, tiny_bert_qa_dir,
                                                                    squad_fixture_path, tmp_path, processes):
    """A WordPiece teacher, a byte-level BPE student: the teacher runs on its own (longer) windows and its
    distributions reach the student through character offsets; recorded as such."""
    out = tmp_path / "o"
    proc = launch("train_prediction.py", _args(tiny_roberta_qa_dir, tiny_bert_qa_dir, squad_fixture_path, out,
                                               tmp_path / "c", "--max_train_steps", "2", "--max_train_samples", "24",
                                               "--teacher_max_seq_length", "160", "--teacher_doc_stride", "64"),
                  processes=processes)
    assert "the teacher tokenizes differently (vocabularies differ" in proc.stdout + proc.stderr
    results = read_json(out / "all_results.json")
    assert results["status"] == "finished"
    assert results["teacher_tokenization"].startswith("differs from the student's: vocabularies differ")
    assert "character offsets" in results["teacher_target_alignment"]
    assert results["teacher_window"] == {"max_seq_length": 160, "doc_stride": 64, "max_query_length": 32}
    losses = [r["train/loss_kd"] for r in read_jsonl(out / "train_log.jsonl") if "train/loss_kd" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(x > 0 for x in losses)
    assert "character offsets" in (out / "README.md").read_text()  # the model card says how it was taught


def test_malformed_squad_is_a_clear_error(student_dir, tmp_path):
    import json

    bad = {"version": "v2.0", "data": [{"title": "Broken_Article", "paragraphs": [{
        "context": "Paris is the capital of France.",
        "qas": [{"id": "q-bad-1", "question": "What is the capital of France?",
                 "answers": [{"text": "Paris", "answer_start": 5}], "is_impossible": False}]}]}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    proc = launch("train_prediction.py", _args(student_dir, None, path, tmp_path / "o", tmp_path / "c"), check=False)
    assert proc.returncode != 0
    for part in ("bad.json", "Broken_Article", "q-bad-1", "--skip_invalid"):
        assert part in proc.stderr


def test_training_set_without_answerable_question_warns(student_dir, squad_fixture_path, tmp_path):
    data = read_json(squad_fixture_path)
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if not qa["answers"]]
    unanswerable = tmp_path / "unanswerable.json"
    unanswerable.write_text(json.dumps(data))
    proc = launch("train_prediction.py", _args(student_dir, None, unanswerable, tmp_path / "o", tmp_path / "c",
                                               "--max_train_steps", "1"))
    assert "has no answerable question: the span loss only teaches the no-answer position" in proc.stderr


def _error_line(err: str) -> str:
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]  # after argparse's usage: one line
    return line


def test_a_teacher_without_a_trained_qa_head_is_refused_a_student_is_not(student_dir, tiny_bert_encoder_dir,
                                                                         squad_fixture_path, tmp_path, capsys):
    import train_prediction

    argv = _args(student_dir, tiny_bert_encoder_dir, squad_fixture_path, tmp_path / "o", tmp_path / "c")
    with pytest.raises(SystemExit) as exit_info:
        train_prediction.parse_args(list(map(str, argv)))
    line = _error_line(capsys.readouterr().err)
    assert exit_info.value.code == 2 and not os.listdir(tmp_path)
    assert f"--teacher_name_or_path {tiny_bert_encoder_dir} has no trained QA head" in line
    assert "qa_outputs.weight" in line and f"train_prediction.py --model_name_or_path {tiny_bert_encoder_dir}" in line
    # the same encoder as the student: fine-tuning trains the head it lacks
    args, _ = train_prediction.parse_args(list(map(str, _args(tiny_bert_encoder_dir, None, squad_fixture_path,
                                                              tmp_path / "o", tmp_path / "c"))))
    assert args.model_name_or_path == str(tiny_bert_encoder_dir)


def test_a_model_dir_without_tokenizer_files_is_refused(student_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path,
                                                        capsys):
    import shutil

    import train_prediction

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(student_dir / name, bare / name)
    for student, teacher, flag in ((bare, tiny_bert_qa_dir, "--model_name_or_path"),
                                   (student_dir, bare, "--teacher_name_or_path")):
        with pytest.raises(SystemExit) as exit_info:
            train_prediction.parse_args(list(map(str, _args(student, teacher, squad_fixture_path, tmp_path / "o",
                                                            tmp_path / "c"))))
        line = _error_line(capsys.readouterr().err)
        assert exit_info.value.code == 2 and f"{flag} {bare}: no tokenizer files there" in line
        assert "tokenizer.save_pretrained" in line
    assert sorted(os.listdir(tmp_path)) == ["no_tokenizer"]

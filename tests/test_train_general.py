"""train_general.py end to end through ``accelerate launch`` / torchrun on CPU, on the committed Wikipedia sample,
with a tiny random 4-layer BERT teacher (BertForMaskedLM, the tiny WordPiece tokenizer of conftest)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig, BertForMaskedLM

import train_general
from kd.packing import tokenize
from tests.conftest import FIXTURES_DIR, TINY_MAX_POSITIONS, _tiny_model_kwargs, build_tiny_bert_tokenizer
from tests.helpers import REPO_ROOT, launch, read_json, read_jsonl, script_env

SAMPLE = FIXTURES_DIR / "wiki_leads_sample.txt"
SCRIPT = "train_general.py"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = build_tiny_bert_tokenizer()
    config = BertConfig(**{**_tiny_model_kwargs(len(tokenizer)), "num_hidden_layers": 4},
                        max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("general_teacher")
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _args(teacher_dir, out, *extra):
    return ["--teacher_name_or_path", teacher_dir, "--train_file", SAMPLE, "--output_dir", out,
            "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "7",
            *extra]


def _sequences(trace_path) -> list[list[int]]:
    return [seq for record in read_jsonl(trace_path) for seq in record["sequences"]]


def test_general_distillation_end_to_end(teacher_dir, tmp_path, squad_fixture_path):
    out, cache = tmp_path / "general", tmp_path / "cache"
    launch(SCRIPT, _args(teacher_dir, out, "--student_layers", "2,4", "--max_train_steps", "4",
                         "--learning_rate", "1e-4", "--corpus_cache_dir", cache))
    results = read_json(out / "all_results.json")
    assert results["status"] == "finished" and results["student"] == {"teacher_layers": [2, 4]}
    corpus = results["corpus"]
    assert corpus["corpus_cache_hit"] is False and corpus["num_documents"] == 33
    assert corpus["num_sequences"] == -(-corpus["num_tokens"] // 64)  # packed full: only the last one is short
    log = [r for r in read_jsonl(out / "train_log.jsonl") if "train/loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:  # every term logged; tinybert weights are 1
        assert r["train/loss"] == pytest.approx(r["train/loss_att"] + r["train/loss_hidden"] + r["train/loss_emb"],
                                                rel=1e-5)
        assert r["train/tokens_per_s"] > 0
    assert results["train_metrics"]["train_tokens"] == 4 * 4 * 64
    card = (out / "README.md").read_text()  # the model card: a bare encoder, no QA widget
    assert "- general-distillation" in card and "pipeline_tag: feature-extraction" in card

    # the student loads as a QA model (new QA head) with the trained encoder, and it came from blocks 2 and 4
    saved = load_file(str(out / "model.safetensors"))
    qa = AutoModelForQuestionAnswering.from_pretrained(out)
    assert torch.equal(qa.bert.encoder.layer[1].output.dense.weight, saved["encoder.layer.1.output.dense.weight"])
    assert read_json(out / "tokenizer.json")["padding"] is None  # saved as the teacher's, no padding left enabled
    teacher = load_file(str(teacher_dir / "model.safetensors"))
    key = "encoder.layer.{}.attention.self.query.weight"
    moved = (saved[key.format(0)] - teacher["bert." + key.format(1)]).abs().max()
    assert 0 < moved < 0.01 < (saved[key.format(0)] - teacher["bert." + key.format(0)]).abs().max()

    # ... and as the student of task distillation (train_task_intermediate.py), against a QA teacher (this masked LM
    # has no QA head: it is refused there); saved with a head, the teacher stands in for its fine-tuned self
    qa_teacher, nxt = tmp_path / "qa_teacher", tmp_path / "task"
    AutoModelForQuestionAnswering.from_pretrained(teacher_dir).save_pretrained(qa_teacher)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(qa_teacher)
    launch("train_task_intermediate.py", ["--model_name_or_path", out, "--teacher_name_or_path", qa_teacher,
                                          "--train_file", squad_fixture_path, "--output_dir", nxt,
                                          "--max_train_samples", "8", "--max_train_steps", "1",
                                          "--per_device_train_batch_size", "4", "--max_seq_length", "128",
                                          "--doc_stride", "48", "--max_query_length", "32"])
    assert read_json(nxt / "all_results.json")["status"] == "finished"

    # two processes: the packed corpus comes from the cache, and each process trains on different sequences
    two = tmp_path / "two"
    proc = launch(SCRIPT, _args(teacher_dir, two, "--student_layers", "2,4", "--max_train_steps", "6",
                                "--corpus_cache_dir", cache, "--trace_data"), processes=2)
    assert "cache hit" in proc.stdout + proc.stderr
    assert read_json(two / "all_results.json")["corpus"]["corpus_cache_hit"] is True
    ranks = [_sequences(two / "data_trace" / f"rank{r}.jsonl") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6 * 4  # 6 steps of 4 rows, 48 of the 54 sequences: no wrap-around
    seen = [set(map(tuple, r)) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1]


def _documents_in(stream: list[int], docs: list[list[int]], sep: int) -> list[int]:
    """Indices of the documents a packed token stream (sequences' content, concatenated) is made of, in order."""
    found, i = [], 0
    while i < len(stream):
        if stream[i] == sep:
            i += 1
            continue
        match = max((k for k, d in enumerate(docs) if stream[i:i + len(d)] == d), key=lambda k: len(docs[k]),
                    default=None)
        if match is None:  # the stream ends inside a document
            assert any(d[:len(stream) - i] == stream[i:] for d in docs)
            break
        found.append(match)
        i += len(docs[match])
    return found


def test_streaming_two_processes_read_disjoint_shards(teacher_dir, tmp_path):
    out = tmp_path / "stream2"
    launch(SCRIPT, _args(teacher_dir, out, "--streaming", "--shuffle_buffer_size", "0", "--trace_data",
                         "--num_hidden_layers", "2", "--max_train_steps", "12", "--checkpointing_steps", "12"),
           processes=2)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)  # the trainer behind build_tiny_bert_tokenizer varies
    text = SAMPLE.read_text(encoding="utf-8")
    docs = tokenize(tokenizer, [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()])
    assert len(docs) == 33
    first_pass = []
    for rank in range(2):
        sequences = _sequences(out / "data_trace" / f"rank{rank}.jsonl")
        assert all(len(s) == 64 for s in sequences)  # packed, never padded
        order = _documents_in([t for s in sequences for t in s[1:-1]], docs, tokenizer.sep_token_id)
        epoch0 = order[:order.index(order[0], 1)] if order[0] in order[1:] else order
        assert len(order) > len(epoch0)  # the shard was read to its end and started again
        assert epoch0 == sorted(epoch0)  # one byte range each, read in file order
        first_pass.append(set(epoch0))
    assert not first_pass[0] & first_pass[1] and first_pass[0] | first_pass[1] == set(range(33))
    checkpoint = out / "checkpoints" / "step_00000012"
    assert {read_json(checkpoint / f"data_state_{r}.json")["settings"]["reader"]["rank"] for r in range(2)} == {0, 1}


def test_streaming_resume_continues_mid_stream(teacher_dir, tmp_path):
    """Resumed from a mid-run checkpoint, a streaming run reads exactly the batches the uninterrupted run read
    after that point (none twice, none skipped), and ends with the same weights (dropout on: RNG restored)."""
    common = ["--streaming", "--shuffle_buffer_size", "16", "--trace_data", "--num_hidden_layers", "2",
              "--hidden_size", "16", "--num_attention_heads", "2", "--intermediate_size", "32",
              "--gradient_accumulation_steps", "2", "--max_train_steps", "6", "--checkpointing_steps", "3",
              "--checkpoints_total_limit", "0", "--learning_rate", "1e-3"]
    full = tmp_path / "full"
    launch(SCRIPT, _args(teacher_dir, full, *common))
    resumed = tmp_path / "resumed"
    mid = full / "checkpoints" / "step_00000003"
    state = read_json(mid / "data_state_0.json")
    assert state["batches"] == 6 and state["position"]["offset"] > 0  # mid-file, with buffered sequences
    assert len(state["pool"]["lengths"]) >= 15  # the shuffle buffer travels with the checkpoint
    launch(SCRIPT, _args(teacher_dir, resumed, *common, "--resume_from_checkpoint", mid))

    a, b = read_jsonl(full / "data_trace" / "rank0.jsonl"), read_jsonl(resumed / "data_trace" / "rank0.jsonl")
    assert len(a) == 12 and b == a[6:]
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    log_a = {r["step"]: r["train/loss"] for r in read_jsonl(full / "train_log.jsonl") if "train/loss" in r}
    log_b = {r["step"]: r["train/loss"] for r in read_jsonl(resumed / "train_log.jsonl") if "train/loss" in r}
    assert sorted(log_b) == [4, 5, 6] and all(log_b[s] == pytest.approx(log_a[s], abs=1e-6) for s in log_b)


def test_streaming_under_deepspeed_matches_ddp_and_resumes(teacher_dir, tmp_path):
    """The stream is not passed to accelerator.prepare, so DeepSpeed gets its micro-batch size by hand: on the
    repo's ZeRO-2 config (2 CPU processes) the run reads what DDP reads, has DDP's losses, and resumes mid-stream
    from ZeRO's sharded checkpoint with the same data and weights."""
    common = ["--streaming", "--shuffle_buffer_size", "8", "--trace_data", "--num_hidden_layers", "2",
              "--max_train_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "0",
              "--learning_rate", "1e-4"]
    ddp, zero, resumed = tmp_path / "ddp", tmp_path / "zero", tmp_path / "zero_resumed"
    launch(SCRIPT, _args(teacher_dir, ddp, *common), processes=2)
    launch(SCRIPT, _args(teacher_dir, zero, *common), processes=2, deepspeed=True)
    assert read_json(zero / "all_results.json")["distributed_type"] == "DistributedType.DEEPSPEED"
    for rank in range(2):
        trace = f"data_trace/rank{rank}.jsonl"
        assert read_jsonl(zero / trace) == read_jsonl(ddp / trace)
    loss_ddp = [r["train/loss"] for r in read_jsonl(ddp / "train_log.jsonl") if "train/loss" in r]
    loss_zero = [r["train/loss"] for r in read_jsonl(zero / "train_log.jsonl") if "train/loss" in r]
    assert len(loss_zero) == 6 and loss_zero == pytest.approx(loss_ddp, abs=1e-4)
    mid = zero / "checkpoints" / "step_00000003"
    assert (mid / "pytorch_model").is_dir()  # ZeRO's own shards

    launch(SCRIPT, _args(teacher_dir, resumed, *common, "--resume_from_checkpoint", mid), processes=2, deepspeed=True)
    for rank in range(2):
        a = read_jsonl(zero / "data_trace" / f"rank{rank}.jsonl")
        assert read_jsonl(resumed / "data_trace" / f"rank{rank}.jsonl") == a[len(a) // 2:]
    wa, wb = load_file(str(zero / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_streaming_preempted_by_sigterm_resumes_without_rereading(teacher_dir, tmp_path):
    """SIGTERM (what SLURM sends) in the middle of a streaming run with gradient accumulation: the run saves a
    checkpoint at the next optimizer step, with the reading position, and exits cleanly; resumed into the same
    output dir, it reads on from there. The trace of both runs together equals an uninterrupted run's."""
    common = ["--streaming", "--shuffle_buffer_size", "16", "--trace_data", "--num_hidden_layers", "2",
              "--gradient_accumulation_steps", "2"]
    out = tmp_path / "preempted"
    cmd = [sys.executable, str(REPO_ROOT / SCRIPT), *map(str, _args(teacher_dir, out, *common,
                                                                   "--max_train_steps", "100000"))]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log, deadline = out / "train_log.jsonl", time.time() + 300
    while not (log.exists() and len(read_jsonl(log)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the signal"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Preempted by SIGTERM" in output, output[-3000:]
    record = read_json(out / "preempted.json")
    steps = record["state"]["completed_steps"]
    assert os.path.isfile(os.path.join(record["checkpoint"], "data_state_0.json"))
    assert len(read_jsonl(out / "data_trace" / "rank0.jsonl")) == 2 * steps  # whole accumulation cycles only

    launch(SCRIPT, _args(teacher_dir, out, *common, "--max_train_steps", steps + 3,
                         "--resume_from_checkpoint", "latest"))
    reference = tmp_path / "uninterrupted"
    launch(SCRIPT, _args(teacher_dir, reference, *common, "--max_train_steps", steps + 3))
    trace = read_jsonl(out / "data_trace" / "rank0.jsonl")
    assert len(trace) == 2 * (steps + 3) and trace == read_jsonl(reference / "data_trace" / "rank0.jsonl")
    assert [r["step"] for r in read_jsonl(log) if "train/loss" in r][-4:] == [steps, steps + 1, steps + 2, steps + 3]


@pytest.mark.parametrize("extra, message", [
    ([], "--max_train_steps N"),
    (["--max_train_steps", "2"], "choose the student in exactly one way"),
    (["--max_train_steps", "2", "--student_layers", "2", "--num_hidden_layers", "2"], "exactly one way"),
    (["--max_train_steps", "2", "--num_attention_heads", "3"], "not a multiple of num_attention_heads"),
    (["--max_train_steps", "2", "--student_layers", "2,9"], "out of range"),
    (["--max_train_steps", "2", "--student_layers", "2", "--max_seq_length", "1000"], "exceeds the teacher's 512"),
    (["--max_train_steps", "2", "--num_hidden_layers", "2", "--num_attention_heads", "4"],
     "attention-score loss needs equal head counts"),
])
def test_invalid_arguments_are_clear_errors(teacher_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train_general.parse_args([str(a) for a in _args(teacher_dir, tmp_path, *extra)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_corpus_files_are_named(teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_general.parse_args(["--teacher_name_or_path", str(teacher_dir), "--train_file",
                                  str(tmp_path / "nope_*.txt"), "--output_dir", str(tmp_path),
                                  "--max_train_steps", "1", "--student_layers", "2"])
    assert "nope_*.txt" in capsys.readouterr().err


def test_a_corpus_file_that_is_not_utf8_text_is_refused(teacher_dir, tmp_path, capsys):
    binary = tmp_path / "model.safetensors.txt"
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(256)))
    with pytest.raises(SystemExit) as exit_info:
        train_general.parse_args(["--teacher_name_or_path", str(teacher_dir), "--train_file", str(binary),
                                  "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
                                  "--student_layers", "2"])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert f"--train_file: {binary} is not UTF-8 text: a NUL byte (a binary file?) at byte offset 1 (line 1)" in line


def test_sized_student_config_copies_the_teacher_family():
    from transformers import DistilBertConfig, RobertaConfig

    from kd.student import student_config_of_size

    teacher = RobertaConfig(vocab_size=123, hidden_size=64, num_hidden_layers=6, num_attention_heads=8,
                            intermediate_size=256, max_position_embeddings=130)
    config = student_config_of_size(teacher, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                    intermediate_size=None)
    assert (config.model_type, config.vocab_size, config.max_position_embeddings) == ("roberta", 123, 130)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == \
        (2, 32, 4, 256)
    assert teacher.num_hidden_layers == 6  # a copy
    distil = student_config_of_size(DistilBertConfig(), num_hidden_layers=3, intermediate_size=1000)
    assert (distil.n_layers, distil.hidden_dim) == (3, 1000)
    with pytest.raises(ValueError, match="not a multiple"):
        student_config_of_size(teacher, num_attention_heads=6)

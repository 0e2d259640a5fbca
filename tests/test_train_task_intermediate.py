"""train_task_intermediate.py end to end through ``accelerate launch`` / torchrun on CPU, with tiny random models:
a 4-layer BERT teacher (hidden 32, 4 heads) and 2-layer students of another width (hidden 24)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForQuestionAnswering, AutoTokenizer, BertConfig,
                          BertForQuestionAnswering)

import train_task_intermediate
from tests.conftest import TINY_MAX_POSITIONS
from tests.helpers import REPO_ROOT, launch, read_json, read_jsonl, script_env

WINDOW = ["--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"]
SCRIPT = "train_task_intermediate.py"


def _save_bert(tokenizer, out, *, hidden, layers, heads, seed, dropout=0.0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        initializer_range=0.2)  # large enough that attention scores and relations are not ~uniform
    BertForQuestionAnswering(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_bert_qa_dir, tmp_path_factory):
    """teacher: 4 layers, hidden 32, 4 heads; student: 2 layers, hidden 24, 4 heads; student_2h: 2 heads;
    student_dropout: as student with dropout 0.1. All share the tiny BERT tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_bert_qa_dir)
    root = tmp_path_factory.mktemp("intermediate_models")
    return {
        "teacher": _save_bert(tok, root / "teacher", hidden=32, layers=4, heads=4, seed=0),
        "student": _save_bert(tok, root / "student", hidden=24, layers=2, heads=4, seed=1),
        "student_2h": _save_bert(tok, root / "student_2h", hidden=24, layers=2, heads=2, seed=2),
        "student_dropout": _save_bert(tok, root / "student_dropout", hidden=24, layers=2, heads=4, seed=1,
                                      dropout=0.1),
    }


@pytest.fixture(scope="module")
def equal_length_squad(tiny_bert_qa_dir, squad_fixture_path, tmp_path_factory):
    """24 answer-less questions whose windows all have the same number of real tokens (one window each).

    The TinyBERT losses are means over real tokens, so a batch split over two processes averages the same
    per-token values the one-process batch does only when every example has as many tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_bert_qa_dir)
    data = json.loads(squad_fixture_path.read_text())
    paragraphs = [p for a in data["data"] for p in a["paragraphs"]]
    questions = [qa["question"] for p in paragraphs for qa in p["qas"]]
    lengths = collections.Counter(len(tok(q)["input_ids"]) for q in questions)
    q_len = lengths.most_common(1)[0][0]
    same = list(dict.fromkeys(q for q in questions if len(tok(q)["input_ids"]) == q_len))
    target = 80  # context tokens
    contexts = []
    for p in paragraphs:
        words = p["context"].split()
        for k in range(1, len(words)):
            n = len(tok(" ".join(words[:k]), add_special_tokens=False)["input_ids"])
            if n == target:
                contexts.append(" ".join(words[:k]))
            if n >= target:
                break
    assert len(contexts) >= 2 and len(same) >= 12
    qas = [(c, q) for c in contexts[:2] for q in same[:12]]
    out = {"version": "v2.0", "data": [{"title": "equal", "paragraphs": [
        {"context": c, "qas": [{"id": f"eq{i}", "question": q, "answers": []}]} for i, (c, q) in enumerate(qas)]}]}
    path = tmp_path_factory.mktemp("equal") / "equal.json"
    path.write_text(json.dumps(out))
    return path


def _args(student, teacher, train_file, out, *extra):
    return ["--model_name_or_path", student, "--teacher_name_or_path", teacher, "--train_file", train_file,
            "--output_dir", out, "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--seed", "7", *WINDOW, *extra]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_end_to_end_trains_student_and_projections_and_exports_plain_student(models, squad_fixture_path, tmp_path):
    out = tmp_path / "run"
    launch(SCRIPT, _args(models["student"], models["teacher"], squad_fixture_path, out, "--max_train_samples", "40",
                         "--max_train_steps", "8", "--checkpointing_steps", "1", "--checkpoints_total_limit", "0",
                         "--validation_file", squad_fixture_path, "--max_eval_samples", "8"))
    results = read_json(out / "all_results.json")
    assert results["status"] == "finished" and results["total_steps"] == 8
    assert results["layer_map"] == [[0, 0], [1, 2], [2, 4]]  # uniform 2 <- 4, embeddings included
    assert results["distiller"]["weights"] == {"attention": 1.0, "hidden": 1.0, "embedding": 1.0, "relation": 0.0}
    assert results["distiller"]["hidden_projection"] and results["distiller"]["embedding_projection"]
    assert results["frozen_parameters"] == {"head": ["qa_outputs.weight", "qa_outputs.bias"], "unreached": []}
    assert results["teacher_dtype"] == "torch.float32"  # auto on CPU

    # every loss term logged, and the total is their (unit-weighted) sum
    log = read_jsonl(out / "train_log.jsonl")
    train = [r for r in log if "train/loss" in r]
    assert len(train) == 8
    for r in train:
        assert r["train/loss"] == pytest.approx(r["train/loss_att"] + r["train/loss_hidden"] + r["train/loss_emb"],
                                                rel=1e-5)
        assert r["train/loss_att"] > 0 and r["train/loss_hidden"] > 0 and r["train/loss_emb"] > 0
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    heldout = [r for r in log if "eval/loss" in r]
    assert heldout and {"eval/loss_att", "eval/loss_hidden", "eval/loss_emb"} <= heldout[-1].keys()
    assert results["eval_metrics"]["loss"] == pytest.approx(heldout[-1]["eval/loss"])
    assert results["eval_loss"] == results["eval_metrics"]["loss"]  # HF's flat key beside the nested one
    card = (out / "README.md").read_text()  # the model card names the stage and the map it learnt with
    assert "- task-intermediate-distillation" in card and "0:0, 1:2, 2:4" in card

    # the projections are in the checkpoints, and they trained
    first = load_file(str(out / "checkpoints" / "step_00000001" / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step_00000008" / "model.safetensors"))
    projection_keys = {k for k in last if "projection" in k}
    assert projection_keys == {"hidden_projection.weight", "hidden_projection.bias",
                               "embedding_projection.weight", "embedding_projection.bias"}
    assert last["hidden_projection.weight"].shape == (32, 24)
    for k in projection_keys:
        assert not torch.equal(first[k], last[k]), k

    # the exported student: no projections, the last checkpoint's encoder, the QA head as initialised
    exported = load_file(str(out / "model.safetensors"))
    assert not any("projection" in k for k in exported)
    model = AutoModelForQuestionAnswering.from_pretrained(out)
    initial = AutoModelForQuestionAnswering.from_pretrained(models["student"]).state_dict()
    state = model.state_dict()
    assert state.keys() == initial.keys()
    assert _max_diff({k: state[k] for k in state}, {k: last[f"student.{k}"] for k in state}) == 0.0
    assert torch.equal(state["qa_outputs.weight"], initial["qa_outputs.weight"])
    assert not torch.equal(state["bert.encoder.layer.1.output.dense.weight"],
                           initial["bert.encoder.layer.1.output.dense.weight"])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(models["student"]).get_vocab()

    # ... and it is a valid --model_name_or_path for the next stage
    nxt = tmp_path / "prediction"
    launch("train_prediction.py", ["--model_name_or_path", out, "--train_file", squad_fixture_path,
                                   "--output_dir", nxt, "--max_train_samples", "16", "--max_train_steps", "2",
                                   "--per_device_train_batch_size", "4", *WINDOW])
    assert read_json(nxt / "all_results.json")["status"] == "finished"


def test_resume_mid_epoch_matches_uninterrupted_run(models, squad_fixture_path, tmp_path):
    # dropout on in the student: the RNG states are in the checkpoint, so the masks after the resume must line up
    common = ["--max_train_samples", "16", "--num_train_epochs", "2", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "3", "--checkpoints_total_limit", "0"]
    full = tmp_path / "full"
    launch(SCRIPT, _args(models["student_dropout"], models["teacher"], squad_fixture_path, full, *common))
    total = read_json(full / "all_results.json")["total_steps"]
    mid = full / "checkpoints" / "step_00000003"
    state = read_json(mid / "kd_state.json")
    assert state["epoch"] == 0 and 0 < state["batches_in_epoch"] < total  # really inside the first epoch

    resumed = tmp_path / "resumed"
    launch(SCRIPT, _args(models["student_dropout"], models["teacher"], squad_fixture_path, resumed, *common,
                         "--resume_from_checkpoint", mid))
    # the whole trained module (student + projections) and the exported student match
    last = f"step_{total:08d}"
    a = load_file(str(full / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / last / "model.safetensors"))
    assert any("projection" in k for k in a)
    assert _max_diff(a, b) <= 1e-5
    assert _max_diff(load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))) <= 1e-5
    log_a = {r["step"]: r for r in read_jsonl(full / "train_log.jsonl") if "train/loss" in r}
    log_b = {r["step"]: r for r in read_jsonl(resumed / "train_log.jsonl") if "train/loss" in r}
    assert min(log_b) == 4 and max(log_b) == total
    for step in log_b:
        for term in ("train/loss", "train/loss_att", "train/loss_hidden", "train/loss_emb"):
            assert log_b[step][term] == pytest.approx(log_a[step][term], abs=1e-6)


def test_two_processes_match_one_process(models, equal_length_squad, tmp_path):
    # small learning rate: Adam turns reduction-order noise in tiny gradients into full-size steps
    steps = ["--max_train_steps", "6", "--learning_rate", "5e-5"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(SCRIPT, _args(models["student"], models["teacher"], equal_length_squad, one, *steps,
                         "--per_device_train_batch_size", "8"))
    launch(SCRIPT, _args(models["student"], models["teacher"], equal_length_squad, two, *steps,
                         "--per_device_train_batch_size", "4"), processes=2)
    assert read_json(two / "all_results.json")["num_processes"] == 2
    terms = ("train/loss", "train/loss_att", "train/loss_hidden", "train/loss_emb")
    log1 = [r for r in read_jsonl(one / "train_log.jsonl") if "train/loss" in r]
    log2 = [r for r in read_jsonl(two / "train_log.jsonl") if "train/loss" in r]
    assert len(log1) == len(log2) == 6
    for term in terms:
        a, b = [r[term] for r in log1], [r[term] for r in log2]
        assert np.allclose(a, b, rtol=0, atol=1e-4), (term, a, b)
    assert log1[-1]["train/loss"] != log1[0]["train/loss"]  # it trained: the comparison is not of constants
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert _max_diff(w1, w2) <= 1e-4


def test_minilm_relation_with_different_head_counts_on_two_processes(models, squad_fixture_path, tmp_path):
    """Student 2 heads, teacher 4; the relation loss on the last layer leaves the student's top attention output
    and feed-forward unreached: they are frozen (DDP without find_unused_parameters would fail on them)."""
    out = tmp_path / "minilm"
    launch(SCRIPT, _args(models["student_2h"], models["teacher"], squad_fixture_path, out, "--max_train_samples",
                         "24", "--max_train_steps", "5", "--loss_kind", "minilm_relation", "--layer_map", "last",
                         "--relation_heads", "8", "--per_device_train_batch_size", "4"), processes=2)
    results = read_json(out / "all_results.json")
    assert results["num_processes"] == 2 and results["layer_map"] == [[2, 4]]
    assert results["distiller"]["relation_heads"] == 8 and not results["distiller"]["hidden_projection"]
    unreached = results["frozen_parameters"]["unreached"]
    assert "student.bert.encoder.layer.1.output.dense.weight" in unreached
    assert "student.bert.encoder.layer.1.attention.output.dense.weight" in unreached
    assert not any("self.query" in k or "self.value" in k or "layer.0." in k for k in unreached)
    train = [r for r in read_jsonl(out / "train_log.jsonl") if "train/loss" in r]
    assert len(train) == 5 and set(train[0]) == {"step", "train/loss", "train/loss_rel", "train/grad_norm", "train/lr"}
    assert all(r["train/loss_rel"] > 0 for r in train)

    initial = AutoModelForQuestionAnswering.from_pretrained(models["student_2h"]).state_dict()
    trained = AutoModelForQuestionAnswering.from_pretrained(out).state_dict()
    assert torch.equal(trained["bert.encoder.layer.1.output.dense.weight"],
                       initial["bert.encoder.layer.1.output.dense.weight"])  # frozen: kept as it was
    for k in ("bert.encoder.layer.1.attention.self.value.weight", "bert.encoder.layer.0.output.dense.weight"):
        assert not torch.equal(trained[k], initial[k]), k


def test_tokenizer_mismatch_is_a_clear_error(tiny_roberta_qa_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    # same sizes (2 layers, 2 heads, hidden 32), so only the tokenizers differ; plain `python` (one process) is
    # enough for an error path and starts faster than `accelerate launch`
    proc = subprocess.run([sys.executable, str(REPO_ROOT / SCRIPT),
                           *map(str, _args(tiny_roberta_qa_dir, tiny_bert_qa_dir, squad_fixture_path, tmp_path / "o",
                                           "--max_train_steps", "1"))],
                          cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train_task_intermediate.py: error: The student tokenizer" in proc.stderr
    assert str(tiny_roberta_qa_dir) in proc.stderr and str(tiny_bert_qa_dir) in proc.stderr
    assert not (tmp_path / "o" / "all_results.json").exists()


@pytest.mark.parametrize("student, extra, message", [
    ("student_2h", [], "minilm_relation"),  # TinyBERT scores need equal head counts
    ("student_2h", ["--loss_kind", "minilm_relation", "--relation_heads", "5"], "Valid choices: [1, 2, 4, 8]"),
    ("student", ["--relation_heads", "4"], "applies to the relation loss only"),
    ("student", ["--layer_map", "1:2,2:5"], "out of range"),
    ("student", ["--layer_map", "last", "--embedding_loss_weight", "1"], "needs the pair 0:0"),
    ("student", ["--hidden_loss_weight", "-1"], "--hidden_loss_weight must be a finite number >= 0"),
    ("student", ["--layer_map", "missing.json"], "does not exist"),
])
def test_invalid_setups_fail_at_argument_parsing(models, squad_fixture_path, tmp_path, capsys, student, extra,
                                                 message):
    with pytest.raises(SystemExit) as exc:
        train_task_intermediate.parse_args(list(map(str, _args(models[student], models["teacher"],
                                                               squad_fixture_path, tmp_path, *extra))))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# --- in-process checks of the pieces the script relies on ----------------------------------------------------------
def _tiny_qa(hidden, layers, heads, seed):
    torch.manual_seed(seed)
    return BertForQuestionAnswering(BertConfig(
        vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=37,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2))


@pytest.mark.parametrize("loss_kind, student_heads", [("tinybert", 4), ("minilm_relation", 2)])
def test_lean_losses_equal_whole_tensor_losses_in_value_and_gradient(monkeypatch, loss_kind, student_heads):
    """The chunked, checkpointed T x T losses the script uses give the kd.losses values and gradients."""
    import kd.intermediate as ki
    import kd.lean_losses as lean_losses
    from kd.capture import capture_teacher
    from kd.layer_map import parse_layer_map

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9, [1] * 12, [1] * 10 + [0] * 2])
    batch = {"input_ids": torch.randint(1, 99, (5, 12), generator=g) * mask, "attention_mask": mask}
    monkeypatch.setattr(lean_losses, "LEAN_CHUNK_BYTES", 2 * 4 * 12 * 12 * 4)  # chunks of 2 examples, the last of 1
    monkeypatch.setattr(lean_losses, "SCORE_CHUNK_BYTES", 2 * 4 * 12 * 12 * 4)
    teacher = _tiny_qa(32, 4, 4, 0)
    results = []
    for lean in (False, True):
        distiller = ki.IntermediateDistiller(_tiny_qa(24, 2, student_heads, 1), parse_layer_map("uniform", 2, 4),
                                             teacher.config, loss_kind=loss_kind, lean_loss=lean)
        assert ("scores" in distiller.capture_what) == (not lean and loss_kind == "tinybert")
        terms = distiller(batch, capture_teacher(teacher, distiller.layer_map, batch, distiller.capture_what))
        terms["loss"].backward()
        results.append((terms, {n: p.grad for n, p in distiller.named_parameters() if p.grad is not None}))
    (whole, grads_whole), (lean, grads_lean) = results
    assert whole.keys() == lean.keys() and whole["loss"] > 0
    for k in whole:
        assert lean[k].item() == pytest.approx(whole[k].item(), rel=1e-5), k
    assert grads_whole.keys() == grads_lean.keys()
    for n in grads_whole:
        assert torch.allclose(grads_lean[n], grads_whole[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("fill", [1e30, -3e38, 7.0])
def test_lean_score_loss_ignores_padding_values_and_takes_bf16(fill):
    from kd.lean_losses import lean_attention_score_loss
    from kd.losses import attention_score_loss

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    qs, ks = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(2))
    qt, kt = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(2))  # another head size: fine
    reference = attention_score_loss(qs @ ks.transpose(-1, -2) / 2, qt @ kt.transpose(-1, -2) / 8**0.5, mask)
    dirty = [x.clone() for x in (qs, ks, qt, kt)]
    for x in dirty:
        x[1, :, 3:] = fill
    qs_d, ks_d = (x.requires_grad_() for x in dirty[:2])
    loss = lean_attention_score_loss((qs_d, ks_d), dirty[2:], mask)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for grad in (qs_d.grad, ks_d.grad):
        assert torch.isfinite(grad).all() and grad[1, :, 3:].abs().sum() == 0
    bf16 = lean_attention_score_loss((qs.bfloat16(), ks.bfloat16()), (qt.bfloat16(), kt.bfloat16()), mask)
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(reference.item(), rel=2e-2)


def test_freeze_unreached_parameters_finds_what_the_map_cannot_train():
    """'last' with the relation loss reads only Q/K/V of the student's top layer: its attention output and
    feed-forward (and the QA head) get no gradient; with the TinyBERT loss on 'uniform' everything is reached."""
    import kd.intermediate as ki
    from kd.layer_map import parse_layer_map

    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch = {"input_ids": torch.arange(16).view(2, 8) % 90 + 1, "attention_mask": mask}
    teacher = _tiny_qa(32, 4, 4, 0).bert.eval()
    student = _tiny_qa(24, 2, 2, 1)
    distiller = ki.IntermediateDistiller(student, parse_layer_map("last", 2, 4), teacher.config,
                                         loss_kind="minilm_relation")
    assert ki.freeze_outside_encoder(student) == ["qa_outputs.weight", "qa_outputs.bias"]
    rng = torch.get_rng_state()
    frozen = ki.freeze_unreached_parameters(distiller, teacher, batch)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe changes no later random draw
    assert frozen and all(n.startswith("student.bert.encoder.layer.1.") for n in frozen)
    assert not any(".self." in n for n in frozen)  # q, k and v of the top layer are trained
    assert {n for n, p in distiller.named_parameters() if not p.requires_grad} == set(frozen) | {
        "student.qa_outputs.weight", "student.qa_outputs.bias"}

    student = _tiny_qa(24, 2, 4, 1)
    distiller = ki.IntermediateDistiller(student, parse_layer_map("uniform", 2, 4), teacher.config)
    ki.freeze_outside_encoder(student)
    assert ki.freeze_unreached_parameters(distiller, teacher, batch) == []


def _encoder_of(model_dir, out):
    """The encoder of a saved QA model alone (no QA head), with its tokenizer."""
    AutoModel.from_pretrained(model_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_a_teacher_without_a_trained_qa_head_is_refused(models, squad_fixture_path, tmp_path, capsys):
    """Task distillation learns from a fine-tuned teacher; a bare encoder's (or a masked LM's) QA head is random.
    A student without a QA head is fine: its new head is frozen here and trained by train_prediction.py."""
    teacher = _encoder_of(models["teacher"], tmp_path / "teacher_encoder")
    with pytest.raises(SystemExit) as exit_info:
        train_task_intermediate.parse_args(list(map(str, _args(models["student"], teacher, squad_fixture_path,
                                                               tmp_path / "o"))))
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert exit_info.value.code == 2 and f"--teacher_name_or_path {teacher} has no trained QA head" in line
    assert not (tmp_path / "o").exists()
    student = _encoder_of(models["student"], tmp_path / "student_encoder")
    args, _ = train_task_intermediate.parse_args(list(map(str, _args(student, models["teacher"], squad_fixture_path,
                                                                     tmp_path / "o"))))
    assert args.model_name_or_path == str(student)

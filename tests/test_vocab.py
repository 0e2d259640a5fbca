"""Vocabulary-pruned students (make_student.py --prune_vocab_file, kd/vocab.py): tokenizers that still tokenize
everything, weights that give the same outputs where the tokens are unchanged, sizes reported, bad input refused."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, AutoTokenizer

import make_student
from kd.vocab import prune_model_vocab, required_ids, tokenizer_model
from tests.conftest import fixture_texts
from tests.helpers import REPO_ROOT, launch, read_json, script_env

BERT_VOCAB, ROBERTA_VOCAB = 400, 450  # of 1015 and 700: far fewer than the fixture's tokens (835 and 491)


def _make(teacher, out, *flags) -> str:
    """make_student.py in process; returns what it printed."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        make_student.main(["--teacher_name_or_path", str(teacher), "--output_dir", str(out), *map(str, flags)])
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pruned_bert(tiny_bert_qa_dir, squad_fixture_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned_bert")
    printed = _make(tiny_bert_qa_dir, out, "--prune_vocab_file", squad_fixture_path, "--vocab_size", BERT_VOCAB)
    return out, printed


@pytest.fixture(scope="module")
def pruned_roberta(tiny_roberta_qa_dir, squad_fixture_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned_roberta")
    printed = _make(tiny_roberta_qa_dir, out, "--prune_vocab_file", squad_fixture_path, "--vocab_size", ROBERTA_VOCAB)
    return out, printed


def _tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_round_trip(teacher_dir, student_dir, texts):
    """Every text decodes to what the teacher's tokenizer gives, without a new unknown; returns how many texts
    tokenize differently (so that a test can make sure the pruning did something)."""
    teacher, student = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(student_dir)
    assert student.is_fast and type(student) is type(teacher) and len(student) < len(teacher)
    changed = 0
    for text in texts:
        ours, theirs = student(text)["input_ids"], teacher(text)["input_ids"]
        assert student.decode(ours, skip_special_tokens=True) == teacher.decode(theirs, skip_special_tokens=True)
        unk = student.unk_token_id
        assert ours.count(unk) == theirs.count(teacher.unk_token_id), text  # the tiny tokenizers have none
        changed += _tokens(student, text) != _tokens(teacher, text)
    # special tokens kept, under their new ids, in the tokenizer, its post-processor and the model's config
    config = AutoConfig.from_pretrained(student_dir)
    assert config.vocab_size == len(student)
    assert student.convert_ids_to_tokens(config.pad_token_id) == teacher.pad_token == student.pad_token
    for name in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token"):
        assert student.convert_ids_to_tokens(getattr(student, f"{name}_id")) == getattr(teacher, name)
    ids = student("a", "b")["input_ids"]
    assert ids[0] == student.cls_token_id and ids[-1] == student.sep_token_id
    # tokenizer.json by itself (as other runtimes read it) inserts the new ids too
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(student_dir) / "tokenizer.json"))
    raw.no_padding()  # MiniLM's pads to 128
    raw = raw.encode("a", "b").ids
    assert raw[0] == student.cls_token_id and raw[-1] == student.sep_token_id
    return changed


def test_pruned_wordpiece_tokenizer_round_trips_without_new_unknowns(tiny_bert_qa_dir, pruned_bert):
    out, _ = pruned_bert
    assert len(AutoTokenizer.from_pretrained(out)) == BERT_VOCAB  # --vocab_size is the total, specials included
    changed = _check_round_trip(tiny_bert_qa_dir, out, fixture_texts() + ["Zebras quickly vexed (the) jumping fox!"])
    assert changed > 10


def test_pruned_bpe_tokenizer_round_trips_and_keeps_only_buildable_merges(tiny_roberta_qa_dir, pruned_roberta):
    out, _ = pruned_roberta
    changed = _check_round_trip(tiny_roberta_qa_dir, out, fixture_texts() + ["Zebras quickly vexed the fox!"])
    assert changed > 10
    model = json.loads((out / "tokenizer.json").read_text())["model"]
    assert len(model["vocab"]) <= ROBERTA_VOCAB
    teacher_merges = json.loads((tiny_roberta_qa_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert 0 < len(model["merges"]) < len(teacher_merges)
    for left, right in model["merges"]:
        assert left in model["vocab"] and right in model["vocab"] and left + right in model["vocab"]
    # every kept multi-character token can still be built from the kept merges
    made = {left + right for left, right in model["merges"]}
    assert all(t in made for t in model["vocab"] if len(t) > 1 and not t.startswith("<"))


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_pruned_model_gives_the_teachers_logits_where_tokens_are_unchanged(which, request):
    teacher_dir = request.getfixturevalue(f"tiny_{which}_qa_dir")
    out, _ = request.getfixturevalue(f"pruned_{which}")
    tok_t, tok_s = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(out)
    teacher = AutoModelForQuestionAnswering.from_pretrained(teacher_dir).eval()
    student = AutoModelForQuestionAnswering.from_pretrained(out).eval()
    questions = [t for t in fixture_texts() if len(t) < 200]
    same = [q for q in questions if _tokens(tok_s, q) == _tokens(tok_t, q)]
    assert 3 <= len(same) < len(questions)  # both kinds exist
    assert any(tok_s(q)["input_ids"] != tok_t(q)["input_ids"] for q in same)  # new ids for the same tokens
    with torch.no_grad():
        for q in same[:20]:
            a, b = teacher(**tok_t(q, return_tensors="pt")), student(**tok_s(q, return_tensors="pt"))
            torch.testing.assert_close(b.start_logits, a.start_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.end_logits, a.end_logits, atol=1e-5, rtol=0)


def _data_texts(examples) -> list[str]:
    """What make_student.py counts: each paragraph once, every question."""
    return list(dict.fromkeys(examples["context"])) + list(examples["question"])


def test_sizes_are_reported_in_the_output_and_student_origin(tiny_bert_qa_dir, squad_fixture_path,
                                                             squad_fixture_examples, pruned_bert):
    out, printed = pruned_bert
    teacher = AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir)
    student = AutoModelForQuestionAnswering.from_pretrained(out)
    n_teacher, n_student = teacher.num_parameters(), student.num_parameters()
    hidden = teacher.config.hidden_size
    assert n_teacher - n_student == (len(AutoTokenizer.from_pretrained(tiny_bert_qa_dir)) - BERT_VOCAB) * hidden
    origin = read_json(out / "student_origin.json")
    assert origin["teacher_parameters"] == n_teacher and origin["student_parameters"] == n_student
    assert origin["teacher_layers_kept"] == [1, 2]  # no --layers: every block
    vocab = origin["vocab"]
    assert vocab["teacher_vocab_size"] == teacher.config.vocab_size and vocab["vocab_size"] == BERT_VOCAB
    assert vocab["data_file"] == str(squad_fixture_path) and vocab["requested"] == {"vocab_size": BERT_VOCAB}
    # coverage: the share of the fixture's tokens (teacher's tokenizer) that the student kept
    tok_t, tok_s = AutoTokenizer.from_pretrained(tiny_bert_qa_dir), AutoTokenizer.from_pretrained(out)
    tokens = [t for text in _data_texts(squad_fixture_examples) for t in _tokens(tok_t, text)]
    kept = set(tok_s.get_vocab())
    assert vocab["data_tokens"] == len(tokens)
    assert vocab["coverage"] == pytest.approx(sum(t in kept for t in tokens) / len(tokens), abs=1e-6)
    assert vocab["coverage"] < 1 and vocab["data_tokens_after"] > vocab["data_tokens"]
    assert f"{teacher.config.vocab_size} -> {BERT_VOCAB} tokens" in printed
    assert f"covering {100 * vocab['coverage']:.1f}%" in printed
    assert f"{n_teacher / 1e6:.1f}M (teacher) -> {n_student / 1e6:.1f}M (student" in printed
    card = (out / "README.md").read_text()
    assert f"pruned to {BERT_VOCAB} of {teacher.config.vocab_size} tokens" in card


def test_vocab_coverage_keeps_the_fewest_most_frequent_tokens(tiny_bert_qa_dir, squad_fixture_path,
                                                              squad_fixture_examples, tmp_path):
    out = tmp_path / "s"
    _make(tiny_bert_qa_dir, out, "--prune_vocab_file", squad_fixture_path, "--vocab_coverage", "0.9")
    tok_t, tok_s = AutoTokenizer.from_pretrained(tiny_bert_qa_dir), AutoTokenizer.from_pretrained(out)
    counts = collections.Counter(t for text in _data_texts(squad_fixture_examples) for t in _tokens(tok_t, text))
    kept, total = set(tok_s.get_vocab()), sum(counts.values())
    covered = sum(n for t, n in counts.items() if t in kept)
    assert covered >= 0.9 * total
    # the rarest data token it kept beyond the required ones (single characters, ##c, specials) was needed
    chosen = [t for t in kept if t in counts and len(t.removeprefix("##")) > 1 and not t.startswith("[")]
    rarest = min(chosen, key=lambda t: (counts[t], -tok_t.convert_tokens_to_ids(t)))
    assert covered - counts[rarest] < 0.9 * total
    assert read_json(out / "student_origin.json")["vocab"]["requested"] == {"vocab_coverage": 0.9}
    # default: every token the data uses
    out_all = tmp_path / "all"
    _make(tiny_bert_qa_dir, out_all, "--prune_vocab_file", squad_fixture_path)
    assert set(counts) <= set(AutoTokenizer.from_pretrained(out_all).get_vocab())
    assert read_json(out_all / "student_origin.json")["vocab"]["coverage"] == 1.0


def test_vocab_pruning_composes_with_layers_and_a_bare_encoder(tiny_roberta_qa_dir, squad_fixture_path, tmp_path):
    out = tmp_path / "s"
    _make(tiny_roberta_qa_dir, out, "--layers", "2", "--head", "none", "--prune_vocab_file", squad_fixture_path,
          "--vocab_size", ROBERTA_VOCAB)
    config = AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 1 and config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    assert config.vocab_size <= ROBERTA_VOCAB
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (1, 0, 2)
    student = AutoModel.from_pretrained(out)
    teacher = AutoModel.from_pretrained(tiny_roberta_qa_dir)
    torch.testing.assert_close(student.encoder.layer[0].state_dict(), teacher.encoder.layer[1].state_dict())
    assert read_json(out / "student_origin.json")["teacher_layers_kept"] == [2]


def test_tokens_the_post_processor_inserts_are_required(tiny_bert_qa_dir):
    tokenizer_json = json.loads((tiny_bert_qa_dir / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = []  # so that only the post-processor names [CLS] and [SEP]
    vocab = tokenizer_json["model"]["vocab"]
    required = required_ids(tokenizer_json, special_ids=set())
    assert {vocab["[CLS]"], vocab["[SEP]"]} <= required and vocab["[MASK]"] not in required


def test_pruning_keeps_a_tied_output_embedding_and_its_bias():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, pad_token_id=3)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    keep = [0, 3, 7, 8, 20, 49]
    pruned = prune_model_vocab(model, keep).eval()
    assert pruned.config.vocab_size == 6 and pruned.config.pad_token_id == 1
    assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    with torch.no_grad():
        a = model(input_ids=torch.tensor([[7, 20, 49, 3]])).logits[..., keep]
        b = pruned(input_ids=torch.tensor([[2, 4, 5, 1]])).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        make_student.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err
    return err


@pytest.mark.parametrize("flags, expected", [
    (["--vocab_size", "500", "--vocab_coverage", "0.9"], "not allowed with argument"),
    (["--vocab_coverage", "0"], "must be in (0, 1]"),
    (["--vocab_coverage", "1.5"], "must be in (0, 1]"),
    (["--vocab_size", "50"], "smaller than the 103 tokens every pruned vocabulary keeps"),
])
def test_bad_pruning_sizes_are_one_line_errors(flags, expected, tiny_bert_qa_dir, squad_fixture_path, tmp_path,
                                               capsys):
    out = tmp_path / "s"
    err = _error(capsys, ["--teacher_name_or_path", tiny_bert_qa_dir, "--output_dir", out,
                          "--prune_vocab_file", squad_fixture_path, *flags])
    assert expected in err
    assert not out.exists()


def test_layers_or_pruning_is_needed_and_size_flags_need_data(tiny_bert_qa_dir, tmp_path, capsys):
    base = ["--teacher_name_or_path", tiny_bert_qa_dir, "--output_dir", tmp_path / "s"]
    assert "give --layers" in _error(capsys, base)
    assert "give --prune_vocab_file too" in _error(capsys, [*base, "--layers", "2", "--vocab_size", "500"])
    assert "SQuAD file not found" in _error(capsys, [*base, "--prune_vocab_file", tmp_path / "missing.json"])
    assert not (tmp_path / "s").exists()


def test_other_tokenizer_models_are_refused_in_one_line(tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    teacher = tmp_path / "unigram"
    shutil.copytree(tiny_bert_qa_dir, teacher)
    vocab = [(t, -1.0) for t in AutoTokenizer.from_pretrained(tiny_bert_qa_dir).convert_ids_to_tokens(range(1015))]
    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(vocab, unk_id=1)), unk_token="[UNK]",
                                      pad_token="[PAD]")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher / name).unlink()
    unigram.save_pretrained(teacher)
    with pytest.raises(ValueError, match="Unigram"):
        tokenizer_model(json.loads((teacher / "tokenizer.json").read_text()))
    out = tmp_path / "s"
    proc = subprocess.run([sys.executable, "make_student.py", "--teacher_name_or_path", str(teacher),
                           "--prune_vocab_file", str(squad_fixture_path), "--output_dir", str(out)],
                          cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"make_student.py: error: cannot prune the vocabulary of {teacher}: the tokenizer is a Unigram model; "
        "vocabulary pruning supports WordPiece and BPE tokenizers (BERT-, RoBERTa-style)")
    assert not out.exists()


def test_pruned_student_trains_with_train_prediction(pruned_bert, squad_fixture_path, tmp_path):
    out, _ = pruned_bert
    run = tmp_path / "run"
    launch("train_prediction.py", ["--model_name_or_path", out, "--train_file", squad_fixture_path,
                                   "--output_dir", run, "--per_device_train_batch_size", "8", "--max_train_steps",
                                   "2", "--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"])
    results = read_json(run / "all_results.json")
    assert results["status"] == "finished" and results["total_steps"] == 2
    assert AutoConfig.from_pretrained(run).vocab_size == BERT_VOCAB
    assert len(AutoTokenizer.from_pretrained(run)) == BERT_VOCAB


def test_pruned_student_is_distilled_from_its_full_vocabulary_teacher(pruned_bert, tiny_bert_qa_dir,
                                                                       squad_fixture_path, tmp_path):
    """The pruned vocabulary is another tokenizer: the teacher's distributions reach it across tokenizers."""
    out, _ = pruned_bert
    run = tmp_path / "run"
    launch("train_prediction.py", ["--model_name_or_path", out, "--teacher_name_or_path", tiny_bert_qa_dir,
                                   "--teacher_cache_dir", tmp_path / "cache", "--train_file", squad_fixture_path,
                                   "--output_dir", run, "--per_device_train_batch_size", "8", "--max_train_steps",
                                   "2", "--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"])
    results = read_json(run / "all_results.json")
    assert results["status"] == "finished"
    assert results["teacher_tokenization"] == f"differs from the student's: vocabularies differ ({BERT_VOCAB} vs " \
                                              f"{len(AutoTokenizer.from_pretrained(tiny_bert_qa_dir))} entries)"


def test_real_minilm_pruned_to_the_fixture(minilm_path, squad_fixture_path, tmp_path):
    """The real uncased WordPiece vocabulary (30,522, 997 single characters): no new [UNK] on the fixture or on
    text outside it, and the same hidden states where the tokens are unchanged."""
    out = tmp_path / "s"
    printed = _make(minilm_path, out, "--head", "none", "--layers", "2,4,6", "--prune_vocab_file",
                    squad_fixture_path, "--vocab_size", 2500)
    assert "30522 -> 2500 tokens (1999 required)" in printed
    texts = fixture_texts() + ["Hyperparameter optimisation of quantised transformers, Zürich 2024 — naïve café"]
    assert _check_round_trip(minilm_path, out, texts) > 10
    tok_t, tok_s = AutoTokenizer.from_pretrained(minilm_path), AutoTokenizer.from_pretrained(out)
    teacher = make_student.student_from_teacher_layers(AutoModel.from_pretrained(minilm_path), [2, 4, 6]).eval()
    student = AutoModel.from_pretrained(out).eval()
    same = [q for q in fixture_texts() if _tokens(tok_s, q) == _tokens(tok_t, q)][:10]
    assert same
    with torch.no_grad():
        for q in same:
            a = teacher(**tok_t(q, return_tensors="pt")).last_hidden_state
            b = student(**tok_s(q, return_tensors="pt")).last_hidden_state
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)

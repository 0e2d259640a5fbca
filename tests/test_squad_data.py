"""kd.squad: loading and validation, sliding-window features, post-processing of logits."""

import copy
import json
import logging

import datasets
import numpy as np
import pytest

from kd.features import check_window_args, model_input_columns, prepare_eval_features, prepare_train_features
from kd.qa_eval import postprocess_qa_predictions
from kd.squad import SquadFormatError, flatten_squad, has_unanswerable, load_squad, read_squad_json, validate_records

MAX_SEQ, STRIDE, MAX_QUERY = 128, 32, 64

# ------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------


def test_load_fixture(squad_fixture_path):
    ds = load_squad(str(squad_fixture_path))
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    assert len(ds) == 128
    assert len(set(ds["id"])) == 128
    assert sum(1 for a in ds["answers"] if not a["text"]) == 78
    first = ds[0]
    assert first["id"] == "56ddde6b9a695914005b9628"
    assert first["title"] == "Normans"
    assert first["question"] == "In what country is Normandy located?"
    assert first["answers"] == {"text": ["France"] * 4, "answer_start": [159] * 4}
    assert first["context"][159:165] == "France"
    assert has_unanswerable(ds)


def test_has_unanswerable_false_for_squad_v1_style_data(squad_fixture_examples):
    answerable = squad_fixture_examples.filter(lambda r: len(r["answers"]["text"]) > 0)
    assert len(answerable) == 50
    assert not has_unanswerable(answerable)
    assert has_unanswerable(squad_fixture_examples.to_list())  # plain records work too


def test_flatten_keeps_file_order_and_is_impossible_until_validated(squad_fixture_path):
    data = read_squad_json(squad_fixture_path)
    records = flatten_squad(data, str(squad_fixture_path))
    assert len(records) == 128
    assert records[0]["is_impossible"] is False  # kept for validation ...
    valid, problems = validate_records(records, str(squad_fixture_path))
    assert problems == []
    assert list(valid[0]) == ["id", "title", "context", "question", "answers"]  # ... then dropped
    unanswerable = next(r for r in valid if not r["answers"]["text"])
    assert unanswerable["answers"] == {"text": [], "answer_start": []}


def test_read_squad_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_squad(str(missing))
    not_json = tmp_path / "broken.json"
    not_json.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(SquadFormatError, match=r"broken\.json: not valid JSON"):
        read_squad_json(not_json)
    wrong_top = tmp_path / "list.json"
    wrong_top.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SquadFormatError, match=r"list\.json: not SQuAD format"):
        read_squad_json(wrong_top)
    no_paragraphs = tmp_path / "article.json"
    no_paragraphs.write_text(json.dumps({"data": [{"title": "T", "qas": []}]}), encoding="utf-8")
    with pytest.raises(SquadFormatError, match=r"article\.json: data\[0\] \(article 'T'\) has no \"paragraphs\""):
        read_squad_json(no_paragraphs)


# Mutations of one question of the fixture: European_Union_law, paragraph 0, question 1
# (answerable, id 5725b7f389a1e219009abd5e). Each returns the id the error must name.
TARGET_TITLE = "European_Union_law"


def _target(data):
    article = next(a for a in data["data"] if a["title"] == TARGET_TITLE)
    paragraph = article["paragraphs"][0]
    return paragraph, paragraph["qas"][1], paragraph["qas"]


def _mutate(kind, data):
    paragraph, qa, qas = _target(data)
    if kind == "missing_question":
        del qa["question"]
    elif kind == "empty_question":
        qa["question"] = "   "
    elif kind == "empty_context":
        paragraph["context"] = " "
        return qas[0]["id"]  # every question of the paragraph is invalid; the first is listed first
    elif kind == "text_not_at_start":
        qa["answers"][0]["answer_start"] += 1
    elif kind == "start_out_of_range":
        qa["answers"][0]["answer_start"] = len(paragraph["context"]) + 5
    elif kind == "negative_start":
        qa["answers"][0]["answer_start"] = -1
    elif kind == "empty_answer_text":
        qa["answers"][0]["text"] = ""
    elif kind == "impossible_with_answers":
        qa["is_impossible"] = True
    elif kind == "missing_answers":
        del qa["answers"]
    elif kind == "duplicate_id":
        qas[2]["id"] = qa["id"]
    elif kind == "non_string_id":
        qa["id"] = 12345
        return 12345
    return qa["id"]


MALFORMED = {
    "missing_question": "missing field 'question'",
    "empty_question": "empty question",
    "empty_context": "empty context",
    "text_not_at_start": "not found at answer_start",
    "start_out_of_range": "out of range",
    "negative_start": "answer_start -1 out of range",
    "empty_answer_text": "empty answer text",
    "impossible_with_answers": "is_impossible is true but the question has answers",
    "missing_answers": "missing field 'answers'",
    "duplicate_id": "duplicate question id",
    "non_string_id": "field 'id' must be a string",
}


@pytest.fixture(scope="module")
def fixture_json(squad_fixture_path):
    return json.loads(squad_fixture_path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_record_is_reported_with_file_article_id_and_problem(kind, fixture_json, tmp_path):
    data = copy.deepcopy(fixture_json)
    qid = _mutate(kind, data)
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SquadFormatError) as err:
        load_squad(str(path))
    message = str(err.value)
    assert str(path) in message
    assert f"article '{TARGET_TITLE}'" in message
    assert f"question id {qid!r}" in message
    assert MALFORMED[kind] in message
    assert "--skip_invalid" in message


def test_skip_invalid_drops_records_and_logs_the_count(fixture_json, tmp_path, caplog):
    data = copy.deepcopy(fixture_json)
    paragraph, qa, qas = _target(data)
    qa["answers"][0]["answer_start"] += 1
    dropped = qas[3]["id"]
    del qas[3]["question"]
    path = tmp_path / "two_bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="kd.squad"):
        ds = load_squad(str(path), skip_invalid=True)
    assert len(ds) == 126
    assert qa["id"] not in ds["id"] and dropped not in ds["id"]
    assert "Skipped 2 invalid record(s) of 128" in caplog.text

    # --max_train_samples / --max_eval_samples: the first N of the valid questions
    n = [r["id"] for r in flatten_squad(fixture_json, "")].index(dropped) + 3  # past both dropped records
    first = load_squad(str(path), skip_invalid=True, max_samples=n)
    assert first["id"] == ds["id"][:n] and len(first) == n

    records = flatten_squad(data, str(path))
    valid, problems = validate_records(records, str(path), skip_invalid=True)
    assert len(valid) == 126 and len(problems) == 2
    assert "not found at answer_start" in problems[0] and "missing field 'question'" in problems[1]


def test_error_lists_first_problems_and_the_total(fixture_json):
    records = flatten_squad(copy.deepcopy(fixture_json), "many.json")
    for r in records[:9]:
        r["question"] = ""
    with pytest.raises(SquadFormatError) as err:
        validate_records(records, "many.json")
    message = str(err.value)
    assert message.startswith("9 invalid record(s) in many.json")
    assert message.count("empty question") == 5
    assert "... and 4 more" in message


# ------------------------------------------------------------------------------------------
# Sliding-window features
# ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_roberta_untrimmed_tokenizer(tiny_roberta_tokenizer):
    """RoBERTa tokenizer whose offsets include the leading space of a word (trim_offsets=False)."""
    from tokenizers.processors import RobertaProcessing

    tok = tiny_roberta_tokenizer
    tok.backend_tokenizer.post_processor = RobertaProcessing(
        (tok.sep_token, tok.sep_token_id), (tok.cls_token, tok.cls_token_id), trim_offsets=False
    )
    return tok


TOKENIZERS = ["tiny_bert_tokenizer", "tiny_roberta_tokenizer", "tiny_roberta_untrimmed_tokenizer"]


def _windows(examples, tokenizer, **kwargs):
    sizes = dict(max_seq_length=MAX_SEQ, doc_stride=STRIDE, max_query_length=MAX_QUERY) | kwargs
    train = prepare_train_features(examples, tokenizer, **sizes)
    evaluation = prepare_eval_features(examples, tokenizer, **sizes)
    assert train["input_ids"] == evaluation["input_ids"]  # same windows, same order
    return train, evaluation


def _check_labels(examples, tokenizer, train, evaluation):
    """Every label decodes to the first gold answer or sits on CLS; returns #labelled windows."""
    by_id = {r["id"]: r for r in examples}
    labelled_examples, labelled = set(), 0
    for feature, window in zip(train, evaluation):
        record = by_id[window["example_id"]]
        start, end = feature["start_positions"], feature["end_positions"]
        cls = feature["input_ids"].index(tokenizer.cls_token_id)
        if not record["answers"]["text"]:
            assert (start, end) == (cls, cls)
            continue
        if (start, end) == (cls, cls):
            continue
        offsets = window["offset_mapping"]
        assert offsets[start] is not None and offsets[end] is not None and start <= end
        text = record["context"][offsets[start][0] : offsets[end][1]]
        assert text.strip() == record["answers"]["text"][0].strip()
        labelled += 1
        labelled_examples.add(record["id"])
    # Consecutive windows share STRIDE tokens, so an answer of up to STRIDE + 1 tokens always lies
    # entirely inside some window (longer ones may not). Margin: BPE may split the answer
    # slightly differently inside the context than alone.
    short_answers = {
        r["id"]
        for r in examples
        if r["answers"]["text"]
        and len(tokenizer(r["answers"]["text"][0], add_special_tokens=False)["input_ids"]) <= STRIDE - 2
    }
    assert short_answers <= labelled_examples
    return labelled


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_train_labels_decode_to_the_gold_answer(tokenizer_name, request, squad_fixture_examples):
    tokenizer = request.getfixturevalue(tokenizer_name)
    train, evaluation = _windows(squad_fixture_examples, tokenizer)
    assert len(train) > 3 * len(squad_fixture_examples)  # most contexts need several windows
    expected_columns = {"input_ids", "attention_mask", "start_positions", "end_positions"}
    if "token_type_ids" in tokenizer.model_input_names:
        expected_columns.add("token_type_ids")
    assert set(train.column_names) == expected_columns
    assert set(evaluation.column_names) == expected_columns - {"start_positions", "end_positions"} | {
        "example_id", "offset_mapping",
    }
    assert all(len(ids) == MAX_SEQ for ids in train["input_ids"])
    labelled = _check_labels(squad_fixture_examples, tokenizer, train, evaluation)
    assert labelled >= 50  # 50 answerable questions, several answers in 2 overlapping windows


def test_wordpiece_fixture_tokenizer_splits_words_into_pieces(tiny_bert_tokenizer):
    # Guards the point of the BERT test above: answers must also start/end inside ## pieces.
    tokens = tiny_bert_tokenizer.tokenize("Rollo's Scandinavian descendants")
    assert any(t.startswith("##") for t in tokens)


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS[:2])
def test_long_context_windows_overlap_by_doc_stride(tokenizer_name, request, squad_fixture_examples):
    tokenizer = request.getfixturevalue(tokenizer_name)
    longest = max(squad_fixture_examples, key=lambda r: len(r["context"]))
    one = datasets.Dataset.from_list([longest])
    _, evaluation = _windows(one, tokenizer)
    assert len(evaluation) >= 5
    context_ids = [
        [tok for tok, off in zip(w["input_ids"], w["offset_mapping"]) if off is not None] for w in evaluation
    ]
    for current, following in zip(context_ids, context_ids[1:]):
        assert current[-STRIDE:] == following[:STRIDE]
    first_offsets = [o for o in evaluation[0]["offset_mapping"] if o is not None]
    last_offsets = [o for o in evaluation[len(evaluation) - 1]["offset_mapping"] if o is not None]
    assert first_offsets[0][0] == 0
    assert last_offsets[-1][1] == len(longest["context"].rstrip())


def _question_token_count(one_example, tokenizer, max_query_length):
    """Question tokens in the first window: attended tokens outside the context minus specials."""
    _, evaluation = _windows(one_example, tokenizer, max_query_length=max_query_length)
    window = evaluation[0]
    outside = sum(a for a, o in zip(window["attention_mask"], window["offset_mapping"]) if o is None)
    return outside - tokenizer.num_special_tokens_to_add(pair=True)


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS[:2])
def test_long_questions_are_cut_to_max_query_length(tokenizer_name, request, squad_fixture_examples):
    tokenizer = request.getfixturevalue(tokenizer_name)
    record = dict(squad_fixture_examples[0])
    record["question"] = " ".join([record["question"]] * 6)
    one = datasets.Dataset.from_list([record])
    assert _question_token_count(one, tokenizer, 64) > 20  # the long question really is long ...
    assert 0 < _question_token_count(one, tokenizer, 8) <= 8  # ... and gets cut
    train, evaluation = _windows(one, tokenizer, max_query_length=8)
    _check_labels(one, tokenizer, train, evaluation)


def test_question_cut_inside_a_split_character_still_fits(tiny_roberta_tokenizer, squad_fixture_examples):
    # Byte-level BPE spells the emoji as 4 byte tokens that share one character span, so a cut
    # after the first of them keeps the whole character, and re-tokenizing brings back all 4.
    record = dict(squad_fixture_examples[0])
    record["question"] = "Who was \U0001F600 in Normandy?"
    one = datasets.Dataset.from_list([record])
    for max_query_length in range(1, 10):
        assert 0 < _question_token_count(one, tiny_roberta_tokenizer, max_query_length) <= max_query_length


def test_leading_whitespace_of_questions_is_dropped(tiny_roberta_tokenizer, squad_fixture_examples):
    # Byte-level BPE would otherwise spend tokens on the spaces.
    record = dict(squad_fixture_examples[0])
    padded = {**record, "question": "   " + record["question"]}
    _, plain = _windows(datasets.Dataset.from_list([record]), tiny_roberta_tokenizer)
    _, spaced = _windows(datasets.Dataset.from_list([padded]), tiny_roberta_tokenizer)
    assert spaced["input_ids"] == plain["input_ids"]


def test_left_padding_puts_context_first(tiny_bert_tokenizer, squad_fixture_examples):
    tokenizer = tiny_bert_tokenizer
    tokenizer.padding_side = "left"
    examples = squad_fixture_examples.select(range(12))
    train, evaluation = _windows(examples, tokenizer)
    short = [w for w in train if w["attention_mask"][0] == 0]
    assert short, "expected some padded windows"
    # Context first: the first token after CLS is a context token.
    for window in evaluation:
        cls = window["input_ids"].index(tokenizer.cls_token_id)
        assert window["offset_mapping"][cls + 1] is not None
    _check_labels(examples, tokenizer, train, evaluation)


def test_model_input_columns(tiny_bert_tokenizer, tiny_roberta_tokenizer, squad_fixture_examples):
    examples = squad_fixture_examples.select(range(2))
    bert = prepare_eval_features(examples, tiny_bert_tokenizer, MAX_SEQ, STRIDE, MAX_QUERY)
    roberta = prepare_eval_features(examples, tiny_roberta_tokenizer, MAX_SEQ, STRIDE, MAX_QUERY)
    assert model_input_columns(bert) == ["input_ids", "attention_mask", "token_type_ids"]
    assert model_input_columns(roberta) == ["input_ids", "attention_mask"]


def test_non_fast_tokenizer_is_rejected(squad_fixture_examples):
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="not a fast"):
        prepare_train_features(squad_fixture_examples, SlowTokenizer())


def test_window_sizes_are_checked(tiny_bert_tokenizer, tiny_roberta_tokenizer, squad_fixture_examples):
    # BERT adds 3 special tokens to a pair: room for context = 128 - 64 - 3 = 61.
    with pytest.raises(ValueError, match=r"doc_stride \(61\) must be smaller .* = 61"):
        prepare_train_features(squad_fixture_examples, tiny_bert_tokenizer, 128, 61, 64)
    check_window_args(tiny_bert_tokenizer, 128, 60, 64)
    # RoBERTa adds 4.
    with pytest.raises(ValueError, match="= 60"):
        check_window_args(tiny_roberta_tokenizer, 128, 60, 64)
    with pytest.raises(ValueError, match="no room for the context"):
        check_window_args(tiny_bert_tokenizer, 64, 8, 64)
    with pytest.raises(ValueError, match="positive integer"):
        check_window_args(tiny_bert_tokenizer, 128, 0, 64)


# ------------------------------------------------------------------------------------------
# Post-processing hand-made logits
# ------------------------------------------------------------------------------------------

CONTEXT = "The Normans were in Normandy."
# Window of 10 tokens: 0 CLS, 1-2 question, 3 SEP, 4-9 context tokens.
WORDS = [(0, 3), (4, 11), (12, 16), (17, 19), (20, 28), (28, 29)]  # The Normans were in Normandy .
OFFSETS = [None, None, None, None] + [list(w) for w in WORDS]
L = len(OFFSETS)
LOW = -10.0


def _features(rows):
    """rows: (example_id, offset_mapping, attention_mask)."""
    return datasets.Dataset.from_list(
        [{"example_id": e, "offset_mapping": o, "attention_mask": m} for e, o, m in rows]
    )


def _examples(*ids):
    return datasets.Dataset.from_list([{"id": i, "context": CONTEXT} for i in ids])


def _logits(n=1, **positions):
    """[n, L] logits at LOW except the given {position: value} maps for feature 0."""
    start = np.full((n, L), LOW, dtype=np.float32)
    end = np.full((n, L), LOW, dtype=np.float32)
    for pos, value in positions.get("start", {}).items():
        start[0, pos] = value
    for pos, value in positions.get("end", {}).items():
        end[0, pos] = value
    return start, end


def _one_feature():
    return _features([("q", OFFSETS, [1] * L)])


def test_postprocess_picks_the_best_span_inside_the_context():
    # The highest logits sit on question tokens (1, 2), which are not answers.
    start, end = _logits(start={1: 50, 7: 3, 5: 1}, end={2: 50, 8: 3, 5: 2})
    predictions, null_odds = postprocess_qa_predictions(_examples("q"), _one_feature(), start, end)
    assert predictions == {"q": "in Normandy"}  # (7, 8): 6 beats (5, 5): 3 and (7, 5) is reversed
    assert null_odds["q"] == pytest.approx(2 * LOW - 6)


def test_postprocess_null_answer_when_null_wins():
    start, end = _logits(start={0: 5, 5: 1}, end={0: 5, 5: 1})
    features, examples = _one_feature(), _examples("q")
    predictions, null_odds = postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=True)
    assert predictions == {"q": ""}
    assert null_odds["q"] == pytest.approx(10 - 2)
    # SQuAD 1.1 mode never predicts "", and a higher threshold lets the span through.
    v1, _ = postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=False)
    assert v1 == {"q": "Normans"}
    relaxed, _ = postprocess_qa_predictions(
        examples, features, start, end, version_2_with_negative=True, null_score_diff_threshold=8.5
    )
    assert relaxed == {"q": "Normans"}


def test_postprocess_null_score_is_the_minimum_over_windows_and_span_the_best():
    second = [None] * 4 + [list(w) for w in WORDS[3:]] + [None] * 3  # window: "in Normandy ."
    features = _features([("q", OFFSETS, [1] * L), ("q", second, [1] * 7 + [0] * 3)])
    start, end = _logits(n=2, start={0: 5, 5: 1}, end={0: 5, 5: 1})  # window 0: null 10, span 2
    start[1, 0] = end[1, 0] = 0.5  # window 1: null 1
    start[1, 5] = end[1, 5] = 2.0  # window 1: "Normandy" (its token 5) scores 4
    predictions, null_odds = postprocess_qa_predictions(
        _examples("q"), features, start, end, version_2_with_negative=True
    )
    assert predictions == {"q": "Normandy"}
    assert null_odds["q"] == pytest.approx(1 - 4)


def test_postprocess_respects_max_answer_length():
    start, end = _logits(start={4: 5}, end={8: 5, 5: 1})
    features, examples = _one_feature(), _examples("q")
    long, _ = postprocess_qa_predictions(examples, features, start, end, max_answer_length=5)
    assert long == {"q": "The Normans were in Normandy"}
    short, _ = postprocess_qa_predictions(examples, features, start, end, max_answer_length=2)
    assert short == {"q": "The Normans"}


def test_postprocess_only_pairs_the_n_best_starts_and_ends():
    # Single-token answers only. The best one, "Normandy" (8, 8), has the 3rd best start.
    start, end = _logits(start={4: 3, 5: 2, 8: 0}, end={4: -5, 5: -5, 8: 4})
    features, examples = _one_feature(), _examples("q")
    two, _ = postprocess_qa_predictions(examples, features, start, end, n_best_size=2, max_answer_length=1)
    assert two == {"q": "The"}
    three, _ = postprocess_qa_predictions(examples, features, start, end, n_best_size=3, max_answer_length=1)
    assert three == {"q": "Normandy"}


def test_postprocess_falls_back_to_all_pairs_when_no_top_pair_is_valid():
    start, end = _logits(start={1: 9, 6: 2}, end={2: 9, 6: 1})
    predictions, _ = postprocess_qa_predictions(_examples("q"), _one_feature(), start, end, n_best_size=1)
    assert predictions == {"q": "were"}


def test_postprocess_null_score_uses_cls_of_left_padded_windows():
    padded = [None] * 2 + OFFSETS[:-2]  # 2 pads, CLS at 2, question 3-4, SEP 5, context 6-9
    features = _features([("q", padded, [0, 0] + [1] * (L - 2))])
    start, end = _logits(start={2: 5, 6: 1}, end={2: 5, 6: 1})
    start[0, 0] = end[0, 0] = -100.0  # a pad position: using it as "null" would pick the span
    predictions, null_odds = postprocess_qa_predictions(
        _examples("q"), features, start, end, version_2_with_negative=True
    )
    assert predictions == {"q": ""} and null_odds["q"] == pytest.approx(8.0)


def test_postprocess_input_errors():
    start, end = _logits()
    with pytest.raises(ValueError, match="no matching example"):
        postprocess_qa_predictions(_examples("other"), _one_feature(), start, end)
    with pytest.raises(ValueError, match="shape"):
        postprocess_qa_predictions(_examples("q"), _one_feature(), start[:, :5], end)


def test_postprocess_end_to_end_recovers_gold_answers(tiny_roberta_tokenizer, squad_fixture_examples):
    """Logits that peak at the training labels must give back the gold answers."""
    train, evaluation = _windows(squad_fixture_examples, tiny_roberta_tokenizer)
    start = np.zeros((len(train), MAX_SEQ), dtype=np.float32)
    end = np.zeros_like(start)
    rows = np.arange(len(train))
    start[rows, train["start_positions"]] = 10.0
    end[rows, train["end_positions"]] = 10.0
    predictions, _ = postprocess_qa_predictions(
        squad_fixture_examples, evaluation, start, end, version_2_with_negative=True, max_answer_length=MAX_SEQ
    )
    labelled = {window["example_id"] for window, s in zip(evaluation, train["start_positions"]) if s != 0}
    checked = [r for r in squad_fixture_examples if r["id"] in labelled or not r["answers"]["text"]]
    assert len(checked) > 120  # nearly all of the 128 (a few long answers never fit a window)
    for record in checked:
        gold = record["answers"]["text"]
        assert predictions[record["id"]].strip() == (gold[0] if gold else "")


def test_empty_and_json_lines_files_get_a_format_hint(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(SquadFormatError, match=r"empty\.json: not valid JSON .*the file is empty; expected one SQuAD"):
        read_squad_json(empty)
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"title": "a", "paragraphs": []}\n{"title": "b", "paragraphs": []}\n')
    with pytest.raises(SquadFormatError, match=r"looks like JSON Lines \(one JSON object per line\)"):
        read_squad_json(lines)
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    with pytest.raises(SquadFormatError) as info:
        read_squad_json(broken)
    assert str(info.value).endswith("broken.json: not valid JSON (Expecting value: line 1 column 11 (char 10)).")


# ------------------------------------------------------------------------------------------
# Streaming: load_squad reads a file article by article, never the whole document
# ------------------------------------------------------------------------------------------


def _old_load(path):
    records, _ = validate_records(flatten_squad(read_squad_json(path), str(path)), str(path))
    return records


@pytest.mark.parametrize("read_chars", [1 << 20, 7])  # 7: every value spans many reads
def test_streaming_load_gives_the_records_of_the_whole_document_load(squad_fixture_path, tmp_path, monkeypatch,
                                                                     read_chars):
    import kd.squad

    data = json.loads(squad_fixture_path.read_text())
    moved = tmp_path / "data_not_first.json"  # "data" between other keys, odd spacing, numbers at the edges
    moved.write_text('{ "n" : 12 ,\n"data"  :  ' + json.dumps(data["data"]) + ' , "version": "v2.0", "x": [1, 2.5]}\n')
    expected = _old_load(squad_fixture_path)
    monkeypatch.setattr(kd.squad, "_READ_CHARS", read_chars)
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("read the whole document"))
    for path in (squad_fixture_path, moved):
        assert load_squad(str(path)).to_list() == expected
    assert load_squad(str(moved), max_samples=5).to_list() == expected[:5]


def test_streaming_load_keeps_the_error_messages(squad_fixture_path, tmp_path):
    text = squad_fixture_path.read_text()
    cases = {"truncated.json": text[: len(text) // 2], "empty.json": "", "no_data.json": '{"version": "1"}',
             "data_not_list.json": '{"data": {"title": "x"}}',
             "lines.json": '{"data": []}\n{"data": []}\n',
             "no_paragraphs.json": json.dumps({"data": [json.loads(text)["data"][0], {"title": "T"}]})}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(SquadFormatError) as old:
            flatten_squad(read_squad_json(path), str(path))
        with pytest.raises(SquadFormatError) as new:
            load_squad(str(path))
        assert str(new.value) == str(old.value), name
    # a bad record past max_samples is still an error, as before
    data = json.loads(text)
    data["data"][-1]["paragraphs"][-1]["qas"][-1]["id"] = data["data"][0]["paragraphs"][0]["qas"][0]["id"]
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(data))
    with pytest.raises(SquadFormatError, match="(?s)1 invalid record.*duplicate question id"):
        load_squad(str(dup), max_samples=3)
    assert len(load_squad(str(dup), skip_invalid=True)) == 127

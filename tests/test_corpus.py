"""kd.corpus, kd.packing, kd.streaming: document splitting, byte-range shards, packing, the packed-corpus cache and
the resumable stream."""

from __future__ import annotations

import itertools
import json
import os
import random
import re

import numpy as np
import pytest

from kd import packing as kp
from kd.corpus import DatasetCorpus, FileCorpus, resolve_files
from kd.packing import Packer, PackedCorpus, build_packed_corpus, tokenize
from kd.streaming import DatasetShardReader, FileShardReader, PackedStream
from tests.conftest import FIXTURES_DIR

SAMPLE = FIXTURES_DIR / "wiki_leads_sample.txt"


def blocks_of(text: str) -> list[str]:
    """The documented block rule, written independently: maximal runs of non-blank lines."""
    return [b.strip() for b in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n")) if b.strip()]


@pytest.fixture(scope="module")
def sample_docs() -> list[str]:
    return blocks_of(SAMPLE.read_text(encoding="utf-8"))


def write_jsonl(path, docs, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, column: d}) + "\n")
    return str(path)


def write_parquet(path, docs, row_group_size, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs}), path, row_group_size=row_group_size)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Reading and sharding
# ---------------------------------------------------------------------------------------------------------------
def test_documents_are_blank_line_blocks_or_lines(sample_docs, tmp_path):
    assert len(sample_docs) == 33 and sample_docs[0] == "= 2001: A Space Odyssey ="
    assert list(FileCorpus([str(SAMPLE)]).documents()) == sample_docs
    lines = [ln.strip() for ln in SAMPLE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert list(FileCorpus([str(SAMPLE)], line_by_line=True).documents()) == lines
    # CRLF line ends and whitespace-only "blank" lines split the same way; a last block without a newline counts
    messy = tmp_path / "messy.txt"
    messy.write_bytes(b"\r\n  \r\nfirst doc\r\nstill first\r\n \t \r\nsecond\n\n\n\nthird, no newline")
    assert list(FileCorpus([str(messy)]).documents()) == ["first doc\r\nstill first".replace("\r", ""),
                                                          "second", "third, no newline"]


def test_a_binary_file_is_refused_before_reading(tmp_path):
    """A binary file was decoded with errors="replace" and trained on as text; validate() now refuses it, naming
    the file and where."""
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"= A title =\n\n\x93NUMPY" + bytes(range(256)))
    with pytest.raises(ValueError, match=rf"{re.escape(str(binary))} is not UTF-8 text: byte 0x93 is not UTF-8 at "
                                         r"byte offset 13 \(line 3\)"):
        FileCorpus([str(binary)]).validate()
    nul = tmp_path / "utf16.txt"
    nul.write_bytes("plain ascii, as UTF-16\n".encode("utf-16-le"))  # every other byte NUL, all valid UTF-8
    with pytest.raises(ValueError, match=r"a NUL byte .* at byte offset 1 \(line 1\)"):
        FileCorpus([str(nul)]).validate()
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl is not UTF-8 text: byte 0xe9 is not UTF-8 at byte offset 13"):
        FileCorpus([str(jsonl)]).validate()


@pytest.mark.parametrize("line_by_line", [False, True])
def test_a_bad_byte_past_the_start_stops_reading_where_it_is(line_by_line, tmp_path):
    from kd.corpus import SNIFF_BYTES, CorpusFormatError

    good = "A line of text, d\u00e9j\u00e0 vu.\n" * (2 * SNIFF_BYTES // 30)
    path = tmp_path / "late.txt"
    path.write_bytes(good.encode() + b"\n\nlatin-1 caf\xe9\n")
    corpus = FileCorpus([str(path)], line_by_line=line_by_line)
    corpus.validate()  # the start is text
    offset, line = len(good.encode()) + 2 + len("latin-1 caf"), good.count("\n") + 3
    with pytest.raises(CorpusFormatError, match=rf"byte 0xe9 is not UTF-8 at byte offset {offset} \(line {line}\)"):
        list(corpus.documents())
    # a multi-byte character cut by the sniffed prefix is no error
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"x" * (SNIFF_BYTES - 1) + "\u00e9\n".encode())
    FileCorpus([str(cut)]).validate()
    assert list(FileCorpus([str(cut)]).documents()) == ["x" * (SNIFF_BYTES - 1) + "\u00e9"]


@pytest.mark.parametrize("chunk", [1, 5, 64, 333, 1000, 4096])
@pytest.mark.parametrize("line_by_line", [False, True])
def test_byte_range_units_partition_the_documents(chunk, line_by_line, tmp_path):
    """Whatever the cut points (inside a line, on a blank line, inside a block), every document is read by
    exactly one unit, whole, in order."""
    rng = random.Random(chunk)
    text = "".join(f"{'  ' if rng.random() < .2 else ''}doc {i} " + "word " * rng.randint(0, 30) +
                   ("\nmore of it" if rng.random() < .5 else "") + "\n" * rng.randint(1, 3) for i in range(40))
    path = tmp_path / "c.txt"
    path.write_text(text)
    corpus = FileCorpus([str(path)], line_by_line=line_by_line)
    whole = list(corpus.documents())
    assert whole == ([ln.strip() for ln in text.splitlines() if ln.strip()] if line_by_line else blocks_of(text))
    assert len(whole) > 15
    units = corpus.units(chunk)
    assert len(units) == -(-len(text) // chunk)
    assert [d for u in units for d, _ in corpus.read(u)] == whole


def test_reading_resumes_after_any_document(sample_docs):
    corpus = FileCorpus([str(SAMPLE)])
    unit = corpus.units()[0]
    read = list(corpus.read(unit))
    for k in (1, 7, len(read) - 1, len(read)):
        assert [d for d, _ in corpus.read(unit, read[k - 1][1])] == sample_docs[k:]


def test_jsonl_and_parquet_give_the_same_documents(sample_docs, tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", sample_docs[:20], column="body")
    parquet = write_parquet(tmp_path / "b.parquet", sample_docs[20:], row_group_size=4, column="body")
    corpus = FileCorpus(resolve_files([str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")]), text_column="body")
    corpus.validate()
    assert list(corpus.documents()) == sample_docs
    assert len([u for u in corpus.units() if u.file == 1]) == 4  # 13 rows in row groups of 4
    for chunk in (50, 700):
        assert [d for u in corpus.units(chunk) for d, _ in corpus.read(u)] == sample_docs
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        FileCorpus([parquet]).validate()
    with pytest.raises(ValueError, match="no field 'text'.*--text_column"):
        FileCorpus([jsonl]).validate()
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        resolve_files([str(tmp_path / "nothing_here*.txt")])


def epoch0_documents(reader) -> list[str]:
    out = []
    for text, pos in reader.documents():
        if pos["epoch"] > 0:
            return out
        out.append(text)


@pytest.mark.parametrize("processes", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_corpus(sample_docs, tmp_path, processes):
    files = [str(SAMPLE), write_jsonl(tmp_path / "x.jsonl", [f"extra {i}" for i in range(7)])]
    corpus = FileCorpus(files)
    everything = list(corpus.documents())
    shards = [epoch0_documents(FileShardReader(corpus, r, processes, seed=3)) for r in range(processes)]
    assert all(shards) and sorted(sum(shards, [])) == sorted(everything)
    assert len(set(map(tuple, [sorted(s) for s in shards]))) == processes
    # one parquet row group for 2 processes: fewer units than processes, so every P-th document each
    one_group = FileCorpus([write_parquet(tmp_path / "one.parquet", sample_docs, row_group_size=100)])
    halves = [epoch0_documents(FileShardReader(one_group, r, 2)) for r in range(2)]
    assert halves == [sample_docs[0::2], sample_docs[1::2]]


def test_a_process_without_documents_is_an_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("only one document\n")
    reader = FileShardReader(FileCorpus([str(path)]), 1, 2)
    with pytest.raises(RuntimeError, match="process 1 of 2 found no document"):
        next(reader.documents())


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------
CLS, SEP = 1, 2


def random_docs(rng, capacity, n=60):
    lengths = [0, 1, capacity - 1, capacity, capacity + 1, 2 * capacity]
    lengths += [rng.randint(0, 3 * capacity) for _ in range(n)]
    rng.shuffle(lengths)
    return [[rng.randint(5, 99) for _ in range(k)] for k in lengths]


@pytest.mark.parametrize("max_seq_length", [3, 4, 16])
def test_packing_keeps_every_token_once_in_order_without_padding(max_seq_length):
    rng = random.Random(max_seq_length)
    c = max_seq_length - 2
    docs = random_docs(rng, c)
    packer = Packer(max_seq_length, CLS, SEP)
    sequences = [s for d in docs for s in packer.add(d)]
    assert all(len(s) == max_seq_length for s in sequences)  # full length: no padding anywhere
    last = packer.flush()
    assert len(last) <= 1 and all(3 <= len(s) < max_seq_length for s in last)
    sequences += last
    assert all(s[0] == CLS and s[-1] == SEP for s in sequences)
    # the documented rule, restated: one stream, a separator between documents unless it would open a piece
    stream = []
    for d in docs:
        if d and len(stream) % c:
            stream.append(SEP)
        stream.extend(d)
    expected = [stream[i:i + c] for i in range(0, len(stream), c)]
    assert [s[1:-1] for s in sequences] == expected
    content = [t for s in sequences for t in s[1:-1] if t != SEP]
    assert content == [t for d in docs for t in d]  # nothing lost, nothing duplicated
    assert all(s[1] != SEP for s in sequences)  # a separator never opens a sequence


def test_packing_with_document_boundaries():
    rng = random.Random(0)
    docs = random_docs(rng, 6)
    packer = Packer(8, CLS, SEP, respect_document_boundaries=True)
    per_doc = [packer.add(d) for d in docs]
    assert packer.flush() == []
    for d, seqs in zip(docs, per_doc):
        assert [t for s in seqs for t in s[1:-1]] == d  # each sequence holds tokens of one document only
        assert all(s[0] == CLS and s[-1] == SEP and 3 <= len(s) <= 8 for s in seqs)
        assert all(len(s) == 8 for s in seqs[:-1])  # only a document's last piece is short


def test_packer_state_round_trip():
    rng = random.Random(1)
    docs = random_docs(rng, 5)
    a = Packer(7, CLS, SEP)
    first = [s for d in docs[:20] for s in a.add(d)]
    b = Packer(7, CLS, SEP)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest_a = [s for d in docs[20:] for s in a.add(d)] + a.flush()
    rest_b = [s for d in docs[20:] for s in b.add(d)] + b.flush()
    assert first and rest_a == rest_b


def test_tokenize_fast_path_matches_the_tokenizer_call(tiny_bert_tokenizer, tiny_roberta_tokenizer, sample_docs):
    for tok in (tiny_bert_tokenizer, tiny_roberta_tokenizer):
        expected = tok(sample_docs, add_special_tokens=False)["input_ids"]
        fingerprint = kp.tokenizer_fingerprint(tok)
        assert tokenize(tok, sample_docs) == expected
        # a padded, truncated call leaves padding enabled on the shared backend: neither the ids nor the cache key
        # may change because of it
        tok(["a", "a longer text"], padding="max_length", max_length=64, truncation=True)
        assert tokenize(tok, sample_docs) == expected and kp.tokenizer_fingerprint(tok) == fingerprint
    # RoBERTa-style framing
    assert kp.special_ids(tiny_roberta_tokenizer) == (0, 2, 1)


# ---------------------------------------------------------------------------------------------------------------
# Non-streaming: packed once, cached
# ---------------------------------------------------------------------------------------------------------------
def test_packed_corpus_is_built_once_and_cached(tiny_bert_tokenizer, sample_docs, tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    calls = []
    real_tokenizer = kp.document_tokenizer

    def counting_tokenizer(tok):
        encode = real_tokenizer(tok)
        return lambda texts: calls.append(len(texts)) or encode(texts)

    monkeypatch.setattr(kp, "document_tokenizer", counting_tokenizer)
    cache = tmp_path / "cache"

    def build(max_seq_length=32, respect=False):
        return build_packed_corpus(FileCorpus([str(text)]), tiny_bert_tokenizer, max_seq_length=max_seq_length,
                                   respect_document_boundaries=respect, cache_dir=str(cache), tokenize_batch_size=8)

    entry, hit = build()
    assert not hit and sum(calls) == len(sample_docs)
    corpus = PackedCorpus(entry, tiny_bert_tokenizer.pad_token_id)
    # the same sequences as packing the documents directly
    packer = Packer(32, *kp.special_ids(tiny_bert_tokenizer)[:2])
    expected = [s for ids in tokenize(tiny_bert_tokenizer, sample_docs) for s in packer.add(ids)] + packer.flush()
    assert len(corpus) == len(expected) and corpus.meta["dtype"] == "uint16"
    assert [corpus.sequence(i).tolist() for i in range(len(corpus))] == expected
    batch = corpus.__getitems__([len(corpus) - 1, 0])  # the short last sequence is padded
    assert batch["input_ids"].shape == (2, 32) and batch["attention_mask"][0].sum() == len(expected[-1])

    calls.clear()
    assert build() == (entry, True) and calls == []  # second run: nothing re-tokenized
    assert build(max_seq_length=64)[1] is False  # other settings, other entry
    assert build(respect=True)[1] is False
    calls.clear()
    os.utime(text, ns=(os.stat(text).st_atime_ns, os.stat(text).st_mtime_ns + 10**9))  # the file changed
    assert build()[1] is False and calls
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 4


# ---------------------------------------------------------------------------------------------------------------
# Streaming: resumable
# ---------------------------------------------------------------------------------------------------------------
def make_stream(reader, tokenizer, **kw):
    settings = dict(max_seq_length=32, batch_size=4, shuffle_buffer_size=7, seed=5, tokenize_batch_size=4)
    settings.update(kw)
    return PackedStream(reader, tokenizer, **settings)


def take(stream, n):
    it = iter(stream)
    return [{k: v.tolist() for k, v in next(it).items()} for _ in range(n)]


def stream_readers(tmp_path, sample_docs):
    parquet = write_parquet(tmp_path / "p.parquet", sample_docs, row_group_size=100)
    jsonl = write_jsonl(tmp_path / "j.jsonl", sample_docs)
    return {
        "text": lambda: FileShardReader(FileCorpus([str(SAMPLE)]), 0, 1, seed=1, shard_bytes=900),
        "parquet_rank1_of_2": lambda: FileShardReader(FileCorpus([parquet]), 1, 2),
        "datasets_json_rank0_of_2": lambda: DatasetShardReader(
            DatasetCorpus("json", data_files=[jsonl, jsonl], streaming=True), 0, 2),
    }


@pytest.mark.parametrize("kind", ["text", "parquet_rank1_of_2", "datasets_json_rank0_of_2"])
@pytest.mark.parametrize("respect", [False, True])
def test_stream_resumes_exactly_where_it_stopped(kind, respect, tiny_bert_tokenizer, sample_docs, tmp_path):
    new_reader = stream_readers(tmp_path, sample_docs)[kind]
    reference = take(make_stream(new_reader(), tiny_bert_tokenizer, respect_document_boundaries=respect), 60)
    for k in (1, 13, 41):  # 41 batches are past the end of the first epoch of every shard here
        a = make_stream(new_reader(), tiny_bert_tokenizer, respect_document_boundaries=respect)
        assert take(a, k) == reference[:k]
        state = json.loads(json.dumps(a.state_dict()))
        b = make_stream(new_reader(), tiny_bert_tokenizer, respect_document_boundaries=respect)
        b.load_state_dict(state)
        assert take(b, 60 - k) == reference[k:]
    assert a.epoch >= 1


def test_stream_first_epoch_is_the_packed_shard(tiny_bert_tokenizer, sample_docs):
    """Without shuffling, one process's stream is its documents packed in order, nothing lost or repeated."""
    stream = make_stream(FileShardReader(FileCorpus([str(SAMPLE)]), 0, 1), tiny_bert_tokenizer, shuffle_buffer_size=0,
                         max_seq_length=16, batch_size=3)
    packer = Packer(16, *kp.special_ids(tiny_bert_tokenizer)[:2])
    expected = [s for ids in tokenize(tiny_bert_tokenizer, sample_docs) for s in packer.add(ids)]
    n = len(expected) // 3
    got = [row for b in take(stream, n) for row in b["input_ids"]]
    assert got == expected[:3 * n]
    assert all(m == [1] * 16 for b in take(stream, 5) for m in b["attention_mask"])  # never padded


def test_stream_shuffle_is_seeded(tiny_bert_tokenizer):
    def batches(seed, buffer):
        reader = FileShardReader(FileCorpus([str(SAMPLE)]), 0, 1, seed=seed)
        return take(make_stream(reader, tiny_bert_tokenizer, seed=seed, shuffle_buffer_size=buffer), 10)

    assert batches(1, 20) == batches(1, 20)
    assert batches(1, 20) != batches(2, 20) != batches(1, 0)
    rows = lambda bs: sorted(tuple(r) for b in bs for r in b["input_ids"])  # noqa: E731
    # a buffer reorders sequences, it does not invent them: all drawn rows come from the unshuffled stream
    assert set(rows(batches(1, 20))) <= set(rows(take(make_stream(
        FileShardReader(FileCorpus([str(SAMPLE)]), 0, 1), tiny_bert_tokenizer, shuffle_buffer_size=0), 40)))


def test_stream_state_from_other_settings_is_refused(tiny_bert_tokenizer):
    reader = lambda: FileShardReader(FileCorpus([str(SAMPLE)]), 0, 1)  # noqa: E731
    a = make_stream(reader(), tiny_bert_tokenizer)
    take(a, 2)
    b = make_stream(reader(), tiny_bert_tokenizer, batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())
    two = make_stream(FileShardReader(FileCorpus([str(SAMPLE)]), 0, 2), tiny_bert_tokenizer)
    with pytest.raises(ValueError, match="number of processes"):
        two.load_state_dict(a.state_dict())


def test_stream_state_survives_staging_the_corpus_elsewhere(tiny_bert_tokenizer, tmp_path):
    """Jobs often copy the corpus to node-local disk first: another directory and mtime, the same files."""
    a = make_stream(FileShardReader(FileCorpus([str(SAMPLE)]), 0, 1), tiny_bert_tokenizer)
    take(a, 3)
    staged = tmp_path / "scratch" / SAMPLE.name
    staged.parent.mkdir()
    staged.write_bytes(SAMPLE.read_bytes())
    b = make_stream(FileShardReader(FileCorpus([str(staged)]), 0, 1), tiny_bert_tokenizer)
    b.load_state_dict(a.state_dict())
    assert take(b, 4) == take(a, 4)


@pytest.mark.parametrize("files, warned", [(2, False), (3, True)])
def test_datasets_stream_split_by_example_is_announced(sample_docs, tmp_path, caplog, files, warned):
    """2 processes: 2 shards are split whole; 3 cannot be, so datasets has every process read all of them."""
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", sample_docs[i::files]) for i in range(files)]
    with caplog.at_level("WARNING", logger="kd.streaming"):
        readers = [DatasetShardReader(DatasetCorpus("json", data_files=paths, streaming=True), r, 2) for r in (0, 1)]
    assert ("keeps one document in 2" in caplog.text) is warned
    first_pass = [[text for text, _ in itertools.takewhile(lambda d: d[1]["epoch"] == 0, r.documents())]
                  for r in readers]
    assert sorted(first_pass[0] + first_pass[1]) == sorted(sample_docs)  # disjoint and complete either way


def test_a_datasets_corpus_is_read_like_files(tiny_bert_tokenizer, sample_docs, tmp_path):
    """--dataset_name goes through datasets.load_dataset (here a local folder of JSON Lines, as a hub name would)."""
    folder = tmp_path / "my_corpus"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", sample_docs)
    corpus = DatasetCorpus(str(folder))
    assert list(corpus.documents()) == sample_docs
    entry, hit = build_packed_corpus(corpus, tiny_bert_tokenizer, max_seq_length=32, cache_dir=str(tmp_path / "c"))
    assert not hit and build_packed_corpus(corpus, tiny_bert_tokenizer, max_seq_length=32,
                                           cache_dir=str(tmp_path / "c")) == (entry, True)
    files = build_packed_corpus(FileCorpus([str(SAMPLE)]), tiny_bert_tokenizer, max_seq_length=32,
                                cache_dir=str(tmp_path / "c"))[0]
    from_dataset, from_files = PackedCorpus(entry, 0), PackedCorpus(files, 0)
    assert len(from_dataset) == len(from_files) > 1
    assert all(np.array_equal(from_dataset.sequence(i), from_files.sequence(i)) for i in range(len(from_files)))
    with pytest.raises(ValueError, match="no column 'body'"):
        DatasetCorpus(str(folder), text_column="body")

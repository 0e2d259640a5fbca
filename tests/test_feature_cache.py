"""kd.feature_cache: examples and windows built once, cached as memory-mapped Arrow data, shared and reused."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch

import kd.squad

from kd import feature_cache, features
from kd.data import TensorDictDataset, arrow_columns
from kd.feature_cache import cached_windows, load_examples
from kd.features import model_input_arrays, prepare_eval_features, prepare_train_features
from kd.squad import load_squad
from kd.teacher_cache import fingerprint_inputs
from tests.helpers import launch, read_json

WINDOW = dict(max_seq_length=128, doc_stride=48, max_query_length=32)


def _windows(path, tokenizer, cache, kind="train", **window):
    examples, info = load_examples(None, str(path), cache_dir=str(cache))
    windows, winfo = cached_windows(None, kind, examples, info["source_key"], tokenizer, **{**WINDOW, **window},
                                    cache_dir=str(cache))
    return examples, windows, info, winfo


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_cached_windows_are_the_uncached_ones_and_a_second_run_builds_nothing(
        kind, squad_fixture_path, tiny_bert_tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    examples, windows, info, winfo = _windows(squad_fixture_path, tiny_bert_tokenizer, cache, kind)
    assert info["hit"] is False and winfo["hit"] is False
    prepare = prepare_train_features if kind == "train" else prepare_eval_features
    uncached = prepare(load_squad(str(squad_fixture_path)), tiny_bert_tokenizer, **WINDOW)
    assert examples.to_dict() == load_squad(str(squad_fixture_path)).to_dict()
    assert windows.features == uncached.features and windows.to_dict() == uncached.to_dict()
    assert all(f["filename"].startswith(winfo["entry"]) for f in windows.cache_files)  # memory-mapped from disk

    entries = {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)}

    def no_build(*a, **k):
        raise AssertionError("featurized again")

    monkeypatch.setattr(features, f"prepare_{kind}_features", no_build)
    monkeypatch.setattr(kd.squad, "iter_squad_articles", no_build)  # nor the file read again
    examples2, windows2, info2, winfo2 = _windows(squad_fixture_path, tiny_bert_tokenizer, cache, kind)
    assert info2["hit"] is True and winfo2["hit"] is True and winfo2["key"] == winfo["key"]
    assert windows2.to_dict() == uncached.to_dict() and examples2.to_dict() == examples.to_dict()
    assert {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)} == entries


def test_a_changed_file_tokenizer_or_window_setting_misses(squad_fixture_path, tiny_bert_tokenizer,
                                                           tiny_roberta_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    _, base, _, info = _windows(squad_fixture_path, tiny_bert_tokenizer, cache)
    data = json.loads(squad_fixture_path.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] = "What is a changed question?"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data))
    _, other_file, file_info, other = _windows(changed, tiny_bert_tokenizer, cache)
    assert file_info["hit"] is False and other["hit"] is False and other["key"] != info["key"]
    assert other_file["input_ids"][0] != base["input_ids"][0]
    _, _, _, tok = _windows(squad_fixture_path, tiny_roberta_tokenizer, cache)
    _, strided, _, stride = _windows(squad_fixture_path, tiny_bert_tokenizer, cache, doc_stride=32)
    assert tok["hit"] is False and stride["hit"] is False
    assert len({info["key"], other["key"], tok["key"], stride["key"]}) == 4
    assert len(strided) == len(prepare_train_features(load_squad(str(squad_fixture_path)), tiny_bert_tokenizer,
                                                      **{**WINDOW, "doc_stride": 32}))


def test_a_killed_build_is_never_read_back(squad_fixture_path, tiny_bert_tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    examples, info = load_examples(None, str(squad_fixture_path), cache_dir=str(cache))

    def killed(self, *a, **k):  # the build dies while writing its data
        os.makedirs(os.path.join(a[0]), exist_ok=True)
        open(os.path.join(a[0], "data-00000-of-00001.arrow"), "wb").write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "save_to_disk", killed)
        with pytest.raises(KeyboardInterrupt):
            cached_windows(None, "train", examples, info["source_key"], tiny_bert_tokenizer, **WINDOW,
                           cache_dir=str(cache))
    # a kill that even skipped the clean-up: a half-written temp dir and an entry dir without its marker
    key = feature_cache._digest("windows", "train", info["source_key"],
                                feature_cache.tokenizer_fingerprint(tiny_bert_tokenizer), WINDOW,
                                feature_cache.file_digest(features.__file__))
    for debris in (cache / f".tmp-train-{key}-deadbeef" / "data", cache / f"train-{key}" / "data"):
        debris.mkdir(parents=True)
        (debris / "data-00000-of-00001.arrow").write_bytes(b"half")
    windows, winfo = cached_windows(None, "train", examples, info["source_key"], tiny_bert_tokenizer, **WINDOW,
                                    cache_dir=str(cache))
    assert winfo["key"] == key and winfo["hit"] is False  # built afresh, not read
    assert windows.to_dict() == prepare_train_features(examples, tiny_bert_tokenizer, **WINDOW).to_dict()
    assert cached_windows(None, "train", examples, info["source_key"], tiny_bert_tokenizer, **WINDOW,
                          cache_dir=str(cache))[1]["hit"] is True


def test_an_unwritable_cache_dir_costs_the_caching_only(squad_fixture_path, tiny_bert_tokenizer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    examples, windows, info, winfo = _windows(squad_fixture_path, tiny_bert_tokenizer, blocker / "cache")
    assert info["entry"] is None and winfo["entry"] is None
    assert windows.to_dict() == prepare_train_features(load_squad(str(squad_fixture_path)), tiny_bert_tokenizer,
                                                       **WINDOW).to_dict()


def test_batches_and_teacher_key_read_from_arrow_columns_equal_the_arrays(squad_fixture_path, tiny_bert_tokenizer,
                                                                         tmp_path):
    _, windows, _, _ = _windows(squad_fixture_path, tiny_bert_tokenizer, tmp_path / "cache")
    arrays = model_input_arrays(windows)
    columns = arrow_columns(windows, list(arrays))
    assert fingerprint_inputs(columns) == fingerprint_inputs(arrays)
    rows = [5, 0, 600, 17]
    ours, theirs = TensorDictDataset(columns).__getitems__(rows), TensorDictDataset(arrays).__getitems__(rows)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert columns["input_ids"].shape == arrays["input_ids"].shape


@pytest.mark.slow
def test_two_processes_share_one_cache_built_once_and_a_restart_reuses_it(tiny_bert_qa_dir, squad_fixture_path,
                                                                          tmp_path):
    cache = tmp_path / "features"
    common = ["--model_name_or_path", tiny_bert_qa_dir, "--train_file", squad_fixture_path,
              "--validation_file", squad_fixture_path, "--per_device_train_batch_size", "8",
              "--max_train_steps", "2", "--features_cache_dir", cache, "--teacher_cache_dir", tmp_path / "t",
              *[str(x) for kv in WINDOW.items() for x in (f"--{kv[0]}", kv[1])]]
    proc = launch("train_prediction.py", [*common, "--output_dir", tmp_path / "run1"], processes=2)
    assert "building it in memory" not in proc.stderr  # the other process read what the first one built
    first = read_json(tmp_path / "run1" / "all_results.json")["features_cache"]
    assert [first[k]["hit"] for k in ("train_examples", "train_windows", "eval_windows")] == [False] * 3
    assert first["validation_examples"] == first["train_examples"] | {"hit": True}  # the same file: one entry
    entries = [n for n in os.listdir(cache) if not n.startswith(".")]
    assert sorted(n.split("-")[0] for n in entries) == ["eval", "examples", "train"]
    assert {read_json(cache / n / "meta.json")["built_by_process"] for n in entries} == {0}
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]
    mtimes = {n: os.stat(cache / n).st_mtime_ns for n in os.listdir(cache)}
    launch("train_prediction.py", [*common, "--output_dir", tmp_path / "run2"], processes=2)
    second = read_json(tmp_path / "run2" / "all_results.json")["features_cache"]
    assert {second[k]["hit"] for k in second} == {True}
    assert {k: v["key"] for k, v in second.items()} == {k: v["key"] for k, v in first.items()}
    assert {n: os.stat(cache / n).st_mtime_ns for n in os.listdir(cache)} == mtimes

"""benchmarks/quality.py's bookkeeping on fake finished runs: which seeds count, the gains, each stage's
contribution, the bootstrap interval, the data split. No training here: the experiment itself is hours of CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, read_json

spec = importlib.util.spec_from_file_location("quality", REPO_ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)

# 4 dev questions; a variant's quality is how many of them it answers right
DEV = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "red green blue black", "qas": [
    {"id": f"q{i}", "question": "?", "answers": [{"text": word, "answer_start": 0}]}
    for i, word in enumerate(["red", "green", "blue", "black"])]}]}]}
WORDS = ["red", "green", "blue", "black"]


def fake_run(work, name, right: int):
    """A finished run dir answering the first `right` dev questions correctly and the rest wrong."""
    out = work / name
    out.mkdir(parents=True)
    predictions = {f"q{i}": WORDS[i] if i < right else "nothing" for i in range(4)}
    (out / "predictions.json").write_text(json.dumps(predictions))
    (out / "all_results.json").write_text(json.dumps({"eval_metrics": {"exact": 25.0 * right, "f1": 25.0 * right}}))


def experiment(tmp_path, seeds=(1, 2), variants=quality.PRED_VARIANTS, prune_vocab_size=None):
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), output=str(tmp_path / "quality.json"),
                              stop_after_minutes=None, max_seq_length=192, doc_stride=64, batch_size=16,
                              seeds=list(seeds), bootstrap=500, wiki_file=None, variants=list(variants),
                              prune_vocab_size=prune_vocab_size)
    exp = quality.Experiment(args)
    (tmp_path / "work" / "data").mkdir(parents=True)
    (tmp_path / "work" / "data" / "dev.json").write_text(json.dumps(DEV))
    fake_run(tmp_path / "work", "teacher", 4)
    return exp


def test_summary_gains_steps_and_unfinished_seeds(tmp_path):
    exp = experiment(tmp_path, seeds=(1, 2, 3))
    work = tmp_path / "work"
    right = {"nokd": 1, "kd": 2, "nokd_aug": 1, "kd_aug": 2, "ti_kd_aug": 3}
    for seed in (1, 2):
        for variant, r in right.items():
            fake_run(work, f"{variant}_s{seed}", r + (seed == 2 and variant == "ti_kd_aug"))
    for variant in ("nokd", "kd"):  # seed 3 unfinished: it must not count anywhere
        fake_run(work, f"{variant}_s3", 0)
    fake_run(work, "gd_ti_kd_aug_s1", 4)  # extended variants: one finished for one seed only, one for both
    for seed in (1, 2):
        fake_run(work, f"kd_aug_long_s{seed}", 3)

    result = exp.summarize({"T=2,w=0.9": 30.0}, (2.0, 0.9))
    assert result == read_json(tmp_path / "quality.json")
    assert result["seeds_finished"] == [1, 2]
    rows = result["variants"]
    assert list(rows) == ["nokd", "kd", "nokd_aug", "kd_aug", "ti_kd_aug", "kd_aug_long", "gd_ti_kd_aug"]
    assert rows["nokd"]["f1"] == [25.0, 25.0] and "f1_gain_vs_nokd" not in rows["nokd"]
    assert rows["ti_kd_aug"]["f1"] == [75.0, 100.0]
    assert rows["ti_kd_aug"]["f1_mean"] == pytest.approx(87.5)
    assert rows["ti_kd_aug"]["f1_std"] == pytest.approx(np.std([75, 100], ddof=1))
    assert rows["kd"]["f1_gain_vs_nokd"] == pytest.approx(25.0)
    assert rows["gd_ti_kd_aug"]["seeds"] == [1] and rows["gd_ti_kd_aug"]["f1_gain_vs_nokd"] == pytest.approx(75.0)
    steps = result["steps"]
    assert steps["task-intermediate distillation"]["gain"] == pytest.approx(87.5 - 50.0)
    assert steps["task-intermediate distillation vs as many more KD steps"]["gain"] == pytest.approx(87.5 - 75.0)
    assert steps["general distillation"]["seeds"] == [1]
    assert steps["general distillation"]["gain"] == pytest.approx(25.0)
    assert "init from the fine-tuned teacher (vs the pre-trained encoder)" not in steps  # pre_nokd never ran
    lo, hi = rows["kd"]["f1_gain_ci95"]
    assert lo <= 25.0 <= hi


def test_summary_refuses_when_no_seed_finished(tmp_path):
    exp = experiment(tmp_path, seeds=(1,))
    fake_run(tmp_path / "work", "nokd_s1", 1)
    with pytest.raises(SystemExit, match="no seed has finished"):
        exp.summarize({}, (2.0, 0.9))


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    a = rng.normal(5.0, 1.0, 2000)
    lo, hi = quality.paired_bootstrap(a, np.zeros_like(a), samples=500)
    assert lo < a.mean() < hi and hi - lo < 0.2
    lo, hi = quality.paired_bootstrap(a, a, samples=100)
    assert lo == hi == 0.0


def test_slice_keeps_paragraphs_whole(tmp_path):
    data = {"version": "1.1", "data": [{"title": f"a{k}", "paragraphs": [
        {"context": f"p{k}{j}", "qas": [{"id": f"{k}{j}{i}", "question": "?", "answers": []} for i in range(3)]}
        for j in range(2)]} for k in range(2)]}  # 2 articles x 2 paragraphs x 3 questions
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    first = quality.slice_squad(str(path), 0, 4)
    rest = quality.slice_squad(str(path), 4, 100)
    ids = lambda d: [q["id"] for a in d["data"] for p in a["paragraphs"] for q in p["qas"]]  # noqa: E731
    # the paragraph holding question 4 starts at 3: it goes wholly to the first part (its first question is in it)
    assert ids(first) == ["000", "001", "002", "010", "011", "012"]
    assert ids(rest) == ["100", "101", "102", "110", "111", "112"]
    assert not set(ids(first)) & set(ids(rest))


def test_summary_reports_the_pruned_student_across_tokenizers(tmp_path):
    exp = experiment(tmp_path, seeds=(1, 2), prune_vocab_size=8000)
    work = tmp_path / "work"
    for seed in (1, 2):
        for variant, r in {"nokd": 1, "kd": 3, "nokd_aug": 1, "kd_aug": 2, "ti_kd_aug": 3}.items():
            fake_run(work, f"{variant}_s{seed}", r)
        fake_run(work, f"pruned8000_nokd_s{seed}", 1)
        fake_run(work, f"pruned8000_kd_s{seed}", 2 + (seed == 2))
        fake_run(work, f"pruned16000_kd_s{seed}", 4)  # another size's runs in the same work_dir: not mixed in
    result = exp.summarize({"T=2,w=0.9": 30.0}, (2.0, 0.9))
    rows, steps = result["variants"], result["steps"]
    assert list(rows)[-2:] == ["pruned_nokd", "pruned_kd"] and rows["pruned_kd"]["f1"] == [50.0, 75.0]
    assert steps["prediction-layer KD across tokenizers (pruned student)"]["gain"] == pytest.approx(62.5 - 25.0)
    assert steps["vocabulary pruning, under KD"]["gain"] == pytest.approx(62.5 - 75.0)
    assert steps["vocabulary pruning, no teacher"]["gain"] == pytest.approx(0.0)


def test_some_variants_only_the_pruned_comparison(tmp_path):
    """--variants nokd kd: a seed counts once those two (not the augmented ones) finished; the pruned rows join."""
    exp = experiment(tmp_path, seeds=(1, 2), variants=("kd", "nokd"), prune_vocab_size=8000)
    work = tmp_path / "work"
    for seed in (1, 2):
        fake_run(work, f"nokd_s{seed}", 1)
        fake_run(work, f"pruned8000_nokd_s{seed}", 1)
        fake_run(work, f"pruned8000_kd_s{seed}", 2)
    fake_run(work, "kd_s1", 3)  # seed 2's kd unfinished: seed 2 does not count
    result = exp.summarize({"T=2,w=0.9": 30.0}, (2.0, 0.9))
    assert result["seeds_finished"] == [1]
    assert list(result["variants"]) == ["nokd", "kd", "pruned_nokd", "pruned_kd"]  # the table's order, not argv's
    assert result["variants"]["pruned_kd"]["seeds"] == [1]
    assert result["steps"]["vocabulary pruning, under KD"]["gain"] == pytest.approx(50.0 - 75.0)
    assert "augmented data, no teacher" not in result["steps"]


@pytest.mark.parametrize("argv, message", [(["--variants", "kd"], "must include nokd"),
                                           (["--variants", "nokd", "--prune_vocab_size", "8000"], "needs kd")])
def test_variants_are_checked_up_front(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.argv", ["quality.py", "--squad_train", "t.json", "--squad_dev", "d.json", *argv])
    with pytest.raises(SystemExit) as exit_:
        quality.parse_args()
    assert exit_.value.code == 2 and message in capsys.readouterr().err

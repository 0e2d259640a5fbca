"""The teacher-logit cache: computed once, reused without running (or even loading) the teacher."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from accelerate import Accelerator

from kd import teacher_cache


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _columns(seed, n=10, length=24, vocab=50):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Spy:
    """Stands in for kd.qa_eval.predict_logits and counts teacher passes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, accelerator, model, dataloader):
        self.calls += 1
        starts, ends = [], []
        with torch.no_grad():
            for batch in dataloader:
                out = model(**batch)
                starts.append(out.start_logits.float().numpy())
                ends.append(out.end_logits.float().numpy())
        return np.concatenate(starts), np.concatenate(ends)


def test_second_call_hits_the_cache_without_the_teacher(accelerator, tiny_bert_qa_dir, tmp_path, monkeypatch):
    spy, cols = Spy(), _columns(0)
    start, end, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                                    batch_size=4, predict_logits=spy)
    assert spy.calls == 1 and info["teacher_cache_hit"] is False
    assert start.shape == (10, 24) and start.dtype == np.float32
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir).eval()
    with torch.no_grad():
        ref = model(**{k: torch.as_tensor(v).long() for k, v in cols.items()})
    assert np.allclose(start, ref.start_logits.numpy(), atol=1e-5)
    assert np.allclose(end, ref.end_logits.numpy(), atol=1e-5)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr(transformers.AutoModelForQuestionAnswering, "from_pretrained", no_teacher)
    start2, end2, info2 = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols,
                                                       cache_dir=str(tmp_path), batch_size=4, predict_logits=spy)
    assert spy.calls == 1 and info2["teacher_cache_hit"] is True
    assert np.array_equal(start, start2) and np.array_equal(end, end2)


def test_key_follows_inputs_teacher_and_precision(tiny_bert_qa_dir, tiny_roberta_qa_dir):
    bert = teacher_cache.fingerprint_model_dir(str(tiny_bert_qa_dir))
    assert bert == teacher_cache.fingerprint_model_dir(str(tiny_bert_qa_dir))
    assert bert != teacher_cache.fingerprint_model_dir(str(tiny_roberta_qa_dir))
    a, b = teacher_cache.fingerprint_inputs(_columns(0)), teacher_cache.fingerprint_inputs(_columns(1))
    assert a != b
    changed = _columns(0)
    changed["input_ids"][3, 7] += 1  # one token differs
    assert teacher_cache.fingerprint_inputs(changed) != a
    assert teacher_cache.cache_key(bert, a, torch.float32) != teacher_cache.cache_key(bert, a, torch.bfloat16)


def test_unfinished_entries_are_not_read(accelerator, tiny_bert_qa_dir, tmp_path):
    spy, cols = Spy(), _columns(2)
    key_dir_count = len(os.listdir(tmp_path))
    teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path), predict_logits=spy)
    (entry,) = [d for d in os.listdir(tmp_path) if not d.startswith(".")]
    assert key_dir_count == 0 and not any(d.startswith(".tmp") for d in os.listdir(tmp_path))
    os.remove(tmp_path / entry / "meta.json")  # as if the writer died before publishing
    os.rename(tmp_path / entry, tmp_path / (entry + "x"))
    os.makedirs(tmp_path / entry)  # an empty dir with the right name is not a cache entry either
    _, _, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                              predict_logits=spy)
    assert spy.calls == 2 and info["teacher_cache_hit"] is False


def _reference(model_dir, cols):
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v).long() for k, v in cols.items()})
    return out.start_logits.numpy(), out.end_logits.numpy()


def _reverse_rows(path):
    np.save(path, np.load(path)[::-1].copy())  # a valid .npy file, the right shape: only a checksum tells


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _break_header(path):
    with open(path, "r+b") as f:
        f.write(b"\x00" * 16)


@pytest.mark.parametrize("damage", [_reverse_rows, _truncate, _break_header])
def test_a_damaged_entry_is_recomputed_and_named(damage, accelerator, tiny_bert_qa_dir, tmp_path, caplog):
    spy, cols = Spy(), _columns(3)
    teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                 predict_logits=spy)
    (key,) = [d for d in os.listdir(tmp_path) if not d.startswith(".")]
    damage(tmp_path / key / "end_logits.npy")
    with caplog.at_level("WARNING", logger="kd.teacher_cache"):
        start, end, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols,
                                                        cache_dir=str(tmp_path), predict_logits=spy)
    assert spy.calls == 2 and info["teacher_cache_hit"] is False and info["teacher_cache_written"] is True
    ref_start, ref_end = _reference(tiny_bert_qa_dir, cols)
    assert np.allclose(start, ref_start, atol=1e-5) and np.allclose(end, ref_end, atol=1e-5)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(tmp_path / key) in warning and "end_logits.npy" in warning and "recomputing" in warning
    # the entry was replaced by an intact one: the next run hits it, with the right rows
    _, end3, info3 = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                                  predict_logits=spy)
    assert spy.calls == 2 and info3["teacher_cache_hit"] is True and np.allclose(end3, ref_end, atol=1e-5)
    assert [d for d in os.listdir(tmp_path)] == [key]  # no debris of the damaged entry left


def test_an_entry_without_checksums_is_recomputed(accelerator, tiny_bert_qa_dir, tmp_path, caplog):
    import json

    spy, cols = Spy(), _columns(4)
    teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                 predict_logits=spy)
    (key,) = os.listdir(tmp_path)
    meta = json.loads((tmp_path / key / "meta.json").read_text())
    assert set(meta["checksums"]) == {"start_logits.npy", "end_logits.npy"}
    del meta["checksums"]  # as an entry written before they were kept
    (tmp_path / key / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="kd.teacher_cache"):
        _, _, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                                  predict_logits=spy)
    assert spy.calls == 2 and info["teacher_cache_hit"] is False and "no checksums" in caplog.text


def test_an_unwritable_cache_dir_is_found_before_the_pass_and_logits_stay_in_memory(
        accelerator, tiny_bert_qa_dir, tmp_path, caplog, monkeypatch):
    spy, cols = Spy(), _columns(5)
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "cache"  # cannot be created (root may write anywhere, so no chmod here)

    def no_pass_yet(*a, **k):
        raise AssertionError("the pass ran before the cache dir was found unwritable")

    order = []
    monkeypatch.setattr(teacher_cache, "_unwritable", lambda d, real=teacher_cache._unwritable: order.append("probe")
                        or real(d))
    with caplog.at_level("WARNING", logger="kd.teacher_cache"):
        start, end, info = teacher_cache.teacher_logits(
            accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(cache),
            predict_logits=lambda *a: order.append("pass") or spy(*a))
    assert order == ["probe", "pass"] and spy.calls == 1
    assert info["teacher_cache_hit"] is False and info["teacher_cache_written"] is False
    ref_start, ref_end = _reference(tiny_bert_qa_dir, cols)
    assert start.dtype == np.float32 and np.allclose(start, ref_start, atol=1e-5) and np.allclose(end, ref_end,
                                                                                                  atol=1e-5)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"cannot write to the cache dir {cache}" in warning and "kept in memory" in warning


def test_a_write_failure_after_the_pass_keeps_the_pass(accelerator, tiny_bert_qa_dir, tmp_path, caplog, monkeypatch):
    import errno

    spy, cols = Spy(), _columns(6)
    real_save = np.save

    def full_disk(path, *a, **k):
        if str(path).endswith("end_logits.npy"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *a, **k)

    monkeypatch.setattr(np, "save", full_disk)
    with caplog.at_level("WARNING", logger="kd.teacher_cache"):
        start, end, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols,
                                                        cache_dir=str(tmp_path), predict_logits=spy)
    assert spy.calls == 1 and info["teacher_cache_written"] is False
    ref_start, ref_end = _reference(tiny_bert_qa_dir, cols)
    assert np.allclose(start, ref_start, atol=1e-5) and np.allclose(end, ref_end, atol=1e-5)
    assert "writing cache entry" in caplog.text and "kept in memory" in caplog.text
    assert os.listdir(tmp_path) == []  # no half entry, no temp dir left


# --------------------------------------------------------------------------------------------
# Room on disk: the entry's size is stated before the pass, and a disk without room refused
# --------------------------------------------------------------------------------------------


def test_the_stated_size_is_the_entry_size_on_disk(accelerator, tiny_bert_qa_dir, tmp_path, caplog):
    cols = _columns(7, n=300, length=64)
    with caplog.at_level("INFO", logger="kd.teacher_cache"):
        _, _, info = teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), cols, cache_dir=str(tmp_path),
                                                  predict_logits=Spy())
    (key,) = os.listdir(tmp_path)
    real = sum(os.path.getsize(tmp_path / key / name) for name in os.listdir(tmp_path / key))
    stated = info["teacher_cache_bytes"]
    assert 0 <= stated - real <= 1024 and real > 2 * 300 * 64 * 4
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Teacher logits cache:")]
    assert f"{stated / 1000:.1f} KB for 300 windows at 64 tokens" in line and "free there" in line


def test_a_disk_without_room_is_refused_before_the_pass(accelerator, tiny_bert_qa_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(teacher_cache, "free_bytes", lambda path: 2000)
    monkeypatch.setattr(transformers.AutoModelForQuestionAnswering, "from_pretrained",
                        lambda *a, **k: pytest.fail("the teacher was loaded though the disk has no room"))
    spy = Spy()
    with pytest.raises(teacher_cache.CacheSpaceError) as err:
        teacher_cache.teacher_logits(accelerator, str(tiny_bert_qa_dir), _columns(8), cache_dir=str(cache),
                                     predict_logits=spy)
    message = str(err.value)
    assert spy.calls == 0 and "\n" not in message
    assert f"needs 3.2 KB for 10 windows at 24 tokens (float32 start and end logits) in {cache}" in message
    assert "only 2.0 KB free" in message
    assert "--teacher_cache_dir" in message and "KD_CACHE" in message and "free some space" in message
    assert not cache.exists() or os.listdir(cache) == []


SMALL_DISK = '''
import os, shutil
_real, _full = shutil.disk_usage, os.environ["TEST_FULL_DIR"]
def _disk_usage(path):  # the file system of TEST_FULL_DIR has 4 KB free
    usage = _real(path)
    return usage._replace(free=4096) if os.path.abspath(path).startswith(_full) else usage
shutil.disk_usage = _disk_usage
'''


def _train_prediction_on_a_small_disk(tmp_path, teacher, fixture, processes):
    """train_prediction.py as users run it, on a file system (the cache dir's) that reports 4 KB free."""
    from tests.helpers import REPO_ROOT, free_port, script_env

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SMALL_DISK)
    cache = tmp_path / "cache"
    (tmp_path / "status").mkdir()
    env = dict(script_env(), PYTHONPATH=f"{site}{os.pathsep}{REPO_ROOT}", TEST_FULL_DIR=str(cache),
               KD_WORKER_STATUS_DIR=str(tmp_path / "status"))
    cmd = [sys.executable]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    args = ["--model_name_or_path", teacher, "--teacher_name_or_path", teacher, "--train_file", fixture,
            "--output_dir", tmp_path / "out", "--teacher_cache_dir", cache, "--features_cache_dir", tmp_path / "f",
            "--max_seq_length", "128",
            "--doc_stride", "48", "--max_query_length", "32", "--max_train_steps", "1"]
    proc = subprocess.run(cmd + [str(REPO_ROOT / "train_prediction.py"), *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, cache


def test_train_prediction_refuses_a_cache_disk_without_room(tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    proc, cache = _train_prediction_on_a_small_disk(tmp_path, tiny_bert_qa_dir, squad_fixture_path, 1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert error.startswith("train_prediction.py: error: the teacher logits cache needs ")
    assert f"in {cache}, but its file system has only 4.1 KB free" in error and "--teacher_cache_dir" in error
    assert "Traceback" not in proc.stderr and "Teacher logits: cache miss" not in proc.stderr
    assert os.listdir(cache) == []  # no entry, no temp dir
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_every_process_refuses_a_cache_disk_without_room(tiny_bert_qa_dir, squad_fixture_path, tmp_path):
    """Only each node's first process writes (and checks); the others must stop as well, not wait in the pass."""
    proc, cache = _train_prediction_on_a_small_disk(tmp_path, tiny_bert_qa_dir, squad_fixture_path, 2)
    assert proc.returncode != 0
    statuses = [(tmp_path / "status" / name).read_text() for name in os.listdir(tmp_path / "status")]
    assert statuses == ["2", "2"], proc.stderr[-3000:]  # each worker's own exit status (kd.launcher.run_worker)
    assert proc.stderr.count("train_prediction.py: error: the teacher logits cache needs") == 1
    assert os.listdir(cache) == []

"""Faults a long run meets, injected as a user would meet them; each test asserts the outcome, not only "no crash".

Runs train_prediction.py on the tiny random models (the machinery is the same in every training script).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from kd.checkpoint import STATE_FILE, CheckpointManager, damage
from kd.student import student_from_teacher_layers
from tests.helpers import CPU_CONFIG, REPO_ROOT, free_port, launch, read_json, read_jsonl, script_env

pytestmark = pytest.mark.slow
WINDOW = ["--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"]


@pytest.fixture(scope="module")
def student_dir(tiny_bert_qa_dir, tmp_path_factory):
    student = student_from_teacher_layers(AutoModelForQuestionAnswering.from_pretrained(tiny_bert_qa_dir), [2])
    out = tmp_path_factory.mktemp("fault_student")
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    return out


def _args(student_dir, fixture, out, *extra, teacher=None, cache=None):
    args = ["--model_name_or_path", student_dir, "--train_file", fixture, "--output_dir", out,
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "5",
            *WINDOW]
    if teacher:
        args += ["--teacher_name_or_path", teacher, "--teacher_cache_dir", cache, "--temperature", "2"]
    return [*args, *map(str, extra)]


def _weights(out_dir) -> dict:
    return load_file(os.path.join(out_dir, "model.safetensors"))


def _assert_same_weights(a, b, tol=1e-6):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= tol, k


def _tree_digest(root) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# --- an output dir belongs to one run --------------------------------------------------------------------------------
def test_reusing_an_output_dir_is_refused_and_the_old_run_stays_intact(student_dir, squad_fixture_path, tmp_path):
    out = tmp_path / "run"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, "--max_train_steps", 6,
                                        "--checkpointing_steps", 2, "--checkpoints_total_limit", 3))
    before, old_id = _tree_digest(out), read_json(out / "run.json")["run_id"]
    proc = launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, "--max_train_steps", 2,
                                               "--checkpointing_steps", 1), check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr and "--overwrite_output_dir" in proc.stderr
    assert _tree_digest(out) == before  # nothing of the old run touched, nothing of the new one written

    # --overwrite_output_dir: the old checkpoints and records go first, then the new run is alone in the dir
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, "--max_train_steps", 2,
                                        "--checkpointing_steps", 1, "--checkpoints_total_limit", 3,
                                        "--overwrite_output_dir"))
    results = read_json(out / "all_results.json")
    assert results["state"]["completed_steps"] == 2 and results["total_steps"] == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "train/loss" in r] == [1, 2]
    assert results["run_id"] == read_json(out / "run.json")["run_id"] != old_id


def test_latest_and_pruning_see_only_this_runs_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for run, steps in (("old", (70, 75, 80)), ("new", (5, 10))):
        for step in steps:
            path = root / f"step_{step:08d}"
            path.mkdir(parents=True)
            (path / STATE_FILE).write_text(
                f'{{"epoch": 0, "batches_in_epoch": {step}, "completed_steps": {step}, "run_id": "{run}"}}')
    manager = CheckpointManager(str(tmp_path), total_limit=1, run_id="new")
    assert manager.latest() == str(root / "step_00000010")
    manager._prune()
    assert sorted(os.listdir(root)) == ["step_00000010", "step_00000070", "step_00000075", "step_00000080"]
    assert CheckpointManager(str(tmp_path), run_id="other").resolve("latest") is None  # starts fresh


# --- kill -9, then resume ------------------------------------------------------------------------------------------
def _start(args):
    cmd = [sys.executable, str(REPO_ROOT / "train_prediction.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("when", ["at a random step", "during a checkpoint write"])
def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(student_dir, squad_fixture_path, tmp_path, when):
    # long enough that even an idle machine is still training when the kill comes
    common = ["--max_train_steps", 60, "--checkpointing_steps", 1 if "write" in when else 3,
              "--checkpoints_total_limit", 2]
    reference = tmp_path / "reference"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, reference, *common))

    out = tmp_path / "killed"
    proc = _start(_args(student_dir, squad_fixture_path, out, *common))
    target = int(np.random.default_rng().integers(3, 30))
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        if "write" in when:
            if (out / "checkpoints").is_dir() and any(n.endswith(".partial") for n in os.listdir(out / "checkpoints")):
                break
            time.sleep(0.002)
        else:
            log = out / "train_log.jsonl"
            if log.exists() and len(read_jsonl(log)) >= target:
                break
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, *common,
                                        "--resume_from_checkpoint", "latest"))
    _assert_same_weights(out, reference)
    assert not [n for n in os.listdir(out / "checkpoints") if n.endswith(".partial")]
    steps = [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 61))  # each step logged once, although some ran twice


# --- a damaged newest checkpoint ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage_kind", ["truncated", "overwritten"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(student_dir, squad_fixture_path, tmp_path,
                                                               damage_kind):
    common = ["--max_train_steps", 8, "--checkpointing_steps", 2, "--checkpoints_total_limit", 0]
    finished = tmp_path / "finished"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, finished, *common))
    damaged, reference = tmp_path / "damaged", tmp_path / "reference"
    shutil.copytree(finished, damaged)
    shutil.copytree(finished, reference)
    shutil.rmtree(reference / "checkpoints" / "step_00000008")  # what the fallback must be equal to

    weights = damaged / "checkpoints" / "step_00000008" / "model.safetensors"
    data = weights.read_bytes()
    if damage_kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:  # 4 KB of garbage in place, size unchanged
        weights.write_bytes(data[:-8192] + os.urandom(4096) + data[-4096:])
    assert damage(str(weights.parent), read_json(weights.parent / STATE_FILE)["files"])

    proc = launch("train_prediction.py", _args(student_dir, squad_fixture_path, damaged, *common,
                                               "--resume_from_checkpoint", "latest"))
    log = proc.stdout + proc.stderr
    assert "step_00000008 is damaged: model.safetensors" in log and "Trying an older one" in log
    assert "step_00000006, the newest intact checkpoint" in log
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, reference, *common,
                                        "--resume_from_checkpoint", "latest"))
    for tensor in _weights(damaged).values():
        assert tensor.isfinite().all()
    _assert_same_weights(damaged, reference, tol=0.0)

    # nothing intact at all: a clear error naming each checkpoint, and no training
    for path in (damaged / "checkpoints").iterdir():
        (path / "model.safetensors").write_bytes(b"")
    proc = launch("train_prediction.py", _args(student_dir, squad_fixture_path, damaged, *common,
                                               "--resume_from_checkpoint", "latest"), check=False)
    assert proc.returncode != 0 and "No intact checkpoint to resume from" in proc.stderr
    assert "step_00000002: model.safetensors has 0 bytes" in proc.stderr


# --- the teacher pass does not change what training draws ----------------------------------------------------------
def test_same_seed_same_student_with_cold_or_warm_teacher_cache(student_dir, tiny_bert_qa_dir, squad_fixture_path,
                                                                tmp_path):
    common = ["--max_train_steps", 6]
    cold = tmp_path / "cold"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, cold, *common, teacher=tiny_bert_qa_dir,
                                        cache=tmp_path / "cache"))
    warm = tmp_path / "warm"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, warm, *common, teacher=tiny_bert_qa_dir,
                                        cache=tmp_path / "cache"))
    assert read_json(cold / "all_results.json")["teacher_cache_hit"] is False
    assert read_json(warm / "all_results.json")["teacher_cache_hit"] is True
    _assert_same_weights(cold, warm, tol=0.0)

    # a cache filled by two processes serves the same student to one
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, tmp_path / "fill2", "--max_train_steps", 1,
                                        teacher=tiny_bert_qa_dir, cache=tmp_path / "cache2"), processes=2)
    from2 = tmp_path / "from2"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, from2, *common, teacher=tiny_bert_qa_dir,
                                        cache=tmp_path / "cache2"))
    assert read_json(from2 / "all_results.json")["teacher_cache_hit"] is True
    _assert_same_weights(cold, from2, tol=1e-6)


def test_a_damaged_or_unwritable_teacher_cache_costs_no_run_across_two_processes(student_dir, tiny_bert_qa_dir,
                                                                                 squad_fixture_path, tmp_path):
    common, cache = ["--max_train_steps", 3], tmp_path / "cache"
    first = tmp_path / "first"
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, first, *common, teacher=tiny_bert_qa_dir,
                                        cache=cache), processes=2)
    (key,) = [d for d in os.listdir(cache) if not d.startswith(".")]
    end_file = cache / key / "end_logits.npy"
    np.save(end_file, np.load(end_file)[::-1].copy())  # the rows reversed: a valid array of the right shape

    # both processes find the entry damaged, recompute it together, and train the student the intact entry trains
    again = tmp_path / "again"
    proc = launch("train_prediction.py", _args(student_dir, squad_fixture_path, again, *common,
                                               teacher=tiny_bert_qa_dir, cache=cache), processes=2)
    assert f"cache entry {cache / key} is damaged (end_logits.npy does not match its checksum)" in proc.stderr
    assert read_json(again / "all_results.json")["teacher_cache_hit"] is False
    _assert_same_weights(first, again, tol=1e-6)
    assert read_json(cache / key / "meta.json")["checksums"]  # replaced by an intact entry
    assert sorted(os.listdir(cache)) == [key]

    # a cache dir that cannot be created: said before the pass, the logits are kept in memory, the run finishes
    (tmp_path / "a_file").write_text("")
    nowhere = tmp_path / "a_file" / "cache"
    proc = launch("train_prediction.py", _args(student_dir, squad_fixture_path, tmp_path / "memory", *common,
                                               teacher=tiny_bert_qa_dir, cache=nowhere), processes=2)
    output = proc.stdout + proc.stderr
    assert f"cannot write to the cache dir {nowhere}" in output and "kept in memory (not cached)" in output
    assert output.index("cannot write to the cache dir") < output.index("cache miss; running")
    _assert_same_weights(first, tmp_path / "memory", tol=1e-6)


# --- a full disk -------------------------------------------------------------------------------------------------
def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays_intact(student_dir, squad_fixture_path,
                                                                            tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"this test mounts a 3 MB tmpfs and needs root for it: {proc.stderr.strip()}"
    try:
        out = mount / "run"
        proc = launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, "--max_train_steps", 40,
                                                   "--checkpointing_steps", 1, "--checkpoints_total_limit", 0),
                      check=False)
        assert proc.returncode != 0
        assert "No space left on device writing a checkpoint to" in proc.stderr and str(out) in proc.stderr
        kept = sorted(os.listdir(out / "checkpoints"))
        assert kept and not [n for n in kept if n.endswith(".partial")]
        newest = out / "checkpoints" / kept[-1]
        assert damage(str(newest), read_json(newest / STATE_FILE)["files"]) is None
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- preemption under every launcher -------------------------------------------------------------------------------
def _launcher_cmd(kind: str, args: list) -> tuple[list[str], dict]:
    env = script_env()
    if kind == "torchrun":
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port())]
    elif kind == "accelerate_2":  # accelerate launch starts 2 CPU processes through torch's agent with DeepSpeed
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO_ROOT / "accelerate_configs" / "deepspeed_zero2.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(free_port())]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG)]
    return [sys.executable, str(REPO_ROOT / "launch.py"), *cmd, str(REPO_ROOT / "train_prediction.py"),
            *map(str, args)], env


@pytest.mark.parametrize("kind, target, sig", [
    ("torchrun", "launcher", signal.SIGUSR1),   # plain torchrun dies of it and orphans its workers
    ("torchrun", "launcher", signal.SIGTERM),   # plain torchrun exits 1 with a traceback, SIGKILLs after 30 s
    ("torchrun", "group", signal.SIGTERM),      # plain torchrun's workers are in other sessions: never reached
    ("torchrun", "worker", signal.SIGUSR1),     # one rank signalled: all save the same step
    ("accelerate", "launcher", signal.SIGTERM),  # plain accelerate launch dies and orphans the script
    ("accelerate_2", "launcher", signal.SIGUSR1),  # 2 processes: accelerate runs torch's agent in-process
    ("accelerate_2", "group", signal.SIGTERM),
    ("accelerate", "wrapper", signal.SIGUSR1),
])
def test_preemption_signal_anywhere_saves_once_and_exits_0(student_dir, squad_fixture_path, tmp_path, kind, target,
                                                           sig):
    out = tmp_path / "run"
    args = _args(student_dir, squad_fixture_path, out, "--num_train_epochs", 200)
    cmd, env = _launcher_cmd(kind, args)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wrapper = psutil.Process(proc.pid)
    log, deadline = out / "train_log.jsonl", time.time() + 300
    while not (log.exists() and len(read_jsonl(log)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the signal"
        time.sleep(0.1)
    launcher = wrapper.children()[0]
    workers = launcher.children()
    assert len(workers) == (1 if kind == "accelerate" else 2)
    everyone = [wrapper, launcher, *workers]
    if target == "wrapper":
        wrapper.send_signal(sig)
    elif target == "launcher":
        launcher.send_signal(sig)
    elif target == "group":
        os.killpg(proc.pid, sig)
    else:
        workers[-1].send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert f"Preempted by {signal.Signals(sig).name}" in output or "Preempted by a signal on another process" in output
    assert "Traceback" not in output and "SignalException" not in output
    gone, alive = psutil.wait_procs(everyone, timeout=10)
    assert not alive, f"left running: {alive}"
    record = read_json(out / "preempted.json")
    assert record["status"] == "preempted" and os.path.isfile(os.path.join(record["checkpoint"], STATE_FILE))
    assert len(os.listdir(out / "checkpoints")) == 1  # one checkpoint, saved by every rank at the same step
    assert not (out / "all_results.json").exists()


@pytest.mark.parametrize("kind", ["accelerate", "torchrun"])
def test_workers_whose_launch_was_killed_save_once_and_stop(student_dir, squad_fixture_path, tmp_path, kind):
    """kill -9 of launch.py (no handler of it runs, as when pipeline.py above it is killed with its group): the
    launcher gets SIGTERM as the wrapper dies, and workers whose launch is gone save one checkpoint and exit
    rather than train on unseen beside a rerun."""
    out = tmp_path / "run"
    cmd, env = _launcher_cmd(kind, _args(student_dir, squad_fixture_path, out, "--num_train_epochs", 200))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wrapper = psutil.Process(proc.pid)
    log, deadline = out / "train_log.jsonl", time.time() + 300
    while not (log.exists() and len(read_jsonl(log)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before the kill"
        time.sleep(0.1)
    everyone = [wrapper, *wrapper.children(recursive=True)]
    assert len(everyone) == (3 if kind == "accelerate" else 4)
    wrapper.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(everyone, timeout=120)
    output = proc.stdout.read()
    assert not alive, f"left running: {alive}\n{output[-3000:]}"
    # accelerate launch passes its SIGTERM on; torch's agent dies of it and the workers see their launch gone
    assert ("Preempted by SIGTERM" if kind == "accelerate" else "Preempted by the end of its launcher") in output, \
        output[-3000:]
    record = read_json(out / "preempted.json")
    assert record["status"] == "preempted" and os.path.isfile(os.path.join(record["checkpoint"], STATE_FILE))
    assert len(os.listdir(out / "checkpoints")) == 1 and not (out / "all_results.json").exists()


def test_resuming_a_finished_run_trains_no_extra_step(student_dir, squad_fixture_path, tmp_path):
    """A requeued job that finished just before its requeue reruns the same command: nothing more is trained."""
    out = tmp_path / "done"
    common = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest"]
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, *common))
    before = _weights(out)
    launch("train_prediction.py", _args(student_dir, squad_fixture_path, out, *common))
    results = read_json(out / "all_results.json")
    assert results["state"]["completed_steps"] == 4 and results["train_metrics"]["completed_steps"] == 4
    after = _weights(out)
    assert all((before[k] - after[k]).abs().max() == 0 for k in before)
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "train/loss" in r] == [1, 2, 3, 4]

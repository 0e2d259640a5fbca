"""pipeline.py end to end on a tiny recipe: every stage chained, skipped when done, resumed after a signal; one
pipeline per output dir, nothing left running when it is killed, every recipe problem found before anything runs."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from safetensors.torch import load_file

import pipeline
from kd.pipeline import (ACCELERATE_LAUNCH, PREEMPTED_EXIT, RecipeError, changed_outputs, fingerprint,
                         load_recipe, same_command)
from tests.conftest import FIXTURES_DIR, fixture_texts
from tests.helpers import REPO_ROOT, read_json, read_jsonl, script_env

WINDOW = {"max_seq_length": 128, "doc_stride": 48, "max_query_length": 32}


@pytest.fixture(scope="module")
def tiny_glove(tmp_path_factory):
    """Random 8-d vectors for every fixture word: GloVe-only augmentation has neighbours to pick."""
    import numpy as np

    words = sorted({w.lower() for t in fixture_texts() for w in t.replace(".", " ").split() if w.isalpha()})
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("glove") / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(f'{x:.4f}' for x in rng.normal(size=8))}\n" for w in words))
    return path


def _recipe(tmp_path, teacher_base, glove, name="recipe", **changes) -> str:
    squad = str(FIXTURES_DIR / "squad_v2_dev_slice.json")
    train = dict(per_device_train_batch_size=8, learning_rate=1e-3, seed=3, keep_checkpoints="none", **WINDOW)
    stages = {
        "teacher": dict(model_name_or_path=str(teacher_base), train_file=squad, max_train_steps=4, **train),
        "student_init": dict(teacher_name_or_path="${teacher}", layers="2"),
        "general": dict(teacher_name_or_path="${teacher}", model_name_or_path="${student_init}",
                        train_file=str(FIXTURES_DIR / "wiki_leads_sample.txt"), max_seq_length=64, max_train_steps=3,
                        per_device_train_batch_size=4, learning_rate=1e-3, seed=3, keep_checkpoints="none"),
        "augment": dict(train_file=squad, glove_only=True, glove_path=str(glove), multiplication_factor=1,
                        word_possibilities=3, seed=3),
        "task_intermediate": dict(model_name_or_path="${general}", teacher_name_or_path="${teacher}",
                                  train_file="${augment}", max_train_steps=4, **train),
        "prediction": dict(model_name_or_path="${task_intermediate}", teacher_name_or_path="${teacher}",
                           train_file=squad, validation_file=squad, temperature=2, max_train_steps=40,
                           checkpointing_steps=1, **{**train, "keep_checkpoints": "last"}),
        # the comparisons: the same init without a teacher, and with prediction-layer distillation alone
        "student_nokd": dict(model_name_or_path="${student_init}", train_file=squad, validation_file=squad,
                             max_train_steps=3, **train),
        "student_kd": dict(model_name_or_path="${student_init}", teacher_name_or_path="${teacher}", train_file=squad,
                           validation_file=squad, temperature=2, max_train_steps=3, **train),
        # the small student: the recipe's with a pruned vocabulary, taught across tokenizers
        "student_pruned_init": dict(teacher_name_or_path="${task_intermediate}", prune_vocab_file=squad,
                                    vocab_size=400),
        "student_pruned": dict(model_name_or_path="${student_pruned_init}", teacher_name_or_path="${teacher}",
                               train_file=squad, validation_file=squad, temperature=2, max_train_steps=3, **train),
        "evaluate": dict(model_name_or_path="${prediction}", validation_file=squad, **WINDOW),
        "report": dict(models=["teacher=${teacher}", "student_nokd=${student_nokd}", "student_kd=${student_kd}",
                               "student=${prediction}", "student_pruned=${student_pruned}"], validation_file=squad,
                       warmup_batches=1, timing_batches=2, **WINDOW),
    }
    for key, value in changes.items():
        stage, flag = key.split("__")
        stages[stage][flag] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"launch": "accelerate_configs/cpu.yaml", "stages": stages}, sort_keys=False))
    return str(path)


def _run(*argv, check=True, **env):
    env = {**script_env(), "KD_CACHE": str(argv[argv.index("--output_dir") + 1]) + "_cache", **env}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline.py"), *map(str, argv)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_pipeline_runs_every_stage_chained_then_skips_and_resumes(tiny_bert_qa_dir, tiny_glove, tmp_path):
    recipe = _recipe(tmp_path, tiny_bert_qa_dir, tiny_glove)
    out = tmp_path / "run"

    # dry run: the commands, nothing run or written
    dry = _run("--recipe", recipe, "--output_dir", out, "--dry_run")
    assert not out.exists() and dry.stdout.count("\n# ") + dry.stdout.startswith("# ") == len(pipeline.STAGES)

    _run("--recipe", recipe, "--output_dir", out)
    record = read_json(out / "pipeline.json")["stages"]
    assert list(record) == list(pipeline.STAGES) and all(s["status"] == "finished" for s in record.values())
    # outputs chained: each stage read what the one before wrote
    assert read_json(out / "student_init" / "student_origin.json")["teacher"] == str(out / "teacher")
    assert read_json(out / "task_intermediate" / "run_config.json")["args"]["train_file"] == str(
        out / "augment" / "train-aug.json")
    assert read_json(out / "prediction" / "run_config.json")["args"]["model_name_or_path"] == str(
        out / "task_intermediate")
    assert read_json(out / "student_nokd" / "run_config.json")["args"]["teacher_name_or_path"] is None
    assert read_json(out / "student_kd" / "run_config.json")["args"]["model_name_or_path"] == str(out / "student_init")
    assert [r["model"] for r in read_json(out / "report" / "report.json")["rows"]] == [
        "teacher", "student_nokd", "student_kd", "student", "student_pruned"]
    pruned = read_json(out / "student_pruned" / "all_results.json")
    assert pruned["teacher_tokenization"].startswith("differs")  # 400 of the teacher's tokens: the cross path
    assert read_json(out / "student_pruned_init" / "student_origin.json")["teacher"] == str(out / "task_intermediate")
    assert record["evaluate"]["metrics"]["f1"] == pytest.approx(read_json(out / "evaluate" / "eval_results.json")["f1"],
                                                                abs=0.01)
    # commands.sh holds exactly what ran
    lines = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith(sys.executable)]
    assert lines == [" ".join(s["command"]) for s in record.values()]
    assert lines == [line for line in dry.stdout.splitlines() if line.startswith(sys.executable)]

    # a second run skips everything
    again = _run("--recipe", recipe, "--output_dir", out)
    assert again.stdout.count("finished before: skipped") == len(pipeline.STAGES)
    assert read_json(out / "pipeline.json")["stages"] == record

    # a changed setting of a finished stage: a clear error naming it, nothing run
    changed = _recipe(tmp_path, tiny_bert_qa_dir, tiny_glove, "changed", prediction__temperature=4)
    proc = _run("--recipe", changed, "--output_dir", out, check=False)
    assert proc.returncode == 2 and "stage prediction ran with other settings (--temperature: 2 -> 4)" in proc.stderr
    assert "--rerun prediction" in proc.stderr

    # SIGTERM in the middle of the prediction stage, then the same command: the final student of an uninterrupted run
    interrupted = tmp_path / "interrupted"
    env = {**script_env(), "KD_CACHE": str(interrupted) + "_cache"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "pipeline.py"), "--recipe", recipe, "--output_dir",
                             str(interrupted)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpoints, deadline = interrupted / "prediction" / "checkpoints", time.time() + 600
    while not (checkpoints.is_dir() and any(n.startswith("step_") and not n.endswith(".partial")
                                            for n in os.listdir(checkpoints))):
        assert proc.poll() is None and time.time() < deadline, "the prediction stage ended before the signal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
    assert read_json(interrupted / "pipeline.json")["stages"]["prediction"]["status"] == "preempted"
    _run("--recipe", recipe, "--output_dir", interrupted)
    a = load_file(interrupted / "prediction" / "model.safetensors")
    b = load_file(out / "prediction" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)


@pytest.mark.slow
def test_recipe_errors_before_anything_runs(tiny_bert_qa_dir, tiny_glove, tmp_path):
    recipe = _recipe(tmp_path, tiny_bert_qa_dir, tiny_glove, prediction__no_such_flag=1, teacher__max_seq_length=600)
    proc = _run("--recipe", recipe, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "stage prediction: train_prediction.py has no --no_such_flag" in proc.stderr
    assert "stage teacher (train_prediction.py): " in proc.stderr and "exceeds the 512 positions" in proc.stderr
    assert not (tmp_path / "out" / "teacher").exists()

    data = yaml.safe_load(open(recipe))
    del data["stages"]["teacher"]
    (tmp_path / "no_teacher.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"names \$\{teacher\}, but the recipe has no teacher stage"):
        load_recipe(str(tmp_path / "no_teacher.yaml"))
    with pytest.raises(RecipeError, match="unknown stage"):
        load_recipe(recipe, ["distill.temperature=2"])
    with pytest.raises(RecipeError, match="set by the pipeline"):
        load_recipe(recipe, ["prediction.output_dir=x"])


# --- the recipe and the record, checked whole before anything runs (fast: nothing trains) --------------------------
def test_every_problem_of_every_stage_is_listed_before_anything_runs(tiny_bert_qa_dir, tiny_glove, tmp_path):
    """Later stages' inputs do not exist yet: their types, choices, references and launch configs are checked all
    the same, and every problem is listed in one go."""
    recipe = _recipe(tmp_path, tiny_bert_qa_dir, tiny_glove, prediction__max_train_steps="many",
                     student_kd__keep_checkpoints="sometimes", student_nokd__model_name_or_path="${student_init.model}",
                     evaluate__model_name_or_path="${nosuch}", task_intermediate__launch="accelerate_configs/nope.yaml",
                     general__layer_map={"a": 1})
    out = tmp_path / "out"
    proc = _run("--recipe", recipe, "--output_dir", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for expected in ("stage prediction (train_prediction.py): argument --max_train_steps: invalid positive_int value: 'many'",
                     "stage student_kd (train_prediction.py): argument --keep_checkpoints: invalid choice: 'sometimes'",
                     "stage student_nokd: ${student_init.model} names no stage",
                     "stage evaluate: ${nosuch} names no stage",
                     "stage task_intermediate: cannot read its launch config",
                     "stage general: layer_map: a dict is no script argument"):
        assert expected in proc.stderr, proc.stderr
    assert sorted(os.listdir(out)) == ["pipeline.lock"]  # no stage ran, nothing recorded


def test_every_missing_input_of_every_stage_is_listed_once(tiny_bert_qa_dir, tiny_glove, tmp_path):
    """What the user brings (data, vectors), checked across all stages in one run: each missing file once, named
    with its stage and script, not just the first one the first script's parser meets."""
    recipe = _recipe(tmp_path, tiny_bert_qa_dir, tiny_glove, teacher__train_file="data/no-train-v2.0.json",
                     augment__train_file="data/no-train-v2.0.json", augment__glove_path="data/no-glove.6B.300d.txt")
    proc = _run("--recipe", recipe, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for expected in ("stage teacher (train_prediction.py): --train_file data/no-train-v2.0.json does not exist",
                     "stage augment (augment.py): --train_file data/no-train-v2.0.json does not exist",
                     "stage augment (augment.py): --glove_path data/no-glove.6B.300d.txt does not exist"):
        assert proc.stderr.count(expected) == 1, proc.stderr
    assert proc.stderr.count("stage augment") == 2 and proc.stderr.count("stage teacher") == 1, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr  # pipeline.py's, not a script's inside it
    dry = _run("--recipe", recipe, "--output_dir", tmp_path / "out", "--dry_run")
    assert ("# not there yet, to bring before running: stage augment (augment.py): --train_file "
            "data/no-train-v2.0.json, --glove_path data/no-glove.6B.300d.txt") in dry.stdout


@pytest.mark.parametrize("text, expected", [
    ("stages: {teacher: [1\n", "is not valid YAML"),
    ("stages:\n  - teacher\n  - prediction\n", "'stages' is a list"),
    ("- stages\n", "a recipe is a mapping"),
    ("stages:\n  teacher: 3\n", "stage teacher: its arguments are a int"),
])
def test_a_malformed_recipe_is_one_line_and_exit_2(tmp_path, text, expected):
    (tmp_path / "r.yaml").write_text(text)
    proc = _run("--recipe", tmp_path / "r.yaml", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("pipeline.py: error: ") and expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


@pytest.mark.parametrize("record", ['{"stages": {"teacher": {"status": "fini', '[1, 2]'])
def test_an_unreadable_pipeline_json_is_one_line_and_exit_2(tiny_bert_qa_dir, tiny_glove, tmp_path, record):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pipeline.json").write_text(record)
    proc = _run("--recipe", _recipe(tmp_path, tiny_bert_qa_dir, tiny_glove), "--output_dir", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"pipeline.py: error: {out / 'pipeline.json'}, the record of what ran, is "
                                  "unreadable")
    assert len(proc.stderr.strip().splitlines()) == 1 and (out / "pipeline.json").read_text() == record


def test_fingerprint_sees_content_not_times(tmp_path):
    stage = tmp_path / "teacher"
    stage.mkdir()
    (stage / "all_results.json").write_text('{"status": "finished"}')
    (stage / "model.safetensors").write_bytes(b"w" * 1000)
    (stage / "config.json").write_text("{}")
    (stage / "train_log.jsonl").write_text("{}\n")  # not read by later stages: not part of it
    recorded = fingerprint("teacher", str(tmp_path))
    assert sorted(recorded) == ["all_results.json", "config.json", "model.safetensors"]
    assert changed_outputs("teacher", str(tmp_path), recorded)[0] == []
    os.utime(stage / "model.safetensors", ns=(1, 1))  # copied without its times: same output
    changes, now = changed_outputs("teacher", str(tmp_path), recorded)
    assert changes == [] and now["model.safetensors"]["mtime_ns"] == 1
    assert now["model.safetensors"]["sha256"] == recorded["model.safetensors"]["sha256"]
    (stage / "model.safetensors").write_bytes(b"x" * 1000)  # same size, other weights
    assert changed_outputs("teacher", str(tmp_path), recorded)[0][0].startswith("model.safetensors: other content")
    (stage / "model.safetensors").write_bytes(b"w" * 10)  # truncated
    assert changed_outputs("teacher", str(tmp_path), recorded)[0] == ["model.safetensors: 10 bytes, was 1000"]
    os.remove(stage / "config.json")
    assert "config.json: missing" in changed_outputs("teacher", str(tmp_path), recorded)[0]


# --- one pipeline per output dir; signals and kills --------------------------------------------------------------
def _small_recipe(tmp_path, teacher_base, steps=30, name="small") -> str:
    """A teacher trained ``steps`` steps (a checkpoint and a log line each), then a student cut from it."""
    squad = str(FIXTURES_DIR / "squad_v2_dev_slice.json")
    stages = {"teacher": dict(model_name_or_path=str(teacher_base), train_file=squad, max_train_steps=steps,
                              checkpointing_steps=1, logging_steps=1, keep_checkpoints="last",
                              per_device_train_batch_size=4, learning_rate=1e-3, seed=3, **WINDOW),
              "student_init": dict(teacher_name_or_path="${teacher}", layers="2")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"launch": "accelerate_configs/cpu.yaml", "stages": stages}, sort_keys=False))
    return str(path)


def _start(recipe, out, **env):
    env = {**script_env(), "KD_CACHE": str(out) + "_cache", **env}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "pipeline.py"), "--recipe", recipe, "--output_dir",
                             str(out)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the pipeline ended before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _losses(log) -> list[int]:
    try:
        return [r["step"] for r in read_jsonl(log) if "train/loss" in r]
    except (OSError, ValueError):  # not there yet, or a line half-written
        return []


@pytest.mark.slow
def test_a_killed_pipeline_leaves_no_trainer_behind_and_one_pipeline_holds_a_dir(tiny_bert_qa_dir, tmp_path):
    # enough steps that the teacher is still training after the second pipeline's start-up (seconds) below
    steps = 120
    recipe = _small_recipe(tmp_path, tiny_bert_qa_dir, steps=steps)
    out = tmp_path / "killed"
    first = _start(recipe, out)
    log = out / "teacher" / "train_log.jsonl"
    _wait_for(lambda: len(_losses(log)) >= 3, first, "3 training steps")
    stage = psutil.Process(first.pid).children(recursive=True)  # the teacher's: launch.py, accelerate, the script
    assert len(stage) >= 3, stage

    # a second pipeline on the same dir is refused at once, naming the first
    second = _run("--recipe", recipe, "--output_dir", out, check=False)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"is in use by another run (pid {first.pid} " in second.stderr

    # kill -9 of the pipeline while the teacher trains: its stage stops with it
    assert all(p.is_running() for p in stage) and len(_losses(log)) < steps, "the teacher ended before the kill"
    first.kill()
    first.communicate()
    lock = os.open(out / "pipeline.lock", os.O_RDWR)
    try:  # the dir stays taken while the stage ends (it saves a checkpoint): a rerun cannot start beside it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not [p for p in stage if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    except BlockingIOError:
        pass
    finally:
        os.close(lock)
    gone, alive = psutil.wait_procs(stage, timeout=120)
    assert not alive, f"left running after the pipeline was killed: {alive}"

    # the rerun, with the venv's bin not on PATH (the stage calls accelerate through this interpreter): each step
    # trained and logged once, and the teacher of an uninterrupted run
    _run("--recipe", recipe, "--output_dir", out, PATH="/usr/bin:/bin")
    assert _losses(log) == list(range(1, steps + 1))
    _run("--recipe", recipe, "--output_dir", tmp_path / "uninterrupted", PATH="/usr/bin:/bin")
    a, b = (load_file(d / "teacher" / "model.safetensors") for d in (out, tmp_path / "uninterrupted"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` installed (Linux: SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.slow
def test_a_signal_before_or_after_a_stage_stops_the_pipeline_before_the_next(tiny_bert_qa_dir, tmp_path):
    recipe = _small_recipe(tmp_path, tiny_bert_qa_dir, steps=3)

    # SIGTERM as soon as the pipeline can hear it, while it checks the recipe: no stage starts
    out = tmp_path / "early"
    proc = _start(recipe, out)
    _wait_for(lambda: _catches(proc.pid, signal.SIGTERM), proc, "a SIGTERM handler")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "pipeline.py: stopped on SIGTERM before stage teacher; rerun the same command to continue." in output
    assert not (out / "teacher").exists()

    # SIGINT (Ctrl-C) once the teacher wrote its results: the student is not started
    out = tmp_path / "late"
    proc = _start(recipe, out)
    _wait_for(lambda: (out / "teacher" / "all_results.json").exists(), proc, "the teacher's results")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT and "rerun the same command to continue" in output, output[-3000:]
    assert "Traceback" not in output and list(read_json(out / "pipeline.json")["stages"]) == ["teacher"]
    assert not (out / "student_init").exists()


@pytest.mark.slow
def test_a_changed_or_missing_output_reruns_its_stage_and_every_one_after(tiny_bert_qa_dir, tmp_path):
    recipe = _small_recipe(tmp_path, tiny_bert_qa_dir, steps=2)
    out = tmp_path / "run"
    _run("--recipe", recipe, "--output_dir", out)
    weights = out / "teacher" / "model.safetensors"
    before = {k: v.clone() for k, v in load_file(weights).items()}  # not the mapped file, truncated below
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size // 2])  # truncated (a full disk, a copy cut short)

    proc = _run("--recipe", recipe, "--output_dir", out)
    assert (f"[teacher] runs again: its output changed since it finished (model.safetensors: {size // 2} bytes, "
            f"was {size})") in proc.stdout
    assert "[student_init] runs again: it comes after teacher, which runs again" in proc.stdout
    assert "skipped" not in proc.stdout
    after = load_file(weights)
    assert after.keys() == before.keys() and all((after[k] - before[k]).abs().max() <= 1e-6 for k in after)

    shutil.rmtree(out / "student_init")  # deleted: it runs again, the teacher it reads is kept
    proc = _run("--recipe", recipe, "--output_dir", out)
    assert "[teacher] finished before: skipped" in proc.stdout
    assert "[student_init] runs again: its output changed since it finished (student_init/: missing)" in proc.stdout
    assert all(s["status"] == "finished" for s in read_json(out / "pipeline.json")["stages"].values())


def test_a_command_recorded_before_the_process_flags_is_the_same_when_the_layout_is_the_config_s(tmp_path):
    """Records written before the pipeline passed --num_processes/--num_machines ran with the launch config's
    layout: the same command if the new layout is that one, another one otherwise."""
    config = tmp_path / "c.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\nnum_machines: 1\n")
    old = [sys.executable, "launch.py", *ACCELERATE_LAUNCH, "--config_file", str(config), "train.py", "--seed", "1"]

    def new(processes, seed="1"):
        return [sys.executable, "launch.py", *ACCELERATE_LAUNCH, "--config_file", str(config), "--num_processes",
                str(processes), "--num_machines", "1", "train.py", "--seed", seed]
    assert same_command(old, new(8))
    assert not same_command(old, new(4))
    assert not same_command(old, new(8, seed="2"))
    assert same_command(new(4), new(4)) and not same_command(new(8), new(4))


def test_a_command_recorded_with_accelerate_from_path_is_the_same_command():
    """Stages call accelerate through the pipeline's interpreter (its venv need not be on PATH); a run recorded
    when they called `accelerate launch` from PATH is not taken for one with other settings."""
    new = [sys.executable, "launch.py", *ACCELERATE_LAUNCH, "--config_file", "c.yaml", "train.py", "--seed", "1"]
    assert ACCELERATE_LAUNCH == (sys.executable, "-m", "accelerate.commands.launch")
    assert same_command([sys.executable, "launch.py", "accelerate", "launch", "--config_file", "c.yaml", "train.py",
                         "--seed", "1"], new)
    assert not same_command([sys.executable, "launch.py", "accelerate", "launch", "--config_file", "c.yaml",
                             "train.py", "--seed", "2"], new)


@pytest.mark.slow
def test_a_prediction_stage_distils_across_tokenizers(tiny_bert_qa_dir, tiny_roberta_qa_dir, tmp_path):
    """A WordPiece teacher used as is, a byte-level BPE student: the recipe check lets it through and the stage
    trains on the carried distributions."""
    recipe = tmp_path / "cross.yaml"
    fixture = str(FIXTURES_DIR / "squad_v2_dev_slice.json")
    recipe.write_text(yaml.safe_dump({"launch": "accelerate_configs/cpu.yaml", "stages": {
        "teacher": {"use": str(tiny_bert_qa_dir)},
        "prediction": {"model_name_or_path": str(tiny_roberta_qa_dir), "teacher_name_or_path": "${teacher}",
                       "train_file": fixture, "max_train_steps": 2, "max_train_samples": 16,
                       "per_device_train_batch_size": 8, "temperature": 2, "teacher_max_seq_length": 160,
                       **WINDOW}}}))
    out = tmp_path / "run"
    _run("--recipe", recipe, "--output_dir", out)
    results = read_json(out / "prediction" / "all_results.json")
    assert results["status"] == "finished" and results["teacher_tokenization"].startswith("differs")
    assert read_json(out / "pipeline.json")["stages"]["prediction"]["status"] == "finished"


# --- what the terminal shows while stages run, and at the end ------------------------------------------------------
def test_progress_shows_the_latest_bar_of_a_growing_log(tmp_path, monkeypatch):
    import io

    log = tmp_path / "stage.log"
    log.write_bytes(b"")
    shown = io.StringIO()
    with open(log, "rb") as reader:
        progress = pipeline.Progress("teacher", reader, shown)
        with open(log, "ab") as writer:
            writer.write(b"loading\n\r  0%|          | 0/200 [00:00<?, ?it/s]\r 10%|#         | 20/200 [00:02<00:18]")
            writer.flush()
            progress.poll()  # the first bar shows at once
            writer.write(b"\r 20%|##        | 40/200 [00:04<00:16]\r 30%|###       | 60/200 [00:06<00:14]")
            writer.flush()
            progress.poll()  # not yet PROGRESS_EVERY_S later: nothing
            monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0)
            writer.write(b"\r100%|##########| 200/200 [00:20<00:00]\nsaved\n")
            writer.flush()
            progress.close()
    assert shown.getvalue().splitlines() == ["[teacher] 10%|#         | 20/200 [00:02<00:18]",
                                             "[teacher] 100%|##########| 200/200 [00:20<00:00]"]


@pytest.mark.slow
def test_a_pipeline_shows_its_stages_progress_and_names_the_student_and_how_to_try_it(tiny_bert_qa_dir, tmp_path):
    squad = str(FIXTURES_DIR / "squad_v2_dev_slice.json")
    train = dict(per_device_train_batch_size=8, learning_rate=1e-3, seed=3, keep_checkpoints="none", **WINDOW)
    stages = {"teacher": dict(model_name_or_path=str(tiny_bert_qa_dir), train_file=squad, max_train_steps=3, **train),
              "prediction": dict(model_name_or_path=str(tiny_bert_qa_dir), teacher_name_or_path="${teacher}",
                                 train_file=squad, max_train_steps=3, **train)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"launch": "accelerate_configs/cpu.yaml", "stages": stages}))
    out = tmp_path / "run"
    proc = _run("--recipe", recipe, "--output_dir", out)
    lines = proc.stdout.splitlines()
    assert f"[teacher] its whole output: {out / 'teacher' / 'stage.log'}" in lines
    bars = [line for line in lines if line.startswith("[prediction] ") and "3/3 [" in line and "100%|" in line]
    assert bars, proc.stdout  # the training loop's bar, forwarded from the stage's log
    assert "100%|" in (out / "prediction" / "stage.log").read_text()  # the log keeps everything
    student, try_it = lines[-2:]
    assert student.startswith(f"student: {out / 'prediction'}"), proc.stdout
    assert try_it.startswith("try: python predict.py --model_name_or_path "), try_it
    answer = subprocess.run(try_it[len("try: "):], shell=True, cwd=REPO_ROOT, env=script_env(), capture_output=True,
                            text=True, timeout=300)
    assert answer.returncode == 0 and '"answer"' in answer.stdout, answer.stderr[-2000:]

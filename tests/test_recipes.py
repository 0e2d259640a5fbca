"""The committed recipes: every stage's every key is a flag of that stage's script, and they resolve."""

from __future__ import annotations

import glob
import os

import pytest

import pipeline
from kd.pipeline import RecipeError, argv_flags, command, load_recipe
from tests.helpers import REPO_ROOT

RECIPES = sorted(glob.glob(str(REPO_ROOT / "recipes" / "*.yaml")))


def test_there_are_the_three_recipes():
    assert [os.path.basename(r) for r in RECIPES] == ["minilm-offline.yaml", "tinybert6-squad2.yaml",
                                                      "tinyroberta-squad2.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_keys_are_script_flags_and_refs_resolve(recipe, tmp_path):
    stages = load_recipe(recipe)
    modules = {}
    for name, stage in stages.items():
        if stage.use:
            continue
        module = modules.setdefault(stage.script, pipeline.script_module(stage.script))
        assert pipeline.unknown_flags(stage, module) == [], name
        cmd = command(stage, str(tmp_path), stages, str(REPO_ROOT))
        assert "${" not in " ".join(cmd)  # every reference resolved
        if stage.launch:
            assert os.path.isfile(REPO_ROOT / stage.launch), stage.launch


def test_offline_recipe_chains_every_stage():
    stages = load_recipe(str(REPO_ROOT / "recipes" / "minilm-offline.yaml"))
    assert list(stages) == list(pipeline.STAGES)
    assert stages["prediction"].refs == {"task_intermediate", "teacher"}
    assert stages["task_intermediate"].refs == {"general", "teacher", "augment"}
    # the small student: step 2's, pruned, then taught by the full-vocabulary teacher
    assert stages["student_pruned_init"].refs == {"task_intermediate"}
    assert stages["student_pruned"].refs == {"student_pruned_init", "teacher"}


def test_flags_of_a_command_line_and_tokenizer_check(tiny_roberta_qa_dir, tiny_bert_qa_dir):
    assert argv_flags(["py", "s.py", "--a", "1", "2", "--b", "--c", "x"]) == {"--a": ["1", "2"], "--b": [], "--c": ["x"]}
    student = ["s.py", "--model_name_or_path", str(tiny_roberta_qa_dir), "--teacher_name_or_path"]
    problems = pipeline.tokenizer_mismatch("task_intermediate", student + [str(tiny_bert_qa_dir)])
    assert len(problems) == 1 and "stage task_intermediate: the student" in problems[0]
    assert "tokenize differently" in problems[0]
    assert pipeline.tokenizer_mismatch("task_intermediate", student + [str(tiny_roberta_qa_dir)]) == []
    assert pipeline.tokenizer_mismatch("task_intermediate", student) == []  # a flag without its value: the script decides


# --- processes and global batch: from the machine or pipeline.py's flags (dry runs: nothing starts) ----------------
TINYROBERTA = str(REPO_ROOT / "recipes" / "tinyroberta-squad2.yaml")


def _dry_run(capsys, *argv) -> tuple[int, str, str]:
    code = pipeline.main(["--recipe", TINYROBERTA, "--output_dir", "runs/x", "--dry_run", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _launched(out: str) -> dict[str, dict[str, list[str]]]:
    """The flags of every launched stage's command line, by stage."""
    lines = out.splitlines()
    return {lines[i][2:].split(":")[0]: argv_flags(lines[i + 1].split()) for i in range(len(lines) - 1)
            if lines[i].startswith("# ") and ("launch.py" in lines[i + 1] or lines[i + 1].startswith("srun"))}


def _ranks(flags: dict[str, list[str]], line: str = "") -> int:
    """What a command line starts: accelerate launch's --num_processes, or srun's tasks x processes per node."""
    if "--ntasks" in line:
        tasks = int(line.split("--ntasks=")[1].split()[0])
        return tasks * int(line.split("KD_PROCS_PER_NODE=")[1].split()[0])
    return int(flags["--num_processes"][0])


@pytest.mark.parametrize("argv, gpus", [(["--num_processes", "4"], 0), ([], 4)], ids=["flag", "4-gpus-visible"])
def test_a_4_gpu_dry_run_starts_4_ranks_each_with_a_quarter_of_the_global_batch(capsys, monkeypatch, argv, gpus):
    monkeypatch.setattr(pipeline, "visible_gpus", lambda: gpus)
    code, out, err = _dry_run(capsys, *argv)
    assert code == 0, err
    launched = _launched(out)
    assert set(launched) == {"general", "augment", "task_intermediate", "prediction"}  # augment too: every GPU
    for name, flags in launched.items():
        assert flags["--num_processes"] == ["4"] and flags["--num_machines"][0] == "1", name
        if name != "augment":  # the model card's batch 96 = 24 per GPU on its 4 V100s
            assert flags["--per_device_train_batch_size"] == ["24"], name
    assert "# prediction: 4 processes" in out and "global batch 96 = 24 per device x 4 processes" in out


@pytest.mark.parametrize("argv, gpus", [(["--num_processes", "8", "--num_machines", "2"], 0),
                                        (["--num_machines", "2"], 4)], ids=["flags", "4-gpus-visible"])
def test_a_2x4_gpu_slurm_dry_run_starts_8_ranks(capsys, monkeypatch, argv, gpus):
    monkeypatch.setattr(pipeline, "visible_gpus", lambda: gpus)
    code, out, err = _dry_run(capsys, "--launcher", "slurm", *argv)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("srun")]
    assert len(lines) == 4
    for line in lines:  # slurm/node_launch.sh: accelerate launch --num_processes $((SLURM_NTASKS * KD_PROCS_PER_NODE))
        assert " --ntasks=2 env KD_PROCS_PER_NODE=4 bash " in line and _ranks({}, line) == 8
        if "augment.py" not in line:
            assert argv_flags(line.split())["--per_device_train_batch_size"] == ["12"]
    assert "8 processes on 2 machines" in out


def test_a_slurm_allocation_gives_the_machines(capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "visible_gpus", lambda: 4)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    code, out, err = _dry_run(capsys, "--launcher", "slurm")
    assert code == 0 and out.count(" --ntasks=2 env KD_PROCS_PER_NODE=4 ") == 4, err


def test_a_global_batch_that_does_not_split_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "visible_gpus", lambda: 0)
    code, out, err = _dry_run(capsys, "--num_processes", "5")
    assert code == 2 and "Traceback" not in err
    assert ("stage prediction: global_train_batch_size 96 does not split evenly over 5 processes (--num_processes) "
            "x 1 gradient accumulation step(s); pass --num_processes 4 (24 per device)") in err
    code, out, err = _dry_run(capsys, "--num_processes", "16")  # 96 / 16 = 6: fine
    assert code == 0 and _launched(out)["prediction"]["--per_device_train_batch_size"] == ["6"]
    code, out, err = _dry_run(capsys, "--num_processes", "64")
    assert code == 2 and "set prediction.gradient_accumulation_steps=" not in err  # 96 / 64: no accumulation helps
    assert "pass --num_processes 48 (2 per device)" in err


def test_several_machines_without_slurm_are_refused(capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "visible_gpus", lambda: 4)
    code, out, err = _dry_run(capsys, "--num_machines", "2")
    assert code == 2 and "several machines start through --launcher slurm" in err


def test_global_and_per_device_batch_together_are_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  prediction: {global_train_batch_size: 32, per_device_train_batch_size: 4}\n"
                      "  augment: {global_train_batch_size: 32}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(recipe))
    assert "stage prediction: give global_train_batch_size or per_device_train_batch_size, not both" in str(err.value)
    assert "stage augment: global_train_batch_size is a positive whole number of a training stage" in str(err.value)

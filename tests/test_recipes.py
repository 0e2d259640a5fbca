"""The committed recipes: every stage's every key is a flag of that stage's script, and they resolve."""

from __future__ import annotations

import glob
import os

import pytest

import pipeline
from kd.pipeline import argv_flags, command, load_recipe
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

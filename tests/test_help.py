"""Every flag of every script says what it does and, where it has one, its default, in ``--help``."""

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_general.py", "augment.py", "train_task_intermediate.py", "train_prediction.py", "evaluate.py",
           "predict.py", "make_student.py", "export_onnx.py", "report.py", "pipeline.py"]


def parser_of(script: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"help_{script[:-3]}", os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_shows_its_default(script):
    parser = parser_of(script)
    formatter = parser._get_formatter()
    missing, no_default = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        if not action.help:
            missing.append(flag)
            continue
        shown = formatter._expand_help(action)
        if action.default not in (None, argparse.SUPPRESS) and not action.required and str(action.default) not in shown:
            no_default.append(f"{flag} (default {action.default!r}: {shown!r})")
    assert not missing, f"{script}: options without help: {missing}"
    assert not no_default, f"{script}: options whose --help hides the default: {no_default}"


def test_help_shows_batch_size_and_learning_rate_defaults():
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_prediction.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    flat = " ".join(out.split())
    assert "--per_device_train_batch_size" in flat and "(default: 16)" in flat
    assert "Peak learning rate (AdamW). (default: 5e-05)" in flat
    assert "(default: linear)" in flat

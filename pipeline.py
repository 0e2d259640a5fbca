"""Run the whole distillation recipe as one resumable job: teacher, student init, general distillation,
augmentation, task-intermediate distillation, prediction-layer distillation, evaluation, report.

    python pipeline.py --recipe recipes/minilm-offline.yaml --output_dir runs/offline
    python pipeline.py --recipe recipes/tinyroberta-squad2.yaml --output_dir runs/tinyroberta --dry_run
    python pipeline.py --recipe R.yaml --output_dir D --set prediction.temperature=2 --rerun prediction

Each stage runs its own script (training stages through ``launch.py accelerate launch --config_file <launch>``),
writes under OUTPUT_DIR/<stage>, and its output is the next stage's input (kd/pipeline.py: the recipe format).
The command lines go to OUTPUT_DIR/commands.sh (``--dry_run`` prints them and runs nothing); OUTPUT_DIR/
pipeline.json records each stage's status, command, start, end, wall time and headline metrics.

Rerunning the same command is always safe: a finished stage with the same command line is skipped, an interrupted
one continues from its latest checkpoint, and a finished stage whose settings changed stops the pipeline with the
setting named (``--rerun STAGE`` redoes it and every stage after it). The whole recipe is checked before any
stage runs: stage names, every key against its script's flags, and each stage whose inputs already exist through
its script's own argument checks (paths, sequence length, layer map) and a tokenizer comparison.

Exit status: 0 all selected stages finished; 75 a stage stopped on a preemption signal (SIGTERM/SIGUSR1 to this
process are passed on to the running stage): rerun the same command, e.g. after a SLURM requeue; 2 the recipe or
the settings are wrong; 1 a stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from kd.files import write_json_atomic
from kd.pipeline import (PREEMPTED_EXIT, STAGES, TRAINING, RecipeError, argv_flags, changed_flags, command,
                         finished_marker, headline, load_recipe, shell_line)

REPO = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipes/*.yaml")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--stages", default=None, help=f"Comma-separated subset of {','.join(STAGES)} (default: all "
                                                      "the recipe has); the stages they need must have finished.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="Override one recipe setting (repeatable); the value is read as YAML.")
    parser.add_argument("--rerun", default=None, metavar="STAGE", help="Redo this stage and every stage after it.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
    parser.add_argument("--launcher", default="local", choices=["local", "slurm"],
                        help="local: training stages on this machine (launch.py accelerate launch); slurm: on every "
                             "node of the SLURM allocation, one accelerate launch per node (slurm/node_launch.sh).")
    return parser.parse_args(argv)


def script_module(name: str):
    """A stage's script as a module (by path: a pip package may share its name, e.g. `evaluate`)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name[:-3]}", os.path.join(REPO, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unknown_flags(stage, module) -> list[str]:
    """The recipe keys of ``stage`` that its script (``module``) has no flag for."""
    flags = module.build_parser()._option_string_actions
    return [key for key in stage.args if f"--{key}" not in flags]


def validate(stages, commands, finished) -> list[str]:
    """Every problem found without running a stage: unknown flags; for stages whose inputs exist now, their
    script's own argument checks and whether student and teacher tokenize alike."""
    problems, modules = [], {}
    for name, stage in stages.items():
        if stage.use:
            continue
        module = modules.setdefault(stage.script, script_module(stage.script))
        problems += [f"stage {name}: {stage.script} has no --{key}" for key in unknown_flags(stage, module)]
        if not stage.refs <= finished or not hasattr(module, "parse_args"):
            continue  # its inputs come from stages that have not run yet: its script checks them when it starts
        argv = commands[name][commands[name].index(os.path.join(REPO, stage.script)) + 1:]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                module.parse_args(argv)
        except SystemExit:
            problems.append(f"stage {name}: {err.getvalue().strip().splitlines()[-1]}")
        problems += tokenizer_mismatch(name, argv)
    return problems


def tokenizer_mismatch(name: str, argv: list[str]) -> list[str]:
    """Student and teacher of a distillation stage must share their vocabulary (checked when both are local)."""
    flags = argv_flags(argv)
    student, teacher = ((flags.get(f) or [None])[0] for f in ("--model_name_or_path", "--teacher_name_or_path"))
    if not (student and teacher and os.path.isdir(student) and os.path.isdir(teacher)):
        return []
    from kd.models import load_tokenizer

    try:
        a, b = load_tokenizer(student), load_tokenizer(teacher)
    except ValueError:  # kd.models.NoTokenizerError among them
        return []  # no tokenizer saved there (a general student takes the teacher's): the script decides
    if a.get_vocab() != b.get_vocab():
        return [f"stage {name}: the student {student} and the teacher {teacher} tokenize differently "
                f"({len(a)} vs {len(b)} vocabulary entries); distillation needs identical token ids"]
    return []


class Forwarder:
    """Passes SIGTERM/SIGUSR1 on to the running stage and remembers that one came."""

    def __init__(self):
        self.child, self.signum = None, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def handle(self, signum, frame):
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def run_stage(cmd: list[str], log_path: str, forwarder: Forwarder) -> int:
    with open(log_path, "a") as log:
        log.write(f"\n$ {shell_line(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        forwarder.child = child
        code = child.wait()
        forwarder.child = None
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    try:
        stages = load_recipe(args.recipe, args.overrides)
        selected = [s for s in stages if args.stages is None or s in args.stages.split(",")]
        unknown = sorted(set(args.stages.split(",")) - set(stages)) if args.stages else []
        if unknown or (args.rerun and args.rerun not in stages):
            raise RecipeError(f"--stages/--rerun name(s) {unknown or [args.rerun]} not in the recipe "
                              f"({', '.join(stages)})")
        commands = {name: command(stage, out, stages, REPO, args.launcher)
                    for name, stage in stages.items() if not stage.use}
    except RecipeError as e:
        print(f"pipeline.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for name in selected:
            print(f"# {name}\n{shell_line(commands[name]) if name in commands else '# uses ' + stages[name].use}")
        return 0

    # ---------------------------------------------------------------- what has run, what changed, what to redo
    record_path = os.path.join(out, "pipeline.json")
    record = json.load(open(record_path)) if os.path.isfile(record_path) else {"stages": {}}
    if args.rerun:  # this pipeline's own outputs, redone on request
        for name in STAGES[STAGES.index(args.rerun):]:
            record["stages"].pop(name, None)
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    problems = []
    for name, cmd in commands.items():
        old = record["stages"].get(name, {}).get("command")
        if old is not None and old != cmd:
            problems.append(f"stage {name} ran with other settings ({'; '.join(changed_flags(old, cmd))}); pass "
                            f"--rerun {name} to redo it and what follows, or restore the setting")
    finished = {n for n in stages if stages[n].use or (record["stages"].get(n, {}).get("status") == "finished"
                                                       and os.path.isfile(finished_marker(n, out)))}
    missing = sorted({r for n in selected for r in stages[n].refs} - finished - set(selected))
    if missing:
        problems.append(f"the selected stages need {missing}, which have not finished; run them first")
    problems += validate({n: stages[n] for n in selected}, commands, finished)
    if problems:
        print("pipeline.py: error: the recipe cannot run as it is:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2

    # ---------------------------------------------------------------- run the stages in order
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "commands.sh.tmp"), "w") as f:
        f.write("#!/usr/bin/env bash\n# written by pipeline.py; run from the repository root\nset -euo pipefail\n")
        f.writelines(f"\n# {n}\n{shell_line(commands[n])}\n" for n in selected if n in commands)
    os.replace(os.path.join(out, "commands.sh.tmp"), os.path.join(out, "commands.sh"))
    with Forwarder() as forwarder:
        for name in selected:
            if name in finished or stages[name].use:
                print(f"[{name}] {'uses ' + stages[name].use if stages[name].use else 'finished before: skipped'}")
                continue
            entry = {"status": "running", "command": commands[name], "start": time.strftime("%Y-%m-%dT%H:%M:%S")}
            record["stages"][name] = entry
            write_json_atomic(record_path, record)
            print(f"[{name}] {shell_line(commands[name])}", flush=True)
            t0 = time.time()
            os.makedirs(os.path.join(out, name), exist_ok=True)
            code = run_stage(commands[name], os.path.join(out, name, "stage.log"), forwarder)
            done = os.path.isfile(finished_marker(name, out))
            if name in TRAINING and done:  # a resumed run that stopped again writes preempted.json, not this
                done = json.load(open(finished_marker(name, out))).get("status") == "finished"
            entry.update(end=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=round(time.time() - t0, 1),
                         status="finished" if code == 0 and done else
                         "preempted" if forwarder.signum or (code == 0 and name in TRAINING) else "failed",
                         exit_status=code, metrics=headline(name, out) if done else {})
            write_json_atomic(record_path, record)
            print(f"[{name}] {entry['status']} in {entry['wall_s']:.0f} s {entry['metrics'] or ''}", flush=True)
            if entry["status"] == "preempted":
                print(f"pipeline.py: stage {name} stopped on a preemption signal; rerun the same command to continue.")
                return PREEMPTED_EXIT
            if entry["status"] == "failed":
                print(f"pipeline.py: stage {name} failed (exit {code}); see {os.path.join(out, name, 'stage.log')}",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
setting named (``--rerun STAGE`` redoes it and every stage after it). A finished stage whose outputs are missing or
changed (pipeline.json holds their sizes and hashes: kd.pipeline.fingerprint) runs again, with every stage after
it. The whole recipe is checked before any stage runs, every problem listed at once: stage names, references,
launch configs, every key against its script's flags, each stage whose inputs already exist through its script's
own argument checks (paths, sequence length, layer map) and a tokenizer comparison, the others through their
script's parser (types, choices).

One pipeline at a time holds OUTPUT_DIR (OUTPUT_DIR/pipeline.lock; a second one is refused, exit 2), and its stages
die with it: killed, even with SIGKILL, it leaves no stage running (kd/launcher.py).

Exit status: 0 all selected stages finished; 75 stopped on a preemption signal (SIGTERM/SIGUSR1 to this process
are passed on to the running stage, SIGINT as SIGTERM; one that comes between stages starts no other): rerun the
same command, e.g. after a SLURM requeue; 2 the recipe or the settings are wrong; 1 a stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from kd.args import HelpFormatter, positive_int
from kd.files import write_json_atomic
from kd.launcher import die_with_parent, error_paragraph
from kd.pipeline import (LAUNCHED, PREEMPTED_EXIT, STAGES, TRAINING, RecipeError, argv_flags, batch_plan,
                         changed_flags, changed_outputs, command, finished_marker, fingerprint, headline,
                         launch_config, layout, read_launch_config, read_recipe, same_command, shell_line,
                         visible_gpus)
from kd.run_dir import OutputDirInUseError, hold_dir

REPO = os.path.dirname(os.path.abspath(__file__))
LOCK_FILE = "pipeline.lock"
# a tqdm bar in a stage's log: "train:  45%|####5     | 90/200 [00:30<00:40,  2.1it/s, loss=1.2]"
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")
PROGRESS_EVERY_S = 30  # on a terminal that is no tty (a SLURM .out file, a pipe): one progress line this often
TRY_QUESTION = ("Who gave their name to Normandy?",
                "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--recipe", required=True, help="The recipe: recipes/*.yaml.")
    parser.add_argument("--output_dir", required=True,
                        help="Where every stage writes (OUTPUT_DIR/<stage>, its log OUTPUT_DIR/<stage>/stage.log).")
    parser.add_argument("--stages", default=None, help=f"Comma-separated subset of {','.join(STAGES)} (default: all "
                                                      "the recipe has); the stages they need must have finished.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="Override one recipe setting (repeatable); the value is read as YAML.")
    parser.add_argument("--rerun", default=None, metavar="STAGE", help="Redo this stage and every stage after it.")
    parser.add_argument("--dry_run", action="store_true", help="Print the plan and the commands, run nothing.")
    parser.add_argument("--launcher", default="local", choices=["local", "slurm"],
                        help="local: launched stages on this machine (launch.py accelerate launch); slurm: on every "
                             "node of the SLURM allocation, one accelerate launch per node (slurm/node_launch.sh).")
    parser.add_argument("--num_processes", type=positive_int, default=None,
                        help="Processes (ranks) of every launched stage, all machines together (default: the "
                             "visible GPUs x --num_machines for a multi-GPU launch config, else the config's).")
    parser.add_argument("--num_machines", type=positive_int, default=None,
                        help="Machines (nodes) of every launched stage (default: with --launcher slurm the "
                             "allocation's tasks, one per node; else the launch config's).")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


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


def missing_inputs(stages) -> dict[str, list[str]]:
    """Per stage, the files the recipe names that are not there (what the user brings: data, vectors; paths are
    relative to the repository, where the stages run): ``{stage: ["--glove_path data/glove.6B.300d.txt", ...]}``.
    A value naming another stage's product (``${...}``) or no local path (a hub name such as squad_v2) is not one."""
    missing = {}
    for name, stage in stages.items():
        for key, value in stage.args.items():
            if not key.endswith(("_file", "_files", "_path")) or key.endswith("name_or_path"):
                continue
            for v in (value if isinstance(value, list) else [value]):
                local = isinstance(v, str) and "${" not in v and ("/" in v or os.path.splitext(v)[1])
                if local and not glob.glob(os.path.join(REPO, os.path.expanduser(v))):
                    missing.setdefault(name, []).append(f"--{key} {v}")
    return missing


def script_error(stderr: str) -> str:
    """What a script's parser said (``usage: ...\nPROG: error: MESSAGE``): the message alone, on one line."""
    said = stderr.strip().split(": error: ", 1)[-1]
    return " ".join(said.split())


def validate(stages, commands, finished) -> list[str]:
    """Every problem found without running a stage: unknown flags, launch configs; for stages whose inputs exist
    now, their script's own argument checks and, for intermediate-layer stages, whether student and teacher
    tokenize alike; for the others, what their script's parser checks alone (types, choices, required flags), the
    paths they name not yet existing."""
    problems, modules = [], {}
    missing = missing_inputs({n: s for n, s in stages.items() if not s.use and n in commands})
    for name, stage in stages.items():
        if stage.use or name not in commands:
            continue
        absent = missing.get(name, [])
        problems += [f"stage {name} ({stage.script}): {flag} does not exist" for flag in absent]
        module = modules.setdefault(stage.script, script_module(stage.script))
        unknown = unknown_flags(stage, module)
        problems += [f"stage {name}: {stage.script} has no --{key}" for key in unknown]
        argv = commands[name][commands[name].index(os.path.join(REPO, stage.script)) + 1:]
        ready = stage.refs <= finished and hasattr(module, "parse_args") and not unknown
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                module.parse_args(argv) if ready else module.build_parser().parse_known_args(argv)
        except SystemExit:
            said = script_error(err.getvalue())
            if not any(re.search(rf"{re.escape(flag.split()[0])}\b", said) for flag in absent):  # said above
                problems.append(f"stage {name} ({stage.script}): {said}")
        if ready and stage.script != "train_prediction.py":  # prediction-layer distillation: any teacher's tokenizer
            problems += tokenizer_mismatch(name, argv)
    return problems


def stage_layout(stage, args):
    """The processes of a launched stage: pipeline.py's flags, else (under SLURM) one machine per task of the
    allocation, else its launch config; a multi-GPU config on every GPU this machine sees (kd.pipeline.layout)."""
    machines = args.num_machines
    if machines is None and args.launcher == "slurm" and os.environ.get("SLURM_NTASKS", "").isdigit():
        machines = int(os.environ["SLURM_NTASKS"])  # what slurm/node_launch.sh counts as nodes
    return layout(read_launch_config(launch_config(stage, REPO)), args.num_processes, machines, visible_gpus())


def load_record(path: str) -> dict:
    """OUTPUT_DIR/pipeline.json, or an empty record before the first run."""
    if not os.path.isfile(path):
        return {"stages": {}}
    try:
        with open(path) as f:
            record = json.load(f)
        if not (isinstance(record, dict) and isinstance(record.get("stages"), dict)
                and all(isinstance(e, dict) and isinstance(e.get("outputs", {}), dict) and
                        all(isinstance(f, dict) for f in e.get("outputs", {}).values())
                        for e in record["stages"].values())):
            raise ValueError("not a mapping of each stage to its record")
    except (OSError, ValueError) as err:
        raise RecipeError(f"{path}, the record of what ran, is unreadable ({err}); restore it, or start over "
                          "in another --output_dir") from err
    return record


def tokenizer_mismatch(name: str, argv: list[str]) -> list[str]:
    """Student and teacher of an intermediate-layer stage must share their vocabulary (checked when both are
    local)."""
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


def stages_to_redo(record: dict, out: str, rerun: str | None) -> dict[str, str]:
    """The stages that run again, each with why, in pipeline order: ``rerun`` and every stage after it; a finished
    stage whose outputs are not what it left (missing, other size or content: kd.pipeline.fingerprint) and every
    stage after it, which read them. Refreshes the recorded fingerprints of the others (a record from before
    fingerprints gets them now)."""
    redo = dict.fromkeys(STAGES[STAGES.index(rerun):], f"--rerun {rerun}") if rerun else {}
    for name in STAGES:
        entry = record["stages"].get(name)
        if name in redo or not entry or entry.get("status") != "finished":
            continue
        marker = os.path.relpath(finished_marker(name, out), os.path.join(out, name))
        if "outputs" in entry:
            changes, now = changed_outputs(name, out, entry["outputs"])
        else:
            changes = [] if os.path.isfile(finished_marker(name, out)) else [f"{marker}: missing"]
            now = fingerprint(name, out) if not changes else {}
        if not changes:
            entry["outputs"] = now
            continue
        redo[name] = f"its output changed since it finished ({'; '.join(changes)})"
        redo.update({later: f"it comes after {name}, which runs again" for later in STAGES[STAGES.index(name) + 1:]
                     if later not in redo})
    return {n: redo[n] for n in STAGES if n in redo}


class Forwarder:
    """Passes SIGTERM/SIGUSR1 on to the running stage and remembers that one came (SIGINT too, passed on as
    SIGTERM: the stage saves and stops as on a preemption)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.child, self.signum, self.passed = None, None, False
        self.pass_fds = ()

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if signum == signal.SIGINT == self.signum and self.child is None:  # Ctrl-C twice: no waiting for a check
            print("pipeline.py: stopped on SIGINT; rerun the same command to continue.", flush=True)
            raise SystemExit(PREEMPTED_EXIT)
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
            self.passed = True

    def start(self, cmd: list[str], **popen) -> subprocess.Popen:
        """Start a stage: in its own session (a terminal's Ctrl-C reaches the pipeline, which passes it on),
        dying with the pipeline (SIGTERM when it is killed, even with SIGKILL), holding the output dir's lock
        until its last process ends."""
        self.passed = False
        self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=self.pass_fds,
                                      preexec_fn=die_with_parent(signal.SIGTERM), **popen)
        if self.signum is not None and not self.passed:  # it came while the stage was being started
            self.handle(self.signum, None)
        return self.child

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class Progress:
    """A running stage's latest progress bar, read from its log as it grows, on this process's stdout: redrawn in
    place on a tty (at most once a second), else one line when it first shows, every PROGRESS_EVERY_S seconds and
    at the end. The stage itself writes only to its log, so it never waits on (or dies with) a reader."""

    def __init__(self, name: str, log, stream=None):
        self.name, self.log, self.stream = name, log, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.tail, self.latest, self.shown, self.shown_at, self.drawn = "", None, None, 0.0, False

    def poll(self, final: bool = False) -> None:
        data = self.log.read()
        if data:
            pieces = re.split(r"[\r\n]", self.tail + data.decode(errors="replace"))
            self.tail = pieces[-1]  # tqdm leaves its current bar unterminated: it counts as the latest
            bars = [p.strip() for p in pieces if PROGRESS_BAR.search(p)]
            self.latest = bars[-1] if bars else self.latest
        if self.latest is None or self.latest == self.shown:
            return
        now = time.monotonic()
        if self.tty and (final or now - self.shown_at >= 1):
            self.stream.write(f"\r\x1b[K[{self.name}] {self.latest}"[:300])
            self.drawn = True
        elif not self.tty and (final or self.shown is None or now - self.shown_at >= PROGRESS_EVERY_S):
            self.stream.write(f"[{self.name}] {self.latest}\n")
        else:
            return
        self.stream.flush()
        self.shown, self.shown_at = self.latest, now

    def close(self) -> None:
        self.poll(final=True)
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def run_stage(cmd: list[str], log_path: str, forwarder: Forwarder, name: str = "stage") -> int:
    with open(log_path, "a") as log, open(log_path, "rb") as reader:
        log.write(f"\n$ {shell_line(cmd)}\n")
        log.flush()
        reader.seek(0, os.SEEK_END)  # this run's progress, not a previous attempt's
        progress = Progress(name, reader)
        child = forwarder.start(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                progress.poll()
        progress.close()
        forwarder.child = None
    return code


def shown_path(path: str) -> str:
    """A path as the user may type it here: relative when it lies below the current dir."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def final_student(out: str, record: dict) -> str | None:
    """The lines naming the recipe's student (the prediction stage's output) and how to try it, once it finished."""
    entry = record["stages"].get("prediction") or {}
    if entry.get("status") != "finished":
        return None
    student = shown_path(os.path.join(out, "prediction"))
    scores = ", ".join(f"{k} {v}" for k, v in (entry.get("metrics") or {}).items() if k in ("exact", "f1"))
    question, context = TRY_QUESTION
    try_it = shell_line(["python", shown_path(os.path.join(REPO, "predict.py")), "--model_name_or_path", student,
                         "--question", question, "--context", context])
    return f"student: {student}" + (f" ({scores})" if scores else "") + f"\ntry: {try_it}"


def main(argv=None) -> int:
    args = parse_args(argv)
    with Forwarder() as forwarder:  # from the start: a signal at any moment stops the pipeline before its next stage
        return run(args, forwarder)


def run(args, forwarder: Forwarder) -> int:
    out = os.path.abspath(args.output_dir)
    try:
        stages, problems = read_recipe(args.recipe, args.overrides)
        selected = [s for s in stages if args.stages is None or s in args.stages.split(",")]
        unknown = sorted(set(args.stages.split(",")) - set(stages)) if args.stages else []
        if unknown or (args.rerun and args.rerun not in stages):
            problems.append(f"--stages/--rerun name(s) {unknown or [args.rerun]} not in the recipe "
                            f"({', '.join(stages)})")
        commands, plans = {}, {}
        for name, stage in stages.items():
            try:
                if not stage.use:
                    processes = stage_layout(stage, args) if name in LAUNCHED else None
                    plans[name] = batch_plan(stage, processes) if processes else ""
                    commands[name] = command(stage, out, stages, REPO, args.launcher, processes)
            except RecipeError as e:
                problems += [f"stage {name}: {p}" for p in e.problems]
        if problems and args.dry_run:  # else they are listed with the stages' own problems below
            raise RecipeError(*problems)
    except RecipeError as e:
        print(f"pipeline.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        absent = missing_inputs({n: stages[n] for n in selected if n in commands})
        for name in selected:
            plan = f": {plans[name]}" if plans.get(name) else ""
            print(f"# {name}{plan}\n{shell_line(commands[name]) if name in commands else '# uses ' + stages[name].use}")
        for name, flags in absent.items():
            print(f"# not there yet, to bring before running: stage {name} ({stages[name].script}): {', '.join(flags)}")
        return 0

    # ---------------------------------------------------------------- what has run, what changed, what to redo
    try:
        lock = hold_dir(out, LOCK_FILE)  # held to the end, and by each stage it starts until that stage ends
        record_path = os.path.join(out, "pipeline.json")
        record = load_record(record_path)
    except (OutputDirInUseError, RecipeError) as e:
        print(f"pipeline.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pipeline.py: error: cannot take --output_dir {out} ({e.strerror or e}); choose a writable one",
              file=sys.stderr)
        return 2
    forwarder.pass_fds = (lock,)
    with os.fdopen(lock):
        redo = stages_to_redo(record, out, args.rerun)
        for name, cmd in commands.items():
            old = record["stages"].get(name, {}).get("command")
            if name not in redo and old is not None and not same_command(old, cmd):
                problems.append(f"stage {name} ran with other settings ({'; '.join(changed_flags(old, cmd))}); pass "
                                f"--rerun {name} to redo it and what follows, or restore the setting")
        finished = {n for n in stages if stages[n].use or (n not in redo and record["stages"].get(n, {}).get(
            "status") == "finished" and os.path.isfile(finished_marker(n, out)))}
        missing = sorted({r for n in selected for r in stages[n].refs if r in stages} - finished - set(selected))
        if missing:
            problems.append(f"the selected stages need {missing}, which have not finished; run them first"
                            + "".join(f" ({n} runs again: {redo[n]})" for n in missing if n in redo))
        problems += validate({n: stages[n] for n in selected}, commands, finished)
        if problems:
            print("pipeline.py: error: the recipe cannot run as it is:\n  - " + "\n  - ".join(problems),
                  file=sys.stderr)
            return 2

        # ------------------------------------------------------------ run the stages in order
        for name, why in redo.items():  # only now that nothing stops the run: these outputs are deleted
            if name in record["stages"] or os.path.exists(os.path.join(out, name)):
                print(f"[{name}] runs again: {why}")
            record["stages"].pop(name, None)
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        write_json_atomic(record_path, record)
        with open(os.path.join(out, "commands.sh.tmp"), "w") as f:
            f.write("#!/usr/bin/env bash\n# written by pipeline.py; run from the repository root\nset -euo pipefail\n")
            f.writelines(f"\n# {n}\n{shell_line(commands[n])}\n" for n in selected if n in commands)
        os.replace(os.path.join(out, "commands.sh.tmp"), os.path.join(out, "commands.sh"))
        for name in selected:
            if name in finished or stages[name].use:
                print(f"[{name}] {'uses ' + stages[name].use if stages[name].use else 'finished before: skipped'}")
                continue
            if forwarder.signum is not None:  # it came before this stage started: none starts after it
                print(f"pipeline.py: stopped on {signal.Signals(forwarder.signum).name} before stage {name}; rerun "
                      "the same command to continue.")
                return PREEMPTED_EXIT
            entry = {"status": "running", "command": commands[name], "start": time.strftime("%Y-%m-%dT%H:%M:%S")}
            record["stages"][name] = entry
            write_json_atomic(record_path, record)
            print(f"[{name}] {shell_line(commands[name])}\n[{name}] its whole output: "
                  f"{shown_path(os.path.join(out, name, 'stage.log'))}", flush=True)
            t0 = time.time()
            os.makedirs(os.path.join(out, name), exist_ok=True)
            code = run_stage(commands[name], os.path.join(out, name, "stage.log"), forwarder, name)
            done = os.path.isfile(finished_marker(name, out))
            if name in TRAINING and done:  # a resumed run that stopped again writes preempted.json, not this
                done = json.load(open(finished_marker(name, out))).get("status") == "finished"
            entry.update(end=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=round(time.time() - t0, 1),
                         status="finished" if code == 0 and done else
                         "preempted" if forwarder.signum or (code == 0 and name in TRAINING) else "failed",
                         exit_status=code, metrics=headline(name, out) if done else {})
            if entry["status"] == "finished":  # what the stages after it read, as it left it
                entry["outputs"] = fingerprint(name, out)
            write_json_atomic(record_path, record)
            print(f"[{name}] {entry['status']} in {entry['wall_s']:.0f} s {entry['metrics'] or ''}", flush=True)
            if entry["status"] == "preempted":
                print(f"pipeline.py: stage {name} stopped on a preemption signal; rerun the same command to continue.")
                return PREEMPTED_EXIT
            if entry["status"] == "failed":
                log = os.path.join(out, name, "stage.log")
                with open(log, errors="replace") as f:
                    said = error_paragraph(f.read()[-200_000:])
                print(f"pipeline.py: stage {name} failed (exit {code}): {said}\n(the whole output: {log})",
                      file=sys.stderr)
                return 1
    student = final_student(out, record)
    if student:
        print(student, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole recipe as one job: a recipe file resolved into the stages' exact command lines, and what has run.

A recipe (``recipes/*.yaml``) holds, per stage (under ``stages``), the arguments of that stage's script and nothing
else (the script stays the single source of truth for its flags), plus ``launch`` (the Accelerate config of a
training stage) or, for the teacher, ``use`` (a fine-tuned model taken as it is). Values may name another stage's
product:
``${teacher}`` is the teacher's output dir (or the model it ``use``s), ``${augment}`` the augmented file;
``${pkg:NAME/sub/dir}`` is a directory inside an installed Python package (the offline models and vectors).
Each stage writes under ``OUTPUT/<stage>``; ``OUTPUT/pipeline.json`` records what ran, with which command line,
when, its headline metrics, and a fingerprint of what a finished stage left for the next ones (:func:`fingerprint`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass, field

from kd.files import file_digest

# student_nokd / student_kd are the comparisons that show what the recipe buys: the same student init fine-tuned
# without a teacher, and with prediction-layer distillation alone (no steps 1-2); student_pruned_init /
# student_pruned the small one: a student (e.g. step 2's) with its vocabulary pruned to the task's tokens, taught
# by the full-vocabulary teacher across tokenizers. A recipe may leave any of them out
STAGES = ("teacher", "student_init", "general", "augment", "task_intermediate", "prediction", "student_nokd",
          "student_kd", "student_pruned_init", "student_pruned", "evaluate", "report")
SCRIPTS = {"teacher": "train_prediction.py", "student_init": "make_student.py", "general": "train_general.py",
           "augment": "augment.py", "task_intermediate": "train_task_intermediate.py",
           "prediction": "train_prediction.py", "student_nokd": "train_prediction.py",
           "student_kd": "train_prediction.py", "student_pruned_init": "make_student.py",
           "student_pruned": "train_prediction.py", "evaluate": "evaluate.py", "report": "report.py"}
# resumable, launched through launch.py
TRAINING = {"teacher", "general", "task_intermediate", "prediction", "student_nokd", "student_kd", "student_pruned"}
# started through launch.py accelerate launch on every process of the layout (augment shards its paragraphs)
LAUNCHED = TRAINING | {"augment"}
RESERVED = {"output_dir", "output_file", "resume_from_checkpoint", "overwrite_output_dir"}  # set by the pipeline
# the batch all processes together take per optimizer step: per_device_train_batch_size is derived from it
GLOBAL_BATCH = "global_train_batch_size"
STAGE_KEYS = {"launch", "use", GLOBAL_BATCH}
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a stage stopped on a preemption signal; rerun (requeue) to continue
_REF = re.compile(r"\$\{([^}]+)\}")
# `accelerate launch` through the interpreter that runs the pipeline: its venv's launcher, whether or not the venv
# is on PATH
ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch")


class RecipeError(ValueError):
    """One or more problems of a recipe, each one line; ``str()`` lists them all."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         "the recipe cannot run as it is:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Layout:
    """How many processes a launched stage runs on: ``num_processes`` all machines together."""
    num_processes: int
    num_machines: int = 1
    source: str = "the launch config"

    def describe(self) -> str:
        machines = f" on {self.num_machines} machines" if self.num_machines > 1 else ""
        return f"{self.num_processes} process{'es' if self.num_processes > 1 else ''}{machines} ({self.source})"


def visible_gpus() -> int:
    """The GPUs this process sees (CUDA_VISIBLE_DEVICES honoured); 0 without CUDA."""
    import torch

    return torch.cuda.device_count()


def read_launch_config(path: str) -> dict:
    """An Accelerate config file as a mapping; RecipeError saying what is wrong with it."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as err:
        raise RecipeError(f"cannot read its launch config {path} ({err.strerror or err}); name an existing file of "
                          "accelerate_configs/ with 'launch:'") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"its launch config {path} is not valid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(config, dict):
        raise RecipeError(f"its launch config {path} is not an Accelerate config (a mapping)")
    return config


def layout(config: dict, num_processes: int | None = None, num_machines: int | None = None,
           gpus: int = 0) -> Layout:
    """The processes a launched stage starts: ``num_processes`` / ``num_machines`` when given (pipeline.py's flags,
    or the SLURM allocation's tasks); else a multi-GPU config runs on every GPU this machine sees (``gpus``) on each
    machine; else the config's processes per machine, as written (one for CPU and single-GPU configs)."""
    written = max(int(config.get("num_machines") or 1), 1)
    machines = num_machines or written
    if num_processes:
        found = Layout(num_processes, machines, "--num_processes")
    elif gpus and config.get("distributed_type") in ("MULTI_GPU", "DEEPSPEED", "FSDP") and not config.get("use_cpu"):
        found = Layout(gpus * machines, machines, f"{gpus} GPUs visible" + (f" x {machines} machines"
                                                                             if machines > 1 else ""))
    else:
        per_machine = max(int(config.get("num_processes") or 1) // written, 1)
        found = Layout(per_machine * machines, machines, "the launch config" + (
            f": {per_machine} per machine" if machines > 1 else ""))
    if found.num_processes % found.num_machines:
        raise RecipeError(f"{found.num_processes} processes do not split evenly over {found.num_machines} machines; "
                          "pass --num_processes as a multiple of --num_machines")
    return found


def per_device_batch(stage: Stage, processes: Layout) -> int | None:
    """The per-device batch that keeps the stage's global batch (None: the recipe gives the per-device batch)."""
    if stage.global_batch is None:
        return None
    accumulation = int(stage.args.get("gradient_accumulation_steps") or 1)
    share = processes.num_processes * accumulation
    if stage.global_batch % share == 0:
        return stage.global_batch // share
    fits = [n for n in range(processes.num_processes, 0, -1) if stage.global_batch % (n * accumulation) == 0]
    steps = [a for a in range(accumulation, 65) if stage.global_batch % (processes.num_processes * a) == 0]
    raise RecipeError(
        f"{GLOBAL_BATCH} {stage.global_batch} does not split evenly over {processes.describe()} x "
        f"{accumulation} gradient accumulation step(s); pass --num_processes {fits[0]} "
        f"({stage.global_batch // (fits[0] * accumulation)} per device)"
        + (f", or set {stage.name}.gradient_accumulation_steps={steps[0]}" if steps else "")
        + f", or a {GLOBAL_BATCH} divisible by {share}")


def batch_plan(stage: Stage, processes: Layout) -> str:
    """The dry run's line of a launched stage: its processes and, for a training stage, its global batch."""
    if stage.name not in TRAINING:
        return processes.describe()
    accumulation = int(stage.args.get("gradient_accumulation_steps") or 1)
    per_device = per_device_batch(stage, processes) or stage.args.get("per_device_train_batch_size") or "default"
    total = per_device * processes.num_processes * accumulation if isinstance(per_device, int) else "?"
    return (f"{processes.describe()}; global batch {total} = {per_device} per device x {processes.num_processes} "
            f"processes x {accumulation} accumulation" + (f" ({GLOBAL_BATCH} {stage.global_batch})"
                                                          if stage.global_batch else " (per device as the recipe says)"))


@dataclass
class Stage:
    name: str
    args: dict
    launch: str | None = None
    use: str | None = None  # teacher only: a fine-tuned model taken as it is, nothing runs
    refs: set = field(default_factory=set)  # the stages whose products the arguments name
    global_batch: int | None = None  # GLOBAL_BATCH: the per-device batch follows from the layout

    @property
    def script(self) -> str:
        return SCRIPTS[self.name]


def product(stage: str, output_dir: str, stages: dict[str, Stage]) -> str:
    """What ``${stage}`` stands for: the augmented file, the teacher a recipe uses as is, or the output dir."""
    if stage == "augment":
        return os.path.join(output_dir, "augment", "train-aug.json")
    if stage == "teacher" and stages.get("teacher") is not None and stages["teacher"].use:
        return stages["teacher"].use
    return os.path.join(output_dir, stage)


def package_dir(spec: str) -> str:
    """``NAME/sub/dir`` -> that directory inside the installed package NAME."""
    name, _, sub = spec.partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise RecipeError(f"${{pkg:{spec}}}: no installed package {name!r} (pip install it)")
    return os.path.join(list(found.submodule_search_locations)[0], sub)


def load_recipe(path: str, overrides: list[str] = ()) -> dict[str, Stage]:
    """The recipe's stages in pipeline order, with ``--set STAGE.KEY=VALUE`` overrides applied (values parsed as
    YAML). Raises RecipeError listing every problem: an unreadable file or one not shaped as a recipe, an unknown
    stage, a reserved key, a value that is no script argument, a reference to a stage the recipe lacks."""
    stages, problems = read_recipe(path, overrides)
    if problems:
        raise RecipeError(*problems)
    return stages


def read_recipe(path: str, overrides: list[str] = ()) -> tuple[dict[str, Stage], list[str]]:
    """:func:`load_recipe`'s stages and its problems, for a caller that goes on to check the stages' arguments (so
    that one run lists every problem). A file that cannot be read as a recipe raises RecipeError at once."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except OSError as err:
        raise RecipeError(f"cannot read the recipe {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path} is not a text file in UTF-8 ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        raise RecipeError(f"{path} is not valid YAML ({getattr(err, 'problem', None) or err}"
                          + (f" at line {where.line + 1}, column {where.column + 1}" if where else "") + ")") from err
    recipe = {} if recipe is None else recipe
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with 'launch', 'stages' and 'shared', not a "
                          f"{type(recipe).__name__}")
    unknown = set(recipe) - {"launch", "stages", "shared"}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {sorted(unknown)}; a recipe has 'launch', 'stages' and "
                          "'shared' (YAML anchors for the stages to merge)")
    if not isinstance(recipe.get("stages") or {}, dict):
        raise RecipeError(f"{path}: 'stages' is a {type(recipe['stages']).__name__}; it maps each stage name to its "
                          "script's arguments (teacher: {model_name_or_path: ..., ...})")
    problems = []
    raw = {}
    for name, spec in (recipe.get("stages") or {}).items():
        if spec is not None and not isinstance(spec, dict):
            problems.append(f"stage {name}: its arguments are a {type(spec).__name__}, not a mapping of flag: value")
            continue
        raw[name] = dict(spec or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        stage, dot, flag = key.partition(".")
        if not sep or not dot:
            raise RecipeError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. prediction.temperature=2")
        try:
            raw.setdefault(stage, {})[flag] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                              "quote it") from err
    bad = [name for name in raw if name not in STAGES]
    if bad:
        problems.append(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    launch_default = recipe.get("launch")
    if launch_default is not None and not isinstance(launch_default, str):
        problems.append(f"'launch' is a {type(launch_default).__name__}; it names an Accelerate config file")
        launch_default = None
    stages = {}
    for name in STAGES:
        if name not in raw:
            continue
        spec = raw[name]
        reserved = sorted(RESERVED & set(spec))
        if reserved:
            problems.append(f"stage {name}: {reserved} are set by the pipeline (each stage writes under "
                            "OUTPUT/<stage> and resumes from its own checkpoints)")
        if "use" in spec and name != "teacher":
            problems.append(f"stage {name}: 'use' (take a model as it is) applies to the teacher only")
        launch, use = spec.pop("launch", launch_default), spec.pop("use", None)
        global_batch = spec.pop(GLOBAL_BATCH, None)
        if global_batch is not None:
            if name not in TRAINING or isinstance(global_batch, bool) or not isinstance(global_batch, int) \
                    or global_batch <= 0:
                problems.append(f"stage {name}: {GLOBAL_BATCH} is a positive whole number of a training stage "
                                f"(the examples of one optimizer step over all processes), not {global_batch!r}")
                global_batch = None
            elif "per_device_train_batch_size" in spec:
                problems.append(f"stage {name}: give {GLOBAL_BATCH} or per_device_train_batch_size, not both (the "
                                "per-device batch is derived from the global one and the processes)")
        for key in ("launch", "use"):
            value = launch if key == "launch" else use
            if value is not None and not isinstance(value, str):
                problems.append(f"stage {name}: '{key}' is a {type(value).__name__}; it names "
                                + ("an Accelerate config file" if key == "launch" else "a model (dir or hub name)"))
        for key, value in spec.items():
            if not all(isinstance(v, (str, int, float, bool)) for v in (value if isinstance(value, list) else [value])
                       if v is not None):
                problems.append(f"stage {name}: {key}: a {type(value).__name__} is no script argument (a value, or a "
                                "list of values)")
        refs = set()
        for m in (m for v in _values(spec) for m in _REF.findall(str(v))):
            if m.startswith("pkg:"):
                continue
            if m not in STAGES:
                problems.append(f"stage {name}: ${{{m}}} names no stage; a reference is ${{STAGE}} (the stage's "
                                "output: its dir, the augmented file for augment) or ${pkg:NAME/sub/dir}")
            refs.add(m)  # a bad one too: the stage cannot be checked as if its inputs were there
        stages[name] = Stage(name, spec, launch if name in LAUNCHED and isinstance(launch, str) else None,
                             use if isinstance(use, str) else None, refs, global_batch)
    for stage in stages.values():
        for ref in sorted(stage.refs):
            if ref not in STAGES:
                continue  # said above
            if ref not in stages:
                problems.append(f"stage {stage.name} names ${{{ref}}}, but the recipe has no {ref} stage"
                                + (" (a teacher to distil from: add a teacher stage, or 'use' a fine-tuned one)"
                                   if ref == "teacher" else ""))
            elif STAGES.index(ref) >= STAGES.index(stage.name):
                problems.append(f"stage {stage.name} names ${{{ref}}}, which comes after it")
    return stages, problems


def _values(spec: dict):
    for value in spec.values():
        yield from (value if isinstance(value, list) else [value])


def resolve(value, output_dir: str, stages: dict[str, Stage]) -> str:
    def sub(m):
        ref = m.group(1)
        return package_dir(ref[4:]) if ref.startswith("pkg:") else product(ref, output_dir, stages)
    return _REF.sub(sub, str(value))


def command(stage: Stage, output_dir: str, stages: dict[str, Stage], repo: str, launcher: str = "local",
            processes: Layout | None = None) -> list[str]:
    """The stage's exact command line (run from the repo root). A launched stage (:data:`LAUNCHED`) starts
    ``processes`` ranks (default: its launch config's, as written): launcher ``local`` through ``launch.py
    accelerate launch`` on this machine; ``slurm`` through ``srun`` on every node of the allocation, one
    ``accelerate launch`` per node (slurm/node_launch.sh)."""
    argv = []
    for key, value in stage.args.items():
        if value is False or value is None:
            continue
        argv.append(f"--{key}")
        if value is True:
            continue
        argv.extend(resolve(v, output_dir, stages) for v in (value if isinstance(value, list) else [value]))
    out = os.path.join(output_dir, stage.name)
    if stage.name == "augment":
        argv += ["--output_file", product("augment", output_dir, stages)]
    else:
        argv += ["--output_dir", out]
    if stage.name not in LAUNCHED:
        return [sys.executable, os.path.join(repo, stage.script), *argv]
    config = launch_config(stage, repo)
    processes = processes or layout(read_launch_config(config))
    per_device = per_device_batch(stage, processes)
    if per_device is not None:
        argv += ["--per_device_train_batch_size", str(per_device)]
    if stage.name in TRAINING:
        argv += ["--resume_from_checkpoint", "latest"]
    if launcher == "slurm":
        per_node = processes.num_processes // processes.num_machines
        return ["srun", "--kill-on-bad-exit=1", f"--ntasks={processes.num_machines}",  # one task per node
                "env", f"KD_PROCS_PER_NODE={per_node}", "bash", os.path.join(repo, "slurm", "node_launch.sh"),
                config, os.path.join(repo, stage.script), *argv]
    if processes.num_machines > 1:
        raise RecipeError(f"{processes.describe()}: several machines start through --launcher slurm (one accelerate "
                          "launch per machine), or pass --num_machines 1")
    launch = [*ACCELERATE_LAUNCH, "--config_file", config, "--num_processes", str(processes.num_processes),
              "--num_machines", "1"]
    return [sys.executable, os.path.join(repo, "launch.py"), *launch, os.path.join(repo, stage.script), *argv]


def launch_config(stage: Stage, repo: str) -> str:
    """The Accelerate config file a launched stage runs with."""
    return os.path.join(repo, stage.launch or "accelerate_configs/cpu.yaml")


def same_command(old: list[str], new: list[str]) -> bool:
    """Whether a recorded command line is ``new``. Records of earlier versions count as the same: one that called
    ``accelerate launch`` from PATH, and one without ``--num_processes`` / ``--num_machines`` (it ran with its launch
    config's) when ``new`` passes the config's own values."""
    i = next((i for i in range(len(old) - 1) if old[i:i + 2] == ["accelerate", "launch"]), None)
    old = old if i is None else [*old[:i], *ACCELERATE_LAUNCH, *old[i + 2:]]
    n = len(ACCELERATE_LAUNCH)
    at = next((i for i in range(len(new) - n) if tuple(new[i:i + n]) == ACCELERATE_LAUNCH), None)
    if at is None or new[at + n:at + n + 1] != ["--config_file"] or "--num_processes" in old:
        return old == new
    layout = new[at + n + 2:at + n + 6]  # --num_processes N --num_machines M, as launch_command writes them
    if layout[::2] != ["--num_processes", "--num_machines"]:
        return old == new
    try:
        config = read_launch_config(new[at + n + 1])
    except RecipeError:
        return False
    configured = [str(config.get("num_processes", 1)), str(config.get("num_machines", 1))]
    return layout[1::2] == configured and old == [*new[:at + n + 2], *new[at + n + 6:]]


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def finished_marker(stage: str, output_dir: str) -> str:
    """The file a stage's script writes last, whole, when it finished."""
    out = os.path.join(output_dir, stage)
    if SCRIPTS.get(stage) == "make_student.py":
        return os.path.join(out, "student_origin.json")
    return {"augment": os.path.join(out, "train-aug.json"), "evaluate": os.path.join(out, "eval_results.json"),
            "report": os.path.join(out, "report.json")}.get(stage, os.path.join(out, "all_results.json"))


# What a finished stage leaves for the stages after it, besides its marker: the model (config, weights, vocabulary)
OUTPUT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "tokenizer.json", "vocab.*",
                "merges.txt")


def output_files(stage: str, output_dir: str) -> list[str]:
    """The files of a finished stage that later stages read (paths relative to its dir)."""
    out = os.path.join(output_dir, stage)
    found = {os.path.relpath(finished_marker(stage, output_dir), out)}
    found.update(os.path.relpath(p, out) for pattern in OUTPUT_FILES
                 for p in glob.glob(os.path.join(glob.escape(out), pattern)) if os.path.isfile(p))
    return sorted(found)


def fingerprint(stage: str, output_dir: str, known: dict | None = None) -> dict[str, dict]:
    """``{file: {"size", "mtime_ns", "sha256"}}`` of :func:`output_files`. The content decides (a copy that only
    changed the times is the same output), but it is read once: a file whose size and mtime are as in ``known``
    keeps its recorded hash. So a finished stage costs one read of its model when it finishes (seconds for a
    large model, against hours of training) and a stat per file on every rerun."""
    out, known = os.path.join(output_dir, stage), known or {}
    prints = {}
    for name in output_files(stage, output_dir):
        st = os.stat(os.path.join(out, name))
        old = known.get(name) or {}
        same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256")
        prints[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "sha256": old["sha256"] if same else file_digest(os.path.join(out, name), "sha256")}
    return prints


def changed_outputs(stage: str, output_dir: str, recorded: dict[str, dict]) -> tuple[list[str], dict]:
    """What differs from a finished stage's recorded fingerprint (``["model.safetensors: 1000 bytes, was 2000",
    "config.json: missing"]``; empty: unchanged) and the fingerprint as it is now (same hashes, fresh times)."""
    out = os.path.join(output_dir, stage)
    if not os.path.isdir(out):
        return [f"{stage}/: missing"], {}
    changes, now = [], {}
    for name, old in sorted(recorded.items()):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            changes.append(f"{name}: missing")
            continue
        st = os.stat(path)
        if st.st_size != old.get("size"):
            changes.append(f"{name}: {st.st_size} bytes, was {old.get('size')}")
            continue
        digest = old.get("sha256") if st.st_mtime_ns == old.get("mtime_ns") else file_digest(path, "sha256")
        if digest != old.get("sha256"):
            changes.append(f"{name}: other content (sha256 {digest[:12]}, was {str(old.get('sha256'))[:12]})")
        now[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return changes if len(changes) <= 3 else [*changes[:3], f"{len(changes) - 3} more"], now


def argv_flags(argv: list[str]) -> dict[str, list[str]]:
    """A command line's flags and their values: [..., "--a", "1", "2", "--b"] -> {"--a": ["1", "2"], "--b": []}."""
    out, key = {}, None
    for a in argv:
        if a.startswith("--"):
            key = a
            out[key] = []
        elif key is not None:
            out[key].append(a)
    return out


def changed_flags(old: list[str], new: list[str]) -> list[str]:
    """The flags whose values differ between two command lines (for the "settings changed" message)."""
    a, b = argv_flags(old), argv_flags(new)
    return [f"{k}: {' '.join(a.get(k, ['(absent)']))} -> {' '.join(b.get(k, ['(absent)']))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# the QA models of a pipeline output dir that report.py compares, under these names: the recipe's student
# (prediction) and the comparison students; the teacher is the one the students were distilled from
REPORT_STUDENTS = (("student_nokd", "student_nokd"), ("student_kd", "student_kd"), ("prediction", "student"),
                   ("student_pruned", "student_pruned"))
REPORT_SETTINGS = ("--validation_file", "--max_seq_length", "--doc_stride", "--max_query_length")


def report_argv(output_dir: str, repo: str) -> list[str]:
    """report.py's arguments for a pipeline output dir: --models with the teacher the finished students were
    distilled from and those students, and the dev file and windows of the first of them that has one. Stages ran
    in ``repo``: a relative path there is made absolute (a hub name stays as it is)."""
    import json

    def local(value):
        here = os.path.join(repo, value)
        return here if not os.path.isabs(value) and os.path.exists(here) else value

    try:
        with open(os.path.join(output_dir, "pipeline.json")) as f:
            ran = json.load(f)["stages"]
    except (OSError, ValueError, KeyError) as err:
        raise RecipeError(f"{output_dir} holds no readable pipeline.json ({err}); pass the output dir of a "
                          "pipeline.py run, or name the models with --models") from err
    done = [(name, label, argv_flags(ran[name]["command"])) for name, label in REPORT_STUDENTS
            if ran.get(name, {}).get("status") == "finished"]
    teachers = [flags["--teacher_name_or_path"][0] for _, _, flags in done if flags.get("--teacher_name_or_path")]
    if not teachers:
        finished = ", ".join(n for n, v in ran.items() if v.get("status") == "finished") or "none"
        raise RecipeError(f"{output_dir}: no finished prediction or student_kd stage names a teacher "
                          f"(finished: {finished}); finish one, or name the models with --models")
    argv = ["--models", f"teacher={local(teachers[0])}", *(f"{label}={os.path.join(output_dir, name)}"
                                                         for name, label, _ in done)]
    for flag in REPORT_SETTINGS:
        value = next((flags[flag] for _, _, flags in done if flags.get(flag)), None)
        if value:
            argv += [flag, *(map(local, value) if flag == "--validation_file" else value)]
    return argv


def headline(stage: str, output_dir: str) -> dict:
    """A few numbers worth seeing in pipeline.json: EM/F1, final training loss, held-out loss, counts."""
    import json

    try:
        with open(finished_marker(stage, output_dir)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if stage == "augment":
        return {"paragraphs": sum(len(a["paragraphs"]) for a in data["data"])}
    if stage == "report":
        return {r["model"]: {"f1": round(r["f1"], 2), "speedup": round(r["speedup"], 2)} for r in data["rows"]}
    if stage == "evaluate":
        return {k: round(data[k], 2) for k in ("exact", "f1") if k in data}
    metrics = {k: round(v, 4) for k, v in (data.get("eval_metrics") or {}).items()
               if k in ("exact", "f1", "loss") and isinstance(v, float)}
    metrics.update({k: round(v, 1) for k, v in (data.get("train_metrics") or {}).items() if k == "train_runtime_s"})
    return metrics

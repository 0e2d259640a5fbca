"""README.md model cards, in the Hugging Face Hub's format, for every model dir the scripts export.

A card is one function of data, :func:`model_card`: the run record (``kd.records.run_record`` plus the final
metrics, what ``all_results.json`` holds), facts about the saved weights (:func:`model_facts`) and the model's
``qa_settings.json``. It opens with the Hub's YAML metadata (library, pipeline tag: question-answering, or
feature-extraction for a bare encoder, which would answer with an untrained head; tags with the stage,
``base_model`` when the run started from a hub model, ``datasets``, and ``model-index`` with EM/F1 on the
validation set when the run evaluated them), then says what the model is, how it was distilled (the settings
and the exact command), its windows, metrics and speed, and how to use it (predict.py, Haystack's
TransformersExtractiveReader with the saved windows). :func:`write_model_card` gathers the inputs from the output
dir and writes ``README.md`` atomically; the scripts call it on the main process once the model, tokenizer and
qa_settings.json are written, just before ``all_results.json``.

Local paths never go into the metadata (the Hub rejects them as ``base_model`` and ``datasets``); the text names
them instead.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shlex

from kd.files import write_text_atomic

CARD_FILE = "README.md"
KD_QA = "kd-qa"  # what the cards call this toolkit

# script -> (tag, what the stage does)
STAGES = {
    "make_student.py": ("student-init", "keeping a selection of a teacher's layers (DistilBERT-style "
                                        "initialisation)"),
    "train_general.py": ("general-distillation", "general distillation on raw text (step 1 of TinyBERT's recipe)"),
    "train_task_intermediate.py": ("task-intermediate-distillation",
                                   "task-specific intermediate-layer distillation (step 2 of TinyBERT's recipe)"),
    "train_prediction.py": ("prediction-layer-distillation",
                            "prediction-layer distillation (step 3 of TinyBERT's recipe)"),
}
FINE_TUNING = ("fine-tuning", "fine-tuning on the gold answer spans (no teacher)")
# SQuAD metrics in the Hub's model-index: our key -> (metric type, display name)
INDEX_METRICS = {"exact": ("exact_match", "Exact Match"), "f1": ("f1", "F1")}
WINDOW_DOC = {"max_seq_length": "tokens per window, all included", "doc_stride": "context tokens shared by "
              "consecutive windows of a long context", "max_query_length": "question tokens kept",
              "max_answer_length": "longest answer, in tokens", "n_best_size": "start/end candidates per window",
              "version_2_with_negative": "may answer 'no answer' (evaluated on unanswerable questions too)",
              "no_answer_threshold": "no answer when the null score beats the best span by more than this"}


# ---------------------------------------------------------------------------------------------------------------
# Inputs from disk
# ---------------------------------------------------------------------------------------------------------------
def model_facts(model_dir: str) -> dict:
    """What a saved model dir holds: architecture, layers, width, heads, parameters and bytes of weights (from
    config.json and the safetensors headers; no weights are loaded). {} for a hub name or a dir without config."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)  # maps the family's own names (DistilBERT's n_layers, dim, ...)
    facts = {k: getattr(config, k, None) for k in ("model_type", "architectures", "num_hidden_layers", "hidden_size",
                                                   "num_attention_heads")}
    weights = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if weights:
        from safetensors import safe_open

        from kd.model_eval import model_size_on_disk

        count = 0
        for file in weights:  # the headers only: tied weights are stored once, as model.num_parameters() counts
            with safe_open(file, framework="np") as f:
                count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        facts.update(num_parameters=count, size_on_disk_bytes=model_size_on_disk(model_dir))
    return facts


def write_model_card(output_dir: str, record: dict) -> str:
    """Write ``output_dir/README.md`` for the model saved there, from the run's ``record`` (call on the main
    process, after the model, tokenizer and qa_settings.json are written). Returns the card."""
    from kd.qa_settings import load_qa_settings

    args = record.get("args", {})
    teacher = args.get("teacher_name_or_path") or (record.get("student") or {}).get("teacher")
    facts = model_facts(output_dir)
    if teacher and os.path.isdir(teacher):
        facts["teacher_num_hidden_layers"] = model_facts(teacher).get("num_hidden_layers")
    card = model_card(record, facts, load_qa_settings(output_dir))
    write_text_atomic(os.path.join(output_dir, CARD_FILE), card)
    return card


# ---------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------
def hub_id(name: str | None) -> str | None:
    """``name`` when it names a model or dataset on the Hub, None for a local path (or nothing)."""
    if not name or os.path.exists(name) or name.startswith(("/", ".", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def stage(record: dict) -> tuple[str, str]:
    """(tag, description) of the stage that made the model."""
    if record.get("script") == "train_prediction.py" and not record.get("args", {}).get("teacher_name_or_path"):
        return FINE_TUNING
    return STAGES.get(record.get("script"), ("kd-qa", "a kd-qa run"))


def model_card(record: dict, facts: dict | None = None, qa_settings: dict | None = None) -> str:
    """The README.md of a model dir: Hub metadata + text, from the run ``record`` (as in all_results.json),
    ``facts`` of the saved model (:func:`model_facts`, plus ``teacher_num_hidden_layers`` when known) and its
    ``qa_settings`` (qa_settings.json)."""
    facts, qa_settings = facts or {}, qa_settings or {}
    args = record.get("args", {})
    tag, _ = stage(record)
    name = record.get("hub_model_id") or os.path.basename(os.path.normpath(args.get("output_dir") or "model"))
    qa_model = is_qa_model(record, facts)
    sections = [f"# {name}", what_it_is(record, facts), data_section(record), settings_section(record),
                window_section(record, qa_settings), metrics_section(record), speed_section(record),
                usage_section(record, qa_settings, qa_model), command_section(record)]
    body = "\n\n".join(s for s in sections if s)
    return f"---\n{metadata(record, name, tag, qa_model).to_yaml()}\n---\n\n{body}\n"


def is_qa_model(record: dict, facts: dict) -> bool:
    """Whether the saved model has a QA head (a bare encoder is loaded with a new, untrained one)."""
    if facts.get("architectures"):
        return any(a.endswith("ForQuestionAnswering") for a in facts["architectures"])
    return record.get("script") not in ("train_general.py",) and \
        (record.get("student") or {}).get("head", "qa") == "qa"


def metadata(record: dict, name: str, tag: str, qa_model: bool):
    """The YAML block: huggingface_hub's own ModelCardData, so that the keys and model-index are the Hub's."""
    from huggingface_hub import EvalResult, ModelCardData

    args = record.get("args", {})
    base = hub_id(start_model(record))
    dataset = hub_id(args.get("dataset_name"))
    tags = ["knowledge-distillation"] if tag != FINE_TUNING[0] else []
    tags += ["question-answering", tag, KD_QA]
    results = []
    eval_metrics = record.get("eval_metrics") or {}
    if all(k in eval_metrics for k in INDEX_METRICS):
        validation = validation_source(record)
        for key, (metric_type, metric_name) in INDEX_METRICS.items():
            results.append(EvalResult(
                task_type="question-answering", task_name="Question Answering",
                dataset_type=dataset if not args.get("validation_file") and dataset else "json",
                dataset_name=validation, dataset_config=None if args.get("validation_file") else
                args.get("dataset_config_name"), dataset_split="validation",
                metric_type=metric_type, metric_value=round(float(eval_metrics[key]), 2), metric_name=metric_name))
    # a bare encoder answers nothing until a QA head is trained: no QA widget for it
    return ModelCardData(library_name="transformers", pipeline_tag="question-answering" if qa_model else
                         "feature-extraction", tags=tags, base_model=base, datasets=[dataset] if dataset else None,
                         model_name=name if results else None, eval_results=results or None)


def start_model(record: dict) -> str | None:
    """The model the run started from: --model_name_or_path; make_student.py's (and a general student cut from
    it) the teacher's; None for a randomly initialised student."""
    args, origin = record.get("args", {}), record.get("student") or {}
    if record.get("script") == "make_student.py" or "teacher_layers" in origin:
        return args.get("teacher_name_or_path")
    return args.get("model_name_or_path")


def validation_source(record: dict) -> str:
    args = record.get("args", {})
    if args.get("validation_file"):
        return os.path.basename(args["validation_file"])
    return args.get("dataset_name") or "validation set"


def _name(value: str | None, dataset: bool = False) -> str:
    """A model or dataset for the text: a link when it is on the Hub, the path as given otherwise."""
    if value is None:
        return "(none)"
    hub = hub_id(value)
    url = f"https://huggingface.co/{'datasets/' if dataset else ''}{hub}"
    return f"[{hub}]({url})" if hub else f"`{value}` (a local path)"


def what_it_is(record: dict, facts: dict) -> str:
    args, origin = record.get("args", {}), record.get("student") or {}
    _, doing = stage(record)
    teacher = args.get("teacher_name_or_path") or origin.get("teacher")
    script = record.get("script")
    lines = [f"Made with {KD_QA} by {doing}."]
    if script == "make_student.py":
        layers = origin.get("teacher_layers_kept")
        lines.append(f"The student keeps the embeddings and blocks {layers} of the teacher {_name(teacher)}"
                     + (f" (of its {facts['teacher_num_hidden_layers']})" if facts.get("teacher_num_hidden_layers")
                        else "") + ", weights copied, and its tokenizer" + _pruned_vocab(origin.get("vocab")) + ".")
    elif teacher:
        start = ("a random initialisation of size " + json.dumps(origin["size"]) if "size" in origin else
                 f"blocks {origin['teacher_layers']} of the teacher" if "teacher_layers" in origin else
                 _name(start_model(record)))
        lines.append(f"Student of the teacher {_name(teacher)}"
                     + (f" ({facts['teacher_num_hidden_layers']} layers)" if facts.get("teacher_num_hidden_layers")
                        else "") + f", starting from {start}.")
    else:
        lines.append(f"Fine-tuned from {_name(start_model(record))}.")
    shape = []
    if facts.get("num_hidden_layers") is not None:
        shape.append(f"{_plural(facts['num_hidden_layers'], 'layer')}, hidden size {facts.get('hidden_size')}, "
                     f"{facts.get('num_attention_heads')} attention heads ({facts.get('model_type')})")
    if facts.get("num_parameters"):
        shape.append(f"{facts['num_parameters'] / 1e6:.1f}M parameters")
    if facts.get("size_on_disk_bytes"):
        shape.append(f"{facts['size_on_disk_bytes'] / 2**20:.1f} MiB of weights on disk")
    if shape:
        lines.append("Size: " + "; ".join(shape) + ".")
    if script == "train_general.py" or (script == "make_student.py" and origin.get("head") == "none"):
        lines.append("A bare encoder: `AutoModelForQuestionAnswering` loads it with a new, untrained QA head; "
                     "distil or fine-tune it for QA before use (train_task_intermediate.py, train_prediction.py).")
    elif script == "train_task_intermediate.py":
        lines.append("An intermediate checkpoint: this stage trains the encoder's layers only; the QA head is as "
                     "it was initialised. Train it with train_prediction.py (step 3) before using it for QA.")
    elif script == "make_student.py":
        lines.append("Not trained since its layers were cut from the teacher: distil it (train_task_intermediate.py, "
                     "train_prediction.py) before use.")
    return "\n".join(lines)


def _pruned_vocab(vocab: dict | None) -> str:
    """make_student.py --prune_vocab_file's pruning, as the end of a sentence ('' without it)."""
    if not vocab:
        return ""
    return (f", with its vocabulary pruned to {vocab['vocab_size']} of {vocab['teacher_vocab_size']} tokens "
            f"(the most frequent of `{vocab['data_file']}`, {100 * vocab['coverage']:.1f} % of its tokens, and "
            "every single character, so no text gets a new unknown token)")


def data_section(record: dict) -> str:
    args = record.get("args", {})
    items = []
    if record.get("script") == "train_general.py":
        corpus = record.get("corpus") or {}
        files = record.get("corpus_files") or args.get("corpus_files") or []  # resolved, else as typed
        if len(files) > 5:
            source = f"{len(files)} local files (" + ", ".join(f"`{p}`" for p in args.get("corpus_files") or []) + ")"
        elif files:
            source = ", ".join(f"`{os.path.basename(f)}`" for f in files)
        else:
            config = args.get("dataset_config_name")
            source = _name(args.get("dataset_name"), dataset=True) + (f" ({config})" if config else "")
        counts = ", ".join(f"{corpus[k]} {k[4:]}" for k in ("num_documents", "num_tokens", "num_sequences")
                           if corpus.get(k) is not None)
        items.append(f"- corpus: {source}" + (f" ({counts})" if counts else ""))
    elif record.get("script") != "make_student.py":
        train = (f"`{os.path.basename(args['train_file'])}` (a local SQuAD-format file)" if args.get("train_file")
                 else _name(args.get("dataset_name"), dataset=True))
        items.append(f"- training questions: {train}" + (f", the first {args['max_train_samples']}"
                                                          if args.get("max_train_samples") else ""))
        if args.get("validation_file") or args.get("dataset_name"):
            validation = (f"`{os.path.basename(args['validation_file'])}` (a local SQuAD-format file)"
                          if args.get("validation_file") else _name(args.get("dataset_name"), dataset=True))
            items.append(f"- validation: {validation}" + (f", the first {args['max_eval_samples']}"
                                                          if args.get("max_eval_samples") else ""))
    return "## Data\n\n" + "\n".join(items) if items else ""


def settings_section(record: dict) -> str:
    """The distillation settings the record holds, then the optimisation ones."""
    args, items = record.get("args", {}), []
    script = record.get("script")
    if script == "train_prediction.py" and args.get("teacher_name_or_path"):
        w = record.get("distillation_loss_weight", args.get("distillation_loss_weight"))
        items += [f"- loss = w · T² · {args.get('distillation_loss')}(teacher_T ‖ student_T) + (1 − w) · "
                  "CE(gold spans), over the start and end distributions",
                  f"- temperature T: {args.get('temperature')}", f"- distillation_loss_weight w: {w}",
                  f"- distillation_loss: {args.get('distillation_loss')}"]
    distiller = record.get("distiller")
    if isinstance(distiller, dict):
        items.append(f"- loss_kind: {distiller.get('loss_kind')}")
        layer_map = record.get("layer_map") or distiller.get("layer_map")
        items.append(f"- layer map (student layer: teacher layer, 0 = embeddings): {_layer_map(layer_map)} "
                     f"(--layer_map {args.get('layer_map')})")
        weights = {k: v for k, v in (distiller.get("weights") or {}).items() if v}
        items.append("- loss weights: " + ", ".join(f"{k} {v:g}" for k, v in weights.items()))
        if distiller.get("relation_heads"):
            items.append(f"- relation heads: {distiller['relation_heads']}")
        projections = [k for k in ("hidden_projection", "embedding_projection") if distiller.get(k)]
        if projections:
            items.append("- trained projections (widths differ; not exported): " + ", ".join(projections))
    if record.get("teacher_tokenization"):
        window = record.get("teacher_window") or {}
        items.append(f"- teacher tokenization: {record['teacher_tokenization']}; the teacher ran on its own windows "
                     f"({', '.join(f'{k}={v}' for k, v in window.items())}) and its distributions were aligned by "
                     f"{record.get('teacher_target_alignment')}")
    if record.get("teacher_dtype"):
        items.append(f"- teacher precision: {record['teacher_dtype']}")
    if "learning_rate" in args:
        processes = record.get("num_processes") or 1
        batch = args.get("per_device_train_batch_size")
        accumulation = args.get("gradient_accumulation_steps") or 1
        steps = record.get("total_steps")
        items.append(f"- optimisation: AdamW, learning rate {args['learning_rate']:g} ({args.get('lr_scheduler_type')}"
                     f" schedule), {steps} steps of {batch * processes * accumulation} samples ({batch} per device × "
                     f"{_processes(processes)} × {accumulation} accumulation), seed {args.get('seed')}")
    if script == "make_student.py":
        origin = record.get("student") or {}
        items.append(f"- teacher blocks kept (1-based): {origin.get('teacher_layers_kept')}; head: "
                     f"{origin.get('head', args.get('head'))}")
    return "## Distillation settings\n\n" + "\n".join(items) if items else ""


def _plural(n, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _processes(n) -> str:
    return _plural(n, "process")


def _layer_map(layer_map) -> str:
    if isinstance(layer_map, list):
        return ", ".join(f"{s}:{t}" for s, t in layer_map)
    return str(layer_map)


def window_section(record: dict, qa_settings: dict) -> str:
    if record.get("script") == "train_general.py":
        packing = "one document per sequence" if record.get("args", {}).get("respect_document_boundaries") \
            else "documents packed back to back"
        return (f"## Windows\n\nTrained on sequences of {record['args'].get('max_seq_length')} tokens "
                f"({packing}); no QA windows yet.")
    if not qa_settings:
        return ""
    rows = [f"| `{k}` | {v} | {WINDOW_DOC[k]} |" for k, v in qa_settings.items() if k in WINDOW_DOC]
    whose = ("The teacher's settings" if record.get("script") == "make_student.py" else
             "The settings it was trained with")
    text = (f"## Windows\n\n{whose}, saved in `qa_settings.json` (predict.py and evaluate.py read them; give them "
            "to any other reader too: a model served on other windows sees contexts unlike those it learnt "
            "from).\n\n| setting | value | meaning |\n|---|---|---|\n" + "\n".join(rows))
    if qa_settings.get("no_answer_threshold_source"):
        text += f"\n\nThe no-answer threshold is the {qa_settings['no_answer_threshold_source']}."
    return text


def metrics_section(record: dict) -> str:
    metrics = {k: v for k, v in (record.get("eval_metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        return ""
    where = validation_source(record)
    if record.get("script") == "train_task_intermediate.py":
        head = f"Held-out intermediate losses on {where} (no answers are predicted in this stage):"
    else:
        total = metrics.get("total")
        head = f"SQuAD metrics on {where}" + (f" ({total} questions)" if total else "") + \
            ", from the last evaluation of the run (`eval_results.json`, `predictions.json`):"
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return f"## Evaluation\n\n{head}\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)


def speed_section(record: dict) -> str:
    """Inference speed when the record holds it (evaluate.py's keys); the training throughput otherwise."""
    found = {**(record.get("eval_metrics") or {}), **(record.get("speed") or {})}
    timing = {k: v for k, v in found.items() if k.startswith(("latency_ms", "throughput"))}
    train = record.get("train_metrics") or {}
    items = [f"- {k}: {v:.4g}" for k, v in timing.items() if isinstance(v, (int, float))]
    if train.get("train_samples_per_s"):
        items.append(f"- training: {train['train_samples_per_s']:.4g} samples/s"
                     + (f", {train['train_tokens_per_s']:.4g} tokens/s" if train.get("train_tokens_per_s") else "")
                     + f" on {_processes(record.get('num_processes', 1))}, {train.get('train_runtime_s', 0):.0f} s "
                     "in all")
    if not items:
        return ""
    if not timing:
        items.append("- inference latency and throughput: not measured in this run; `python evaluate.py "
                     "--model_name_or_path MODEL --validation_file dev.json` measures them")
    return "## Speed\n\n" + "\n".join(items)


def usage_section(record: dict, qa_settings: dict, qa_model: bool) -> str:
    args = record.get("args", {})
    model = record.get("hub_model_id") or args.get("output_dir")
    if not qa_model or record.get("script") in ("train_task_intermediate.py", "make_student.py"):
        nxt = ("train_task_intermediate.py" if record.get("script") in ("train_general.py", "make_student.py")
               else "train_prediction.py")
        return (f"## Use\n\nAs the student of the next stage:\n\n```bash\naccelerate launch {nxt} "
                f"--model_name_or_path {shlex.quote(model)} --teacher_name_or_path TEACHER ...\n```")
    window = {"max_seq_length": qa_settings.get("max_seq_length", args.get("max_seq_length", 384)),
              "stride": qa_settings.get("doc_stride", args.get("doc_stride", 128))}
    return f"""## Use

With {KD_QA}'s `predict.py` (reads `qa_settings.json`: the windows and no-answer threshold above):

```bash
python predict.py --model_name_or_path {shlex.quote(model)} \\
    --question "Who gave their name to Normandy?" \\
    --context "The Normans were the people who gave their name to Normandy, a region in France."
```

With Haystack 3 (`pip install transformers-haystack`), on the windows it was trained with:

```python
from haystack import Document
from haystack_integrations.components.readers.transformers import TransformersExtractiveReader

reader = TransformersExtractiveReader(model={json.dumps(model)}, max_seq_length={window['max_seq_length']}, \
stride={window['stride']})
result = reader.run(query="Who gave their name to Normandy?",
                    documents=[Document(content="The Normans gave their name to Normandy, a region in France.")])
print(result["answers"][0].data)
```"""


def command_section(record: dict) -> str:
    """The exact command of the run (as recorded: paths as typed), and where it ran."""
    script, argv = record.get("script", "SCRIPT"), record.get("argv", [])
    chunks, current = [], []
    for arg in argv:  # one flag and its values per line
        if arg.startswith("--") and current:
            chunks.append(" ".join(shlex.quote(a) for a in current))
            current = []
        current.append(arg)
    if current:
        chunks.append(" ".join(shlex.quote(a) for a in current))
    launcher = "python" if script == "make_student.py" else "accelerate launch"
    command = " \\\n    ".join([f"{launcher} {script}", *chunks])
    where = []
    if record.get("num_processes"):
        where.append(f"{_processes(record['num_processes'])} ({record.get('distributed_type')}, mixed precision "
                     f"{record.get('mixed_precision')})")
    if record.get("git_sha"):
        where.append(f"{KD_QA} at git {record['git_sha']}")
    versions = record.get("versions") or {}
    if versions:
        where.append(", ".join(f"{k} {v}" for k, v in versions.items()))
    records = ("`student_origin.json`" if script == "make_student.py" else
               "`all_results.json` (arguments, resolved settings, metrics) and `train_log.jsonl`")
    return (f"## How it was made\n\n```bash\n{command}\n```\n\n" + ("; ".join(where) + ". " if where else "")
            + f"The record of the run: {records}.")

"""Model cards (README.md), HF's flat metric keys in all_results.json, and --push_to_hub: cards from records, a
tiny train_prediction.py run that pushes while offline (the upload fails, the local output is complete), and the
upload itself against a stand-in for huggingface_hub's HfApi."""

from __future__ import annotations

import json
import os
import shlex
import sys
from types import SimpleNamespace

import pytest
import yaml
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from kd.hub import UPLOAD_EXCLUDE, files_to_upload, push_to_hub
from kd.model_card import model_card
from kd.records import flat_metrics, run_record
from tests.helpers import launch, read_json

WINDOW = ["--max_seq_length", "128", "--doc_stride", "48", "--max_query_length", "32"]
SECRET = "hf_NOT_A_REAL_TOKEN_1234567890"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def prediction_record(**args) -> dict:
    """A step-3 record as train_prediction.py writes it: hub student and teacher, a hub dataset, SQuAD 2.0 metrics."""
    argv = ["--model_name_or_path", "org/student-init", "--teacher_name_or_path", "deepset/roberta-base-squad2",
            "--dataset_name", "squad_v2", "--temperature", "3", "--distillation_loss_weight", "0.7",
            "--max_seq_length", "256", "--doc_stride", "96", "--output_dir", "runs/student"]
    return {
        "script": "train_prediction.py", "argv": argv,
        "args": {"model_name_or_path": "org/student-init", "teacher_name_or_path": "deepset/roberta-base-squad2",
                 "dataset_name": "squad_v2", "dataset_config_name": None, "train_file": None, "validation_file": None,
                 "temperature": 3.0, "distillation_loss_weight": 0.7, "distillation_loss": "kl_div",
                 "max_seq_length": 256, "doc_stride": 96, "max_query_length": 64, "output_dir": "runs/student",
                 "learning_rate": 3e-5, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
                 "lr_scheduler_type": "linear", "seed": 42, **args},
        "git_sha": "0123456789abcdef0123456789abcdef01234567", "num_processes": 4, "mixed_precision": "bf16",
        "distributed_type": "DistributedType.MULTI_GPU", "versions": {"torch": "2.13.0", "transformers": "5.2.0"},
        "distillation_loss_weight": 0.7, "hub_model_id": None, "total_steps": 1000,
        "train_metrics": {"train_runtime_s": 3600.5, "train_samples_per_s": 250.25, "completed_steps": 1000},
        "eval_metrics": {"exact": 78.123456, "f1": 81.98765, "total": 11873, "HasAns_exact": 75.1, "HasAns_f1": 81.2,
                         "HasAns_total": 5928, "NoAns_exact": 81.1, "NoAns_f1": 81.1, "NoAns_total": 5945,
                         "best_f1": 82.5, "best_f1_thresh": -1.25},
    }


QA_SETTINGS = {"max_seq_length": 256, "doc_stride": 96, "max_query_length": 64, "max_answer_length": 30,
               "n_best_size": 20, "version_2_with_negative": True, "no_answer_threshold": -1.25,
               "no_answer_threshold_source": "best_f1_thresh on squad_v2"}
FACTS = {"model_type": "roberta", "architectures": ["RobertaForQuestionAnswering"], "num_hidden_layers": 6,
         "hidden_size": 768, "num_attention_heads": 12, "num_parameters": 81_529_346,
         "size_on_disk_bytes": 326_000_000, "teacher_num_hidden_layers": 12}


# ---------------------------------------------------------------------------------------------------------------
# The card as a function of the record
# ---------------------------------------------------------------------------------------------------------------
def test_card_of_a_distilled_student_has_hub_metadata_metrics_command_and_windows():
    record = prediction_record()
    card = model_card(record, FACTS, QA_SETTINGS)
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "question-answering"
    assert {"knowledge-distillation", "question-answering", "prediction-layer-distillation"} <= set(meta["tags"])
    assert meta["base_model"] == "org/student-init" and meta["datasets"] == ["squad_v2"]
    assert "- validation: [squad_v2](https://huggingface.co/datasets/squad_v2)" in card
    (index,) = meta["model-index"]
    assert index["name"] == "student"
    (result,) = index["results"]
    assert result["task"]["type"] == "question-answering"
    assert result["dataset"] == {"name": "squad_v2", "type": "squad_v2", "split": "validation"}
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics == {"exact_match": round(record["eval_metrics"]["exact"], 2),
                       "f1": round(record["eval_metrics"]["f1"], 2)}
    assert {m["name"] for m in result["metrics"]} == {"Exact Match", "F1"}

    # the body: teacher, size, distillation settings, the exact command, windows, metrics, speed, use
    assert "[deepset/roberta-base-squad2](https://huggingface.co/deepset/roberta-base-squad2) (12 layers)" in card
    assert "6 layers" in card and "81.5M parameters" in card
    assert "temperature T: 3.0" in card and "distillation_loss_weight w: 0.7" in card and "kl_div" in card
    assert "accelerate launch train_prediction.py \\\n    --model_name_or_path org/student-init \\\n" in card
    assert "    --temperature 3 \\\n    --distillation_loss_weight 0.7 \\\n" in card
    assert "4 processes (DistributedType.MULTI_GPU, mixed precision bf16)" in card and record["git_sha"] in card
    assert "| `max_seq_length` | 256 |" in card and "| `doc_stride` | 96 |" in card
    assert "| `no_answer_threshold` | -1.25 |" in card
    assert "| HasAns_f1 | 81.2 |" in card and "| NoAns_total | 5945 |" in card
    assert "250.2 samples/s" in card
    assert "python predict.py --model_name_or_path runs/student" in card
    assert 'TransformersExtractiveReader(model="runs/student", max_seq_length=256, stride=96)' in card
    assert "from haystack_integrations.components.readers.transformers import TransformersExtractiveReader" in card


def test_local_paths_are_named_in_the_text_not_in_the_metadata(tmp_path):
    student, data = tmp_path / "student_init", tmp_path / "data"
    student.mkdir(), data.mkdir()
    train, dev = data / "train-v2.0.json", data / "dev-v2.0.json"
    record = prediction_record(model_name_or_path=str(student), teacher_name_or_path=str(tmp_path / "teacher"),
                               dataset_name=None, train_file=str(train), validation_file=str(dev))
    record["hub_model_id"] = "me/tiny-student"  # --push_to_hub: the card names the repo
    card = model_card(record, FACTS, QA_SETTINGS)
    meta = front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta  # the Hub rejects local paths there
    (result,) = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "me/tiny-student"
    assert result["dataset"]["name"] == "dev-v2.0.json" and result["dataset"]["type"] == "json"
    assert f"`{student}` (a local path)" in card
    assert "`train-v2.0.json` (a local SQuAD-format file)" in card and "`dev-v2.0.json`" in card
    assert "python predict.py --model_name_or_path me/tiny-student" in card


def test_card_of_an_intermediate_stage_has_its_layer_map_and_no_qa_metrics():
    record = {
        "script": "train_task_intermediate.py", "argv": ["--layer_map", "uniform"],
        "args": {"model_name_or_path": "runs/general", "teacher_name_or_path": "runs/teacher", "train_file": "aug.json",
                 "validation_file": "dev.json", "layer_map": "uniform", "output_dir": "runs/student_intermediate"},
        "distiller": {"layer_map": "...", "loss_kind": "tinybert", "relation_heads": None, "hidden_projection": True,
                      "weights": {"attention": 1.0, "hidden": 1.0, "embedding": 1.0, "relation": 0.0}},
        "layer_map": [[0, 0], [1, 4], [2, 8], [3, 12]], "teacher_dtype": "torch.bfloat16",
        "eval_metrics": {"loss": 0.5, "loss_att": 0.25},
    }
    facts = {**FACTS, "num_hidden_layers": 3}
    card = model_card(record, facts, {"max_seq_length": 384, "doc_stride": 128, "max_query_length": 64})
    meta = front_matter(card)
    assert "model-index" not in meta  # held-out losses are no QA metric
    assert "task-intermediate-distillation" in meta["tags"] and meta["pipeline_tag"] == "question-answering"
    assert "0:0, 1:4, 2:8, 3:12" in card and "loss_kind: tinybert" in card
    assert "attention 1, hidden 1, embedding 1" in card and "relation" not in card.split("loss weights:")[1][:40]
    assert "the QA head is as it was initialised" in card and "| loss_att | 0.25 |" in card
    assert "accelerate launch train_prediction.py --model_name_or_path runs/student_intermediate" in card


def test_card_of_a_bare_general_student_is_no_qa_widget():
    record = {"script": "train_general.py", "argv": [], "student": {"teacher_layers": [2, 4]},
              "args": {"teacher_name_or_path": "roberta-base", "model_name_or_path": None, "max_seq_length": 128,
                       "corpus_files": ["corpus/*.txt"], "output_dir": "runs/general"},
              "corpus_files": ["corpus/a.txt"], "corpus": {"num_documents": 3, "num_tokens": 1000}}
    card = model_card(record, {**FACTS, "architectures": ["RobertaModel"]}, {})
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "feature-extraction" and "general-distillation" in meta["tags"]
    assert meta["base_model"] == "roberta-base"  # cut from the teacher's blocks
    assert "blocks [2, 4] of the teacher" in card and "`a.txt` (3 documents, 1000 tokens)" in card
    assert "sequences of 128 tokens" in card


# ---------------------------------------------------------------------------------------------------------------
# Records: flat keys, no secrets
# ---------------------------------------------------------------------------------------------------------------
def test_flat_metrics_are_hf_names_of_the_nested_ones():
    record = prediction_record()
    flat = flat_metrics(record)
    for key, value in record["eval_metrics"].items():
        assert flat[f"eval_{key}"] == value
    assert flat["train_runtime"] == 3600.5 and flat["train_samples_per_second"] == 250.25
    assert flat["train_completed_steps"] == 1000
    assert flat_metrics({"eval_metrics": {"loss": 0.5, "note": "x", "flag": True}}) == {"eval_loss": 0.5}


def test_hub_token_never_reaches_a_record(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_prediction.py", "--push_to_hub", "--hub_token", SECRET,
                                      f"--hub_token={SECRET}", "--seed", "1"])
    accelerator = SimpleNamespace(num_processes=1, mixed_precision="no", distributed_type="NO")
    record = run_record({"hub_token": SECRET, "seed": 1}, accelerator)
    assert SECRET not in json.dumps(record)
    assert record["argv"] == ["--push_to_hub", "--hub_token", "<redacted>", "--hub_token=<redacted>", "--seed", "1"]
    assert record["args"] == {"hub_token": "<redacted>", "seed": 1}

    from kd.runtime import init_trackers  # W&B uploads its run config: no token there either

    sent = {}
    tracking = SimpleNamespace(log_with=["wandb"],
                               init_trackers=lambda project, config, init_kwargs: sent.update(config))
    init_trackers(tracking, "kd-qa", None, "out", {"hub_token": SECRET, "seed": 1})
    assert sent == {"hub_token": "<redacted>", "seed": 1}


# ---------------------------------------------------------------------------------------------------------------
# The scripts
# ---------------------------------------------------------------------------------------------------------------
def test_make_student_refuses_a_teacher_dir_without_tokenizer_files(tiny_bert_qa_dir, tmp_path, capsys):
    """The student would otherwise be saved with the 5-token tokenizer transformers makes from config.json."""
    import shutil

    import make_student

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_qa_dir / name, bare / name)
    with pytest.raises(SystemExit) as exit_info:
        make_student.main(["--teacher_name_or_path", str(bare), "--layers", "2", "--output_dir", str(tmp_path / "s")])
    assert exit_info.value.code == 2 and not (tmp_path / "s").exists()
    assert f"--teacher_name_or_path {bare}: no tokenizer files there" in capsys.readouterr().err


def test_make_student_writes_a_minimal_card(tiny_bert_qa_dir, tmp_path):
    import make_student

    out = tmp_path / "student_init"
    make_student.main(["--teacher_name_or_path", str(tiny_bert_qa_dir), "--layers", "2", "--output_dir", str(out)])
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert "student-init" in meta["tags"] and "base_model" not in meta  # a local teacher
    assert f"blocks [2] of the teacher `{tiny_bert_qa_dir}` (a local path) (of its 2)" in card
    assert "Size: 1 layer, hidden size 32" in card and "python make_student.py \\\n    --teacher_name_or_path" in card
    origin = read_json(out / "student_origin.json")
    assert {k: origin.pop(k) for k in ("teacher_parameters", "student_parameters")} == {
        "teacher_parameters": 66146, "student_parameters": 66146 - 8544}  # one block of hidden 32, FFN 64 fewer
    assert origin == {"teacher": str(tiny_bert_qa_dir), "teacher_layers_kept": [2]}


def test_push_to_hub_offline_fails_clearly_after_the_whole_local_output(tiny_bert_qa_dir, squad_fixture_path,
                                                                        tmp_path):
    """HF_HUB_OFFLINE=1 (as every test runs): the run trains, evaluates and writes everything, then the upload
    fails with one paragraph and a non-zero status."""
    out = tmp_path / "tiny-student"
    proc = launch("train_prediction.py", [
        "--model_name_or_path", tiny_bert_qa_dir, "--train_file", squad_fixture_path, "--validation_file",
        squad_fixture_path, "--output_dir", out, "--max_train_steps", "2", "--per_device_train_batch_size", "8",
        "--max_train_samples", "16", "--max_eval_samples", "24", "--checkpointing_steps", "1", *WINDOW,
        "--push_to_hub", "--hub_model_id", "me/tiny-student", "--hub_token", SECRET], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the upload to the Hugging Face Hub (me/tiny-student) failed (OfflineModeIsEnabled" in proc.stderr
    assert f"The local output at {out} is complete" in proc.stderr
    assert f"hf upload me/tiny-student {out} . --exclude 'checkpoints/*'" in proc.stderr
    assert proc.stderr.count("OfflineModeIsEnabled") == 1  # our paragraph, not a traceback of the script

    # every local output is there and whole
    AutoModelForQuestionAnswering.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert read_json(out / "qa_settings.json")["max_seq_length"] == 128
    results = read_json(out / "all_results.json")
    assert results["status"] == "finished" and results["hub_model_id"] == "me/tiny-student"
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
    # HF's flat keys beside the nested ones, equal
    nested = results["eval_metrics"]
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= nested.keys()
    for key, value in nested.items():
        assert results[f"eval_{key}"] == value
    assert results["train_runtime"] == results["train_metrics"]["train_runtime_s"]
    # the model card: the final metrics, the windows, the command
    card = (out / "README.md").read_text()
    metrics = {m["type"]: m["value"] for m in front_matter(card)["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"exact_match": round(nested["exact"], 2), "f1": round(nested["f1"], 2)}
    assert "| `max_seq_length` | 128 |" in card and "max_seq_length=128, stride=48" in card
    assert "accelerate launch train_prediction.py" in card and "--hub_token '<redacted>'" in card
    # the token is in no file (records and card are uploaded)
    for root, _, names in os.walk(out):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), name


# ---------------------------------------------------------------------------------------------------------------
# The upload
# ---------------------------------------------------------------------------------------------------------------
class FakeHfApi:
    """huggingface_hub.HfApi as far as push_to_hub uses it; upload_folder picks files with the library's own
    filter, as the real one does."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, exist_ok))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, allow_patterns=None, ignore_patterns=None,
                      **kwargs):
        from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

        paths = sorted(os.path.relpath(os.path.join(r, n), folder_path).replace(os.sep, "/")
                       for r, _, names in os.walk(folder_path) for n in names)
        uploaded = list(filter_repo_objects(paths, allow_patterns=allow_patterns,
                                            ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS))
        self.calls.append(("upload_folder", repo_id, repo_type, uploaded))


MODEL_FILES = ["README.md", "all_results.json", "config.json", "eval_results.json", "logs/kd-qa/events.out.tfevents.1",
               "model.safetensors", "null_odds.json", "predictions.json", "qa_settings.json", "run_config.json",
               "tokenizer.json", "tokenizer_config.json", "train_log.jsonl"]
DEBRIS = ["checkpoints/step_00000002/model.safetensors", "checkpoints/step_00000002/optimizer.bin",
          "checkpoints/step_00000003.partial/model.safetensors", "wandb/offline-run-1/run-1.wandb",
          "data_trace/rank0.jsonl", "run.json", "stage.log", "all_results.json.tmp-123", ".git/HEAD"]


@pytest.fixture
def output_dir(tmp_path):
    out = tmp_path / "tiny-student"
    for name in MODEL_FILES + DEBRIS:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    return out


def test_push_uploads_the_model_dir_without_checkpoints_or_debris(output_dir, monkeypatch, capsys):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    repo = push_to_hub(SimpleNamespace(is_main_process=True), str(output_dir), "tiny-student", token=SECRET)
    assert repo == "me/tiny-student"
    (init, create, upload) = FakeHfApi.calls
    assert init == ("init", SECRET) and create == ("create_repo", "tiny-student", True)
    assert upload[:3] == ("upload_folder", "me/tiny-student", "model")
    assert upload[3] == MODEL_FILES == files_to_upload(str(output_dir))  # what is listed is what goes
    printed = capsys.readouterr().out
    assert f"Uploading {len(MODEL_FILES)} files" in printed and "model.safetensors" in printed
    assert "checkpoints/" not in printed and "https://huggingface.co/me/tiny-student" in printed

    # other processes upload nothing
    FakeHfApi.calls = []
    assert push_to_hub(SimpleNamespace(is_main_process=False), str(output_dir), "tiny-student") is None
    assert FakeHfApi.calls == []


def test_a_failed_upload_says_the_local_output_is_complete_and_how_to_upload_it(output_dir, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    class NoToken(FakeHfApi):
        def create_repo(self, repo_id, exist_ok=False, **kwargs):
            raise LocalTokenNotFoundError("Token is required to call the API, but none was found.")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    before = sorted(p for p in output_dir.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub(SimpleNamespace(is_main_process=True), str(output_dir), "me/tiny-student")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one paragraph
    assert "(LocalTokenNotFoundError: Token is required to call the API, but none was found)" in err
    assert f"The local output at {output_dir} is complete" in err and "hf auth login" in err
    assert f"hf upload me/tiny-student {output_dir} . " + " ".join(f"--exclude {shlex.quote(p)}"
                                                                     for p in UPLOAD_EXCLUDE) in err
    assert sorted(p for p in output_dir.rglob("*")) == before


@pytest.mark.parametrize("script", ["train_prediction.py", "train_task_intermediate.py", "train_general.py"])
@pytest.mark.parametrize("extra, message", [
    (["--hub_token", SECRET], "--hub_token applies only with --push_to_hub; add --push_to_hub, or drop it."),
    (["--hub_model_id", "me/x"], "--hub_model_id applies only with --push_to_hub"),
    (["--push_to_hub", "--hub_model_id", "me/x/y"], "--hub_model_id 'me/x/y' is not a valid Hub repo id"),
    (["--push_to_hub", "--output_dir", "runs/my student!"],
     "the default repo name 'my student!' (the name of --output_dir runs/my student!) is not a valid Hub repo id"),
])
def test_hub_arguments_are_checked_up_front(script, extra, message, tiny_bert_qa_dir, squad_fixture_path, tmp_path,
                                            capsys):
    import importlib.util

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location(f"script_{script[:-3]}", REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = str(tiny_bert_qa_dir)
    common = {"train_prediction.py": ["--model_name_or_path", model, "--train_file", str(squad_fixture_path)],
              "train_task_intermediate.py": ["--model_name_or_path", model, "--teacher_name_or_path", model,
                                             "--train_file", str(squad_fixture_path)],
              "train_general.py": ["--teacher_name_or_path", model, "--student_layers", "1", "--train_file",
                                   str(REPO_ROOT / "tests" / "fixtures" / "wiki_leads_sample.txt"),  # read up front
                                   "--max_train_steps", "1"]}[script]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args([*common, "--output_dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # rejected before anything was written

    # the default repo is the output dir's name, as in run_qa_no_trainer.py
    _, resolved = module.parse_args([*common, "--output_dir", str(tmp_path / "my-student"), "--push_to_hub"])
    assert resolved["hub_model_id"] == "my-student"

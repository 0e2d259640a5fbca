"""The project's own sbatch script on a real single-node SLURM (started by slurm/local_cluster.sh; CI runs as root):
preempted with `scancel --signal=USR1`, the job requeues itself and the pipeline finishes with the weights of an
uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import FIXTURES_DIR
from tests.helpers import REPO_ROOT, read_json, script_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "local_cluster.sh")], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"SLURM could not be started:\n{proc.stdout}\n{proc.stderr}"


def _recipe(tmp_path, teacher) -> str:
    squad = str(FIXTURES_DIR / "squad_v2_dev_slice.json")
    window = {"max_seq_length": 128, "doc_stride": 48, "max_query_length": 32}
    stages = {
        "teacher": {"use": str(teacher)},
        "student_init": {"teacher_name_or_path": "${teacher}", "layers": "2"},
        "prediction": {"model_name_or_path": "${student_init}", "teacher_name_or_path": "${teacher}",
                       "train_file": squad, "max_train_steps": 80, "checkpointing_steps": 1,
                       "checkpoints_total_limit": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                       "temperature": 2, "seed": 4, **window},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"launch": "accelerate_configs/cpu.yaml", "stages": stages}))
    return str(path)


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_sbatch_job_preempted_requeues_itself_and_finishes_like_an_uninterrupted_run(cluster, tiny_bert_qa_dir,
                                                                                      tmp_path):
    recipe = _recipe(tmp_path, tiny_bert_qa_dir)
    env = {**script_env(), "PYTHON": sys.executable, "KD_REPO": str(REPO_ROOT), "KD_CACHE": str(tmp_path / "cache")}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(REPO_ROOT / "pipeline.py"), "--recipe", recipe, "--output_dir",
                    str(reference)], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=600)

    out, log = tmp_path / "slurm_run", tmp_path / "job.out"
    t0 = time.time()
    job_id = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(REPO_ROOT / "slurm" / "pipeline.sbatch"),
                             recipe, str(out)], cwd=REPO_ROOT, env=env, check=True, capture_output=True,
                            text=True).stdout.strip().split(";")[0]
    timeline = {"submitted": 0.0}
    checkpoints = out / "prediction" / "checkpoints"
    while not (checkpoints.is_dir() and any(n.startswith("step_") and not n.endswith(".partial")
                                            for n in os.listdir(checkpoints))):
        state = _job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state}: {log.read_text()[-3000:]}"
        assert time.time() - t0 < 300, "the prediction stage never saved a checkpoint"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    timeline["signalled"] = time.time() - t0

    while True:
        job = _job(job_id)
        if int(job.get("Restarts", 0)) >= 1 and "requeued" not in timeline:
            timeline["requeued"] = time.time() - t0
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        assert time.time() - t0 < 600, f"job {job_id} did not finish: {job.get('JobState')}"
        time.sleep(0.5)
    timeline["finished"] = time.time() - t0
    print(f"\nSLURM timeline (s): {timeline}")
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) == 1, text[-3000:]
    assert "requeueing job" in text and "Preempted by SIGUSR1" in (out / "prediction" / "stage.log").read_text()
    stages = read_json(out / "pipeline.json")["stages"]
    assert all(s["status"] == "finished" for s in stages.values())
    a = load_file(out / "prediction" / "model.safetensors")
    b = load_file(reference / "prediction" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-5 for k in a)


def test_two_node_launch_on_one_host_rendezvous(cluster, tiny_bert_qa_dir, tmp_path):
    """slurm/pipeline_multinode.sbatch with two tasks standing in for two nodes: each task starts its own
    `accelerate launch` (machine rank = task rank, main process = first host), one CPU process each, which meet
    in one 2-process DeepSpeed run (gloo)."""
    config = tmp_path / "two_machines.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                      "  zero_stage: 2\n  zero3_init_flag: false\nnum_processes: 2\nnum_machines: 2\n"
                      "mixed_precision: 'no'\n")
    recipe = yaml.safe_load(open(_recipe(tmp_path, tiny_bert_qa_dir)))
    recipe["launch"] = str(config)
    recipe["stages"]["prediction"].update(max_train_steps=4, checkpointing_steps=2)
    (tmp_path / "recipe2.yaml").write_text(yaml.safe_dump(recipe))
    env = {**script_env(), "PYTHON": sys.executable, "KD_REPO": str(REPO_ROOT), "KD_CACHE": str(tmp_path / "cache"),
           "DS_ACCELERATOR": "cpu", "KD_PROCS_PER_NODE": "1"}
    out, log = tmp_path / "two_nodes", tmp_path / "job2.out"
    job_id = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                             f"--output={log}", str(REPO_ROOT / "slurm" / "pipeline_multinode.sbatch"),
                             str(tmp_path / "recipe2.yaml"), str(out)], cwd=REPO_ROOT, env=env, check=True,
                            capture_output=True, text=True).stdout.strip().split(";")[0]
    t0 = time.time()
    while _job(job_id).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() - t0 < 600, "the two-node job did not finish"
        time.sleep(0.5)
    stage_log = (out / "prediction" / "stage.log").read_text() if (out / "prediction" / "stage.log").exists() else ""
    assert _job(job_id)["JobState"] == "COMPLETED", log.read_text()[-2000:] + stage_log[-4000:]
    record = read_json(out / "pipeline.json")["stages"]["prediction"]
    assert record["status"] == "finished" and record["command"][0] == "srun"
    results = read_json(out / "prediction" / "all_results.json")
    assert results["num_processes"] == 2 and results["distributed_type"] == "DistributedType.DEEPSPEED"
    assert results["state"]["completed_steps"] == 4

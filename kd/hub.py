"""Uploading a finished output dir to the Hugging Face Hub (``--push_to_hub``, as in HF's run_qa_no_trainer.py).

The upload comes last: the main process uploads once the local output is complete (model, tokenizer,
qa_settings.json where the stage writes one, the README.md model card, all_results.json). A failed upload
(offline, no token, no write access, the network) changes nothing locally; the run exits non-zero with one
paragraph saying that the local output is complete and the command that uploads it later. What travels is the
model dir and its records, not what only the local run needs (:data:`UPLOAD_EXCLUDE`: checkpoints, W&B's offline
dir, data traces, temp files).
"""

from __future__ import annotations

import os
import shlex
import sys

# Patterns on paths relative to the output dir, as huggingface_hub's upload_folder(ignore_patterns=...) takes them.
UPLOAD_EXCLUDE = [
    "checkpoints/*",  # optimizer states and per-step copies: large, and only a resumed run needs them
    "wandb/*",        # W&B's own run dir (synced with `wandb sync`, not the Hub)
    "data_trace/*",   # --trace_data debugging output
    "*.tmp-*",        # a write that never finished (kd.files)
    "run.json",       # which run owns the local dir (kd.run_dir)
    "preempted.json",
    "*.log",          # pipeline.py's stage.log: local paths and progress bars
]


def default_repo_id(output_dir: str) -> str:
    """The repo name run_qa_no_trainer.py uses without --hub_model_id: the output dir's own name."""
    return os.path.basename(os.path.abspath(output_dir))


def files_to_upload(output_dir: str) -> list[str]:
    """The files of ``output_dir`` (relative paths, sorted) that :func:`push_to_hub` uploads: the same filter
    upload_folder applies, with the same patterns."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects  # upload_folder adds these too

    paths = sorted(os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/")
                   for root, _, names in os.walk(output_dir) for name in names)
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_EXCLUDE + DEFAULT_IGNORE_PATTERNS))


def upload_command(repo_id: str, output_dir: str) -> str:
    """The `hf` command that uploads ``output_dir`` as :func:`push_to_hub` does."""
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in UPLOAD_EXCLUDE)
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(output_dir)} . {excludes}"


def push_to_hub(accelerator, output_dir: str, repo_id: str, token: str | None = None) -> str | None:
    """Create ``repo_id`` if needed and upload ``output_dir`` to it; main process only, the others return at once.

    Call when the local output is complete. Returns the repo id the Hub answered with (``name`` becomes
    ``user/name``). On any failure: the message of :func:`upload_failed_message` on stderr, then SystemExit(1).
    """
    if not accelerator.is_main_process:
        return None
    files = files_to_upload(output_dir)
    print(f"Uploading {len(files)} files of {output_dir} to the Hugging Face Hub ({repo_id}): {', '.join(files)}",
          flush=True)
    try:
        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=output_dir, repo_type="model",
                          ignore_patterns=UPLOAD_EXCLUDE, commit_message="Upload model and model card (kd-qa)")
    except Exception as err:  # offline, auth, permissions, network, a rejected README: the same way out for all
        print(upload_failed_message(err, repo_id, output_dir), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(f"Uploaded to https://huggingface.co/{repo_id}", flush=True)
    return repo_id


def upload_failed_message(err: BaseException, repo_id: str, output_dir: str) -> str:
    first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else "no message"
    return (f"error: the upload to the Hugging Face Hub ({repo_id}) failed ({type(err).__name__}: {first}). "
            f"The local output at {output_dir} is complete (model, tokenizer, README.md model card, "
            "all_results.json and the other records); nothing needs to run again. Upload it from a machine that "
            "reaches the Hub (HF_HUB_OFFLINE unset, a token with write access from `hf auth login` or HF_TOKEN) "
            "with: "
            f"{upload_command(repo_id, output_dir)}")

"""Student-from-teacher layer selection and the checkpoint manager's bookkeeping."""

import json
import os

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, RobertaConfig, RobertaForQuestionAnswering

from kd.checkpoint import STATE_FILE, CheckpointManager
from kd.student import parse_layer_selection, student_from_teacher_layers


@pytest.mark.parametrize("cls, config_cls", [(BertForQuestionAnswering, BertConfig),
                                             (RobertaForQuestionAnswering, RobertaConfig)])
def test_selected_layers_are_copied(cls, config_cls):
    torch.manual_seed(0)
    teacher = cls(config_cls(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                             intermediate_size=20, max_position_embeddings=40)).eval()
    student = student_from_teacher_layers(teacher, [2, 4, 6]).eval()
    assert student.config.num_hidden_layers == 3
    t_layers, s_layers = teacher.base_model.encoder.layer, student.base_model.encoder.layer
    for i, block in enumerate([2, 4, 6]):
        for (name, p_s), (_, p_t) in zip(s_layers[i].named_parameters(), t_layers[block - 1].named_parameters()):
            assert torch.equal(p_s, p_t), name
    assert torch.equal(student.base_model.embeddings.word_embeddings.weight,
                       teacher.base_model.embeddings.word_embeddings.weight)
    assert torch.equal(student.qa_outputs.weight, teacher.qa_outputs.weight)
    # the copy is a real 3-block model: same output as running the teacher's embeddings and blocks 2, 4, 6
    x = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        h = teacher.base_model.embeddings(input_ids=x)
        for block in (2, 4, 6):
            out = t_layers[block - 1](h)
            h = out[0] if isinstance(out, tuple) else out
        expected = teacher.qa_outputs(h)[..., 0]
        assert torch.allclose(student(input_ids=x).start_logits, expected, atol=1e-5)


def test_layer_selection_errors():
    assert parse_layer_selection("every_other", 6) == [2, 4, 6]
    with pytest.raises(ValueError, match="out of range"):
        parse_layer_selection("2,7", 6)
    with pytest.raises(ValueError, match="increasing"):
        parse_layer_selection("4,2", 6)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layer_selection("a,b", 6)


def _fake_checkpoint(root, step, finished=True):
    path = os.path.join(root, "checkpoints", f"step_{step:08d}" + ("" if finished else ".partial"))
    os.makedirs(path)
    if finished:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump({"epoch": 0, "batches_in_epoch": step, "completed_steps": step}, f)
    return path


def test_partial_and_stateless_checkpoints_are_never_resumed(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    assert manager.resolve("latest") is None  # nothing yet: start fresh
    good = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8, finished=False)  # killed mid-write
    os.makedirs(os.path.join(tmp_path, "checkpoints", "step_00000012"))  # renamed but no state file
    assert manager.latest() == good
    assert manager.resolve("latest") == good
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        manager.resolve(os.path.join(tmp_path, "checkpoints", "step_00000008.partial"))


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    manager = CheckpointManager(str(tmp_path), total_limit=2)
    manager._prune()
    assert [os.path.basename(p) for p in manager.completed()] == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("keep, left", [("all", ["step_00000002", "step_00000003"]), ("last", ["step_00000003"]),
                                        ("none", [])])
def test_finished_run_keeps_all_last_or_no_checkpoint(tmp_path, keep, left):
    from accelerate import Accelerator

    for step in (2, 3):
        _fake_checkpoint(tmp_path, step)
    manager = CheckpointManager(str(tmp_path))
    manager.last = os.path.join(tmp_path, "checkpoints", "step_00000003")
    remaining = manager.finish(Accelerator(cpu=True), keep)
    assert [os.path.basename(p) for p in manager.completed()] == left
    assert remaining == (manager.last if keep != "none" else None)
    with pytest.raises(ValueError, match="keep must be one of"):
        manager.finish(Accelerator(cpu=True), "some")

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertModel,
    CamembertConfig,
    CamembertForQuestionAnswering,
    DebertaV2Config,
    DebertaV2Model,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    ElectraConfig,
    ElectraForQuestionAnswering,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaForQuestionAnswering,
    XLMRobertaConfig,
    XLMRobertaForQuestionAnswering,
)

from kd.capture import LayerCapture, base_encoder, capture_teacher, model_inputs, unwrap_model
from kd.layer_map import parse_layer_map

BERT_LIKE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                 initializer_range=0.2)
MODELS = {
    "bert": lambda: BertForQuestionAnswering(BertConfig(**BERT_LIKE)),
    "roberta": lambda: RobertaForQuestionAnswering(RobertaConfig(**BERT_LIKE)),
    "xlm-roberta": lambda: XLMRobertaForQuestionAnswering(XLMRobertaConfig(**BERT_LIKE)),
    "camembert": lambda: CamembertForQuestionAnswering(CamembertConfig(**BERT_LIKE)),
    # embedding_size != hidden_size: layer 0 must be the projected embeddings the encoder sees
    "electra": lambda: ElectraForQuestionAnswering(ElectraConfig(**BERT_LIKE, embedding_size=16)),
    "distilbert": lambda: DistilBertForQuestionAnswering(
        DistilBertConfig(vocab_size=99, dim=32, n_layers=3, n_heads=4, hidden_dim=37, initializer_range=0.2)),
}


def make(name, attn="sdpa"):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.set_attn_implementation(attn)
    return model.eval()


def make_batch(batch_size=2, seq=7, pad_id=0):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    mask[-1, 4:] = 0
    ids = torch.randint(3, 99, (batch_size, seq), generator=g).masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "start_positions": torch.zeros(batch_size, dtype=torch.long)}


def additive_mask(mask):
    """[B, T] -> [B, 1, 1, T] with finfo.min on padded keys, as the eager attention adds it."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


@pytest.fixture
def count_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdpa_capture_equals_eager_attention_and_hidden_states(name, count_sdpa):
    model = make(name, attn="sdpa")
    batch = make_batch(pad_id=model.config.pad_token_id)
    inputs = model_inputs(model, batch)
    with LayerCapture(model, layers=(0, 2), what={"scores", "hidden", "qkv"}) as cap:
        model(**inputs)
    assert len(count_sdpa) == 3  # the fast kernel ran in every layer while capturing

    # Only mapped layers; no attention for layer 0 (embeddings).
    assert sorted(cap.hidden_states) == [0, 2]
    assert sorted(cap.attention_scores) == [2] and sorted(cap.qkv) == [2]
    assert cap.attention_scores[2].shape == (2, 4, 7, 7)
    assert all(x.shape == (2, 4, 7, 8) for x in cap.qkv[2])
    assert cap.hidden_states[0].shape == (2, 7, 32)

    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True, output_hidden_states=True)
    probs = torch.softmax(cap.attention_scores[2] + additive_mask(batch["attention_mask"]), dim=-1)
    torch.testing.assert_close(probs, ref.attentions[1], atol=1e-5, rtol=1e-5)
    for layer in (0, 2):
        torch.testing.assert_close(cap.hidden_states[layer], ref.hidden_states[layer], atol=1e-5, rtol=1e-5)

    # q, k, v are the projections of layer 2 applied to its input (the output of layer 1).
    base, layout = base_encoder(model)
    attention = base.get_submodule(layout.layers)[1].get_submodule(layout.attention)
    with torch.no_grad():
        for captured, proj in zip(cap.qkv[2], (layout.query, layout.key, layout.value)):
            expected = attention.get_submodule(proj)(ref.hidden_states[1]).view(2, 7, 4, 8).transpose(1, 2)
            torch.testing.assert_close(captured, expected, atol=1e-5, rtol=1e-5)


def test_scores_are_taken_before_attention_dropout():
    torch.manual_seed(0)
    config = BertConfig(**BERT_LIKE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.9)
    model = BertModel(config)
    batch = model_inputs(model, make_batch())
    with LayerCapture(model, layers=(1,), what={"scores"}) as cap:
        model.eval()
        model(**batch)
        eval_scores = cap.attention_scores[1]
        model.train()
        torch.manual_seed(1)
        train_out = model(**batch).last_hidden_state
    # Layer 1's scores depend only on the embeddings, which dropout does not touch here; its attention
    # probabilities (and so the output) are dropped out in training.
    torch.testing.assert_close(cap.attention_scores[1], eval_scores)
    model.eval()
    assert not torch.allclose(train_out, model(**batch).last_hidden_state)


def test_only_requested_kinds_are_stored():
    model = make("bert")
    with LayerCapture(model, layers=(0, 1, 3), what={"hidden"}) as cap:
        model(**model_inputs(model, make_batch()))
    assert sorted(cap.hidden_states) == [0, 1, 3]
    assert cap.attention_scores == {} and cap.qkv == {}


def test_capture_is_cleared_each_forward_and_stops_after_remove():
    model = make("bert")
    cap = LayerCapture(model, layers=(2,), what={"scores"}).register()
    model(**model_inputs(model, make_batch(batch_size=2)))
    model(**model_inputs(model, make_batch(batch_size=1)))
    assert cap.attention_scores[2].shape[0] == 1
    snapshot = cap.snapshot()
    cap.remove()
    model(**model_inputs(model, make_batch(batch_size=3)))
    assert cap.attention_scores[2].shape[0] == 1 and snapshot.attention_scores[2].shape[0] == 1


def test_wrapped_models_and_bare_encoders():
    model = make("bert")

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (real compile spawns workers)
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    assert unwrap_model(Compiled(nn.DataParallel(model))) is model
    wrapped = nn.DataParallel(model)  # CPU-only DataParallel just calls the module, like DDP's .module
    with LayerCapture(wrapped, layers=(1,), what={"hidden"}) as cap:
        wrapped(**model_inputs(model, make_batch()))
    assert cap.hidden_states[1].shape == (2, 7, 32)

    bare = model.bert  # no QA head: the model is its own base_model
    with LayerCapture(bare, layers=(1,), what={"hidden"}) as cap:
        bare(**model_inputs(bare, make_batch()))
    assert cap.hidden_states[1].shape == (2, 7, 32)


def test_student_capture_keeps_grad_teacher_capture_does_not():
    model = make("bert").train()
    batch = make_batch()
    with LayerCapture(model, layers=(0, 2), what={"scores", "hidden"}) as cap:
        model(**model_inputs(model, batch))
        assert cap.attention_scores[2].requires_grad and cap.hidden_states[0].requires_grad
    teacher = make("bert").train()
    result = capture_teacher(teacher, parse_layer_map("uniform", 3, 3), batch, {"scores", "hidden", "qkv"})
    assert not teacher.training
    assert sorted(result.hidden_states) == [0, 1, 2, 3] and sorted(result.attention_scores) == [1, 2, 3]
    assert not any(t.requires_grad for t in result.attention_scores.values())


def test_gradient_checkpointing_replay_does_not_overwrite_capture():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**BERT_LIKE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.gradient_checkpointing_enable()
    model.train()
    cap = LayerCapture(model, layers=(2,), what={"scores", "qkv"}).register()
    model(**model_inputs(model, make_batch()))
    scores, qkv = cap.attention_scores[2], cap.qkv[2]
    scores.pow(2).mean().backward()  # replays the checkpointed layers, hooks included
    assert cap.attention_scores[2] is scores and cap.qkv[2] is qkv
    assert model.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0
    cap.remove()


def test_model_inputs_keep_only_what_the_model_takes():
    batch = make_batch()
    assert set(model_inputs(make("bert"), batch)) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(model_inputs(make("distilbert"), batch)) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    "model",
    [
        lambda: GPT2Model(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4)),
        lambda: DebertaV2Model(DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=37)),
    ],
)
def test_unsupported_model_lists_supported_types(model):
    with pytest.raises(ValueError, match=r"Supported model types: bert, camembert, distilbert, electra, roberta"):
        LayerCapture(model(), layers=(1,), what={"hidden"})


def test_layer_index_out_of_range_and_unknown_kind():
    model = make("bert")
    with pytest.raises(ValueError, match=r"from 0 \(embeddings\) to 3"):
        LayerCapture(model, layers=(4,), what={"hidden"})
    with pytest.raises(ValueError, match="subset of"):
        LayerCapture(model, layers=(1,), what={"attentions"})

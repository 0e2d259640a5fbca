"""Vocabulary pruning: a student that keeps only the tokens its data uses, plus every token tokenization needs.

A teacher's word embeddings are most of a small student (MiniLM-L6's 30,522 x 384 are 68 % of its 3-layer
student), while SQuAD uses a fraction of the vocabulary. Pruning keeps, in the original id order:

- the special and added tokens, and every token id the model's config names (``pad_token_id`` ...);
- every token that is one character, alone or with the subword prefix/suffix (WordPiece ``a`` and ``##a``,
  byte-level BPE's 256 byte symbols), so any text still tokenizes without a new unknown;
- the data's most frequent tokens (:func:`choose_tokens`), and for BPE the merge parents of every kept token, so
  that a kept token can still be built; the merges are restricted to those whose parts and result are kept.

A word whose tokens are all kept tokenizes exactly as before (WordPiece: the longest match is still there and no
longer one appeared; BPE: no dropped merge was ever applied to it), so its embeddings, and the model's outputs,
are unchanged; other words split into more, shorter pieces. The tokenizer is edited at the ``tokenizers`` JSON
level (:func:`prune_tokenizer_json`): same normalizer, pre-tokenizer, post-processor and decoder, new ids.
WordPiece (BERT, MiniLM, ELECTRA, DistilBERT) and BPE (RoBERTa, GPT-2 style) models only.
"""

from __future__ import annotations

import collections
import copy
import json
import re

import torch

SUPPORTED_MODELS = ("WordPiece", "BPE")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-F]{2}>$")


def tokenizer_model(tokenizer_json: dict) -> dict:
    """The ``model`` section of a ``tokenizers`` JSON; ValueError for a model kind pruning does not support."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") not in SUPPORTED_MODELS:
        raise ValueError(f"the tokenizer is a {model.get('type')} model; vocabulary pruning supports "
                         f"{' and '.join(SUPPORTED_MODELS)} tokenizers (BERT-, RoBERTa-style)")
    return model


def id_to_token(tokenizer_json: dict) -> dict[int, str]:
    """Every id of the tokenizer (its model's vocabulary and its added tokens) -> token string."""
    tokens = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    tokens.update({a["id"]: a["content"] for a in tokenizer_json.get("added_tokens", [])})
    return tokens


def _merge_result(model: dict, left: str, right: str) -> str:
    """The token a BPE merge makes (the right part loses its continuing-subword prefix, as in ``tokenizers``)."""
    prefix = model.get("continuing_subword_prefix") or ""
    if prefix and right.startswith(prefix):
        right = right[len(prefix):]
    return left + right


def merges(model: dict) -> list[tuple[str, str]]:
    """A BPE model's merges as (left, right) pairs, whichever of the two JSON spellings it uses; [] for WordPiece."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def merge_parents(model: dict) -> dict[int, list[tuple[int, int]]]:
    """BPE: token id -> the (left id, right id) pairs whose merge makes it; {} for WordPiece."""
    vocab, parents = model["vocab"], collections.defaultdict(list)
    for left, right in merges(model):
        result = _merge_result(model, left, right)
        if left in vocab and right in vocab and result in vocab:
            parents[vocab[result]].append((vocab[left], vocab[right]))
    return dict(parents)


def with_ancestors(ids, parents: dict[int, list[tuple[int, int]]]) -> set[int]:
    """``ids`` and, transitively, the merge parents of each (so every kept BPE token can still be built)."""
    out, todo = set(), list(ids)
    while todo:
        i = todo.pop()
        if i not in out:
            out.add(i)
            todo.extend(p for pair in parents.get(i, ()) for p in pair)
    return out


def required_ids(tokenizer_json: dict, special_ids) -> set[int]:
    """The ids every pruned vocabulary keeps whatever the data: ``special_ids`` (the tokenizer's special tokens
    and the ids the model's config names), every added token and every token the post-processor inserts, every
    one-character token (alone or with the
    model's continuing-subword prefix / end-of-word suffix), byte-fallback tokens ``<0x..>``, and their BPE
    merge ancestors."""
    model = tokenizer_model(tokenizer_json)
    prefix = model.get("continuing_subword_prefix") or ""
    suffix = model.get("end_of_word_suffix") or ""

    def core(token: str) -> str:
        if prefix and token.startswith(prefix) and len(token) > len(prefix):
            token = token[len(prefix):]
        if suffix and token.endswith(suffix) and len(token) > len(suffix):
            token = token[:-len(suffix)]
        return token

    ids = set(special_ids) | {a["id"] for a in tokenizer_json.get("added_tokens", [])}
    ids |= {model["vocab"][t] for t in _post_processor_tokens(tokenizer_json.get("post_processor"))
            if t in model["vocab"]}
    ids |= {i for t, i in model["vocab"].items() if len(core(t)) == 1 or _BYTE_FALLBACK.match(t)}
    if model.get("unk_token") in model["vocab"]:
        ids.add(model["vocab"][model["unk_token"]])
    return with_ancestors(ids, merge_parents(model))


def token_counts(tokenizer_json: dict, texts: list[str], batch_size: int = 1000) -> collections.Counter:
    """How often each token id occurs in ``texts`` tokenized by the tokenizer (no special tokens, no truncation)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    counts = collections.Counter()
    for start in range(0, len(texts), batch_size):
        for encoding in tokenizer.encode_batch(texts[start:start + batch_size], add_special_tokens=False):
            counts.update(encoding.ids)
    return counts


def coverage(counts: collections.Counter, kept) -> float:
    """The share of the counted token occurrences whose token is in ``kept`` (1.0 when nothing was counted)."""
    total = sum(counts.values())
    return sum(n for i, n in counts.items() if i in kept) / total if total else 1.0


def choose_tokens(counts: collections.Counter, required: set[int], parents: dict[int, list[tuple[int, int]]],
                  vocab_size: int | None = None, target_coverage: float = 1.0) -> set[int]:
    """The kept ids: ``required`` plus the data's most frequent tokens (with their BPE merge ancestors), either up
    to ``vocab_size`` ids in all (a token whose ancestors do not fit is passed over) or, without ``vocab_size``,
    the fewest that make :func:`coverage` reach ``target_coverage``. Ties go to the lower id.

    Raises ValueError when ``vocab_size`` is smaller than ``required``.
    """
    kept = set(required)
    if vocab_size is not None and vocab_size < len(kept):
        raise ValueError(f"{len(kept)} tokens are required")
    total, covered = sum(counts.values()), sum(n for i, n in counts.items() if i in kept)
    for i, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if vocab_size is None and covered >= target_coverage * total:
            break
        new = with_ancestors([i], parents) - kept
        if vocab_size is not None and len(kept) + len(new) > vocab_size:
            continue
        kept |= new
        covered += sum(counts.get(j, 0) for j in new)
    return kept


def prune_tokenizer_json(tokenizer_json: dict, keep_ids: list[int]) -> dict:
    """A copy of a ``tokenizers`` JSON with only ``keep_ids`` (sorted old ids; old id ``keep_ids[k]`` becomes
    ``k``): its model's vocabulary, BPE merges whose parts and result are all kept, added tokens, and the special
    token ids of the post-processor and of padding. Normalizer, pre-tokenizer and decoder are unchanged."""
    out = copy.deepcopy(tokenizer_json)
    model = tokenizer_model(out)
    tokens = id_to_token(tokenizer_json)
    new_id = {tokens[old]: new for new, old in enumerate(keep_ids)}
    model["vocab"] = {t: new_id[t] for t in sorted(model["vocab"], key=model["vocab"].get) if t in new_id}
    if model["type"] == "BPE":
        kept = [m for m, (left, right) in zip(model["merges"], merges(model))
                if left in new_id and right in new_id and _merge_result(model, left, right) in new_id]
        model["merges"] = kept
    out["added_tokens"] = [{**a, "id": new_id[a["content"]]} for a in out.get("added_tokens", [])]
    _remap_post_processor(out.get("post_processor"), new_id)
    if out.get("padding") and out["padding"].get("pad_token") in new_id:
        out["padding"]["pad_id"] = new_id[out["padding"]["pad_token"]]
    return out


def _post_processor_tokens(processor: dict | None) -> set[str]:
    """The special tokens a post-processor inserts (see :func:`_remap_post_processor`)."""
    if not processor:
        return set()
    tokens = {t for inner in processor.get("processors") or [] for t in _post_processor_tokens(inner)}
    tokens |= {t for spec in (processor.get("special_tokens") or {}).values() for t in spec["tokens"]}
    return tokens | {processor[k][0] for k in ("cls", "sep") if isinstance(processor.get(k), list)}


def _remap_post_processor(processor: dict | None, new_id: dict[str, int]) -> None:
    """The special-token ids a post-processor inserts, in place: TemplateProcessing's ``special_tokens``,
    Bert/RobertaProcessing's ``cls``/``sep`` pairs, and those inside a Sequence."""
    if not processor:
        return
    for inner in processor.get("processors") or []:
        _remap_post_processor(inner, new_id)
    for spec in (processor.get("special_tokens") or {}).values():
        spec["ids"] = [new_id[t] for t in spec["tokens"]]
    for key in ("cls", "sep"):
        if isinstance(processor.get(key), list):
            processor[key] = [processor[key][0], new_id[processor[key][0]]]


def config_token_ids(config) -> dict[str, int]:
    """The token ids a model's config names: ``pad_token_id``, ``bos_token_id`` ... (ints only)."""
    return {k: v for k, v in config.to_dict().items() if k.endswith("_token_id") and isinstance(v, int)}


def vocab_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters indexed by token id: the input word embeddings ``(vocab, hidden)`` and, when the model has
    an output embedding (an MLM decoder, tied or not), its weight ``(vocab, hidden)`` and bias ``(vocab,)``."""
    tensors = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        tensors += [t for t in (out.weight, getattr(out, "bias", None)) if t is not None]
    return tensors


def prune_model_vocab(model: torch.nn.Module, keep_ids: list[int]) -> torch.nn.Module:
    """A model of the same class whose token-indexed weights keep the rows ``keep_ids`` (sorted old ids) in that
    order: old id ``keep_ids[k]`` becomes ``k``. ``config.vocab_size`` and the config's ``*_token_id`` follow.

    Raises ValueError when the config names a token id that is not kept.
    """
    config = copy.deepcopy(model.config)
    config.vocab_size = len(keep_ids)
    new_id = {old: new for new, old in enumerate(keep_ids)}
    for name, old in config_token_ids(model.config).items():
        if old not in new_id:
            raise ValueError(f"config.{name} = {old} is not among the kept tokens")
        setattr(config, name, new_id[old])
    rows = torch.tensor(keep_ids, dtype=torch.long)
    indexed = {id(t) for t in vocab_tensors(model)}
    state = {k: (v[rows].clone() if id(v) in indexed else v)
             for k, v in model.state_dict(keep_vars=True).items()}
    student = type(model)(config)
    student.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    return student

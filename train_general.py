"""Step 1: general distillation of a language model on raw text (TinyBERT's general distillation).

A smaller student learns a general-purpose teacher's inner workings on a large corpus (Wikipedia, The Pile):
its mapped layers match the teacher's pre-softmax attention scores, hidden states and embedding outputs
(TinyBERT, MSE, through a trained projection when the widths differ) or its self-attention relations (MiniLMv2,
--loss_kind minilm_relation, any head counts and widths); the same losses as train_task_intermediate.py
(kd.intermediate). No labels. The result is the starting point of task distillation.

The corpus is packed into --max_seq_length sequences of contiguous tokens ([CLS] ... [SEP], no padding; see
kd/packing.py for the packing rules and --respect_document_boundaries). Without --streaming it is tokenized and
packed once into a cache (keyed by files, tokenizer and settings), memory-mapped, shuffled per epoch by seed
and split across processes by Accelerate. With --streaming every process reads its own shard on the fly,
shuffles packed sequences in a seeded buffer, and saves its exact reading position in every checkpoint, so a
resumed run neither re-reads nor skips text. Training is counted in optimizer steps (--max_train_steps).

Launch:
    # a 6-layer student from every other block of the teacher, on local text files (tokenized once, cached)
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_general.py \
        --teacher_name_or_path roberta-base --student_layers every_other \
        --train_file 'corpus/wiki_*.txt' --max_seq_length 128 --per_device_train_batch_size 64 \
        --max_train_steps 200000 --learning_rate 1e-4 --checkpointing_steps 2000 --output_dir runs/general
    # a smaller, randomly initialised student, streaming a corpus too large for the disk
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_general.py \
        --teacher_name_or_path roberta-base --num_hidden_layers 6 --hidden_size 384 --num_attention_heads 12 \
        --intermediate_size 1536 --loss_kind minilm_relation --layer_map last \
        --dataset_name wikimedia/wikipedia --dataset_config_name 20231101.en --streaming \
        --max_train_steps 400000 --checkpointing_steps 2000 --output_dir runs/general_small
    # continue a preempted job (same command, same number of processes)
    ... same command ... --resume_from_checkpoint latest
    # then task distillation starts from the general student
    accelerate launch ... train_task_intermediate.py --model_name_or_path runs/general \
        --teacher_name_or_path runs/qa_teacher ...

Outputs in --output_dir: the student (save_pretrained: the bare encoder, no projections, and the teacher's
tokenizer; AutoModelForQuestionAnswering loads it with a new QA head), README.md (its model card),
run_config.json, train_log.jsonl (loss, each term, tokens/s), checkpoints/ (with each process's data position
when streaming), all_results.json. --push_to_hub then uploads it.
"""

import argparse
import copy
import os
import sys

import torch
from transformers import AutoConfig, AutoModel

from kd import args as kd_args
from kd.checkpoint import CheckpointManager
from kd.corpus import CorpusFormatError, DatasetCorpus, FileCorpus
from kd.data import make_train_dataloader
from kd.hub import push_to_hub
from kd.intermediate import build_distiller, freeze_unreached_parameters, make_compute_loss
from kd.launcher import run_worker
from kd.loop import PreemptionFlag, StepSync, TrainLog, clip_gradients, every, log_banner, train_batches
from kd.model_card import write_model_card
from kd.models import export_student, load_teacher, load_tokenizer, no_zero3_init, usable_positions
from kd.optim import make_optimizer, make_scheduler, total_and_warmup_steps
from kd.packing import DataTrace, PackedCorpus, build_packed_corpus
from kd.records import run_record, write_outcome, write_record
from kd.run_dir import input_paths
from kd.runtime import init_trackers, setup_accelerator, start_run
from kd.streaming import DatasetShardReader, FileShardReader, PackedStream
from kd.student import parse_layer_selection, student_config_of_size, student_from_teacher_layers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[kd_args.general_distillation_args(), kd_args.intermediate_distillation_args(),
                 kd_args.training_args(), kd_args.hub_args()],
        formatter_class=kd_args.HelpFormatter)
    return parser


def parse_args(argv=None):
    """The arguments, and the settings resolved from them: (args, {"corpus_files", "loss_weights", "distiller",
    "hub_model_id"})."""
    parser = build_parser()
    args = parser.parse_args(argv)
    kd_args.check_training(parser, args)
    corpus_files = kd_args.check_general_distillation(parser, args)
    weights = kd_args.check_intermediate_distillation(parser, args)
    hub_model_id = kd_args.check_hub(parser, args)
    kd_args.check_tokenizers(parser, {"--teacher_name_or_path": args.teacher_name_or_path})  # the student takes it
    if hub_model_id and args.preprocess_only:
        parser.error("--preprocess_only builds the corpus cache and trains no model: drop --push_to_hub (pass it "
                     "to the training run).")
    try:  # from the configs alone: a bad student size, layer map or loss setting fails before anything is loaded
        teacher_config = AutoConfig.from_pretrained(args.teacher_name_or_path)
        config = student_config(args, teacher_config)
        for who, c in (("teacher", teacher_config), ("student", config)):
            room = usable_positions(c)
            if args.max_seq_length > room:
                raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds the {who}'s {room} positions")
        with torch.device("meta"):
            distiller = build_distiller(
                AutoModel.from_config(config), teacher_config, args.layer_map, loss_kind=args.loss_kind,
                weights=weights, relation_heads=args.relation_heads).describe()
    except (ValueError, OSError) as e:
        parser.error(f"teacher {args.teacher_name_or_path}: {e}")
    return args, {"corpus_files": corpus_files, "loss_weights": weights, "distiller": distiller,
                  "hub_model_id": hub_model_id}


def student_config(args, teacher_config):
    """The student's config, whichever way it is chosen (a checkpoint, the teacher's layers, a size)."""
    if args.model_name_or_path:
        return AutoConfig.from_pretrained(args.model_name_or_path)
    if args.student_layers:
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers = len(parse_layer_selection(args.student_layers, teacher_config.num_hidden_layers))
        return config
    return student_config_of_size(teacher_config, **{n: getattr(args, n) for n in kd_args.STUDENT_SIZE_FLAGS})


def make_student(args, accelerator, tokenizer):
    """The student encoder (AutoModel: no head) in fp32, and a JSON-able note of where it came from."""
    teacher_config = AutoConfig.from_pretrained(args.teacher_name_or_path)  # as saved, not as loaded (dtype)
    with no_zero3_init(accelerator):
        if args.model_name_or_path:
            student = AutoModel.from_pretrained(args.model_name_or_path, dtype=torch.float32)
            check_student_tokenizer(args.model_name_or_path, tokenizer, args.teacher_name_or_path)
            origin = {"checkpoint": args.model_name_or_path}
        elif args.student_layers:
            layers = parse_layer_selection(args.student_layers, teacher_config.num_hidden_layers)
            # a full-precision copy with every module the checkpoint has: the teacher itself may be bf16, pooler-less
            full = AutoModel.from_pretrained(args.teacher_name_or_path, dtype=torch.float32)
            student = student_from_teacher_layers(full, layers)
            del full
            origin = {"teacher_layers": layers}
        else:
            student = AutoModel.from_config(student_config(args, teacher_config), dtype=torch.float32)  # seeded
            origin = {"size": {n: getattr(student.config, n) for n in kd_args.STUDENT_SIZE_FLAGS}}
    if student.config.vocab_size < len(tokenizer):
        raise ValueError(f"the student's vocabulary ({student.config.vocab_size}) is smaller than the teacher "
                         f"tokenizer's ({len(tokenizer)}); the student must take the teacher's tokenizer")
    return student, origin


def check_student_tokenizer(student_path, teacher_tokenizer, teacher_path):
    """A student checkpoint that ships its own tokenizer must ship the teacher's."""
    try:
        own = load_tokenizer(student_path)
    except ValueError:  # NoTokenizerError included
        return  # no tokenizer of its own: it takes the teacher's
    if own.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(f"the student {student_path} has another tokenizer than the teacher {teacher_path} "
                         f"({len(own)} vs {len(teacher_tokenizer)} entries); distillation needs the same token ids")


def main(argv=None):
    args, resolved = parse_args(argv)
    accelerator = setup_accelerator(args.output_dir, args.seed, args.gradient_accumulation_steps, args.report_to)
    run_id = None
    if not args.preprocess_only:  # that only fills the corpus cache: it is no run of its own
        run_id = start_run(accelerator, args.output_dir, resume=args.resume_from_checkpoint is not None,
                           overwrite=args.overwrite_output_dir, inputs=input_paths(args))  # another run's: refused
        write_record(accelerator, args.output_dir, "run_config.json",
                     run_record(vars(args), accelerator, run_id=run_id, **resolved))
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---------------------------------------------------------------- data: the teacher's tokenizer, packed text
    tokenizer = load_tokenizer(args.teacher_name_or_path, "--teacher_name_or_path")
    packing = dict(max_seq_length=args.max_seq_length, respect_document_boundaries=args.respect_document_boundaries)
    if resolved["corpus_files"]:
        source = FileCorpus(resolved["corpus_files"], text_column=args.text_column, line_by_line=args.line_by_line)
    else:
        source = DatasetCorpus(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                               text_column=args.text_column, streaming=args.streaming)
    corpus_info = {"streaming": args.streaming}
    if args.streaming:
        # Each process reads its own shard and the stream keeps its own position (saved per process in every
        # checkpoint). It is NOT passed to accelerator.prepare: Accelerate would wrap it (IterableDatasetShard or
        # DataLoaderDispatcher), re-splitting data already split, reading one batch ahead of what training
        # consumed, and resuming only by re-reading and discarding batches.
        reader = (FileShardReader(source, rank, world, seed=args.seed, shard_bytes=int(args.shard_size_mb * 2**20))
                  if resolved["corpus_files"] else DatasetShardReader(source, rank, world))
        train_dataloader = PackedStream(reader, tokenizer, batch_size=args.per_device_train_batch_size,
                                        shuffle_buffer_size=args.shuffle_buffer_size, seed=args.seed, **packing)
        corpus_info["reading"] = (f"process {rank} of {world} reads "
                                  + (f"{len(reader.units)} units" + (" (every P-th document)" if reader.by_document
                                                                     else "")
                                     if resolved["corpus_files"] else "its datasets shard"))
    else:
        with accelerator.main_process_first():  # the main process tokenizes and packs; the others hit the cache
            try:
                entry, hit = build_packed_corpus(source, tokenizer, cache_dir=args.corpus_cache_dir, **packing)
            except CorpusFormatError as err:  # a bad byte or record past the start parse_args checked
                accelerator.print(f"train_general.py: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        if args.preprocess_only:
            accelerator.print(f"corpus {'found in' if hit else 'written to'} the cache: {entry}")
            accelerator.end_training()
            return
        packed = PackedCorpus(entry, tokenizer.pad_token_id)
        train_dataloader = make_train_dataloader(packed, args.per_device_train_batch_size, args.seed)
        corpus_info.update(corpus_cache_dir=entry, corpus_cache_hit=hit,
                           **{k: packed.meta[k] for k in ("num_sequences", "num_tokens", "num_documents")})
        accelerator.print(f"corpus: {'cache hit' if hit else 'tokenized and packed'} ({entry})")

    # ---------------------------------------------------------------- teacher (frozen, not prepared), student
    teacher = load_teacher(args.teacher_name_or_path, accelerator, args.teacher_dtype)
    student, origin = make_student(args, accelerator, tokenizer)
    distiller = build_distiller(student, teacher.config, args.layer_map, loss_kind=args.loss_kind,
                                weights=resolved["loss_weights"], relation_heads=args.relation_heads)
    distiller.to(accelerator.device)
    # Parameters no loss reaches (the pooler; above the last mapped layer) are frozen, so DDP needs no
    # find_unused_parameters. Which ones depends on the models, not on the text: any two rows do.
    probe = tokenizer(["which parameters do the losses reach?"] * 2, return_tensors="pt")
    frozen = freeze_unreached_parameters(
        distiller, teacher, {k: probe[k].to(accelerator.device) for k in ("input_ids", "attention_mask")})
    trainable = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
    accelerator.print(f"student: {origin}; distiller: {distiller.describe()}; {trainable} trainable parameters"
                      + (f"; frozen (no loss reaches them): {frozen}" if frozen else ""))

    # ---------------------------------------------------------------- optimizer (projections included), prepare
    optimizer = make_optimizer(distiller, args.learning_rate, args.weight_decay)
    if args.streaming:
        if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
            # DeepSpeed takes the micro-batch size from a prepared loader, and the stream is not prepared
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
                args.per_device_train_batch_size
        model, optimizer = accelerator.prepare(distiller, optimizer)
    else:
        model, optimizer, train_dataloader = accelerator.prepare(distiller, optimizer, train_dataloader)
    batches_per_epoch = None if args.streaming else len(train_dataloader)  # a stream counts its epochs itself
    total_steps, warmup_steps = total_and_warmup_steps(
        None, num_train_epochs=args.num_train_epochs, max_train_steps=args.max_train_steps,
        num_warmup_steps=args.num_warmup_steps, warmup_ratio=args.warmup_ratio)
    scheduler = make_scheduler(optimizer, args.lr_scheduler_type, total_steps, warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    init_trackers(accelerator, args.project_name, args.run_name, args.output_dir,
                  {**vars(args), "total_steps": total_steps, "layer_map_pairs": str(distiller.layer_map)}, run_id)
    distill = make_compute_loss(teacher, distiller)  # teacher capture (no grad) + student forward + loss terms
    trace = DataTrace(os.path.join(args.output_dir, "data_trace"), rank) if args.trace_data else None

    # ---------------------------------------------------------------- resume (mid-stream too: the stream's position)
    checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit, run_id=run_id,
                                    data_state=train_dataloader if args.streaming else None)
    state = checkpoints.resume(accelerator, args.resume_from_checkpoint, model)  # verified, else an older one
    sync = StepSync(accelerator, args.gradient_accumulation_steps, checkpoints, state)
    train_log = TrainLog(accelerator, args.output_dir, args.logging_steps, total_steps, state.completed_steps)
    log_banner(accelerator, data=corpus_info.get("reading") or f"{packed.meta['num_documents']} documents -> "
               f"{len(packed)} sequences of {args.max_seq_length} tokens",
               per_device_batch_size=args.per_device_train_batch_size,
               accumulation_steps=args.gradient_accumulation_steps, total_steps=total_steps,
               output_dir=args.output_dir, state=state)

    # ---------------------------------------------------------------- train
    with PreemptionFlag() as preemption:
        model.train()
        for batch in train_batches(accelerator, train_dataloader, state, total_steps, stateful=args.streaming):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}  # a stream's are on CPU
            if trace is not None:
                trace.write(batch)
            with accelerator.accumulate(model):
                terms = distill(model, batch)  # {"loss", "loss_att", "loss_hidden", "loss_emb"} or {"loss", "loss_rel"}
                accelerator.backward(terms["loss"])
                sync.add(terms, samples=len(batch["input_ids"]), tokens=batch["attention_mask"].sum())
                if accelerator.sync_gradients:  # the step's last micro-batch: one all-reduce, then the update
                    means = sync.reduce(preemption.signum)  # raises NonFiniteLossError before a bad update
                    means["grad_norm"] = clip_gradients(accelerator, model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            end_of_epoch = state.advance(batches_per_epoch)
            if not accelerator.sync_gradients:
                continue
            means["lr"] = scheduler.get_last_lr()[0]
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, no schedule step
                scheduler.step()
            state.completed_steps += 1
            train_log.step(state.completed_steps, means)
            done = state.completed_steps >= total_steps
            if sync.preempted or end_of_epoch or done or every(args.checkpointing_steps, state.completed_steps):
                checkpoints.save(accelerator, state)
            if sync.preempted or done:
                break

    # ---------------------------------------------------------------- save: the plain student, no projections
    if not sync.preempted:
        checkpoints.finish(accelerator, args.keep_checkpoints)
        export_student(accelerator, model, tokenizer, args.output_dir)
    if args.streaming:
        corpus_info.update(stream_epoch=train_dataloader.epoch, stream_batches=train_dataloader.batches)
    record = run_record(
        vars(args), accelerator, run_id=run_id, **resolved, state=state.to_json(), checkpoint=checkpoints.last,
        total_steps=total_steps, student=origin, teacher_dtype=str(next(teacher.parameters()).dtype),
        frozen_parameters=frozen, corpus=corpus_info, train_metrics=train_log.summary(state.completed_steps))
    if accelerator.is_main_process and not sync.preempted:
        write_model_card(args.output_dir, record)  # README.md, with the final figures; all_results.json comes last
    write_outcome(accelerator, args.output_dir, record, preempted_by=preemption.describe() if sync.preempted else None)
    accelerator.end_training()
    if args.push_to_hub and not sync.preempted:  # the local output is complete: a failed upload leaves it so
        push_to_hub(accelerator, args.output_dir, resolved["hub_model_id"], args.hub_token)


if __name__ == "__main__":
    sys.exit(run_worker(main))

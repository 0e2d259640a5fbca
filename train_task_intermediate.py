"""Step 2: task-specific intermediate-layer distillation of an extractive QA student (TinyBERT, MiniLMv2).

The student learns the fine-tuned teacher's inner workings on (possibly augmented) SQuAD windows: its mapped
layers match the teacher's pre-softmax attention scores, hidden states and embedding outputs (TinyBERT, MSE,
through a trained projection when the widths differ), or the teacher's self-attention relations (MiniLMv2,
--loss_kind minilm_relation, any head counts and widths). No labels are used: unanswerable and answer-less
questions train as well as any. The QA head is not trained here (it is frozen and exported as it was);
train_prediction.py trains it next, starting from this script's output.

The teacher runs on every step, without gradients, in eval mode (no dropout), in its own precision (bf16 on
GPU), outside the optimizer and outside DDP/DeepSpeed; only its mapped layers are kept.

Launch:
    # student from the teacher's own layers, then intermediate-layer distillation on augmented data
    python make_student.py --teacher_name_or_path runs/teacher --layers 2,4,6,8,10,12 --output_dir runs/student_init
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_task_intermediate.py \
        --model_name_or_path runs/student_init --teacher_name_or_path runs/teacher \
        --train_file train-v2.0-aug.json --validation_file dev-v2.0.json --layer_map uniform \
        --num_train_epochs 10 --learning_rate 5e-5 --output_dir runs/student_intermediate --checkpointing_steps 1000
    # then prediction-layer distillation from it
    accelerate launch ... train_prediction.py --model_name_or_path runs/student_intermediate \
        --teacher_name_or_path runs/teacher ...

Outputs in --output_dir: the student (save_pretrained: model with its untouched QA head, no projections, and the
tokenizer), qa_settings.json, README.md (its model card), run_config.json, train_log.jsonl (loss and each term:
loss_att, loss_hidden, loss_emb or loss_rel), checkpoints/ (the projections are in them: they are part of the
trained module), all_results.json (args, layer map, loss settings, frozen parameters, held-out losses, also as
eval_loss, ...). --push_to_hub then uploads it.
"""

import argparse
import sys

import torch
from transformers import AutoModelForQuestionAnswering

from kd import args as kd_args
from kd.checkpoint import CheckpointManager
from kd.compat import TokenizerMismatchError, assert_same_tokenization
from kd.data import TensorDictDataset, arrow_columns, make_train_dataloader
from kd.feature_cache import cached_windows, load_splits
from kd.features import model_input_columns
from kd.hub import push_to_hub
from kd.intermediate import (build_distiller, check_distillation_setup, freeze_outside_encoder,
                             freeze_unreached_parameters, heldout_loss, make_compute_loss)
from kd.launcher import run_worker
from kd.loop import PreemptionFlag, StepSync, TrainLog, clip_gradients, every, log_banner, train_batches
from kd.model_card import write_model_card
from kd.models import export_student, load_teacher, load_tokenizer, no_zero3_init
from kd.optim import make_optimizer, make_scheduler, steps_per_epoch, total_and_warmup_steps
from kd.qa_settings import save_qa_settings, settings_from_args
from kd.records import run_record, write_outcome, write_record
from kd.run_dir import input_paths
from kd.runtime import init_trackers, setup_accelerator, start_run
from kd.squad import SquadFormatError

PROBE_ROWS = 2  # windows used to find the parameters the losses cannot reach


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[kd_args.squad_data_args(), kd_args.window_args(), kd_args.features_cache_args(),
                 kd_args.eval_batch_args(),
                 kd_args.training_args(), kd_args.intermediate_distillation_args(), kd_args.hub_args()],
        formatter_class=kd_args.HelpFormatter)
    parser.add_argument("--model_name_or_path", required=True,
                        help="The student to start from (e.g. make_student.py's output or train_general.py's).")
    return parser


def parse_args(argv=None):
    """The arguments, and the settings resolved from them: (args, {"loss_weights", "distiller", "hub_model_id"})."""
    parser = build_parser()
    args = parser.parse_args(argv)
    kd_args.check_training(parser, args)
    kd_args.check_squad_data(parser, args)
    kd_args.check_windows(parser, args)
    models = {"--model_name_or_path": args.model_name_or_path, "--teacher_name_or_path": args.teacher_name_or_path}
    kd_args.check_models(parser, models, args.max_seq_length)
    kd_args.check_tokenizers(parser, models)
    # task distillation learns from a fine-tuned teacher (TinyBERT); the student's head may be new (it is frozen)
    kd_args.check_trained_qa_head(parser, "--teacher_name_or_path", args.teacher_name_or_path)
    weights = kd_args.check_intermediate_distillation(parser, args)
    hub_model_id = kd_args.check_hub(parser, args)
    try:  # from the configs alone: a bad layer map or loss setting fails before anything is loaded
        distiller = check_distillation_setup(args.model_name_or_path, args.teacher_name_or_path, args.layer_map,
                                             loss_kind=args.loss_kind, weights=weights,
                                             relation_heads=args.relation_heads)
    except (ValueError, OSError) as e:
        parser.error(f"student {args.model_name_or_path} / teacher {args.teacher_name_or_path}: {e}")
    return args, {"loss_weights": weights, "distiller": distiller, "hub_model_id": hub_model_id}


def main(argv=None):
    args, resolved = parse_args(argv)
    accelerator = setup_accelerator(args.output_dir, args.seed, args.gradient_accumulation_steps, args.report_to)
    run_id = start_run(accelerator, args.output_dir, resume=args.resume_from_checkpoint is not None,
                       overwrite=args.overwrite_output_dir, inputs=input_paths(args))  # another run's dir is refused
    write_record(accelerator, args.output_dir, "run_config.json",
                 run_record(vars(args), accelerator, run_id=run_id, **resolved))

    # ---------------------------------------------------------------- data (model inputs only: no labels)
    tokenizer = load_tokenizer(args.model_name_or_path, "--model_name_or_path")
    teacher_tokenizer = load_tokenizer(args.teacher_name_or_path, "--teacher_name_or_path")
    window = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length, num_proc=args.preprocessing_num_workers)
    # built once per node and cached on disk (kd.feature_cache); batches are read from it memory-mapped
    cache = dict(cache_dir=args.features_cache_dir)
    train_examples, eval_examples, data_info = load_splits(
        accelerator, args.train_file, args.validation_file, args.dataset_name, args.dataset_config_name,
        skip_invalid=args.skip_invalid, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, **cache)
    assert_same_tokenization(args.model_name_or_path, tokenizer, args.teacher_name_or_path, teacher_tokenizer,
                             train_examples, window)
    train_features, data_info["train_windows"] = cached_windows(
        accelerator, "train", train_examples, data_info["train_examples"]["source_key"], tokenizer, **window, **cache)
    inputs = arrow_columns(train_features, model_input_columns(train_features))
    eval_inputs = None
    if eval_examples:
        eval_features, data_info["eval_windows"] = cached_windows(
            accelerator, "train", eval_examples, data_info["validation_examples"]["source_key"], tokenizer,
            **window, **cache)
        eval_inputs = arrow_columns(eval_features, model_input_columns(eval_features))
    write_record(accelerator, args.output_dir, "run_config.json",  # the start's record, now with the cache's keys
                 run_record(vars(args), accelerator, run_id=run_id, **resolved, features_cache=data_info))
    num_features = len(inputs["input_ids"])

    # ---------------------------------------------------------------- teacher (frozen, not prepared), distiller
    teacher = load_teacher(args.teacher_name_or_path, accelerator, args.teacher_dtype)
    with no_zero3_init(accelerator):
        student = AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path)
    distiller = build_distiller(student, teacher.config, args.layer_map, loss_kind=args.loss_kind,
                                weights=resolved["loss_weights"], relation_heads=args.relation_heads)
    frozen_head = freeze_outside_encoder(student)
    distiller.to(accelerator.device)
    probe = {k: torch.as_tensor(v[:PROBE_ROWS]).long().to(accelerator.device) for k, v in inputs.items()}
    frozen_unreached = freeze_unreached_parameters(distiller, teacher, probe)
    trainable = sum(p.numel() for p in distiller.parameters() if p.requires_grad)
    accelerator.print(f"distiller: {distiller.describe()}; teacher dtype {next(teacher.parameters()).dtype}; "
                      f"{trainable} trainable parameters; frozen: {len(frozen_head)} head tensors"
                      + (f", {len(frozen_unreached)} the losses cannot reach" if frozen_unreached else ""))

    # ---------------------------------------------------------------- optimizer (projections included), prepare
    train_dataloader = make_train_dataloader(TensorDictDataset(inputs), args.per_device_train_batch_size, args.seed)
    optimizer = make_optimizer(distiller, args.learning_rate, args.weight_decay)
    model, optimizer, train_dataloader = accelerator.prepare(distiller, optimizer, train_dataloader)
    epoch_steps = steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
    total_steps, warmup_steps = total_and_warmup_steps(
        epoch_steps, num_train_epochs=args.num_train_epochs, max_train_steps=args.max_train_steps,
        num_warmup_steps=args.num_warmup_steps, warmup_ratio=args.warmup_ratio)
    scheduler = make_scheduler(optimizer, args.lr_scheduler_type, total_steps, warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    init_trackers(accelerator, args.project_name, args.run_name, args.output_dir,
                  {**vars(args), "total_steps": total_steps, "num_train_features": num_features,
                   "layer_map_pairs": str(distiller.layer_map)}, run_id)
    distill = make_compute_loss(teacher, distiller)  # teacher capture (no grad) + student forward + loss terms

    # ---------------------------------------------------------------- resume
    checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit, run_id=run_id)
    state = checkpoints.resume(accelerator, args.resume_from_checkpoint, model)  # verified, else an older one
    sync = StepSync(accelerator, args.gradient_accumulation_steps, checkpoints, state)
    train_log = TrainLog(accelerator, args.output_dir, args.logging_steps, total_steps, state.completed_steps)
    log_banner(accelerator, data=f"{len(train_examples)} questions -> {num_features} windows; held-out: "
                                 f"{len(eval_inputs['input_ids']) if eval_inputs else 0} windows",
               epochs=total_steps / epoch_steps, per_device_batch_size=args.per_device_train_batch_size,
               accumulation_steps=args.gradient_accumulation_steps, total_steps=total_steps,
               output_dir=args.output_dir, state=state)

    # ---------------------------------------------------------------- train
    eval_metrics = {}
    with PreemptionFlag() as preemption:
        model.train()
        for batch in train_batches(accelerator, train_dataloader, state, total_steps):
            with accelerator.accumulate(model):
                terms = distill(model, batch)  # {"loss", "loss_att", "loss_hidden", "loss_emb"} or {"loss", "loss_rel"}
                accelerator.backward(terms["loss"])
                sync.add(terms, samples=len(batch["input_ids"]))
                if accelerator.sync_gradients:  # the step's last micro-batch: one all-reduce, then the update
                    means = sync.reduce(preemption.signum)  # raises NonFiniteLossError before a bad update
                    means["grad_norm"] = clip_gradients(accelerator, model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            end_of_epoch = state.advance(len(train_dataloader))
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
            if sync.preempted:  # a signal reached some process: every process saved this step; stop here
                break
            if eval_inputs is not None and (end_of_epoch or done or every(args.eval_steps, state.completed_steps)):
                eval_metrics = heldout_loss(accelerator, model, distill, eval_inputs, args.per_device_eval_batch_size)
                train_log.eval(state.completed_steps, eval_metrics)
                model.train()
            if done:
                break

    # ---------------------------------------------------------------- save: the plain student, no projections
    if not sync.preempted:
        checkpoints.finish(accelerator, args.keep_checkpoints)
        export_student(accelerator, model, tokenizer, args.output_dir)
        if accelerator.is_main_process:  # the windows it learnt on go on to step 3 and inference
            save_qa_settings(args.output_dir, settings_from_args(args))
    record = run_record(
        vars(args), accelerator, run_id=run_id, **resolved, features_cache=data_info, state=state.to_json(),
        checkpoint=checkpoints.last,
        total_steps=total_steps, layer_map=[list(p) for p in distiller.layer_map],
        teacher_dtype=str(next(teacher.parameters()).dtype),
        frozen_parameters={"head": frozen_head, "unreached": frozen_unreached},
        train_metrics=train_log.summary(state.completed_steps), eval_metrics=eval_metrics)
    if accelerator.is_main_process and not sync.preempted:
        write_model_card(args.output_dir, record)  # README.md, with the final metrics; all_results.json comes last
    write_outcome(accelerator, args.output_dir, record, preempted_by=preemption.describe() if sync.preempted else None)
    if eval_metrics:
        accelerator.print({f"heldout_{k}": round(v, 5) for k, v in eval_metrics.items()})
    accelerator.end_training()
    if args.push_to_hub and not sync.preempted:  # the local output is complete: a failed upload leaves it so
        push_to_hub(accelerator, args.output_dir, resolved["hub_model_id"], args.hub_token)


if __name__ == "__main__":
    sys.exit(run_worker(main, bad_input=(SquadFormatError, TokenizerMismatchError)))

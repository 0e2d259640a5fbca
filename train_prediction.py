"""Step 3: prediction-layer distillation of an extractive QA student (Hinton et al. 2015).

The student learns the teacher's whole start/end distributions over positions, softened by a temperature T,
together with the gold spans:  loss = w * T^2 * KL(teacher_T || student_T) + (1 - w) * CE(gold).
Without --teacher_name_or_path it is plain fine-tuning (how teachers and baselines are made).

The teacher runs once, without gradients, sharded across processes (bf16 on GPU); its logits are cached on
disk (keyed by teacher, features and precision) and reused across epochs, restarts and later runs. The teacher
is freed before the student trains.

Launch:
    # fine-tune a teacher (or a baseline)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_prediction.py \
        --model_name_or_path roberta-base --dataset_name squad_v2 --output_dir runs/teacher
    # distil it into a smaller student
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_prediction.py \
        --model_name_or_path runs/student_init --teacher_name_or_path runs/teacher \
        --train_file train-v2.0.json --validation_file dev-v2.0.json \
        --temperature 2 --distillation_loss_weight 0.5 --output_dir runs/student \
        --checkpointing_steps 1000 --report_to wandb
    # continue a preempted job
    ... same command ... --resume_from_checkpoint latest

Outputs in --output_dir: the student (save_pretrained: model + tokenizer), qa_settings.json, README.md (its model
card), run_config.json (args, git sha, versions; written at start), train_log.jsonl (every logged step),
checkpoints/, all_results.json (args, git sha, final metrics, nested and as HF's flat eval_*/train_* keys),
predictions.json / null_odds.json / eval_results.json of the last evaluation. --push_to_hub then uploads it.
"""

import argparse
import logging
import sys

from transformers import AutoModelForQuestionAnswering

from kd import args as kd_args
from kd.compat import tokenization_difference
from kd.cross_tokenizer import ALIGNMENT_RULE, cross_tokenizer_targets
from kd.checkpoint import CheckpointManager
from kd.data import TensorDictDataset, arrow_columns, make_train_dataloader
from kd.feature_cache import cached_windows, load_splits
from kd.features import model_input_columns
from kd.hub import push_to_hub
from kd.launcher import run_worker
from kd.loop import PreemptionFlag, StepSync, TrainLog, clip_gradients, every, log_banner, train_batches
from kd.losses import prediction_distillation_loss
from kd.model_card import write_model_card
from kd.models import load_tokenizer, save_weights
from kd.optim import make_optimizer, make_scheduler, steps_per_epoch, total_and_warmup_steps
from kd.qa_eval import evaluate_qa, make_eval_dataloader, save_eval_outputs
from kd.qa_settings import save_qa_settings, settings_from_args
from kd.records import run_record, write_outcome, write_record
from kd.run_dir import input_paths
from kd.runtime import init_trackers, setup_accelerator, start_run
from kd.squad import SquadFormatError, has_answerable
from kd.teacher_cache import CacheSpaceError, teacher_logits

logger = logging.getLogger("train_prediction")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[kd_args.squad_data_args(), kd_args.window_args(), kd_args.features_cache_args(),
                 kd_args.eval_batch_args(), kd_args.answer_args(),
                 kd_args.training_args(), kd_args.prediction_distillation_args(), kd_args.hub_args()],
        formatter_class=kd_args.HelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="The student (or the model to fine-tune).")
    return parser


def parse_args(argv=None):
    """The arguments, and the settings resolved from them: (args, {"distillation_loss_weight", "hub_model_id"})."""
    parser = build_parser()
    args = parser.parse_args(argv)
    kd_args.check_training(parser, args)
    kd_args.check_squad_data(parser, args)
    kd_args.check_windows(parser, args)
    window = kd_args.teacher_window(parser, args)
    models = {"--model_name_or_path": args.model_name_or_path, "--teacher_name_or_path": args.teacher_name_or_path}
    kd_args.check_models(parser, {"--model_name_or_path": args.model_name_or_path}, args.max_seq_length)
    kd_args.check_models(parser, {"--teacher_name_or_path": args.teacher_name_or_path}, window["max_seq_length"])
    kd_args.check_tokenizers(parser, models)
    # the student may be a bare encoder (its QA head is trained here); the teacher's head must be trained already
    kd_args.check_trained_qa_head(parser, "--teacher_name_or_path", args.teacher_name_or_path)
    weight = kd_args.check_prediction_distillation(parser, args)  # 0 without a teacher: gold spans only
    return args, {"distillation_loss_weight": weight, "hub_model_id": kd_args.check_hub(parser, args),
                  "teacher_window": window}


def main(argv=None):
    args, resolved = parse_args(argv)
    accelerator = setup_accelerator(args.output_dir, args.seed, args.gradient_accumulation_steps, args.report_to)
    run_id = start_run(accelerator, args.output_dir, resume=args.resume_from_checkpoint is not None,
                       overwrite=args.overwrite_output_dir, inputs=input_paths(args))  # another run's dir is refused
    write_record(accelerator, args.output_dir, "run_config.json",
                 run_record(vars(args), accelerator, run_id=run_id, **resolved))

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(args.model_name_or_path, "--model_name_or_path")
    window = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length, num_proc=args.preprocessing_num_workers)
    # built once per node and cached on disk (kd.feature_cache); every process then reads it memory-mapped
    cache = dict(cache_dir=args.features_cache_dir)
    train_examples, eval_examples, data_info = load_splits(
        accelerator, args.train_file, args.validation_file, args.dataset_name, args.dataset_config_name,
        skip_invalid=args.skip_invalid, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, **cache)
    train_features, data_info["train_windows"] = cached_windows(
        accelerator, "train", train_examples, data_info["train_examples"]["source_key"], tokenizer, **window, **cache)
    eval_features = None
    if eval_examples:
        eval_features, data_info["eval_windows"] = cached_windows(
            accelerator, "eval", eval_examples, data_info["validation_examples"]["source_key"], tokenizer,
            **window, **cache)
    if not has_answerable(train_examples):
        logger.warning("%s has no answerable question: the span loss only teaches the no-answer position.",
                       args.train_file or args.dataset_name)
    write_record(accelerator, args.output_dir, "run_config.json",  # the start's record, now with the cache's keys
                 run_record(vars(args), accelerator, run_id=run_id, **resolved, features_cache=data_info))
    # batches are read from the memory-mapped windows: no process holds them all
    inputs = arrow_columns(train_features, model_input_columns(train_features))
    columns = {**inputs, **arrow_columns(train_features, ["start_positions", "end_positions"])}

    # ---------------------------------------------------------------- teacher logits (once, cached)
    teacher_info = {}
    if args.teacher_name_or_path:
        teacher_tokenizer = load_tokenizer(args.teacher_name_or_path, "--teacher_name_or_path")
        teacher_window = {**window, **resolved["teacher_window"]}
        differs = tokenization_difference(tokenizer, teacher_tokenizer, train_examples, window, teacher_window)
        if differs is None:  # the teacher sees the student's own windows: its logits are the targets as they are
            teacher_inputs = inputs
        else:  # its own windows; its distributions are carried onto the student's tokens (kd.cross_tokenizer)
            teacher_features, data_info["teacher_train_windows"] = cached_windows(
                accelerator, "train", train_examples, data_info["train_examples"]["source_key"], teacher_tokenizer,
                **teacher_window, **cache)
            teacher_inputs = arrow_columns(teacher_features, model_input_columns(teacher_features))
        start, end, teacher_info = teacher_logits(
            accelerator, args.teacher_name_or_path, teacher_inputs, cache_dir=args.teacher_cache_dir,
            batch_size=args.per_device_eval_batch_size, dtype_choice=args.teacher_dtype)
        how = ("cache hit" if teacher_info["teacher_cache_hit"] else
               "computed" if teacher_info["teacher_cache_written"] else "computed, kept in memory (not cached)")
        accelerator.print(f"teacher logits: {how} ({teacher_info['teacher_cache_dir']})")
        if differs is not None:
            accelerator.print(f"the teacher tokenizes differently ({differs}): its start/end distributions at "
                              f"T = {args.temperature} are carried onto the student's tokens by character offsets")
            start, end = cross_tokenizer_targets(start, end, train_examples, teacher_tokenizer, teacher_window,
                                                 tokenizer, window, args.temperature)
            teacher_info.update(teacher_tokenization="differs from the student's: " + differs,
                                teacher_target_alignment=ALIGNMENT_RULE)
            write_record(accelerator, args.output_dir, "run_config.json",  # the start's record, now with this
                         run_record(vars(args), accelerator, run_id=run_id, **resolved, features_cache=data_info,
                                    **teacher_info))
        columns.update(teacher_start_logits=start, teacher_end_logits=end)

    # ---------------------------------------------------------------- student, optimizer, prepare
    model = AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path)
    train_dataloader = make_train_dataloader(TensorDictDataset(columns), args.per_device_train_batch_size, args.seed)
    eval_dataloader = make_eval_dataloader(eval_features, args.per_device_eval_batch_size) if eval_features else None
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader)
    epoch_steps = steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
    total_steps, warmup_steps = total_and_warmup_steps(
        epoch_steps, num_train_epochs=args.num_train_epochs, max_train_steps=args.max_train_steps,
        num_warmup_steps=args.num_warmup_steps, warmup_ratio=args.warmup_ratio)
    scheduler = make_scheduler(optimizer, args.lr_scheduler_type, total_steps, warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    init_trackers(accelerator, args.project_name, args.run_name, args.output_dir,
                  {**vars(args), **resolved, "total_steps": total_steps, "num_train_features": len(train_features)},
                  run_id)

    # ---------------------------------------------------------------- resume
    checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit, run_id=run_id)
    state = checkpoints.resume(accelerator, args.resume_from_checkpoint, model)  # verified, else an older one
    sync = StepSync(accelerator, args.gradient_accumulation_steps, checkpoints, state)
    train_log = TrainLog(accelerator, args.output_dir, args.logging_steps, total_steps, state.completed_steps)
    log_banner(accelerator, data=f"{len(train_examples)} questions -> {len(train_features)} features; eval: "
                                 f"{len(eval_examples) if eval_examples else 0} questions",
               epochs=total_steps / epoch_steps, per_device_batch_size=args.per_device_train_batch_size,
               accumulation_steps=args.gradient_accumulation_steps, total_steps=total_steps,
               output_dir=args.output_dir, state=state)
    model_inputs = list(inputs)

    def evaluate():
        """EM/F1 on the validation set; also returns the predictions and null odds behind them."""
        results = evaluate_qa(accelerator, model, eval_examples, eval_features, eval_dataloader,
                              n_best_size=args.n_best_size, max_answer_length=args.max_answer_length,
                              no_answer_threshold=args.no_answer_threshold)
        model.train()
        train_log.eval(state.completed_steps, results[0])
        return results

    # ---------------------------------------------------------------- train
    eval_metrics, predictions, null_odds = {}, None, None
    with PreemptionFlag() as preemption:
        model.train()
        for batch in train_batches(accelerator, train_dataloader, state, total_steps):
            with accelerator.accumulate(model):
                outputs = model(**{k: batch[k] for k in model_inputs})
                terms = prediction_distillation_loss(  # {"loss", "loss_ce", and "loss_kd" with a teacher}
                    outputs.start_logits, outputs.end_logits, batch, temperature=args.temperature,
                    distillation_loss_weight=resolved["distillation_loss_weight"], loss_type=args.distillation_loss)
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
            if eval_dataloader is not None and (end_of_epoch or done or every(args.eval_steps, state.completed_steps)):
                eval_metrics, predictions, null_odds = evaluate()
            if done:
                break

    # ---------------------------------------------------------------- save
    if not sync.preempted:
        checkpoints.finish(accelerator, args.keep_checkpoints)
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards when DeepSpeed runs
        if accelerator.is_main_process:
            save_weights(accelerator.unwrap_model(model), args.output_dir, state_dict)
            tokenizer.save_pretrained(args.output_dir)
            # the windows it learnt on and its best no-answer threshold travel with it (predict.py, evaluate.py)
            save_qa_settings(args.output_dir, settings_from_args(args, eval_metrics, args.validation_file))
            if predictions is not None:
                save_eval_outputs(args.output_dir, eval_metrics, predictions, null_odds)
    record = run_record(
        vars(args), accelerator, run_id=run_id, **resolved, features_cache=data_info, **teacher_info,
        state=state.to_json(),
        checkpoint=checkpoints.last, total_steps=total_steps, train_metrics=train_log.summary(state.completed_steps),
        eval_metrics=eval_metrics)
    if accelerator.is_main_process and not sync.preempted:
        write_model_card(args.output_dir, record)  # README.md, with the final metrics; all_results.json comes last
    write_outcome(accelerator, args.output_dir, record, preempted_by=preemption.describe() if sync.preempted else None)
    if eval_metrics:
        accelerator.print({k: round(v, 2) for k, v in eval_metrics.items() if isinstance(v, float)})
    accelerator.end_training()
    if args.push_to_hub and not sync.preempted:  # the local output is complete: a failed upload leaves it so
        push_to_hub(accelerator, args.output_dir, resolved["hub_model_id"], args.hub_token)


if __name__ == "__main__":
    sys.exit(run_worker(main, bad_input=(SquadFormatError, CacheSpaceError)))

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

Outputs in --output_dir: the student (save_pretrained: model + tokenizer), run_config.json (args, git sha,
versions; written at start), train_log.jsonl (every logged step), checkpoints/, all_results.json (args,
git sha, final metrics), predictions.json / null_odds.json / eval_results.json of the last evaluation.
"""

import argparse
import sys

import numpy as np
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from kd import args as kd_args
from kd.compat import assert_same_tokenization
from kd.losses import prediction_distillation_loss
from kd.qa_eval import evaluate_qa, make_eval_dataloader, save_eval_outputs
from kd.squad import load_squad, model_input_arrays, prepare_eval_features, prepare_train_features
from kd.teacher_cache import teacher_logits
from kd.training import (TensorDictDataset, init_trackers, make_optimizer, make_scheduler, make_train_dataloader,
                         run_record, run_training, setup_accelerator, training_steps, write_record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[kd_args.squad_data_args(), kd_args.eval_args(), kd_args.training_args(),
                 kd_args.prediction_distillation_args()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="The student (or the model to fine-tune).")
    args = parser.parse_args(argv)
    kd_args.check_common(parser, args)
    kd_args.check_prediction_distillation(parser, args)
    if args.teacher_name_or_path is None:
        args.distillation_loss_weight = 0.0  # plain fine-tuning: gold spans only
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = setup_accelerator(args)
    write_record(accelerator, args, "run_config.json", run_record(args, accelerator))

    # ---------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    window = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length, num_proc=args.preprocessing_num_workers)
    with accelerator.main_process_first():
        train_examples = load_squad(args.train_file or args.dataset_name, split="train",
                                    config=args.dataset_config_name, skip_invalid=args.skip_invalid,
                                    max_samples=args.max_train_samples)
        train_features = prepare_train_features(train_examples, tokenizer, **window)
        eval_examples = eval_features = None
        if args.validation_file or args.dataset_name:
            eval_examples = load_squad(args.validation_file or args.dataset_name, split="validation",
                                       config=args.dataset_config_name, skip_invalid=args.skip_invalid,
                                       max_samples=args.max_eval_samples)
            eval_features = prepare_eval_features(eval_examples, tokenizer, **window)
    inputs = model_input_arrays(train_features)
    columns = {**inputs, "start_positions": np.asarray(train_features["start_positions"]),
               "end_positions": np.asarray(train_features["end_positions"])}
    accelerator.print(f"train: {len(train_examples)} questions -> {len(train_features)} features; "
                      f"eval: {len(eval_examples) if eval_examples else 0} questions")

    # ---------------------------------------------------------------- teacher logits (once, cached)
    teacher_info = {}
    if args.teacher_name_or_path:
        teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_name_or_path)
        assert_same_tokenization(args.model_name_or_path, tokenizer, args.teacher_name_or_path, teacher_tokenizer,
                                 train_examples, lambda ex, tok: prepare_train_features(ex, tok, **window))
        start, end, teacher_info = teacher_logits(
            accelerator, args.teacher_name_or_path, inputs, cache_dir=args.teacher_cache_dir,
            batch_size=args.per_device_eval_batch_size, dtype_choice=args.teacher_dtype)
        columns.update(teacher_start_logits=start, teacher_end_logits=end)
        accelerator.print(f"teacher logits: {'cache hit' if teacher_info['teacher_cache_hit'] else 'computed'} "
                          f"({teacher_info['teacher_cache_dir']})")

    # ---------------------------------------------------------------- student, optimizer, prepare
    model = AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path)
    train_dataloader = make_train_dataloader(TensorDictDataset(columns), args.per_device_train_batch_size,
                                                      args.seed)
    optimizer = make_optimizer(model, args)
    eval_dataloader = make_eval_dataloader(eval_features, args.per_device_eval_batch_size) if eval_features else None
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)
    total_steps, warmup_steps = training_steps(args, len(train_dataloader))
    scheduler = make_scheduler(optimizer, args, total_steps, warmup_steps)
    init_trackers(accelerator, args, {"total_steps": total_steps, "num_train_features": len(train_features)})
    model_inputs = list(inputs)

    # ---------------------------------------------------------------- loss and evaluation
    def compute_loss(model, batch):
        out = model(**{k: batch[k] for k in model_inputs})
        return prediction_distillation_loss(
            out.start_logits, out.end_logits, batch, temperature=args.temperature,
            distillation_loss_weight=args.distillation_loss_weight, loss_type=args.distillation_loss)

    last_eval = {}

    def evaluate():
        metrics, predictions, null_odds = evaluate_qa(
            accelerator, model, eval_examples, eval_features, eval_dataloader, n_best_size=args.n_best_size,
            max_answer_length=args.max_answer_length, no_answer_threshold=args.no_answer_threshold)
        last_eval.update(predictions=predictions, null_odds=null_odds)
        return metrics

    # ---------------------------------------------------------------- train
    result = run_training(accelerator, args, model=model, optimizer=optimizer, scheduler=scheduler,
                          train_dataloader=train_dataloader, compute_loss=compute_loss,
                          evaluate=evaluate if eval_dataloader is not None else None, total_steps=total_steps)

    # ---------------------------------------------------------------- save
    if result["status"] == "finished":
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards when DeepSpeed runs
        if accelerator.is_main_process:
            unwrapped.save_pretrained(args.output_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(args.output_dir)
            if last_eval:
                save_eval_outputs(args.output_dir, result["eval_metrics"], last_eval["predictions"],
                                  last_eval["null_odds"])
    write_record(accelerator, args, "all_results.json" if result["status"] == "finished" else "preempted.json",
                 run_record(args, accelerator, **teacher_info, status=result["status"], state=result["state"],
                            checkpoint=result["checkpoint"], total_steps=total_steps,
                            train_metrics=result["train_metrics"], eval_metrics=result["eval_metrics"]))
    if result["eval_metrics"]:
        accelerator.print({k: round(v, 2) for k, v in result["eval_metrics"].items() if isinstance(v, float)})
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)

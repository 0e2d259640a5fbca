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
tokenizer), run_config.json, train_log.jsonl (loss and each term: loss_att, loss_hidden, loss_emb or loss_rel),
checkpoints/ (the projections are in them: they are part of the trained module), all_results.json (args, layer
map, loss settings, frozen parameters, held-out losses).
"""

import argparse
import sys

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from kd import args as kd_args
from kd.compat import assert_same_tokenization
from kd.intermediate import (build_distiller, check_distillation_setup, export_student, freeze_outside_encoder,
                             freeze_unreached_parameters, heldout_loss, load_teacher, make_compute_loss, no_zero3_init)
from kd.squad import load_squad, model_input_arrays, prepare_train_features
from kd.training import (TensorDictDataset, init_trackers, make_optimizer, make_scheduler, make_train_dataloader,
                         run_record, run_training, setup_accelerator, training_steps, write_record)

PROBE_ROWS = 2  # windows used to find the parameters the losses cannot reach


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[kd_args.squad_data_args(), kd_args.training_args(), kd_args.intermediate_distillation_args()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True,
                        help="The student to start from (e.g. make_student.py's output or train_general.py's).")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=32,
                        help="Batch size of the held-out loss (--validation_file).")
    parser.add_argument("--eval_steps", type=int, default=None,
                        help="Also report the held-out loss every N optimizer steps (always after each epoch).")
    args = parser.parse_args(argv)
    kd_args.check_common(parser, args)
    kd_args.check_intermediate_distillation(parser, args)
    try:  # from the configs alone: a bad layer map or loss setting fails before anything is loaded
        args.distiller_settings = check_distillation_setup(
            args.model_name_or_path, args.teacher_name_or_path, args.layer_map, loss_kind=args.loss_kind,
            weights=kd_args.intermediate_loss_weights(args), relation_heads=args.relation_heads)
    except (ValueError, OSError) as e:
        parser.error(f"student {args.model_name_or_path} / teacher {args.teacher_name_or_path}: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = setup_accelerator(args)
    write_record(accelerator, args, "run_config.json", run_record(args, accelerator))

    # ---------------------------------------------------------------- data (model inputs only: no labels)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_name_or_path)
    window = dict(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                  max_query_length=args.max_query_length, num_proc=args.preprocessing_num_workers)

    with accelerator.main_process_first():
        train_examples = load_squad(args.train_file or args.dataset_name, split="train",
                                    config=args.dataset_config_name, skip_invalid=args.skip_invalid,
                                    max_samples=args.max_train_samples)
        assert_same_tokenization(args.model_name_or_path, tokenizer, args.teacher_name_or_path, teacher_tokenizer,
                                 train_examples, lambda ex, tok: prepare_train_features(ex, tok, **window))
        inputs = model_input_arrays(prepare_train_features(train_examples, tokenizer, **window))
        eval_inputs = None
        if args.validation_file:
            eval_examples = load_squad(args.validation_file, split="validation", skip_invalid=args.skip_invalid,
                                       max_samples=args.max_eval_samples)
            eval_inputs = model_input_arrays(prepare_train_features(eval_examples, tokenizer, **window))
    num_features = len(inputs["input_ids"])
    accelerator.print(f"train: {len(train_examples)} questions -> {num_features} windows; held-out: "
                      f"{len(eval_inputs['input_ids']) if eval_inputs else 0} windows")

    # ---------------------------------------------------------------- teacher (frozen, not prepared), distiller
    teacher = load_teacher(args.teacher_name_or_path, accelerator, args.teacher_dtype)
    with no_zero3_init(accelerator):
        student = AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path)
    distiller = build_distiller(student, teacher.config, args.layer_map, loss_kind=args.loss_kind,
                                weights=kd_args.intermediate_loss_weights(args), relation_heads=args.relation_heads)
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
    optimizer = make_optimizer(distiller, args)
    model, optimizer, train_dataloader = accelerator.prepare(distiller, optimizer, train_dataloader)
    total_steps, warmup_steps = training_steps(args, len(train_dataloader))
    scheduler = make_scheduler(optimizer, args, total_steps, warmup_steps)
    init_trackers(accelerator, args, {"total_steps": total_steps, "num_train_features": num_features,
                                      "layer_map_pairs": str(distiller.layer_map)})

    compute_loss = make_compute_loss(teacher, distiller)

    def evaluate():
        return heldout_loss(accelerator, model, compute_loss, eval_inputs, args.per_device_eval_batch_size)

    # ---------------------------------------------------------------- train
    result = run_training(accelerator, args, model=model, optimizer=optimizer, scheduler=scheduler,
                          train_dataloader=train_dataloader, compute_loss=compute_loss,
                          evaluate=evaluate if eval_inputs is not None else None, total_steps=total_steps)

    # ---------------------------------------------------------------- save: the plain student, no projections
    if result["status"] == "finished":
        export_student(accelerator, model, tokenizer, args.output_dir)
    write_record(accelerator, args, "all_results.json" if result["status"] == "finished" else "preempted.json",
                 run_record(args, accelerator, status=result["status"], state=result["state"],
                            checkpoint=result["checkpoint"], total_steps=total_steps,
                            layer_map=[list(p) for p in distiller.layer_map], distiller=distiller.describe(),
                            teacher_dtype=str(next(teacher.parameters()).dtype),
                            frozen_parameters={"head": frozen_head, "unreached": frozen_unreached},
                            train_metrics=result["train_metrics"], eval_metrics=result["eval_metrics"]))
    if result["eval_metrics"]:
        accelerator.print({f"heldout_{k}": round(v, 5) for k, v in result["eval_metrics"].items()})
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)

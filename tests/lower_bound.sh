#!/usr/bin/env bash
# The end-to-end tests on the oldest transformers and accelerate we support (their lower bounds in
# requirements.txt), in a venv that sees everything else installed (run after the README's install line).
#   bash tests/lower_bound.sh            # venv in ${KD_LOWER_VENV:-/tmp/kd-lower-bound}, reused when present
set -euo pipefail
cd "$(dirname "$0")/.."
lower=$(sed -n 's/^transformers>=\([0-9.]*\).*/\1/p' requirements.txt)
[ -n "$lower" ] || { echo "no 'transformers>=X' line in requirements.txt" >&2; exit 2; }
lower_accelerate=$(sed -n 's/^accelerate>=\([0-9.]*\).*/\1/p' requirements.txt)
[ -n "$lower_accelerate" ] || { echo "no 'accelerate>=X' line in requirements.txt" >&2; exit 2; }
venv=${KD_LOWER_VENV:-/tmp/kd-lower-bound}
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "transformers==$lower" "accelerate==$lower_accelerate"
"$venv/bin/python" -c "
import accelerate, transformers; from packaging.version import Version
assert Version(transformers.__version__) == Version('$lower'), transformers.__version__
assert Version(accelerate.__version__) == Version('$lower_accelerate'), accelerate.__version__
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
"$venv/bin/python" -m pytest -q -m "not slow" tests/test_train_prediction.py tests/test_train_task_intermediate.py \
    tests/test_train_general.py tests/test_evaluate_cli.py tests/test_predict.py tests/test_report.py \
    tests/test_haystack.py tests/test_errors_once.py tests/test_model_card.py

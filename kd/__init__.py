"""Shared machinery for knowledge distillation of extractive QA Transformers.

Entry scripts (train_*.py, evaluate.py, augment.py) import from here; nothing here imports a script.
"""

from kd.launcher import untee_stderr

# before any script prints: under accelerate >= 1.16 every error would otherwise reach the user twice
untee_stderr()

"""Shared machinery for knowledge distillation of extractive QA Transformers.

Entry scripts (train_*.py, evaluate.py, augment.py) import from here; nothing here imports a script.
"""

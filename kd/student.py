"""Students built from a teacher: a selection of the teacher's own layers (DistilBERT-style initialisation).

Layer numbers are 1-based block indices, as in layer maps (layer 0 is the embedding output, layer k the
output of transformer block k): selecting ``[2, 4, 6]`` of a 6-layer teacher keeps its blocks 2, 4 and 6.
"""

from __future__ import annotations

import copy
import re

import torch

# Encoder blocks live in `<base>.encoder.layer.<i>.` (BERT, RoBERTa, ELECTRA, XLM-R) or
# `<base>.transformer.layer.<i>.` (DistilBERT).
_BLOCK = re.compile(r"^(.*?(?:encoder|transformer)\.layer\.)(\d+)(\..*)$")


def parse_layer_selection(spec: str, num_teacher_layers: int) -> list[int]:
    """'2,4,6' -> [2, 4, 6]; 'every_other' -> [2, 4, ..]; validated against the teacher's depth."""
    if spec == "every_other":
        return list(range(2, num_teacher_layers + 1, 2))
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"layer selection {spec!r} is not a comma-separated list of block numbers, e.g. '2,4,6'")
    if not layers:
        raise ValueError("layer selection is empty; give block numbers such as '2,4,6' or 'every_other'")
    bad = [k for k in layers if not 1 <= k <= num_teacher_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the teacher has blocks 1..{num_teacher_layers} (0 is the "
                         "embedding output, which every student keeps)")
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"layer selection {layers} must be strictly increasing")
    return layers


def student_from_teacher_layers(teacher: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A model of the teacher's class and config with only ``layers`` (1-based) kept, weights copied:
    embeddings, the selected blocks in order, and every head or pooler the teacher has."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if hasattr(config, "n_layers"):  # DistilBERT's name for it
        config.n_layers = len(layers)
    student = type(teacher)(config)
    new_index = {teacher_block - 1: i for i, teacher_block in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _BLOCK.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = value
    if not any(_BLOCK.match(k) for k in state):
        raise ValueError(f"{type(teacher).__name__} has no encoder.layer/transformer.layer blocks; layer selection "
                         "supports BERT, RoBERTa, ELECTRA, XLM-R and DistilBERT style encoders")
    student.load_state_dict(state, strict=True)
    return student


SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def student_config_of_size(teacher_config, **sizes: int | None):
    """A copy of the teacher's config with the given sizes (SIZE_FIELDS; None keeps the teacher's), for a
    randomly initialised student of the teacher's architecture family and vocabulary.

    Raises ValueError for an unknown field or a hidden size that is not a multiple of the head count.
    """
    config = copy.deepcopy(teacher_config)
    for name, value in sizes.items():
        if name not in SIZE_FIELDS:
            raise ValueError(f"unknown student size {name!r}; sizes are {SIZE_FIELDS}")
        if value is None:
            continue
        if name == "intermediate_size" and getattr(config, "model_type", None) == "distilbert":
            name = "hidden_dim"  # DistilBERT's name for it (the other three map through attribute_map)
        setattr(config, name, value)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}; pick sizes such as 384/12 or 512/8")
    return config

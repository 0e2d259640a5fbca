"""Which student layer learns from which teacher layer, as plain data.

Layer 0 is the embedding output (the input of the first Transformer layer); layers 1..N are the outputs of the
Transformer layers, the same numbering as transformers' ``output_hidden_states``.

Specs understood by :func:`parse_layer_map`:

- ``"uniform"``: TinyBERT's map, student layer m <- teacher layer round(m * N_t / N_s) for m = 0..N_s, so 0:0
  (embeddings) and last:last are always included and the teacher layers are evenly spaced even when N_t is not a
  multiple of N_s (Haystack 1.x only accepts integer ratios).
- ``"last"``: only the last student layer <- the last teacher layer (MiniLM-style).
- explicit pairs ``"1:2,2:4,3:6"`` (``student:teacher``, comma separated).
- JSON, inline or as a path to a ``.json`` file: an object ``{"1": 2, "2": 4}`` or a list of pairs ``[[1, 2], [2, 4]]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

_SYNTAX_HELP = (
    "Use 'uniform', 'last', explicit pairs such as '0:0,1:2,2:4,3:6' (student:teacher), "
    "or JSON (inline or a .json file) such as {\"1\": 2, \"2\": 4} or [[1, 2], [2, 4]]."
)


@dataclass(frozen=True)
class LayerMap:
    """(student_layer, teacher_layer) pairs sorted by student layer; each student layer appears once.

    Build it with :func:`parse_layer_map`, which also checks the indices against the layer counts.
    """

    pairs: tuple[tuple[int, int], ...]

    def __post_init__(self):
        students = [s for s, _ in self.pairs]
        if students != sorted(set(students)):
            raise ValueError(f"LayerMap pairs must be sorted by student layer, each once; got {self.pairs}")

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def student_layers(self) -> tuple[int, ...]:
        """Mapped student layers, ascending."""
        return tuple(s for s, _ in self.pairs)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """Distinct mapped teacher layers, ascending (a teacher layer may teach several student layers)."""
        return tuple(sorted({t for _, t in self.pairs}))

    @property
    def has_embeddings(self) -> bool:
        """Whether the embedding outputs are paired (the 0:0 pair)."""
        return bool(self.pairs) and self.pairs[0][0] == 0

    @property
    def transformer_pairs(self) -> tuple[tuple[int, int], ...]:
        """The pairs of Transformer layers, i.e. without 0:0; these are the ones with attention."""
        return tuple(p for p in self.pairs if p[0] > 0)

    def to_json(self) -> str:
        """JSON object {"student": teacher}, which parse_layer_map reads back."""
        return json.dumps({str(s): t for s, t in self.pairs})

    def __str__(self) -> str:
        return ",".join(f"{s}:{t}" for s, t in self.pairs)


def parse_layer_map(spec: str, num_student_layers: int, num_teacher_layers: int) -> LayerMap:
    """Turn a spec (see the module docstring) into a validated LayerMap.

    num_student_layers / num_teacher_layers: Transformer layer counts (config.num_hidden_layers); valid indices are
    0 (embeddings) to that count. Raises ValueError naming the problem and the expected syntax.
    """
    for name, n in (("num_student_layers", num_student_layers), ("num_teacher_layers", num_teacher_layers)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Empty layer map spec. {_SYNTAX_HELP}")
    spec = spec.strip()
    if spec == "uniform":
        pairs = uniform_pairs(num_student_layers, num_teacher_layers)
    elif spec == "last":
        pairs = [(num_student_layers, num_teacher_layers)]
    elif spec.startswith(("{", "[")):
        pairs = _pairs_from_json(spec, source="inline JSON")
    elif spec.endswith(".json") or os.path.isfile(spec):
        pairs = _pairs_from_json_file(spec)
    else:
        pairs = _pairs_from_string(spec)
    return _validated(pairs, num_student_layers, num_teacher_layers)


def uniform_pairs(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform strategy, generalised to any ratio: m <- round(m * N_t / N_s), halves rounded up.

    Exact integer arithmetic (no float rounding, no banker's rounding), so e.g. 3 <- 8 gives 0:0,1:3,2:5,3:8.
    """
    return [(m, (2 * m * num_teacher_layers + num_student_layers) // (2 * num_student_layers))
            for m in range(num_student_layers + 1)]


def _pairs_from_string(spec: str) -> list[tuple[int, int]]:
    pairs = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"Malformed layer map entry {item.strip()!r} in {spec!r}. {_SYNTAX_HELP}")
        pairs.append((_as_index(parts[0], spec), _as_index(parts[1], spec)))
    return pairs


def _as_index(text, spec) -> int:
    if isinstance(text, bool):  # bool is an int subclass; true:1 is surely a mistake
        raise ValueError(f"Layer index {text!r} in {spec!r} is not an integer. {_SYNTAX_HELP}")
    if isinstance(text, int):
        return text
    if isinstance(text, str):
        try:
            return int(text.strip())
        except ValueError:
            pass
    raise ValueError(f"Layer index {text!r} in {spec!r} is not an integer. {_SYNTAX_HELP}")


def _pairs_from_json_file(path: str) -> list[tuple[int, int]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read layer map file {path!r}: {e}. {_SYNTAX_HELP}") from e
    return _pairs_from_json(text, source=path)


class _JsonObject(list):
    """A JSON object's (key, value) pairs in file order, duplicates included."""


def _pairs_from_json(text: str, source: str) -> list[tuple[int, int]]:
    try:
        # Keep an object's key/value pairs as a list: a plain dict would silently drop a repeated key.
        data = json.loads(text, object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as e:
        raise ValueError(f"Layer map {source} is not valid JSON ({e}). {_SYNTAX_HELP}") from e
    if isinstance(data, _JsonObject):
        items = list(data)
    elif isinstance(data, list) and all(isinstance(p, list) and len(p) == 2 for p in data):
        items = [tuple(p) for p in data]
    else:
        raise ValueError(f"Layer map {source} must be a JSON object or a list of [student, teacher] pairs. "
                         f"{_SYNTAX_HELP}")
    return [(_as_index(s, source), _as_index(t, source)) for s, t in items]


def _validated(pairs: list[tuple[int, int]], n_student: int, n_teacher: int) -> LayerMap:
    if not pairs:
        raise ValueError(f"The layer map is empty. {_SYNTAX_HELP}")
    seen: dict[int, int] = {}
    for s, t in pairs:
        _check_range("student", s, n_student)
        _check_range("teacher", t, n_teacher)
        if (s == 0) != (t == 0):
            # Layer 0 is the embedding output, which has no attention; pairing it with a Transformer layer would
            # mix the embedding and attention losses in ways no method defines.
            raise ValueError(f"Pair {s}:{t}: layer 0 (embeddings) can only be paired with layer 0 ('0:0').")
        if s in seen:
            raise ValueError(f"Student layer {s} is mapped twice (to teacher layers {seen[s]} and {t}); "
                             "each student layer learns from one teacher layer.")
        seen[s] = t
    return LayerMap(tuple(sorted(seen.items())))


def _check_range(side: str, index: int, num_layers: int) -> None:
    if not 0 <= index <= num_layers:
        raise ValueError(f"{side.capitalize()} layer index {index} is out of range: the {side} has {num_layers} "
                         f"layers, so {side} indices go from 0 (embeddings) to {num_layers}.")

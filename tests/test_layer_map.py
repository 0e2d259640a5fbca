import dataclasses
import json

import pytest

from kd.layer_map import LayerMap, parse_layer_map


def pairs(spec, n_student, n_teacher):
    return parse_layer_map(spec, n_student, n_teacher).pairs


def test_uniform_integer_ratio_is_tinybert_map_with_embeddings():
    assert pairs("uniform", 3, 6) == ((0, 0), (1, 2), (2, 4), (3, 6))


@pytest.mark.parametrize("n_student,n_teacher", [(4, 12), (6, 12), (2, 24), (3, 3)])
def test_uniform_integer_ratios_are_multiples(n_student, n_teacher):
    k = n_teacher // n_student
    assert pairs("uniform", n_student, n_teacher) == tuple((m, m * k) for m in range(n_student + 1))


def test_uniform_non_integer_ratio_is_evenly_spaced():
    # round(m * 8 / 3) for m = 0..3: 0, 2.67 -> 3, 5.33 -> 5, 8
    assert pairs("uniform", 3, 8) == ((0, 0), (1, 3), (2, 5), (3, 8))


def test_uniform_rounds_halves_up_not_to_even():
    # m * 3 / 2 = 1.5 and 4.5: Python's round() would give 2 and 4 (banker's rounding); evenly spaced wants 2 and 5
    assert pairs("uniform", 4, 6) == ((0, 0), (1, 2), (2, 3), (3, 5), (4, 6))


def test_last_maps_only_last_layers():
    assert pairs("last", 3, 8) == ((3, 8),)


def test_explicit_pairs_are_sorted_and_whitespace_tolerant():
    m = parse_layer_map(" 3:6 , 1:2,2 : 4 ", 3, 6)
    assert m.pairs == ((1, 2), (2, 4), (3, 6))
    assert m.student_layers == (1, 2, 3)
    assert list(m) == [(1, 2), (2, 4), (3, 6)]
    assert not m.has_embeddings


def test_helpers():
    m = parse_layer_map("0:0,1:4,2:4,3:6", 3, 6)
    assert m.teacher_layers == (0, 4, 6)  # distinct, although 4 teaches two student layers
    assert m.has_embeddings
    assert m.transformer_pairs == ((1, 4), (2, 4), (3, 6))
    assert len(m) == 4


def test_json_file_object_and_list_of_pairs(tmp_path):
    obj = tmp_path / "map.json"
    obj.write_text(json.dumps({"2": 4, "1": 2}))
    assert pairs(str(obj), 3, 6) == ((1, 2), (2, 4))
    lst = tmp_path / "map_list.json"
    lst.write_text(json.dumps([[0, 0], [3, 6]]))
    assert pairs(str(lst), 3, 6) == ((0, 0), (3, 6))


def test_inline_json():
    assert pairs('{"1": 2, "3": 6}', 3, 6) == ((1, 2), (3, 6))


def test_str_and_json_round_trip():
    m = parse_layer_map("uniform", 3, 8)
    assert str(m) == "0:0,1:3,2:5,3:8"
    assert parse_layer_map(str(m), 3, 8) == m
    assert json.loads(m.to_json()) == {"0": 0, "1": 3, "2": 5, "3": 8}
    assert parse_layer_map(m.to_json(), 3, 8) == m


def test_layer_map_is_frozen():
    m = parse_layer_map("last", 3, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.pairs = ()


def test_direct_construction_rejects_duplicates():
    with pytest.raises(ValueError, match="sorted by student layer"):
        LayerMap(((1, 2), (1, 3)))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("4:6", r"Student layer index 4 is out of range.*from 0 \(embeddings\) to 3"),
        ("1:7", r"Teacher layer index 7 is out of range.*from 0 \(embeddings\) to 6"),
        ("-1:2", r"Student layer index -1 is out of range"),
        ('{"1": 9}', r"Teacher layer index 9 is out of range"),
    ],
)
def test_out_of_range_names_index_and_range(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_map(spec, 3, 6)


@pytest.mark.parametrize("spec", ["1:2,1:4", '{"1": 2, "1": 4}', "[[1, 2], [1, 4]]"])
def test_student_layer_mapped_twice(spec):
    with pytest.raises(ValueError, match=r"Student layer 1 is mapped twice \(to teacher layers 2 and 4\)"):
        parse_layer_map(spec, 3, 6)


@pytest.mark.parametrize(
    "spec", ["garbage", "1-2", "1:2:3", "a:b", "1:2,", "", "  ", "{not json", "[1, 2]", '{"1": 2.5}', '{"1": true}']
)
def test_malformed_specs_show_the_right_syntax(spec):
    with pytest.raises(ValueError, match=r"'uniform', 'last', explicit pairs such as '0:0,1:2,2:4,3:6'"):
        parse_layer_map(spec, 3, 6)


def test_missing_json_file(tmp_path):
    with pytest.raises(ValueError, match="Cannot read layer map file"):
        parse_layer_map(str(tmp_path / "nope.json"), 3, 6)


@pytest.mark.parametrize("spec", ["0:2", "1:0"])
def test_embeddings_pair_only_with_embeddings(spec):
    with pytest.raises(ValueError, match=r"layer 0 \(embeddings\) can only be paired with layer 0"):
        parse_layer_map(spec, 3, 6)


def test_bad_layer_counts():
    with pytest.raises(ValueError, match="num_teacher_layers must be a positive int"):
        parse_layer_map("uniform", 3, 0)

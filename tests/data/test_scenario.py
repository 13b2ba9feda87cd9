import pytest

from lightning_cil.data.scenario import parse_protocol, resolve_class_order, split_classes


@pytest.mark.parametrize(
    ("name", "expected"), [("B0_Inc10", (10, 10)), ("B50_Inc10", (50, 10)), ("B0_Inc2", (2, 2)), ("B50_Inc5", (50, 5))]
)
def test_protocols_parse(name, expected):
    assert parse_protocol(name) == expected


def test_bad_protocol_names_the_value_and_the_form():
    with pytest.raises(ValueError, match=r"protocol='B10-Inc5'.*B<initial>_Inc<increment>"):
        parse_protocol("B10-Inc5")


def test_split_covers_classes_in_order():
    tasks = split_classes(100, 50, 10)
    assert [len(t) for t in tasks] == [50, 10, 10, 10, 10, 10]
    assert sum(tasks, []) == list(range(100))
    assert [len(t) for t in split_classes(10, 4, [3, 3])] == [4, 3, 3]


def test_increments_that_do_not_cover_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"increment=15 do not cover the 100 classes: 50 \+ 3 x 15 = 95, leaving 5"):
        split_classes(100, 50, 15)
    with pytest.raises(ValueError, match=r"sum to 9.*10 classes"):
        split_classes(10, 3, [3, 3])


def test_seeded_order_is_the_literature_permutation():
    import numpy as np

    names = [str(i) for i in range(100)]
    assert resolve_class_order(names, None, 1993) == list(np.random.RandomState(1993).permutation(100))
    assert resolve_class_order(names, None, None) == list(range(100))


def test_explicit_order_accepts_names_and_indices():
    assert resolve_class_order(["cat", "dog", "ant"], ["ant", 0, "dog"], 1993) == [2, 0, 1]


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 1, 1], r"more than once: \['dog'\]"),
        ([0, 1, 7], r"contains 7, outside the dataset's class ids 0..2"),
        (["cat", "cow", "dog"], r"unknown class 'cow'"),
        ([0, 1], r"missing: \['ant'\]"),
    ],
)
def test_bad_class_orders_are_refused(order, message):
    with pytest.raises(ValueError, match=message):
        resolve_class_order(["cat", "dog", "ant"], order, 1993)

import numpy as np
import pytest

from lightning_cil.data.scenario import build_layout, parse_protocol, resolve_class_order, split_classes


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


def test_layout_is_built_once_with_every_task_info():
    layout = build_layout("class", [f"c{i}" for i in range(10)], initial_classes=4, increment=3, class_order_seed=7)
    order = list(np.random.RandomState(7).permutation(10))
    assert list(layout.class_order) == order and [layout.label_of_target[c] for c in order] == list(range(10))
    assert layout.task_classes == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert layout.task_of_label == (0, 0, 0, 0, 1, 1, 1, 2, 2, 2)
    info = layout.task_info(1)
    assert info is layout.task_info(1)  # looked up, not rebuilt
    assert (info.new_classes, info.num_seen_classes, info.num_old_classes) == ((4, 5, 6), 7, 4)
    assert info.label_task == (0, 0, 0, 0, 1, 1, 1) and info.num_total_classes == 10
    with pytest.raises(IndexError, match=r"task 3 is outside this stream's tasks 0..2"):
        layout.task_info(3)


def test_domain_layouts_have_one_task_per_domain():
    names = ["dog", "cat", "horse"]
    domain = build_layout("domain", names, num_domains=2)
    assert domain.task_classes == ((0, 1, 2), (0, 1, 2)) and domain.by_domain and domain.domain_offset == 0
    assert [domain.task_info(t).num_old_classes for t in range(2)] == [0, 0]  # every task brings every label
    task = build_layout("task", names, num_domains=2)
    assert task.task_classes == ((0, 1, 2), (3, 4, 5)) and task.task_info(1).num_old_classes == 3
    with pytest.raises(ValueError, match=r"needs a dataset with several domains \(dataset='domains'\); 'toy' has one"):
        build_layout("domain", names, num_domains=1, dataset="toy")

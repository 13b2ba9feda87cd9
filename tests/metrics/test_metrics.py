import math

import numpy as np
import pytest
import torch

from lightning_cil.metrics import (
    AccuracyMatrix,
    TaskAccuracy,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
)


def test_task_accuracy_counts_per_task_in_one_pass():
    metric = TaskAccuracy(num_tasks=3, top_k=2)
    scores = torch.tensor([[5.0, 1.0, 0.0, 0.0], [0.0, 1.0, 5.0, 0.0], [0.0, 3.0, 0.0, 2.0], [0.0, 0.0, 1.0, 5.0]])
    labels = torch.tensor([0, 1, 3, 3])
    tasks = torch.tensor([0, 0, 1, 1])
    metric.update(scores, labels, tasks)
    out = metric.compute()
    assert out["correct"].tolist() == [1, 1, 0] and out["total"].tolist() == [2, 2, 0]
    assert out["correct_top_k"].tolist() == [2, 2, 0]  # label 1 is second-best in row 1, label 3 in row 2
    assert out["per_task"][0] == 0.5 and math.isnan(out["per_task"][2])


def test_task_accuracy_counts_after_a_reset_under_inference_mode():
    """``trainer.test`` resets the metric under inference mode; a validation in the next task's fit (the sanity
    check, ``val_during_fit``) then updates it outside inference mode."""
    metric = TaskAccuracy(num_tasks=2)
    with torch.inference_mode():
        metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([0]))
        metric.compute()
        metric.reset()
    with torch.no_grad():
        metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), torch.tensor([1]))
    assert metric.compute()["correct"].tolist() == [0, 1]


def test_matrix_summaries_match_hand_computed_values():
    m = AccuracyMatrix(3)
    m.record(0, [90, 0, 0], [100, 0, 0], [100, 0, 0])
    m.record(1, [60, 80, 0], [90, 95, 0], [100, 100, 0])
    m.record(2, [30, 50, 70], [80, 90, 100], [100, 100, 100])
    assert np.allclose(m.matrix[2], [0.3, 0.5, 0.7])
    assert m.seen.tolist() == pytest.approx([0.9, 0.7, 0.5])
    s = m.summary()
    assert s["avg_incremental_accuracy"] == pytest.approx(0.7)
    assert s["last_accuracy"] == pytest.approx(0.5)
    # forgetting: task0 max(0.9, 0.6) - 0.3 = 0.6; task1 0.8 - 0.5 = 0.3 -> 0.45
    assert s["average_forgetting"] == pytest.approx(0.45)
    assert s["backward_transfer"] == pytest.approx(-0.45)
    assert s["last_old_accuracy"] == pytest.approx(0.4) and s["last_new_accuracy"] == pytest.approx(0.7)
    assert s["avg_incremental_top5"] == pytest.approx((1.0 + 0.925 + 0.9) / 3)
    restored = AccuracyMatrix.from_state_dict(m.state_dict())
    assert restored.summary() == s
    assert "average incremental accuracy: 70.00%" in m.format_table()


def test_seen_accuracy_is_sample_weighted():
    m = AccuracyMatrix(2)
    m.record(0, [10], [10], [10])
    m.record(1, [0, 30], [0, 30], [10, 30])  # 30 of 40 samples right
    assert m.seen[1] == pytest.approx(0.75)


def test_forgetting_and_transfer_of_first_task_are_undefined():
    matrix = np.array([[0.5]])
    assert math.isnan(average_forgetting(matrix, 0)) and math.isnan(backward_transfer(matrix, 0))


def test_empty_task_in_evaluation_is_an_error():
    with pytest.raises(ValueError, match=r"saw no test samples of tasks \[1\]"):
        AccuracyMatrix(2).record(1, [5, 0], [5, 0], [5, 0])


def test_forgetting_per_task_and_the_metrics_json_round_trip():
    m = AccuracyMatrix(3)
    m.record(0, [90, 0, 0], [100, 0, 0], [100, 0, 0])
    m.record(1, [60, 80, 0], [90, 95, 0], [100, 100, 0])
    assert forgetting_per_task(m.matrix, 1).tolist() == pytest.approx([0.3])
    m.record(2, [30, 50, 70], [80, 90, 100], [100, 100, 100])
    assert forgetting_per_task(m.matrix, 2).tolist() == pytest.approx([0.6, 0.3])
    partial = AccuracyMatrix(3)
    partial.record(0, [90, 0, 0], [100, 0, 0], [100, 0, 0])
    for original in (m, partial):
        restored = AccuracyMatrix.from_json(original.to_json())
        assert restored.completed == original.completed and restored.summary() == original.summary()
        assert np.allclose(restored.matrix, original.matrix, equal_nan=True)

"""The loss weights, splits and merges that must match the reference code (PyCIL) or the paper, computed by hand."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, cli, digits_stream, make_trainer
from torch import nn

from lightning_cil import TaskSchedule, run_stream
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods import DER, EWC, WA, BiC, LwF
from lightning_cil.methods.distillation import kd_loss


def _soft_cross_entropy(student: list[float], teacher: list[float], t: float) -> float:
    """-sum_c softmax(teacher / T)_c log softmax(student / T)_c, one sample, in plain Python."""
    z_s = sum(math.exp(v / t) for v in student)
    z_t = sum(math.exp(v / t) for v in teacher)
    return -sum(math.exp(b / t) / z_t * (a / t - math.log(z_s)) for a, b in zip(student, teacher))


def test_kd_loss_is_the_reference_soft_cross_entropy_without_a_temperature_factor():
    student = [[1.0, 2.0, -0.5], [0.3, -1.2, 2.2]]
    teacher = [[2.5, 0.0, 1.0], [-0.7, 0.4, 1.9]]
    expected = sum(_soft_cross_entropy(s, q, 2.0) for s, q in zip(student, teacher)) / 2
    assert kd_loss(torch.tensor(student), torch.tensor(teacher), 2.0).item() == pytest.approx(expected, rel=1e-6)


def _with_teacher(model, old: int, inputs: int):
    """``model`` with a linear stand-in teacher over ``old`` classes, reading images of ``inputs`` features."""
    torch.manual_seed(0)
    model.old_model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, old)).requires_grad_(False)
    return model


def test_lwf_weights_the_reference_distillation_by_lambda():
    """PyCIL's LwF: CE over the new classes' logits + 3 * soft cross-entropy on the old ones (T = 2)."""
    model = _with_teacher(LwF(backbone="resnet20", in_channels=1), old=2, inputs=4)
    images, logits, labels = torch.randn(5, 4), torch.randn(5, 5), torch.tensor([2, 3, 4, 2, 3])
    teacher = model.old_model(images)
    expected = F.cross_entropy(logits[:, 2:], labels - 2) + 3.0 * sum(
        _soft_cross_entropy(s, q, 2.0) for s, q in zip(logits[:, :2].tolist(), teacher.tolist())
    ) / len(images)
    assert model.training_loss(logits, labels, images).item() == pytest.approx(expected.item(), rel=1e-5)


def test_wa_mixes_cross_entropy_and_distillation_by_the_old_class_share():
    """WA's loss (paper, PyCIL's kd_lambda): (1 - lambda) CE + lambda KD, lambda = old / seen = 2 / 5."""
    model = _with_teacher(WA(backbone="resnet20", in_channels=1), old=2, inputs=4)
    images, logits, labels = torch.randn(5, 4), torch.randn(5, 5), torch.tensor([0, 3, 4, 1, 3])
    teacher = model.old_model(images)
    kd = sum(_soft_cross_entropy(s, q, 2.0) for s, q in zip(logits[:, :2].tolist(), teacher.tolist())) / len(images)
    expected = 0.6 * F.cross_entropy(logits, labels).item() + 0.4 * kd
    assert model.training_loss(logits, labels, images).item() == pytest.approx(expected, rel=1e-5)

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


def _recording(cls, hook: str, record):
    """A subclass of ``cls`` whose ``hook`` calls ``record(model, result, *args)`` after the original."""

    def wrapped(self, *args):
        result = getattr(cls, hook)(self, *args)
        record(self, result, *args)
        return result

    return type(cls.__name__, (cls,), {hook: wrapped})


def test_online_ewc_merges_the_fisher_as_pycils_convex_mix(tmp_path):
    """At a task end F <- alpha F_old + (1 - alpha) F_t on the rows that existed, alpha = old / seen classes;
    rows that grew in the task (classifier) take F_t alone. Digits: 4 + 3 + 3 classes, alpha = 4/7 then 7/10."""
    fishers, merged = [], []
    cls = _recording(EWC, "_fisher", lambda model, result: fishers.append({n: f.clone() for n, f in result.items()}))
    cls = _recording(cls, "on_task_end", lambda model, result, task: merged.append(model.penalties[0]))
    L.seed_everything(0)
    model = cls(backbone="resnet20", in_channels=1, schedule=TaskSchedule(epochs=1, lr=0.02, milestones=[]))
    run_stream(make_trainer(tmp_path), model, digits_stream())
    assert len(fishers) == len(merged) == 3 and len(model.penalties) == 1
    for task, alpha in ((1, 4 / 7), (2, 7 / 10)):
        for name, (fisher, _) in merged[task].items():
            rows = len(merged[task - 1][name][0])
            expected = fishers[task][name].clone()
            expected[:rows] = alpha * merged[task - 1][name][0] + (1 - alpha) * fishers[task][name][:rows]
            torch.testing.assert_close(fisher, expected, rtol=1e-6, atol=0, msg=name)
    weight, _ = merged[2]["head.weight"]
    assert weight.shape[0] == 10 and torch.equal(weight[7:], fishers[2]["head.weight"][7:])


def test_bic_holds_out_a_random_share_of_each_old_classs_exemplars(tmp_path):
    """Not the first ones (herding's highest priority, which stage 1 should train on): a random sample, as PyCIL's
    split. Digits, 60 exemplars over 4 classes: 2 held out per class from each class's 15."""
    seen = []

    def record(model, result, task):
        if task.index == 1:
            seen.append(({k: v.tolist() for k, v in model.memory.exemplars.items()}, model.held_out.tolist()))

    cls = _recording(BiC, "on_task_start", record)
    L.seed_everything(0)
    model = cls(
        backbone="resnet20",
        in_channels=1,
        schedule=TaskSchedule(epochs=1, lr=0.02, milestones=[]),
        memory_budget=60,
        bias_epochs=2,
    )
    run_stream(make_trainer(tmp_path), model, digits_stream())
    ((exemplars, held_out),) = seen
    held = set(held_out)
    firsts = 0
    for label, members in exemplars.items():
        mine = [i for i in members if i in held]
        assert len(mine) == 2, (label, mine)
        firsts += set(mine) == set(members[:2])
    assert firsts < len(exemplars), "every old class held out its highest-priority exemplars"


def test_der_mask_embeddings_have_no_weight_decay():
    model = DER(backbone="resnet20", in_channels=1, prune=True, schedule=TaskSchedule(epochs=1, weight_decay=5e-4))
    model.on_task_start(TaskInfo(index=0, num_tasks=2, new_classes=(0, 1), num_seen_classes=2, num_total_classes=4))
    optimizer = model.configure_optimizers()["optimizer"]
    embeddings = {id(e) for e in model.backbone.gates.embeddings}
    assert embeddings
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & embeddings:
            assert ids <= embeddings and group["weight_decay"] == 0.0
        else:
            assert group["weight_decay"] == 5e-4
    grouped = set().union(*({id(p) for p in g["params"]} for g in optimizer.param_groups))
    assert embeddings <= grouped


def test_der_b50_config_keeps_twenty_exemplars_per_class():
    """DER's B50 numbers (and PODNet's protocol) use 20 exemplars per class, not a 2000 total."""
    out = cli("fit", "--config", str(REPO / "configs" / "der_cifar100_b50_10steps.yaml"), "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory_per_class: 20\n" in out.stdout and "memory_budget: null\n" in out.stdout, out.stdout

"""Mixed precision: every method runs a stream under bf16-mixed and 16-mixed, and the task-end work stays in fp32.

``Trainer(accelerator="cpu", precision="16-mixed")`` turns into bf16; the 16-mixed tests pass Lightning's
``MixedPrecision("16-mixed", "cpu")`` plugin instead, which runs fp16 autocast with a GradScaler on the CPU:
the same loss scaling, skipped steps and scaler checkpoint state as on a GPU.
"""

import inspect

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import digits_stream, make_trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from test_contract import CASES

import lightning_cil.methods as methods
from lightning_cil import TaskSchedule, run_stream
from lightning_cil.data.memory import closest_to_mean, herding
from lightning_cil.methods.distillation import kd_loss
from lightning_cil.methods.masking import TaskMaskedModule
from lightning_cil.metrics import TaskAccuracy
from lightning_cil.precision import check_precision


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _digits(scenario: str, **data):
    """The contract test's stream, shrunk: bf16 convolutions are slow on CPUs without bf16 instructions."""
    return digits_stream(scenario, max_train_per_class=30, max_test_per_class=10, **data)


def _model_and_stream(cls, options, **data):
    scenario = "task" if issubclass(cls, TaskMaskedModule) else "class"
    kwargs = {"memory_budget": 60} if "memory_budget" in inspect.signature(cls).parameters else {}
    kwargs.update(options)
    epochs = 2 if cls is methods.PackNet else 1
    model = cls(
        backbone="resnet20", in_channels=1, schedule=TaskSchedule(epochs=epochs, lr=0.02, milestones=[]), **kwargs
    )
    return model, _digits(scenario, **data)


def _run_bf16(cls, options, root):
    L.seed_everything(0)
    model, dm = _model_and_stream(cls, options)
    run_stream(make_trainer(root, precision="bf16-mixed"), model, dm)
    return model, dm


def _fp16_trainer(root):
    return make_trainer(root, plugins=[MixedPrecision("16-mixed", "cpu")])


#: the cases in the default suite: between them they run every fp32-sensitive task-end step (herding, NME means,
#: the Fisher, DER's pruning and balancing, BiC's bias stage); the others run with -m slow
DEFAULT_SUITE = [(methods.ICaRL, {}), (methods.EWC, {}), (methods.BiC, {}), (methods.DER, {"prune": True})]
BF16_CASES = [case if case in DEFAULT_SUITE else pytest.param(*case, marks=pytest.mark.slow) for case in CASES]


@pytest.mark.parametrize(("cls", "options"), BF16_CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_bf16_mixed_stream_keeps_weights_memory_means_and_fisher_in_fp32(cls, options, tmp_path):
    model, dm = _run_bf16(cls, options, tmp_path)
    assert model.task_index == 2 and model.trainer.precision == "bf16-mixed"
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_floating_point() or tensor.dtype == torch.float32, name
    memory = getattr(model, "memory", None)
    if memory is not None:
        assert len(memory) == 60 and memory.indices().dtype == torch.long
    if isinstance(model, methods.EWC):
        assert all(f.dtype == v.dtype == torch.float32 for p in model.penalties for f, v in p.values())
        torch.manual_seed(0)  # the Fisher reads augmented training images
        plain = model._fisher()
        torch.manual_seed(0)
        with _bf16():
            under_autocast = model._fisher()
        assert all(torch.equal(plain[n], under_autocast[n]) and plain[n].dtype == torch.float32 for n in plain)
    if isinstance(model, methods.ICaRL):
        means = model.class_means.clone()
        assert means.dtype == torch.float32
        with _bf16():
            model._compute_class_means(10)
        assert torch.equal(model.class_means, means)
    # exemplar features are computed in fp32 even when the caller has autocast on
    samples = dm.train_subset(torch.arange(64))
    plain = model.extract_features(samples)
    with _bf16():
        under_autocast = model.extract_features(samples)
    assert under_autocast.dtype == torch.float32 and torch.equal(plain, under_autocast)


@pytest.mark.parametrize(("cls", "options"), CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_16_mixed_stream_trains_in_fp16_with_a_loss_scale_and_its_checkpoint_rebuilds_it(cls, options, tmp_path):
    L.seed_everything(0)
    model, dm = _model_and_stream(cls, options)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    training_dtypes = set()
    first_conv.register_forward_hook(lambda m, i, out: training_dtypes.add(out.dtype) if m.training else None)
    trainer = _fp16_trainer(tmp_path)
    run_stream(trainer, model, dm)

    assert model.task_index == 2 and trainer.precision == "16-mixed"
    assert torch.float16 in training_dtypes  # the training steps ran under fp16 autocast
    scale = trainer.precision_plugin.scaler.get_scale()
    assert 0 < scale < float("inf")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_floating_point() or tensor.dtype == torch.float32, name
    memory = getattr(model, "memory", None)
    if memory is not None:
        assert len(memory) == 60
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["MixedPrecision"]["scale"] == scale  # resumes with its scale

    recorded = {name: counts["correct"] for name, counts in model.last_evaluation.items()}
    fresh, fresh_dm = _model_and_stream(cls, options)
    _fp16_trainer(tmp_path / "eval").test(fresh, datamodule=fresh_dm, ckpt_path=str(ckpt), verbose=False)
    assert {name: counts["correct"] for name, counts in fresh.last_evaluation.items()} == recorded


def test_selection_is_fp32_under_autocast():
    torch.manual_seed(0)
    features = torch.randn(500, 64)
    expected = herding(features, 100), closest_to_mean(features, 100)
    with _bf16():  # a bf16 product here picks other exemplars
        assert torch.equal(herding(features, 100), expected[0])
        assert torch.equal(closest_to_mean(features, 100), expected[1])


def test_losses_and_accuracy_counts_are_fp32_from_bf16_scores():
    logits = torch.randn(8, 5).to(torch.bfloat16)
    assert kd_loss(logits, logits, 2.0).dtype == torch.float32
    metric = TaskAccuracy(2)
    metric.update(logits, torch.arange(8) % 5, torch.zeros(8, dtype=torch.long))
    assert metric.compute()["correct"].dtype == torch.long
    with _bf16():
        assert F.cross_entropy(torch.randn(4, 3).float(), torch.zeros(4, dtype=torch.long)).dtype == torch.float32


def test_true_half_precision_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"precision='bf16-true'.*'32-true', '16-mixed', 'bf16-mixed'"):
        check_precision("bf16-true")
    model = methods.Finetune(backbone="resnet20", in_channels=1, schedule=TaskSchedule(epochs=1, milestones=[]))
    with pytest.raises(ValueError, match="precision='16-true'"):
        run_stream(make_trainer(tmp_path, precision="16-true"), model, _digits("class"))

"""DER: frozen old extractors, growing parameters, the auxiliary head, and behaviour on real images."""

import copy
import json

import lightning as L
import torch
from conftest import make_trainer

from lightning_cil import DER, TaskSchedule, TaskStreamDataModule, run_stream


class _Snapshots(L.Callback):
    """After each task's closing evaluation: every extractor's weights and BN buffers, and the aux head size."""

    def __init__(self) -> None:
        self.extractors: list[list[dict]] = []
        self.aux: list[int | None] = []

    def on_test_end(self, trainer, pl_module) -> None:
        self.extractors.append([copy.deepcopy(e.state_dict()) for e in pl_module.backbone.extractors])
        self.aux.append(None if pl_module.aux_head is None else pl_module.aux_head.out_features)


def test_old_extractors_stay_bitwise_frozen_and_the_model_grows(tmp_path):
    L.seed_everything(0)
    dm = TaskStreamDataModule(
        dataset="digits", initial_classes=4, increment=3, class_order_seed=None, batch_size=64, num_workers=0
    )
    model = DER(
        backbone="resnet20",
        in_channels=1,
        schedule=TaskSchedule(epochs=2, lr=0.05, milestones=[]),
        memory_budget=60,
        balance_epochs=4,
    )
    snapshots = _Snapshots()
    run_stream(make_trainer(tmp_path, callbacks=[snapshots]), model, dm)

    assert [len(s) for s in snapshots.extractors] == [1, 2, 3]
    for task in range(1, 3):
        for j in range(task):  # extractor j was frozen from task j + 1 on: weights and running stats unchanged
            before, after = snapshots.extractors[j][j], snapshots.extractors[task][j]
            for name in before:
                assert torch.equal(before[name], after[name]), f"extractor {j} changed {name} in task {task}"
        newest_before = snapshots.extractors[task - 1][task - 1]
        newest_after = snapshots.extractors[task][task]
        assert any(not torch.equal(newest_before[k], newest_after[k]) for k in newest_before)  # F_t did train
    assert snapshots.aux == [None, 3 + 1, 3 + 1]  # |new classes| + 1 from the second task on

    metrics = json.loads((tmp_path / "run" / "version_0" / "metrics.json").read_text())
    params = [t["num_parameters"] for t in metrics["tasks"]]
    extractor = sum(p.numel() for p in model.backbone.extractors[0].parameters())
    assert params == [extractor + 4 * 65, 2 * extractor + 7 * 129, 3 * extractor + 10 * 193]
    assert [t["memory_size"] for t in metrics["tasks"]] == [60, 60, 60]
    assert all(not p.requires_grad for e in model.backbone.extractors[:-1] for p in e.parameters())


def test_der_keeps_first_task_accuracy_that_finetune_loses(split_cifar10):
    """Split CIFAR-10 configs shrunk (see conftest), DER (w/o pruning) with 200 exemplars.

    Calibration (seed 0): after the last task DER keeps 15.0% on task 0 (row [15, 8, 13, 34, 45]) and Finetune
    0.0%. Without the classifier-balancing stage (balance_epochs=0) DER keeps 2.0% (row [2, 6, 40, 9.5, 71.5]):
    the balancing stage is what protects the old classes at this budget (6 epochs per task barely train the
    new extractors, so this stream does not show the paper's margin).
    """
    der = split_cifar10("der")["scorers"]["cnn"]["accuracy_matrix"]
    finetune = split_cifar10("finetune")["scorers"]["cnn"]["accuracy_matrix"]
    assert finetune[-1][0] < 5
    assert der[-1][0] > finetune[-1][0] + 10, der

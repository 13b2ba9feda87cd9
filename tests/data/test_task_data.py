"""The stream is the broker: the data module trains on the plan it is given, methods read a TaskData view."""

from pathlib import Path

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_cil.data import TaskStreamDataModule
from lightning_cil.data.task_data import TaskData, TrainingPlan

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_cil"


def _digits(**kw) -> TaskStreamDataModule:
    dm = TaskStreamDataModule(dataset="digits", protocol="B0_Inc2", class_order_seed=None, num_workers=0, **kw)
    dm.prepare_stream()
    return dm


def test_the_training_loader_serves_the_plan_and_a_new_task_resets_it():
    dm = _digits()
    dm.set_task(1)
    own = set(dm.train_dataloader().dataset.indices.tolist())
    old = torch.nonzero(dm.train_labels() == 0).flatten()[:5]
    held_out = sorted(own)[:3]
    dm.train_on(TrainingPlan(extra=old, exclude=torch.tensor(held_out)))
    planned = set(dm.train_dataloader().dataset.indices.tolist())
    assert planned == (own | set(old.tolist())) - set(held_out)
    dm.train_on(TrainingPlan(all_seen=True))
    assert len(dm.train_dataloader().dataset) == int((dm._train_tasks <= 1).sum())
    dm.set_task(2)
    assert torch.equal(dm.train_dataloader().dataset.indices, torch.nonzero(dm._train_tasks == 2).flatten())


def test_task_data_gives_labels_members_subsets_and_mapped_features_in_order():
    dm = _digits()
    dm.set_task(1)
    data = TaskData(dm.task_info(1), dm, SingleDeviceStrategy(torch.device("cpu")))
    members = data.members(3)
    assert torch.equal(data.labels[members], torch.full((len(members),), 3))
    subset = data.subset(members[:10])
    mean_pixel = data.map(lambda images: images.mean(dim=(1, 2, 3))[:, None], subset, dim=1, batch_size=4)
    expected = torch.stack([subset[i][0].mean() for i in range(10)])[:, None]
    assert torch.allclose(mean_pixel, expected)
    assert len(data.training_set()) == int((dm._train_tasks == 1).sum()) and data.batch_size == dm.hparams.batch_size


def test_methods_and_data_do_not_reach_through_the_trainer_for_each_other():
    """Methods read TaskData and data modules read the TrainingPlan; neither looks the other up at run time."""
    methods = [p.name for p in (PACKAGE / "methods").glob("*.py") if "trainer.datamodule" in p.read_text()]
    data = [p.name for p in (PACKAGE / "data").glob("*.py") if "lightning_module" in p.read_text()]
    assert methods == [] and data == []

"""data.decode_on_device: batches of file bytes, decoded and transformed on the training device."""

import shutil
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_trainer
from PIL import Image

import lightning_cil.data.datamodule as datamodule_module
import lightning_cil.data.task_data as task_data_module
from lightning_cil import Finetune, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.data.device_decoding import EncodedBatch, decode_batch
from lightning_cil.data.task_data import TrainingPlan
from lightning_cil.methods import ICaRL


@pytest.fixture
def mixed_root(cifar10_small_root: Path, tmp_path: Path) -> Path:
    """Four CIFAR-10 classes as JPEG files, with files the batched JPEG decoder refuses among them: a PNG named
    ``.jpg`` and a greyscale JPEG (decoded to RGB)."""
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for folder in sorted((cifar10_small_root / split).iterdir())[:4]:
            shutil.copytree(folder, root / split / folder.name)
    first = sorted((root / "train").iterdir())[0]
    files = sorted(first.iterdir())
    with Image.open(files[0]) as image:
        image.save(files[0], format="PNG")
    with Image.open(files[1]) as image:
        image.convert("L").save(files[1])
    return root


def _stream(root: Path, **kw) -> TaskStreamDataModule:
    options = dict(dataset="imagefolder", root=str(root), initial_classes=2, increment=2, class_order_seed=None)
    return TaskStreamDataModule(**{**options, "batch_size": 16, "num_workers": 0, **kw})


@pytest.mark.parametrize("preset", ["imagenet", "cifar10"])
def test_batches_decoded_on_the_device_equal_the_cpu_paths(mixed_root, preset):
    """Same files, same per-sample seeds, same decoder on the CPU: every training batch is identical, including
    RandomResizedCrop's draws and the files that fall back to one-by-one decoding."""
    batches = {}
    for on_device, workers in ((False, 0), (True, 2)):
        dm = _stream(mixed_root, augmentation=preset, decode_on_device=on_device, num_workers=workers)
        dm.setup("fit")
        dm.set_task(0)
        dm.train_on(TrainingPlan())
        loaded = list(dm.train_dataloader())
        if on_device:
            assert all(isinstance(batch, EncodedBatch) for batch in loaded)
            loaded = [dm.on_before_batch_transfer(batch, 0) for batch in loaded]
        batches[on_device] = loaded
    assert len(batches[True]) == len(batches[False]) == 5  # 2 classes x 40 images, batches of 16
    for (cpu_images, cpu_labels, cpu_tasks), (images, labels, tasks) in zip(batches[False], batches[True]):
        assert images.dtype == torch.float32 and images.shape == cpu_images.shape
        assert torch.equal(images, cpu_images) and torch.equal(labels, cpu_labels) and torch.equal(tasks, cpu_tasks)


@pytest.mark.parametrize("method", [Finetune, ICaRL])
def test_a_stream_decoded_on_the_device_trains_to_the_same_model(mixed_root, tmp_path, monkeypatch, method):
    """Inside Lightning's fit (the hook runs before the batch is moved), in the evaluations and in iCaRL's task-end
    features (herding, class means): the same accuracy matrix and weights."""
    transforms = []

    def recording(batch, transform, *args):
        transforms.append(transform)
        return decode_batch(batch, transform, *args)

    monkeypatch.setattr(datamodule_module, "decode_batch", recording)
    monkeypatch.setattr(task_data_module, "decode_batch", recording)
    results = {}
    for on_device in (False, True):
        L.seed_everything(3)
        options = dict(memory_budget=20) if method is ICaRL else {}
        model = method(backbone="resnet20", schedule=TaskSchedule(epochs=1, lr=0.05, milestones=[]), **options)
        trainer = make_trainer(tmp_path / str(on_device))
        dm = _stream(mixed_root, augmentation="cifar10", decode_on_device=on_device)
        with pytest.warns(UserWarning, match="decode_on_device without a GPU") if on_device else nullcontext():
            summary = run_stream(trainer, model, dm)
        results[on_device] = summary, model.state_dict()
    assert results[True][0] == results[False][0]
    for name, value in results[False][1].items():
        assert torch.equal(value, results[True][1][name]), name
    # training batches, evaluation batches and (iCaRL) the task-end features were all decoded on the device
    assert dm.train_transform in transforms and dm.test_transform in transforms
    evaluation_and_features = sum(t is dm.test_transform for t in transforms)
    test_batches = 3 + 5  # the evaluations after tasks 1 and 2: 40 and 80 test images, batches of 16
    assert evaluation_and_features > test_batches if method is ICaRL else evaluation_and_features == test_batches


def test_decoding_on_the_device_is_refused_for_images_held_in_memory(mixed_root):
    with pytest.raises(ValueError, match=r"decode_on_device .* dataset='digits' is held in memory"):
        TaskStreamDataModule(dataset="digits", decode_on_device=True)
    with pytest.raises(ValueError, match=r"dataset='imagefolder' is held in memory; use it for image files"):
        _stream(mixed_root, in_memory=True, decode_on_device=True)

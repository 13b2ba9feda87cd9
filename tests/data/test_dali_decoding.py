"""data.device_decoder: dali: NVIDIA DALI decodes, crops, resizes, flips and normalises the training batches.

DALI's CPU pipelines run without a GPU, so these tests run DALI itself (the ``dali`` extra, in ``dev``) on real
CIFAR-10 JPEGs: the same crops and flips as the CPU path, to within resampling; a stream resumed mid-epoch ends
with the identical model; what DALI cannot run is refused before training.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CrashAtStep, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_cil import Finetune, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.data.device_decoding import EncodedBatch
from lightning_cil.data.task_data import TrainingPlan

pytest.importorskip("nvidia.dali", reason="the dali extra (in dev) is not installed")


@pytest.fixture
def imagenet_sized_root(cifar10_small_root: Path, tmp_path: Path) -> Path:
    """Two CIFAR-10 classes re-encoded as 500x375 JPEGs (ImageNet's typical size), with a greyscale JPEG and a PNG
    named ``.jpg`` among them, and a GIF named ``.jpg``, which DALI cannot decode (the CPU path reads it)."""
    root = tmp_path / "imagenet_sized"
    for split in ("train", "test"):
        for folder in sorted((cifar10_small_root / split).iterdir())[:2]:
            (root / split / folder.name).mkdir(parents=True)
            for k, source in enumerate(sorted(folder.iterdir())[:24]):
                with Image.open(source) as image:
                    large = image.convert("RGB").resize((500, 375), Image.BICUBIC)
                target = root / split / folder.name / source.name
                if split == "train" and folder.name == "airplane" and k < 3:
                    large = large.convert("L") if k == 0 else large
                    large.save(target, format=("JPEG", "PNG", "GIF")[k])
                else:
                    large.save(target, format="JPEG", quality=90)
    return root


def _stream(root: Path, **kw) -> TaskStreamDataModule:
    options = dict(dataset="imagefolder", root=str(root), initial_classes=2, increment=2, class_order_seed=None)
    return TaskStreamDataModule(**{**options, "batch_size": 16, "num_workers": 0, **kw})


def _batches(dm: TaskStreamDataModule) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    dm.setup("fit")
    dm.set_task(0)
    dm.train_on(TrainingPlan())
    loaded = list(dm.train_dataloader())
    if dm.hparams.decode_on_device:
        assert all(isinstance(batch, EncodedBatch) for batch in loaded)
        loaded = [dm.on_before_batch_transfer(batch, 0) for batch in loaded]
    return loaded


def test_dali_crops_and_flips_what_the_cpu_path_draws(imagenet_sized_root):
    """The ImageNet preset (RandomResizedCrop 224 + flip) on 500x375 JPEGs: every image's crop and flip are the CPU
    path's draws, so DALI's pixels are the CPU path's up to resampling; the GIF DALI refuses gets them exactly."""
    cpu = _batches(_stream(imagenet_sized_root, augmentation="imagenet"))
    dali = _batches(_stream(imagenet_sized_root, augmentation="imagenet", decode_on_device=True, device_decoder="dali"))
    assert len(cpu) == len(dali) == 3  # 48 images, batches of 16
    differences, exact = [], 0
    for (cpu_images, cpu_labels, cpu_tasks), (images, labels, tasks) in zip(cpu, dali):
        assert images.dtype == torch.float32 and images.shape == cpu_images.shape == (16, 3, 224, 224)
        assert torch.equal(labels, cpu_labels) and torch.equal(tasks, cpu_tasks)
        for image, cpu_image in zip(images, cpu_images):
            differences.append((image - cpu_image).abs().mean().item())
            exact += torch.equal(image, cpu_image)
        # against another image's crop the difference is of the order of the pixel values themselves
        assert (images - cpu_images.roll(1, dims=0)).abs().mean() > 0.3
    assert exact == 1, "the GIF is read and transformed by the CPU path"
    assert max(differences) < 0.01, f"DALI's resampling moved a pixel mean by {max(differences):.4f}"


def _run(root: Path, out: Path, callbacks=(), ckpt_path=None) -> Finetune:
    L.seed_everything(3)
    model = Finetune(backbone="resnet20", schedule=TaskSchedule(epochs=2, lr=0.05, milestones=[]))
    dm = _stream(root, augmentation="small32", decode_on_device=True, device_decoder="dali")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decode_on_device without a GPU")
        run_stream(make_trainer(out, callbacks=list(callbacks)), model, dm, ckpt_path=ckpt_path)
    return model


def test_a_stream_decoded_by_dali_resumes_mid_epoch_to_the_identical_model(cifar10_small_root, tmp_path):
    """The crops and flips come from the samples' seeds and the order from the stateful loader, so a fit resumed
    from a step-interval checkpoint gets the batches an uninterrupted one got: the same matrix and weights."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for folder in sorted((cifar10_small_root / split).iterdir())[:4]:
            shutil.copytree(folder, root / split / folder.name)
    reference = _run(root, tmp_path / "reference")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(
            root,
            tmp_path / "killed",
            callbacks=[ModelCheckpoint(every_n_train_steps=3, save_last=True), CrashAtStep(7)],
        )
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    resumed = _run(root, tmp_path / "resumed", ckpt_path=last)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), f"{name} differs after resuming mid-epoch"


def test_what_dali_cannot_run_is_refused_before_training(cifar10_small_root, monkeypatch):
    from torchvision.transforms import v2

    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    jitter = [v2.RandomResizedCrop(32), v2.ColorJitter(0.4), *finish]
    dm = _stream(
        cifar10_small_root,
        decode_on_device=True,
        device_decoder="dali",
        augmentation="small32",
        train_transforms=jitter,
    )
    with pytest.raises(
        ValueError, match=r"device_decoder='dali' runs RandomResizedCrop, .* the training transform has ColorJitter"
    ):
        dm.prepare_stream()
    with pytest.raises(ValueError, match=r"the training transform has RandomCrop: use device_decoder: torchvision"):
        _stream(
            cifar10_small_root, decode_on_device=True, device_decoder="dali", augmentation="cifar10"
        ).prepare_stream()
    flipped_first = [v2.RandomHorizontalFlip(), v2.RandomResizedCrop(32), *finish]
    with pytest.raises(ValueError, match=r"the training transform is \['RandomHorizontalFlip', 'RandomResizedCrop'"):
        _stream(
            cifar10_small_root, decode_on_device=True, device_decoder="dali", augmentation="small32",
            train_transforms=flipped_first,
        ).prepare_stream()  # fmt: skip
    with pytest.raises(
        ValueError, match=r"device_decoder='dali' is the decoder of decode_on_device: set decode_on_device: true"
    ):
        _stream(cifar10_small_root, device_decoder="dali")
    with pytest.raises(
        ValueError, match=r"device_decoder='nvjpeg' is unknown; choose one of \['torchvision', 'dali'\]"
    ):
        _stream(cifar10_small_root, decode_on_device=True, device_decoder="nvjpeg")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("nvidia") else real(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"needs NVIDIA DALI, which is not installed: pip install 'lightning_cil\[dali\]'"
    ):
        _stream(cifar10_small_root, decode_on_device=True, device_decoder="dali")

"""Batch augmentation on the device (data.gpu_augmentation): same crops, flips and brightness as the CPU presets."""

import itertools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from torchvision.transforms import v2

from lightning_cil import Finetune, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.data.batch_augmentation import BATCH_PRESETS, BatchAugmentation, build_batch_augmentation
from lightning_cil.data.transforms import CIFAR100_STATS, build_transforms

N = 2000  # draws per distribution check


def _candidates(image: torch.Tensor, padding: int, flip: bool, finish) -> torch.Tensor:
    """Every output torchvision's RandomCrop(padding) (+ flip) can give for ``image``, as [(2p+1)^2 * (1+flip), ...]."""
    _, h, w = image.shape
    padded = v2.functional.pad(image, [padding])
    outs = []
    for top, left, mirrored in itertools.product(
        range(2 * padding + 1), range(2 * padding + 1), (False, True)[: 1 + flip]
    ):
        crop = v2.functional.crop(padded, top, left, h, w)
        outs.append(finish(v2.functional.horizontal_flip(crop) if mirrored else crop))
    return torch.stack(outs)


def _which(outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index of the candidate each output equals (all must equal one)."""
    projection = torch.randn(outputs[0].numel(), 8, generator=torch.Generator().manual_seed(0))
    best = torch.cdist(outputs.flatten(1) @ projection, candidates.flatten(1) @ projection).argmin(dim=1)
    assert (outputs - candidates[best]).abs().max() < 1e-5, "an output is not a crop/flip torchvision could make"
    return best


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("preset", ["cifar10", "digits"])
def test_crop_and_flip_match_the_cpu_preset_in_support_and_distribution(preset):
    torch.manual_seed(0)
    channels, size = (3, 32) if preset == "cifar10" else (1, 8)
    image = torch.randint(0, 256, (channels, size, size), dtype=torch.uint8)
    train, _ = build_transforms(preset)
    batch = build_batch_augmentation(preset)
    finish = v2.Compose(train.transforms[-2:])  # ToDtype + Normalize
    candidates = _candidates(image, batch.padding, batch.flip, finish)

    device_out = batch(image.expand(N, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1))
    assert device_out.dtype == torch.float32 and device_out.shape == (N, channels, size, size)
    assert device_out.is_contiguous()
    cpu_out = torch.stack([train(image) for _ in range(N)])
    device_counts = torch.bincount(_which(device_out, candidates), minlength=len(candidates)).float()
    cpu_counts = torch.bincount(_which(cpu_out, candidates), minlength=len(candidates)).float()
    # both uniform over the same (2p+1)^2 offsets x flips: chi-square under the 0.1% critical value
    critical = {162: 222.0, 9: 26.1}[len(candidates)]
    assert _chi_square(device_counts) < critical and _chi_square(cpu_counts) < critical
    assert (device_counts > 0).all()


def test_brightness_jitter_matches_torchvision_on_uint8():
    aug = BatchAugmentation(0, False, 63 / 255, *CIFAR100_STATS)
    image = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    device_values = aug(image.expand(N, -1, -1, -1).contiguous(), torch.Generator().manual_seed(2))[:, 0, 0, 0]
    torch.manual_seed(3)
    cpu = v2.Compose([v2.ColorJitter(brightness=63 / 255), v2.ToDtype(torch.float32, scale=True)])
    cpu_values = torch.stack([cpu(image)[0, 0, 0] for _ in range(N)])
    cpu_values = (cpu_values - CIFAR100_STATS[0][0]) / CIFAR100_STATS[1][0]
    # the same set of reachable values (integer pixel levels after truncation) ...
    levels = lambda v: torch.round((v * CIFAR100_STATS[1][0] + CIFAR100_STATS[0][0]) * 255)  # noqa: E731
    assert set(levels(device_values).tolist()) <= set(range(96, 161))
    assert set(levels(cpu_values).tolist()) <= set(range(96, 161))
    # ... and the same distribution (two-sample Kolmogorov-Smirnov statistic under its 0.1% critical value)
    grid = torch.linspace(-3, 3, 2001)
    cdf = lambda v: (v[None, :] <= grid[:, None]).float().mean(1)  # noqa: E731
    assert (cdf(device_values) - cdf(cpu_values)).abs().max() < 1.95 * (2 / N) ** 0.5


def test_normalize_equals_the_test_transform():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    _, test = build_transforms("cifar10")
    expected = torch.stack([test(x) for x in images])
    assert torch.allclose(BATCH_PRESETS["cifar10"].normalize(images), expected, atol=1e-6)


def _stream(**kw) -> TaskStreamDataModule:
    options = dict(
        dataset="digits", initial_classes=4, increment=3, class_order_seed=None, batch_size=64, num_workers=0
    )
    return TaskStreamDataModule(**{**options, **kw})


class _BatchDtypes(L.Callback):
    def __init__(self) -> None:
        self.seen: set[torch.dtype] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.add(batch[0].dtype)


def _train(root, seed: int = 0) -> tuple[Finetune, _BatchDtypes]:
    L.seed_everything(seed)
    model = Finetune(backbone="resnet20", in_channels=1, schedule=TaskSchedule(epochs=1, lr=0.02, milestones=[]))
    dtypes = _BatchDtypes()
    run_stream(make_trainer(root, callbacks=[dtypes]), model, _stream(gpu_augmentation=True))
    return model, dtypes


def test_gpu_augmentation_trains_a_stream_reproducibly(tmp_path):
    dm = _stream(gpu_augmentation=True)
    dm.set_task(0)
    dm.trainer = None
    images, _, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8  # the loader only gathers and collates
    first, dtypes = _train(tmp_path / "a")
    assert dtypes.seen == {torch.float32}  # training steps see augmented, normalised batches
    counts = first.last_evaluation["cnn"]
    assert first.task_index == 2 and counts["correct"][2] / counts["total"][2] > 0.6  # the newest task is learned
    second, _ = _train(tmp_path / "b")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_gpu_augmentation_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match=r"augmentation='imagenet'.*gpu_augmentation: false"):
        TaskStreamDataModule(dataset="imagefolder", root=str(tmp_path), in_memory=True, gpu_augmentation=True)
    with pytest.raises(ValueError, match=r"needs the images in memory.*in_memory=None"):
        TaskStreamDataModule(dataset="imagefolder", root=str(tmp_path), augmentation="cifar10", gpu_augmentation=True)
    with pytest.raises(ValueError, match="uint8"):
        BATCH_PRESETS["cifar10"](torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize(("accelerator", "expected"), [("cpu", False), ("gpu", True)])
def test_pinned_memory_and_persistent_workers_follow_the_accelerator(accelerator, expected):
    dm = _stream(num_workers=2)
    dm.set_task(0)
    cuda = CUDAAccelerator.__new__(CUDAAccelerator)  # an instance without a GPU: only its type is read
    dm.trainer = SimpleNamespace(accelerator=cuda if accelerator == "gpu" else object(), world_size=1, global_rank=0)
    loader = dm._loader(dm.train_dataset(), 8, None)
    assert loader.pin_memory is expected and loader.persistent_workers is expected
    dm = _stream(num_workers=2, pin_memory=False, persistent_workers=False)  # explicit values win
    dm.trainer = SimpleNamespace(accelerator=cuda)
    dm.set_task(0)
    loader = dm._loader(dm.train_dataset(), 8, None)
    assert not loader.pin_memory and not loader.persistent_workers

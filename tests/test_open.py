"""Users bring their own backbone, dataset, transforms and optimizer: the configs of configs/custom/, run through the
CLI on the real CIFAR-10 (shrunk by overrides), and the extension points checked one by one in process."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line, cli, make_trainer, run_main
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_cil import DER, Finetune, ICaRL, TaskSchedule, TaskStreamDataModule
from lightning_cil.data.datasets import DatasetError, DatasetOptions, splits_of_datasets
from lightning_cil.lightning_cli import LightningCILCLI
from lightning_cil.networks.backbones import build_backbone

timm = pytest.importorskip("timm")
CUSTOM = REPO / "configs" / "custom"


def _shrunk(config: str, out_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """configs/custom/<config>.yaml on 2 tasks of 5 CIFAR-10 classes, 20 training and 10 test images per class."""
    data = (
        ["--data.dataset.init_args.root", str(data_root / "train")]
        + ["--data.test_dataset.init_args.root", str(data_root / "test")]
        if config == "imagefolder_dataset"
        else ["--data.dataset", "cifar10", "--data.root", str(data_root)]
    )
    return [
        "fit",
        "--config",
        str(CUSTOM / f"{config}.yaml"),
        *data,
        *("--data.max_train_per_class", "20", "--data.max_test_per_class", "10", "--data.protocol", "B0_Inc5"),
        *("--data.num_workers", "0", "--data.batch_size", "32", "--trainer.accelerator", "cpu"),
        *("--trainer.default_root_dir", str(out_dir), "--trainer.logger.init_args.save_dir", str(out_dir)),
        *("--trainer.enable_progress_bar", "false", "--trainer.deterministic", "true"),
        *extra,
    ]


def _fit(config: str, out_dir: Path, data_root: Path, *extra: str) -> tuple[Path, dict]:
    out = cli(*_shrunk(config, out_dir, data_root, *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics,) = out_dir.glob(f"{config}/version_*/metrics.json")
    return metrics.parent, json.loads(metrics.read_text())


# ---------------------------------------------------------------------------------------------- the configs, run


@pytest.mark.slow  # a 60 s CLI stream and its resume; the dataset-object path has faster checks here
def test_an_imagefolder_dataset_by_class_path_trains_the_stream_and_resumes_exactly(cifar10_small_root, tmp_path):
    """configs/custom/imagefolder_dataset.yaml: torchvision's ImageFolder for both splits, iCaRL on top; the labels
    and class names are the dataset's, and a run resumed from its first task's checkpoint ends identically."""
    schedule = (
        "--model.init_args.schedule",
        "{epochs: 3, lr: 0.5, milestones: []}",
        "--model.init_args.memory_budget",
        "50",
    )
    run, metrics = _fit("imagefolder_dataset", tmp_path / "a", cifar10_small_root, *schedule)
    assert metrics["stream"]["dataset"] == "torchvision.datasets.folder.ImageFolder"
    classes = sorted(p.name for p in (cifar10_small_root / "train").iterdir())
    assert sorted(metrics["class_names"]) == classes
    assert metrics["stream"]["train_samples"] == 200 and metrics["stream"]["test_samples"] == 100
    assert [task["memory_size"] for task in metrics["tasks"]] == [50, 50]  # iCaRL's memory, from the dataset's labels
    _, resumed = _fit(
        "imagefolder_dataset",
        tmp_path / "b",
        cifar10_small_root,
        *schedule,
        "--ckpt_path",
        str(run / "checkpoints" / "task00.ckpt"),
    )
    assert resumed["scorers"] == metrics["scorers"]


def test_a_timm_backbone_trains_der_on_its_own_input_transforms(cifar10_small_root, tmp_path):
    """configs/custom/timm_backbone.yaml with a small timm ResNet (random weights: no download here): DER grows one
    timm extractor per task, and with no transforms given the images are resized to the model's 160 px input."""
    _, metrics = _fit(
        "timm_backbone",
        tmp_path,
        cifar10_small_root,
        *("--model.init_args.backbone", "timm:test_resnet", "--model.init_args.pretrained", "null"),
        *("--model.init_args.schedule", "{epochs: 2, lr: 0.05, milestones: []}", "--trainer.precision", "32"),
        *("--model.init_args.balance_epochs", "5", "--model.init_args.memory_budget", "40"),
    )
    assert metrics["method"] == "DER"
    params = [task["num_parameters"] for task in metrics["tasks"]]
    one = sum(p.numel() for p in timm.create_model("test_resnet", num_classes=0).parameters())
    assert params[1] - params[0] >= one  # a second timm extractor joined
    assert metrics["scorers"]["cnn"]["accuracy_seen"][0] > 20
    datamodule = TaskStreamDataModule(
        dataset="cifar10", root=str(cifar10_small_root), protocol="B0_Inc5", max_train_per_class=1, max_test_per_class=1
    )
    datamodule.use_backbone_defaults(DER(backbone="timm:test_resnet").backbone_data_config())
    datamodule.prepare_stream()
    assert datamodule.test_dataset(up_to_task=0)[0][0].shape == (3, 160, 160)


def test_a_v2_transform_list_replaces_the_preset(cifar10_small_root, tmp_path):
    """configs/custom/v2_transforms.yaml: LwF with a train and a test pipeline of torchvision v2 transforms, which
    the data module runs instead of the CIFAR preset."""
    options = _shrunk(
        "v2_transforms", tmp_path, cifar10_small_root, "--model.init_args.schedule", "{epochs: 2, milestones: []}"
    )
    parsed = LightningCILCLI(args=options[1:], run=False).datamodule
    train = [type(t).__name__ for t in parsed.train_transform.transforms]
    assert train == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToDtype", "Normalize"]
    assert [type(t).__name__ for t in parsed.test_transform.transforms] == ["ToDtype", "Normalize"]
    assert parsed.train_transform.transforms[3].dtype is torch.float32
    out = cli(*options)
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics,) = tmp_path.glob("v2_transforms/version_*/metrics.json")
    metrics = json.loads(metrics.read_text())
    assert metrics["method"] == "LwF" and len(metrics["tasks"]) == 2


def test_adamw_with_cosine_warm_up_follows_its_schedule_in_every_task(cifar10_small_root, tmp_path):
    """configs/custom/adamw_cosine.yaml: the learning rate Lightning logged at every epoch is the warm-up then
    cosine curve of each task's own schedule (first task: 4 epochs, 1 warm-up; later: 3 epochs, 1 warm-up)."""
    first = {"epochs": 4, "lr": 1e-3, "warmup_epochs": 1}
    later = {"epochs": 3, "lr": 5e-4, "warmup_epochs": 1, "min_lr": 1e-5}
    run, metrics = _fit(
        "adamw_cosine",
        tmp_path,
        cifar10_small_root,
        "--model.init_args.first_task",
        "{epochs: 4, lr: 1.0e-3, warmup_epochs: 1}",
        "--model.init_args.schedule",
        "{epochs: 3, lr: 5.0e-4, warmup_epochs: 1, min_lr: 1.0e-5}",
        "--trainer.callbacks+=LearningRateMonitor",
        "--trainer.callbacks.logging_interval",
        "epoch",
    )
    with (run / "metrics.csv").open() as handle:
        logged = [float(row["lr-AdamW"]) for row in csv.DictReader(handle) if row.get("lr-AdamW")]

    def curve(epochs: int, lr: float, warmup_epochs: int, min_lr: float = 0.0) -> list[float]:
        warm = [lr * (1 + e) / (warmup_epochs + 1) for e in range(warmup_epochs)]  # LinearLR from lr / (w + 1)
        decay = epochs - warmup_epochs
        return warm + [min_lr + (lr - min_lr) * (1 + math.cos(math.pi * e / decay)) / 2 for e in range(decay)]

    assert logged == pytest.approx(curve(**first) + curve(**later), rel=1e-6)
    assert metrics["scorers"]["nme"]["accuracy_seen"][0] > 25


@pytest.mark.slow
def test_icarl_on_a_timm_backbone_and_an_imagefolder_dataset_under_two_process_ddp(
    cifar10_small_root, tmp_path, monkeypatch
):
    """2 processes (gloo): both ranks hold the same memory, class means and weights after every task, and the
    reported accuracy is what one process measures on the saved checkpoint."""
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    dump = tmp_path / "ranks"
    options = (
        *("--model.init_args.backbone", "timm:test_resnet", "--model.init_args.memory_budget", "40"),
        *("--model.init_args.schedule", "{epochs: 2, lr: 0.5, milestones: []}"),
    )
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    callbacks = ("--trainer.callbacks+=rank_dump.RankStateDump", "--trainer.callbacks.out_dir", str(dump))
    run, metrics = _fit("imagefolder_dataset", tmp_path, cifar10_small_root, *options, *ddp, *callbacks)
    for task in range(2):
        rank0, rank1 = (json.loads((dump / f"rank{r}_task{task}.json").read_text()) for r in (0, 1))
        assert rank0 == rank1, f"ranks differ after task {task}"
        assert sum(len(v) for v in rank0["memory"].values()) == 40
    evaluate = _shrunk("imagefolder_dataset", tmp_path / "eval", cifar10_small_root, *options)[1:]
    out = cli("test", *evaluate, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"Evaluation after task 2/2 \(nme\): accuracy on seen classes ([\d.]+)%", out.stdout)
    assert found and float(found.group(1)) == pytest.approx(metrics["scorers"]["nme"]["accuracy_seen"][-1], abs=0.01)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--model.init_args.backbone", "timm:no_such_net"],
            r"backbone='timm:no_such_net' is not a timm model; similar names: ",
        ),
        (
            ["--model.init_args.backbone", "torchvision:resnet5O"],
            r"backbone='torchvision:resnet5O' is not a torchvision model; similar names: \['resnet50'",
        ),
        (
            ["--model.init_args.pretrained", "weights/missing.safetensors"],
            r"pretrained='weights/missing.safetensors' does not exist \(looked for .*weights/missing.safetensors\)",
        ),
        (
            ["--model.init_args.schedule", "{epochs: 2, milestones: [], optimizer: torch.optim.Adamm}"],
            r"schedule.optimizer='torch.optim.Adamm': it cannot be imported",
        ),
        (
            [
                "--model.init_args.schedule",
                "{epochs: 2, milestones: [], optimizer: adamw, optimizer_args: {momentum: 0.9}}",
            ],
            r"schedule.optimizer_args \['momentum'\] are not arguments of AdamW; it accepts \['lr', 'betas'",
        ),
        (
            ["--data.train_transforms", '[{"class_path": "torchvision.transforms.v2.RandomHorizontalFlip"}]'],
            r"data.train_transforms turn a uint8 image of shape \(3, 32, 32\) into a torch.uint8 tensor of shape "
            r"\(3, 32, 32\); they must return a float image",
        ),
    ],
    ids=["timm-name", "torchvision-name", "weights-file", "optimizer", "optimizer-args", "transforms"],
)
def test_bad_extension_input_is_one_line_before_training(
    cifar10_small_root, tmp_path, monkeypatch, capsys, override, message
):
    out = run_main(monkeypatch, capsys, *_shrunk("v2_transforms", tmp_path, cifar10_small_root, *override))
    assert_one_line(out, message)
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--data.dataset.class_path", "torchvision.datasets.NoSuch"],
            r"data.dataset: class_path 'torchvision.datasets.NoSuch' cannot be used: module 'torchvision.datasets' "
            r"has no attribute 'NoSuch'\.",
        ),
        (
            ["--model.init_args.backbone.class_path", "my_package.MyNet"],
            r"model.init_args.backbone: class_path 'my_package.MyNet' cannot be used: No module named 'my_package'\.",
        ),
        (
            ["--data.dataset.init_args.root", "no/such/folder"],
            r"class_path 'torchvision.datasets.ImageFolder' could not be built from its init_args: \[Errno 2\] No such "
            r"file or directory: 'no/such/folder'",
        ),
    ],
    ids=["dataset-import", "backbone-import", "dataset-build"],
)
def test_a_class_path_that_does_not_import_or_build_is_one_line(
    cifar10_small_root, tmp_path, monkeypatch, capsys, override, message
):
    out = run_main(monkeypatch, capsys, *_shrunk("imagefolder_dataset", tmp_path, cifar10_small_root, *override))
    assert_one_line(out, message)


# ---------------------------------------------------------------------------------------------- backbones


def test_every_kind_of_backbone_gives_a_feature_vector_of_its_declared_size():
    assert build_backbone("resnet32").out_dim == 64
    vit = build_backbone("timm:test_vit")
    assert vit.out_dim == vit.num_features == 64 and vit.data_config["input_size"] == (3, 160, 160)
    resnet = build_backbone("torchvision:resnet18")
    assert resnet.out_dim == 512 and resnet.classifier_path == "fc"
    mobilenet = build_backbone("torchvision:mobilenet_v3_small")  # classifier: Linear, Hardswish, Dropout, Linear
    assert mobilenet.out_dim == 1024 and mobilenet.classifier_path == "classifier.3"
    own = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert build_backbone(own).out_dim == 16  # found by one dummy forward
    model = ICaRL(backbone=own)
    assert model.hparams.backbone == "torch.nn.modules.container.Sequential" and model.head.in_features == 16
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 0)  # the head grows at the first task


def test_a_backbone_that_does_not_return_feature_vectors_is_refused_with_the_shape_it_gives():
    with pytest.raises(
        ValueError,
        match=r"returns \(2, 8, 222, 222\) for an input of shape \(2, 3, 224, 224\); a "
        r"backbone must return one feature vector per image, shape \(batch, features\)",
    ):
        Finetune(backbone=nn.Conv2d(3, 8, 3))
    declared = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    declared.out_dim = 10
    with pytest.raises(ValueError, match="declares 10 features but returns 8"):
        Finetune(backbone=declared)
    with pytest.raises(ValueError, match="channel pruning supports the ResNet backbones .* not VisionTransformer"):
        DER(backbone="timm:test_vit", prune=True)
    with pytest.raises(ValueError, match="pretrained='hub' downloads the weights of a timm: or torchvision: backbone"):
        Finetune(backbone="resnet32", pretrained="hub")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_a_local_weights_file_reproduces_the_features_it_was_saved_with(tmp_path, suffix):
    """A timm ViT saved with its classifier (as timm and training scripts save one), loaded as a backbone: every
    feature is bit-identical to the source model's; the classifier's weights are skipped."""
    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=10).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    elif suffix == ".pth":
        torch.save({"model": source.state_dict()}, path)  # nested under "model", as DeiT-style scripts save it
    else:  # a lightning_cil checkpoint: its backbone's weights
        model = Finetune(backbone="timm:test_vit")
        model.backbone.load_state_dict(source.state_dict(), strict=False)
        torch.save({"state_dict": model.state_dict(), "lightning_cil": model.architecture()}, path)
    loaded = Finetune(backbone="timm:test_vit", pretrained=str(path)).backbone.eval()
    images = torch.rand(4, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(loaded(images), source.forward_head(source.forward_features(images), pre_logits=True))
    fresh = Finetune(backbone="timm:test_vit").backbone.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(images), loaded(images))


def test_torchvision_weights_file_fits_a_torchvision_backbone(tmp_path):
    torch.manual_seed(0)
    from torchvision.models import resnet18

    source = resnet18().eval()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    loaded = build_backbone("torchvision:resnet18", pretrained=str(tmp_path / "resnet18.pth")).eval()
    source.fc = nn.Identity()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))
    with pytest.raises(ValueError, match=r"does not fit the backbone \(ResNet\): missing"):
        build_backbone("torchvision:resnet34", pretrained=str(tmp_path / "resnet18.pth"))


# ---------------------------------------------------------------------------------------------- datasets


class _Pairs(Dataset):
    """(image, label) pairs of a given kind, with labels as an attribute or only in the items."""

    def __init__(self, kind: str, labels: list[int], attribute: str | None = "targets") -> None:
        self.kind, self.items = kind, labels
        if attribute:
            setattr(self, attribute, list(labels))
        self.classes = [f"class{c}" for c in range(max(labels) + 1)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        pixels = np.full((8, 8, 3), 10 * i % 256, dtype=np.uint8)
        image = {
            "pil": Image.fromarray(pixels),
            "array": pixels,
            "tensor": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            "float": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        }[self.kind]
        return image, self.items[i]


@pytest.mark.parametrize("kind", ["pil", "array", "tensor"])
@pytest.mark.parametrize("attribute", ["targets", "labels", None])
def test_datasets_give_labels_by_attribute_or_by_reading_and_images_of_any_kind(kind, attribute):
    labels = [3, 7, 3, 7, 5, 5, 3, 7, 5, 3]  # label values need not be 0..K-1: classes are numbered in order
    splits = splits_of_datasets(_Pairs(kind, labels, attribute), None, DatasetOptions(test_fraction=0.34))
    assert splits.class_names == ["class3", "class5", "class7"]
    assert len(splits.train) + len(splits.test) == 10 and sorted(splits.test.targets.tolist()) == [0, 1, 2]
    image = splits.train.image(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)


def test_datasets_without_labels_or_with_float_images_are_named():
    class Unlabelled(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return torch.zeros(3, 8, 8, dtype=torch.uint8)

    with pytest.raises(DatasetError, match=r"has no labels: it has none of the attributes \['targets', 'labels'"):
        splits_of_datasets(Unlabelled(), None, DatasetOptions())
    floats = splits_of_datasets(_Pairs("float", [0, 1, 0, 1]), None, DatasetOptions(test_fraction=0.5))
    with pytest.raises(DatasetError, match="is a torch.float32 tensor; the stream's transforms start from uint8"):
        floats.train.image(0)
    with pytest.raises(DatasetError, match=r"different labels \(only in train: \[2\], only in test: \[\]\)"):
        splits_of_datasets(_Pairs("pil", [0, 1, 2]), _Pairs("pil", [0, 1]), DatasetOptions())


def test_a_hugging_face_dataset_split_feeds_the_stream(cifar10_small_root, tmp_path):
    """HuggingFaceDataset over datasets' imagefolder builder (local files, no hub): 3 CIFAR-10 classes, its
    ClassLabel names as class names, a whole Finetune stream trained and evaluated on it."""
    pytest.importorskip("datasets")
    from lightning_cil import run_stream
    from lightning_cil.data import HuggingFaceDataset

    for split, count in (("train", 12), ("test", 6)):
        for name in ("airplane", "cat", "ship"):
            (tmp_path / "hf" / split / name).mkdir(parents=True)
            for image in sorted((cifar10_small_root / split / name).iterdir())[:count]:
                (tmp_path / "hf" / split / name / image.name).write_bytes(image.read_bytes())
    options = {"data_dir": str(tmp_path / "hf"), "cache_dir": str(tmp_path / "cache")}
    datamodule = TaskStreamDataModule(
        dataset=HuggingFaceDataset("imagefolder", "train", **options),
        test_dataset=HuggingFaceDataset("imagefolder", "test", **options),
        augmentation="cifar10",
        initial_classes=2,
        increment=1,
        class_order_seed=None,
        batch_size=12,
        num_workers=0,
    )
    model = Finetune(backbone="resnet20", schedule=TaskSchedule(epochs=1, lr=0.05))
    summary = run_stream(make_trainer(tmp_path / "run"), model, datamodule)
    assert datamodule.class_names == ["airplane", "cat", "ship"]
    assert len(datamodule.splits.train) == 36 and len(datamodule.splits.test) == 18
    assert summary["cnn"]["last_accuracy"] is not None  # both tasks trained and evaluated
    with pytest.raises(DatasetError, match=r"has no column \['fine_label'\]; its columns are \['image', 'label'\]"):
        HuggingFaceDataset("imagefolder", "train", label_column="fine_label", **options)


def test_train_and_test_transforms_must_agree_on_the_input_size():
    datamodule = TaskStreamDataModule(
        dataset=_Pairs("tensor", [0, 1] * 5),
        initial_classes=1,
        increment=1,
        train_transforms=[v2.RandomResizedCrop(16), v2.ToDtype(torch.float32, scale=True)],
        test_transforms=[v2.ToDtype(torch.float32, scale=True)],
    )
    with pytest.raises(
        ValueError,
        match=r"train_transforms give images of shape \(3, 16, 16\) but "
        r"data.test_transforms give \(3, 8, 8\)",
    ):
        datamodule.prepare_stream()


def test_a_schedule_scales_the_learning_rate_of_a_parameter_group():
    schedule = TaskSchedule(epochs=4, lr=0.1, optimizer="adamw", weight_decay=0.05, scheduler="cosine")
    schedule.check("schedule")
    backbone, head = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer, _ = schedule.build([{"params": [backbone], "lr_scale": 0.01}, {"params": [head]}])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.1])
    assert all(g["weight_decay"] == 0.05 for g in optimizer.param_groups)

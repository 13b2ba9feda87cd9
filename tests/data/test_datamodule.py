import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_cil.data import DatasetError, TaskStreamDataModule, imagenet_subset


def _digits(**kw) -> TaskStreamDataModule:
    dm = TaskStreamDataModule(dataset="digits", num_workers=0, **kw)
    dm.prepare_stream()
    return dm


def test_labels_are_class_order_positions_so_new_classes_append():
    dm = _digits(protocol="B0_Inc2", class_order_seed=1993)
    order = dm.class_order
    assert sorted(order) == list(range(10)) and order != list(range(10))
    for task in range(dm.num_tasks):
        dm.set_task(task)
        _, labels, tasks = next(iter(torch.utils.data.DataLoader(dm.train_dataset(), batch_size=10_000)))
        assert set(labels.tolist()) == {2 * task, 2 * task + 1}
        assert set(tasks.tolist()) == {task}
    # digit order[k] carries label k
    digits = dm.splits.train.targets
    assert torch.equal(dm.train_labels(), dm._label_of_target[digits])
    assert int(dm._label_of_target[order[0]]) == 0


def test_test_data_covers_every_seen_task_and_exemplars_are_merged():
    dm = _digits(protocol="B0_Inc2", class_order_seed=None)
    dm.set_task(2)
    test_tasks = dm.test_dataset().tasks[dm.test_dataset().indices]
    assert set(test_tasks.tolist()) == {0, 1, 2}
    base = dm.train_dataset()
    old = torch.nonzero(dm.train_labels() == 0).flatten()[:5]
    merged = dm.train_dataset(extra_indices=old)
    assert len(merged) == len(base) + 5
    assert set(old.tolist()) <= set(merged.indices.tolist())
    assert len(dm.train_dataset(all_seen=True)) == int((dm._train_tasks <= 2).sum())


def test_task_info_describes_growth():
    dm = _digits(initial_classes=4, increment=[3, 3], class_order_seed=None)
    info = dm.task_info(1)
    assert info.new_classes == (4, 5, 6) and info.num_seen_classes == 7 and info.num_tasks == 3
    assert info.label_task == (0, 0, 0, 0, 1, 1, 1)


def test_protocol_and_explicit_split_are_exclusive():
    with pytest.raises(ValueError, match="either the protocol or initial_classes/increment"):
        TaskStreamDataModule(dataset="digits", protocol="B0_Inc2", increment=2)


def test_stream_needs_a_split():
    with pytest.raises(ValueError, match=r"set data.protocol"):
        _digits()


def test_increments_that_do_not_cover_digits_fail_before_training():
    with pytest.raises(ValueError, match="do not cover the 10 classes"):
        _digits(initial_classes=4, increment=4)


def test_unknown_dataset_and_preset_name_the_choices():
    with pytest.raises(ValueError, match=r"dataset='cifar1000' is unknown; choose one of \[.*'cifar100'"):
        TaskStreamDataModule(dataset="cifar1000")
    with pytest.raises(ValueError, match=r"augmentation='autoaugment' is unknown"):
        TaskStreamDataModule(dataset="digits", augmentation="autoaugment")


def _tree(root: Path, layout: dict[str, list[str]]) -> Path:
    """Build train/test class folders with tiny real PNGs (or given bytes)."""
    import numpy as np
    from PIL import Image

    for folder, files in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.endswith(".png"):
                Image.fromarray(np.random.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / folder / name)
            else:
                (root / folder / name).write_bytes(b"not an image")
    return root


def _folder_dm(root: Path, **kw) -> TaskStreamDataModule:
    dm = TaskStreamDataModule(
        dataset="imagefolder", root=str(root), initial_classes=1, increment=1, num_workers=0, **kw
    )
    dm.prepare_stream()
    return dm


def test_missing_root_says_what_layout_was_expected(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist; expected layout: .*/train/<class>/<image> and .*/test/"):
        _folder_dm(tmp_path / "nowhere")


def test_wrong_layout_is_explained(tmp_path):
    _tree(tmp_path, {"cat": ["a.png"], "dog": ["b.png"]})  # class folders directly under root
    with pytest.raises(DatasetError, match=r"train' does not exist; expected layout"):
        _folder_dm(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    _tree(tmp_path, {"train/cat": ["a.png"], "train/dog": [], "test/cat": ["c.png"], "test/dog": ["d.png"]})
    with pytest.raises(DatasetError, match=r"class folder '.*train/dog' holds no images"):
        _folder_dm(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    _tree(
        tmp_path,
        {"train/cat": ["a.png", "broken.jpg"], "train/dog": ["b.png"], "test/cat": ["c.png"], "test/dog": ["d.png"]},
    )
    with pytest.raises(DatasetError, match=r"cannot read image file .*train/cat/broken.jpg"):
        _folder_dm(tmp_path, in_memory=True)


def test_train_and_test_classes_must_match(tmp_path):
    _tree(tmp_path, {"train/cat": ["a.png"], "train/dog": ["b.png"], "test/cat": ["c.png"], "test/cow": ["d.png"]})
    with pytest.raises(
        DatasetError, match=r"different class folders \(only in train: \['dog'\], only in test: \['cow'\]"
    ):
        _folder_dm(tmp_path)


def test_imagenet_subsets_are_versioned_package_files():
    podnet, seeded = imagenet_subset("podnet"), imagenet_subset("seed1993")
    assert len(podnet) == len(set(podnet)) == 100 and len(seeded) == len(set(seeded)) == 100
    assert podnet != seeded and all(w.startswith("n") and len(w) == 9 for w in podnet + seeded)
    with pytest.raises(
        ValueError, match=r"imagenet_subset='imagenet100' is unknown; choose one of \['podnet', 'seed1993'\]"
    ):
        imagenet_subset("imagenet100")


def test_cifar10_image_folder_in_memory(cifar10_root):
    dm = TaskStreamDataModule(
        dataset="cifar10",
        root=str(cifar10_root),
        protocol="B0_Inc2",
        class_order_seed=None,
        max_train_per_class=20,
        max_test_per_class=10,
        num_workers=0,
    )
    dm.prepare_stream()
    assert dm.splits.train.images.shape == (200, 3, 32, 32) and dm.splits.train.images.dtype == torch.uint8
    assert dm.class_names[:2] == ["airplane", "automobile"] and dm.num_tasks == 5
    dm.set_task(0)
    image, label, task = dm.train_dataset()[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label in (0, 1) and task == 0


def test_pacs_domain_and_task_scenarios(pacs_root):
    common = dict(dataset="domains", root=str(pacs_root), max_train_per_class=10, max_test_per_class=5, num_workers=0)
    domain = TaskStreamDataModule(scenario="domain", domains=["photo", "art_painting", "cartoon", "sketch"], **common)
    assert domain.num_tasks == 4 and domain.num_classes == 7
    info = domain.task_info(3)
    assert info.new_classes == tuple(range(7)) and info.num_seen_classes == 7
    task = TaskStreamDataModule(scenario="task", domains=["photo", "sketch"], **common)
    assert task.num_tasks == 2 and task.num_classes == 14
    assert task.task_info(1).new_classes == tuple(range(7, 14))
    task.set_task(1)
    labels = task.test_dataset().labels[task.test_dataset().indices]
    assert set(labels.tolist()) == set(range(14))
    assert task.class_names[7] == "sketch/dog"
    with pytest.raises(ValueError, match="a stream of domains has one task per domain"):
        TaskStreamDataModule(scenario="domain", protocol="B0_Inc2", **common).prepare_stream()
    with pytest.raises(DatasetError, match=r"domains \['clipart'\] are not folders"):
        TaskStreamDataModule(scenario="domain", domains=["clipart"], **common).prepare_stream()


def test_cifar_pickles_as_torchvision_stores_them(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n: int, offset: int) -> dict:
        return {
            "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            "labels": [(offset + i) % 10 for i in range(n)],
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(20, i)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(10, 0)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    dm = TaskStreamDataModule(dataset="cifar10", root=str(tmp_path), protocol="B0_Inc5", num_workers=0)
    dm.prepare_stream()
    assert dm.splits.train.images.shape == (100, 3, 32, 32) and len(dm.splits.test) == 10
    assert dm.describe()["format"] == "pickle" and sorted(dm.class_names) == [f"c{i}" for i in range(10)]


@pytest.mark.parametrize(("dataset", "subset"), [("imagenet100", "podnet"), ("imagenet100", "seed1993")])
def test_imagenet100_reads_only_its_subset_and_records_it(tmp_path, dataset, subset):
    wnids = imagenet_subset(subset)
    extra = "n99999999"  # a class outside the subset must be ignored
    layout = {f"{split}/{w}": ["a.png"] for w in [*wnids, extra] for split in ("train", "val")}
    _tree(tmp_path, layout)
    dm = TaskStreamDataModule(
        dataset=dataset, root=str(tmp_path), protocol="B0_Inc10", imagenet_subset=subset, num_workers=0
    )
    dm.prepare_stream()
    assert sorted(dm.class_names) == sorted(wnids) and dm.num_tasks == 10
    assert dm.describe()["imagenet_subset"] == subset
    dm.set_task(0)
    image, _, _ = dm.train_dataset()[0]
    assert image.shape == (3, 224, 224)  # the ImageNet training preset: RandomResizedCrop(224)


def test_imagenet_missing_subset_class_is_named(tmp_path):
    wnids = imagenet_subset("podnet")[:99]
    _tree(tmp_path, {f"{split}/{w}": ["a.png"] for w in wnids for split in ("train", "val")})
    with pytest.raises(DatasetError, match=r"class folders \['n0\d+'\] are missing from train/ or val/"):
        TaskStreamDataModule(dataset="imagenet100", root=str(tmp_path), protocol="B0_Inc10").prepare_stream()


@pytest.mark.parametrize("backend", ["torchcodec", "torchvision"])
def test_image_files_decode_to_the_same_pixels_whoever_decodes_them(tmp_path, cifar10_small_root, monkeypatch, backend):
    """JPEG, PNG and WebP go through the image codec (TorchCodec, or torchvision's decoders where TorchCodec cannot
    load), other formats and files it refuses through PIL: every route, with either library, gives the pixels PIL
    gives (here on real CIFAR-10 JPEGs, re-encoded at ImageNet's size too), and so does the batched JPEG decoder of
    ``decode_on_device``."""
    import numpy as np
    from PIL import Image

    from lightning_cil.data import image_codec
    from lightning_cil.data.datasets import read_image

    monkeypatch.setattr(image_codec, "DECODERS", image_codec.load_decoders(backend))

    def pil(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)

    jpegs = sorted((cifar10_small_root / "test").rglob("*.jpg"))[:40]
    assert jpegs and all(torch.equal(read_image(str(p)), pil(p)) for p in jpegs)
    batch = image_codec.decode_jpegs([image_codec.read_bytes(p) for p in jpegs], "cpu")
    assert all(torch.equal(image, pil(p)) for image, p in zip(batch, jpegs, strict=True))
    with Image.open(jpegs[0]) as image:
        rgb = image.convert("RGB").resize((500, 375), Image.BICUBIC)
    files = {"large.jpg": {"quality": 90}, "photo.png": {}, "photo.webp": {"lossless": True}, "photo.bmp": {}}
    for name, options in files.items():
        rgb.save(tmp_path / name, **options)
    rgb.convert("L").save(tmp_path / "grey.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")  # a decoder may refuse it; PIL converts it
    rgb.save(tmp_path / "really_a_png.jpg", format="PNG")
    frames = [rgb, rgb.transpose(Image.FLIP_LEFT_RIGHT)]  # PIL reads an animated file's first frame
    frames[0].save(tmp_path / "animated.webp", save_all=True, append_images=frames[1:], lossless=True)
    for path in sorted(tmp_path.iterdir()):
        decoded = read_image(str(path))
        assert decoded.shape[0] == 3 and torch.equal(decoded, pil(path)), path.name
    with pytest.raises(image_codec.ImageDecodeError):
        image_codec.decode_jpegs([image_codec.read_bytes(tmp_path / "really_a_png.jpg")], "cpu")


def test_torchvisions_decoders_take_over_where_torchcodec_cannot_load():
    """A missing TorchCodec, or one whose library does not load with the installed torch, leaves decoding to
    torchvision's decoders instead of failing the import."""
    code = (
        "import sys; sys.modules['torchcodec'] = None\n"  # what an uninstalled (or broken) package looks like
        "from lightning_cil.data import image_codec\n"
        "print(image_codec.DECODERS.backend)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torchvision"
    from lightning_cil.data import image_codec

    assert image_codec.DECODERS.backend == "torchcodec"  # installed with the project


@pytest.mark.parametrize("preset", ["cifar10", "imagenet", "small32"])
def test_an_evaluation_batch_is_transformed_at_once_with_the_numbers_of_one_image_at_a_time(cifar10_small_root, preset):
    """In-memory images under an evaluation pipeline (dtype, normalise; resize and centre crop for the others) are
    transformed as one stacked batch: the same tensors as image by image, and so the same features and scores."""
    from torch.utils.data import DataLoader

    from lightning_cil.data.transforms import runs_batchwise

    dm = TaskStreamDataModule(
        dataset="imagefolder", root=str(cifar10_small_root), in_memory=True, augmentation=preset,
        initial_classes=5, increment=5, num_workers=0,
    )  # fmt: skip
    dm.prepare_stream()
    dm.set_task(0)
    test = dm.test_dataset()
    test.with_index = True
    assert runs_batchwise(test.transform) and not runs_batchwise(dm.train_transform)
    keys = list(range(0, len(test), 3))
    batch = test.__getitems__(keys)
    one_by_one = [test[k] for k in keys]
    assert len(batch) == len(one_by_one) == len(keys)
    for (image, label, task, index), (image1, label1, task1, index1) in zip(batch, one_by_one):
        assert torch.equal(image, image1) and (label, task, index) == (label1, task1, index1)
    loaded = next(iter(DataLoader(test, batch_size=16)))
    assert torch.equal(loaded[0], torch.stack([test[k][0] for k in range(16)]))


@pytest.mark.parametrize(("dataset", "classes"), [("vtab", 50), ("omnibenchmark", 300)])
def test_presplit_benchmarks_are_checked_for_their_classes(tmp_path, dataset, classes):
    """ImageNet-A, CUB-200, ObjectNet, OmniBenchmark and VTAB come as pre-split train/ and test/ copies."""
    _tree(tmp_path, {f"{split}/c{k:03d}": ["a.png"] for k in range(classes) for split in ("train", "test")})
    dm = TaskStreamDataModule(dataset=dataset, root=str(tmp_path), protocol="B0_Inc10", num_workers=0)
    dm.prepare_stream()
    assert len(dm.class_names) == classes and dm.num_tasks == classes // 10
    for split in ("train", "test"):
        shutil.rmtree(tmp_path / split / "c000")
    with pytest.raises(DatasetError, match=rf"has {classes - 1} class folders, expected {classes}"):
        TaskStreamDataModule(dataset=dataset, root=str(tmp_path), protocol="B0_Inc10").prepare_stream()

"""ImageNet-R by CODA-Prompt's fixed split: the shipped test list, the rest training, on either folder layout.

The trees hold one tiny JPEG under each of ImageNet-R's names (the split reads names only): the 6,000 of CODA's test
list and 24,000 others, 30,000 in all as in the archive.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_cil.data import DatasetError, TaskStreamDataModule
from lightning_cil.data.datasets import _package_list

CLASSES = _package_list("imagenet_r_coda_classes.txt")
TEST_LIST = _package_list("imagenet_r_coda_test.txt")


def test_the_shipped_lists_are_complete():
    assert len(CLASSES) == len(set(CLASSES)) == 200
    assert len(TEST_LIST) == len(set(TEST_LIST)) == 6_000
    assert {name.split("/")[0] for name in TEST_LIST} == set(CLASSES)


def _archive(root: Path, presplit: bool = False) -> list[str]:
    """An ImageNet-R tree with CODA's test images and 120 training images per class; its training names."""
    train = [f"{wnid}/extra_{k}.jpg" for wnid in CLASSES for k in range(120)]
    jpeg = io.BytesIO()
    Image.fromarray(torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8).numpy()).save(jpeg, format="JPEG")
    for index, name in enumerate(TEST_LIST + train):
        # a pre-split copy scatters the images of either split over its own train/ and test/ folders
        folder = root / (("train", "test")[index % 2] if presplit else "") / name.split("/")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name.split("/")[1]).write_bytes(jpeg.getvalue())
    return train


def _stream(root: Path, **options) -> TaskStreamDataModule:
    dm = TaskStreamDataModule(
        dataset="imagenet_r", root=str(root), protocol="B0_Inc20", class_order_seed=None, num_workers=0, **options
    )
    dm.prepare_stream()
    return dm


def _names(split) -> list[str]:
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in split.paths]


@pytest.mark.parametrize("presplit", [False, True], ids=["archive", "presplit"])
def test_coda_split_is_the_same_on_either_layout(tmp_path, presplit):
    train_names = _archive(tmp_path, presplit)
    dm = _stream(tmp_path)
    info = dm.describe()
    assert (info["train_samples"], info["test_samples"], info["imagenet_r_split"]) == (24_000, 6_000, "coda")
    assert _names(dm.splits.test) == TEST_LIST and sorted(_names(dm.splits.train)) == sorted(train_names)
    # labels are CODA's: the class of a file is its wnid's position in CODA's label order, which is the stream's
    # order without a class_order_seed; B0 Inc20 gives CODA's 10 tasks of 20 classes
    assert [dm.class_names[t] for t in dm.splits.test.targets.tolist()] == [n.split("/")[0] for n in TEST_LIST]
    assert dm.class_names == CLASSES and dm.num_tasks == 10
    assert [dm.class_names[c] for c in dm.layout.task_classes[0]] == CLASSES[:20]


def test_folders_split_keeps_a_presplit_copy_as_it_is(tmp_path):
    _archive(tmp_path, presplit=True)
    dm = _stream(tmp_path, imagenet_r_split="folders")
    assert dm.describe()["imagenet_r_split"] == "folders" and dm.class_names == sorted(CLASSES)
    assert {Path(p).parts[-3] for p in dm.splits.test.paths} == {"test"} and len(dm.splits.test) == 15_000
    with pytest.raises(DatasetError, match=r"imagenet_r_split='folders' needs a pre-split copy"):
        _stream(tmp_path / "train", imagenet_r_split="folders")


def test_an_incomplete_or_foreign_copy_is_refused(tmp_path):
    _archive(tmp_path)
    missing = TEST_LIST[17]
    (tmp_path / missing).unlink()
    with pytest.raises(
        DatasetError, match=rf"holds 29,999 images, 1 of CODA-Prompt's test list missing \(e.g. '{missing}'\)"
    ):
        _stream(tmp_path)
    shutil.copy(tmp_path / TEST_LIST[0], tmp_path / missing)
    (tmp_path / "n00000000").mkdir()
    (tmp_path / "n00000000" / "x.jpg").touch()
    with pytest.raises(DatasetError, match=r"class folders \['n00000000'\] that are not among its 200 wnids"):
        _stream(tmp_path)
    shutil.rmtree(tmp_path / "n00000000")
    with pytest.raises(ValueError, match=r"imagenet_r_split='tfds' is unknown; choose one of \['coda', 'folders'\]"):
        _stream(tmp_path, imagenet_r_split="tfds")

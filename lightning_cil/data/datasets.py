"""Dataset loaders: every dataset becomes a train and a test :class:`ImageSplit` with integer class ids.

Small datasets (CIFAR, digits, PACS) are decoded once into one ``uint8`` tensor so that the loader
costs a tensor index per image; large ones (ImageNet) stay a list of files decoded by the workers.
A loader checks the layout on disk and says what it expected when the layout is wrong.

Any map-style dataset of ``(image, label)`` pairs works too (:func:`splits_of_datasets`): torchvision's
(``ImageFolder``, ``CIFAR100``, ``Flowers102``, ...) or the user's own. Its labels are read from an attribute
(:data:`LABEL_ATTRIBUTES`) or, without one, by reading every sample once; its images (PIL, ``uint8`` arrays or
tensors) are read through it by the loader workers.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from lightning_cil.data.image_codec import ImageDecodeError, decode_image, read_bytes

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetOptions",
    "DatasetSplits",
    "ImageSplit",
    "dataset_channels",
    "default_in_memory",
    "dataset_label",
    "imagenet_subset",
    "load_dataset",
    "splits_of_datasets",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
#: files decoded straight into a tensor (``image_codec``: libjpeg-turbo, libpng, libwebp); the rest, and any file
#: the decoder refuses, go through PIL
TENSOR_DECODED = (".jpg", ".jpeg", ".png", ".webp")
#: attributes of a dataset object read for its labels, in this order (torchvision's names)
LABEL_ATTRIBUTES = ("targets", "labels", "_labels", "y")


class DatasetError(ValueError):
    """A dataset on disk is missing, laid out differently than expected, or holds an unreadable file.

    An image read by a loader worker fails there; torch's DataLoader re-raises the error in the main process as
    ``DatasetError("Caught DatasetError in DataLoader worker process N. Original Traceback ...")``. Such an error
    keeps only the worker's own message, so that it reads the same with and without workers.
    """

    def __init__(self, message: str) -> None:
        if isinstance(message, str) and message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            raised = f"{type(self).__module__}.{type(self).__qualname__}: "
            if raised in message:
                message = message[message.rindex(raised) + len(raised) :].strip()
        super().__init__(message)


@dataclass
class ImageSplit:
    """One split: a label and a domain per sample, and the images (in memory, as files, or in a dataset object)."""

    targets: Tensor  # int64 [N], dataset class ids
    groups: Tensor  # int64 [N], domain index (all 0 for a single-domain dataset)
    images: Tensor | None = None  # uint8 [N, C, H, W] when decoded in memory
    paths: list[str] | None = None  # files, when read lazily
    source: Dataset | None = None  # a dataset of (image, label) read lazily: sample i is source[source_index[i]]
    source_index: Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def image(self, index: int) -> Tensor:
        """Image ``index`` as ``uint8 [C, H, W]``."""
        if self.images is not None:
            return self.images[index]
        if self.source is not None:
            assert self.source_index is not None
            j = int(self.source_index[index])
            return image_tensor(self.source[j][0], f"sample {j} of {dataset_label(self.source)}")
        assert self.paths is not None
        return read_image(self.paths[index])

    def encoded(self, index: int) -> Tensor:
        """Image ``index``'s file as undecoded bytes (``uint8 [n]``), to be decoded on the training device."""
        if self.paths is None:
            raise DatasetError("only images read from files can be decoded on the device (data.decode_on_device).")
        return read_bytes(self.paths[index])

    def subset(self, indices: Tensor) -> ImageSplit:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSplit(
            targets=self.targets[indices],
            groups=self.groups[indices],
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices.tolist()],
            source=self.source,
            source_index=None if self.source_index is None else self.source_index[indices],
        )

    def limit_per_class(self, max_per_class: int | None, seed: int) -> ImageSplit:
        """Keep at most ``max_per_class`` samples of every (domain, class), chosen by a seeded shuffle."""
        if max_per_class is None:
            return self
        if max_per_class <= 0:
            raise ValueError(f"max_per_class={max_per_class} must be positive or None.")
        generator = torch.Generator().manual_seed(seed)
        keys = self.groups * (int(self.targets.max()) + 1) + self.targets
        keep = []
        for key in torch.unique(keys):
            members = torch.nonzero(keys == key).flatten()
            chosen = members[torch.randperm(len(members), generator=generator)[:max_per_class]]
            keep.append(chosen.sort().values)
        return self.subset(torch.cat(keep).sort().values)

    def decoded(self) -> ImageSplit:
        """This split with every image decoded into one uint8 tensor (all images must share a size)."""
        if self.images is not None or len(self) == 0:
            return self
        first = self.image(0)
        images = torch.empty((len(self), *first.shape), dtype=torch.uint8)
        images[0] = first
        for i in range(1, len(self)):
            image = self.image(i)
            if image.shape != first.shape:
                raise DatasetError(
                    f"cannot keep images in memory: {self._name(i)} is {tuple(image.shape)} but {self._name(0)} is "
                    f"{tuple(first.shape)}; set data.in_memory=false for datasets of mixed image sizes."
                )
            images[i] = image
        return replace(self, images=images, paths=None, source=None, source_index=None)

    def _name(self, index: int) -> str:
        if self.paths is not None:
            return self.paths[index]
        return f"sample {int(self.source_index[index])} of {dataset_label(self.source)}"


@dataclass
class DatasetSplits:
    """A dataset ready to be cut into tasks."""

    train: ImageSplit
    test: ImageSplit
    class_names: list[str]
    domain_names: list[str] = field(default_factory=lambda: ["all"])
    #: Provenance to record with the run (which ImageNet subset, which split seed, ...).
    info: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetOptions:
    """Loader options that only some datasets read."""

    download: bool = False
    imagenet_subset: str = "podnet"
    domains: Sequence[str] | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    imagenet_r_split: str = "coda"


def image_tensor(image: object, what: str) -> Tensor:
    """A dataset's image (PIL, ``uint8`` array ``[H, W(, C)]`` or tensor ``[(C,) H, W]``) as ``uint8 [C, H, W]``.
    PIL images other than greyscale are converted to RGB."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "L" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DatasetError(f"{what} is a {image.dtype} array; images must be uint8 (0-255).")
        array = image[:, :, None] if image.ndim == 2 else image
        if array.ndim != 3:
            raise DatasetError(f"{what} is an array of shape {image.shape}; expected [H, W] or [H, W, C].")
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # a PIL image's array is read-only
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8:
            raise DatasetError(
                f"{what} is a {image.dtype} tensor; the stream's transforms start from uint8 images (0-255): give "
                f"the dataset no transform of its own and set data.train_transforms / data.test_transforms instead."
            )
        tensor = image[None] if image.ndim == 2 else image
        if tensor.ndim != 3:
            raise DatasetError(f"{what} is a tensor of shape {tuple(image.shape)}; expected [H, W] or [C, H, W].")
        return tensor.as_subclass(Tensor)
    raise DatasetError(f"{what} is a {type(image).__name__}; expected a PIL image, a uint8 array or a uint8 tensor.")


def read_image(path: str) -> Tensor:
    """Decode one file as RGB ``uint8 [3, H, W]``, naming the file if it cannot be read.

    JPEG, PNG and WebP files are decoded into the tensor directly (``image_codec``: TorchCodec, or torchvision),
    without a PIL image and its copy in between: the same libjpeg-turbo, the same pixels (``torch.equal`` on 2,000
    CIFAR-10 JPEGs and on 400 ImageNet-sized ones). On a 500x375 JPEG it decodes 2.1x as fast as PIL, and with the
    ImageNet training transform a core loads 1.37x as many images (benchmarks/loader.py). Other formats, and files
    the decoder refuses, are read by PIL.
    """
    if path.lower().endswith(TENSOR_DECODED):
        try:
            return decode_image(read_bytes(path))
        except (ImageDecodeError, OSError):
            pass  # PIL reads more variants, and names the file when it cannot
    return read_image_with_pil(path)


def read_image_with_pil(path: str) -> Tensor:
    """:func:`read_image` through PIL alone: any format PIL knows, converted to RGB."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"cannot read image file {path}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- folder layouts


def _require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise DatasetError(f"dataset path {str(path)!r} {what}; expected layout: {expected}.")


def _class_dirs(root: Path, expected: str) -> list[Path]:
    _require_dir(root, expected)
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not dirs:
        raise DatasetError(f"{str(root)!r} has no class folders; expected layout: {expected}.")
    return dirs


def _image_files(class_dir: Path) -> list[str]:
    files = sorted(str(p) for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(
            f"class folder {str(class_dir)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})."
        )
    return files


def _folder_split(root: Path, class_names: Sequence[str], expected: str, group: int = 0) -> ImageSplit:
    """Files of ``root/<class>/*`` for the given classes, labelled by their position in ``class_names``."""
    paths: list[str] = []
    targets: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = root / name
        _require_dir(class_dir, expected)
        files = _image_files(class_dir)
        paths += files
        targets += [label] * len(files)
    n = len(targets)
    return ImageSplit(torch.tensor(targets, dtype=torch.long), torch.full((n,), group, dtype=torch.long), paths=paths)


def _train_test_folders(root: Path, train: str = "train", test: str = "test", classes: Sequence[str] | None = None):
    expected = f"{root}/{train}/<class>/<image> and {root}/{test}/<class>/<image>"
    _require_dir(root, expected)
    train_classes = [p.name for p in _class_dirs(root / train, expected)]
    test_classes = [p.name for p in _class_dirs(root / test, expected)]
    if classes is None:
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DatasetError(
                f"{root}: train and test hold different class folders "
                f"(only in {train}: {only_train[:10]}, only in {test}: {only_test[:10]})."
            )
        classes = train_classes
    else:
        missing = [c for c in classes if c not in set(train_classes) or c not in set(test_classes)]
        if missing:
            raise DatasetError(f"{root}: class folders {missing[:10]} are missing from {train}/ or {test}/.")
    return (
        _folder_split(root / train, classes, expected),
        _folder_split(root / test, classes, expected),
        list(classes),
    )


def _stratified_split(split: ImageSplit, test_fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """Seeded per-(domain, class) split for datasets that ship without a test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    generator = torch.Generator().manual_seed(seed)
    keys = split.groups * (int(split.targets.max()) + 1) + split.targets
    train_idx, test_idx = [], []
    for key in torch.unique(keys):
        members = torch.nonzero(keys == key).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = max(1, round(len(members) * test_fraction))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    return split.subset(torch.cat(train_idx).sort().values), split.subset(torch.cat(test_idx).sort().values)


# --------------------------------------------------------------------------- datasets


def _load_digits(root: Path | None, options: DatasetOptions) -> DatasetSplits:
    """scikit-learn's handwritten digits: 1,797 real 8x8 grey images, shipped with the package."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(digits.target.astype(np.int64))
    full = ImageSplit(targets, torch.zeros_like(targets), images=images)
    train, test = _stratified_split(full, options.test_fraction, options.split_seed)
    info = {"split_seed": options.split_seed, "test_fraction": options.test_fraction}
    return DatasetSplits(train, test, [str(d) for d in range(10)], info=info)


def _cifar_pickles(root: Path, num_classes: int) -> DatasetSplits | None:
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    if not folder.is_dir():
        return None

    def read(name: str) -> dict:
        with open(folder / name, "rb") as handle:
            return pickle.load(handle, encoding="latin1")

    if num_classes == 10:
        parts = [read(f"data_batch_{i}") for i in range(1, 6)]
        train_x = np.concatenate([p["data"] for p in parts])
        train_y = np.concatenate([p["labels"] for p in parts])
        test = read("test_batch")
        test_x, test_y = test["data"], np.asarray(test["labels"])
        names = read("batches.meta")["label_names"]
    else:
        train, test = read("train"), read("test")
        train_x, train_y = train["data"], np.asarray(train["fine_labels"])
        test_x, test_y = test["data"], np.asarray(test["fine_labels"])
        names = read("meta")["fine_label_names"]

    def to_split(x: np.ndarray, y: np.ndarray) -> ImageSplit:
        images = torch.from_numpy(x.reshape(-1, 3, 32, 32).copy())
        targets = torch.from_numpy(y.astype(np.int64))
        return ImageSplit(targets, torch.zeros_like(targets), images=images)

    return DatasetSplits(to_split(train_x, train_y), to_split(test_x, test_y), list(names), info={"format": "pickle"})


def _cifar_loader(num_classes: int) -> Callable[[Path | None, DatasetOptions], DatasetSplits]:
    def load(root: Path | None, options: DatasetOptions) -> DatasetSplits:
        name = f"CIFAR-{num_classes}"
        if root is None:
            raise DatasetError(f"{name} needs data.root (a folder with torchvision's files or train/ and test/).")
        if options.download:
            from torchvision.datasets import CIFAR10, CIFAR100

            (CIFAR10 if num_classes == 10 else CIFAR100)(str(root), train=True, download=True)
        splits = _cifar_pickles(root, num_classes)
        if splits is None:
            train, test, names = _train_test_folders(root)
            if len(names) != num_classes:
                raise DatasetError(f"{name} at {root} has {len(names)} class folders, expected {num_classes}.")
            splits = DatasetSplits(train, test, names, info={"format": "image_folder"})
        return splits

    return load


def _load_image_folder(root: Path | None, options: DatasetOptions) -> DatasetSplits:
    if root is None:
        raise DatasetError("imagefolder needs data.root with train/<class>/* and test/<class>/*.")
    train, test, names = _train_test_folders(root)
    return DatasetSplits(train, test, names)


def dataset_label(dataset: object) -> str:
    """How a dataset object is named in messages and run files: its class's import path."""
    return f"{type(dataset).__module__}.{type(dataset).__qualname__}"


def _labels_of(dataset: Dataset) -> Tensor:
    """The label of every sample of ``dataset``: an attribute of :data:`LABEL_ATTRIBUTES`, else read sample by
    sample (each item must be ``(image, label, ...)``)."""
    name = dataset_label(dataset)
    try:
        size = len(dataset)
    except TypeError as error:
        raise DatasetError(f"{name} has no len(); the stream needs a map-style dataset.") from error
    if size == 0:
        raise DatasetError(f"{name} is empty.")
    labels = next((getattr(dataset, a) for a in LABEL_ATTRIBUTES if getattr(dataset, a, None) is not None), None)
    if labels is None:
        first = dataset[0]
        if not isinstance(first, (tuple, list)) or len(first) < 2:
            raise DatasetError(
                f"{name} has no labels: it has none of the attributes {list(LABEL_ATTRIBUTES)}, and its items are "
                f"{type(first).__name__}, not (image, label) pairs."
            )
        labels = [first[1]] + [dataset[i][1] for i in range(1, size)]
    try:
        labels = torch.as_tensor([int(label) for label in labels], dtype=torch.long)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{name}'s labels are not integers ({error}).") from error
    if len(labels) != size:
        raise DatasetError(f"{name} has {size} samples but {len(labels)} labels.")
    return labels


def splits_of_datasets(train: Dataset, test: Dataset | None, options: DatasetOptions) -> DatasetSplits:
    """A stream's splits from dataset objects; without ``test``, ``options.test_fraction`` of every class of
    ``train`` is held out (seeded). Class names come from the datasets' ``classes`` when there is one per label."""
    raw = {"train": _labels_of(train)} | ({"test": _labels_of(test)} if test is not None else {})
    values = torch.unique(torch.cat(list(raw.values())))
    if test is not None:
        in_train, in_test = set(raw["train"].tolist()), set(raw["test"].tolist())
        if in_train != in_test:
            raise DatasetError(
                f"the train and test datasets hold different labels (only in train: {sorted(in_train - in_test)[:10]}"
                f", only in test: {sorted(in_test - in_train)[:10]})."
            )
    classes = getattr(train, "classes", None)
    names = (
        [str(classes[v]) for v in values.tolist()]
        if isinstance(classes, (list, tuple)) and int(values.max()) < len(classes) and int(values.min()) >= 0
        else [str(v) for v in values.tolist()]
    )

    def split(dataset: Dataset, labels: Tensor) -> ImageSplit:
        targets = torch.searchsorted(values, labels)  # dataset label -> class id 0..K-1
        index = torch.arange(len(labels))
        return ImageSplit(targets, torch.zeros_like(targets), source=dataset, source_index=index)

    info: dict[str, object] = {"dataset_class": dataset_label(train)}
    if test is None:
        train_split, test_split = _stratified_split(
            split(train, raw["train"]), options.test_fraction, options.split_seed
        )
        info |= {"split_seed": options.split_seed, "test_fraction": options.test_fraction}
    else:
        train_split, test_split = split(train, raw["train"]), split(test, raw["test"])
    return DatasetSplits(train_split, test_split, names, info=info)


def _package_list(name: str) -> list[str]:
    """The lines of a versioned list in ``imagenet_subsets/``, without comments and blank lines."""
    text = resources.files("lightning_cil.data").joinpath("imagenet_subsets", name).read_text()
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]


def imagenet_subset(name: str) -> list[str]:
    """WordNet ids of a named ImageNet subset shipped with the package (see ``imagenet_subsets/``)."""
    files = {"podnet": "imagenet100_podnet.txt", "seed1993": "imagenet100_seed1993.txt"}
    if name not in files:
        raise ValueError(f"imagenet_subset={name!r} is unknown; choose one of {sorted(files)}.")
    return _package_list(files[name])


def _imagenet_loader(num_classes: int) -> Callable[[Path | None, DatasetOptions], DatasetSplits]:
    def load(root: Path | None, options: DatasetOptions) -> DatasetSplits:
        if root is None:
            raise DatasetError("ImageNet needs data.root with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.")
        classes = imagenet_subset(options.imagenet_subset) if num_classes == 100 else None
        train, test, names = _train_test_folders(root, "train", "val", classes)
        if len(names) != num_classes:
            raise DatasetError(f"ImageNet at {root} has {len(names)} class folders, expected {num_classes}.")
        info = {"imagenet_subset": options.imagenet_subset} if num_classes == 100 else {}
        return DatasetSplits(train, test, names, info=info)

    return load


def _presplit_loader(name: str, num_classes: int) -> Callable[[Path | None, DatasetOptions], DatasetSplits]:
    """A benchmark distributed as a pre-split copy, ``root/train/<class>/*`` and ``root/test/<class>/*`` (the
    RevisitingCIL/PILOT copies of ImageNet-A, CUB-200, ObjectNet, OmniBenchmark and VTAB), checked for its classes."""

    def load(root: Path | None, options: DatasetOptions) -> DatasetSplits:
        if root is None:
            raise DatasetError(f"{name} needs data.root with train/<class>/* and test/<class>/*.")
        train, test, names = _train_test_folders(root)
        if len(names) != num_classes:
            raise DatasetError(f"{name} at {root} has {len(names)} class folders, expected {num_classes}.")
        return DatasetSplits(train, test, names)

    return load


#: the ImageNet-R splits: CODA-Prompt's fixed test list (the rest trains), or a pre-split copy's folders as they are
IMAGENET_R_SPLITS = ("coda", "folders")
#: images of ImageNet-R (200 classes) and of CODA-Prompt's test list
IMAGENET_R_IMAGES, IMAGENET_R_CODA_TEST = 30_000, 6_000


def _load_imagenet_r(root: Path | None, options: DatasetOptions) -> DatasetSplits:
    """ImageNet-R: ``root/<wnid>/*`` (the original archive) or a pre-split copy ``root/{train,test}/<wnid>/*``.

    ``coda`` (default) splits it as the prompt papers' experiments do, by CODA-Prompt's fixed lists: the 6,000 images
    of ``imagenet_r_coda_test.txt`` test, the other 24,000 train, the classes in CODA's label order. An image is
    named by ``<wnid>/<file>``, which is unique in ImageNet-R, so either layout gives the same split. ``folders``
    keeps a pre-split copy's ``train/`` and ``test/`` as they are (RevisitingCIL, PILOT, RanPAC, EASE), the classes
    sorted.
    """
    split = options.imagenet_r_split
    if split not in IMAGENET_R_SPLITS:
        raise ValueError(f"imagenet_r_split={split!r} is unknown; choose one of {list(IMAGENET_R_SPLITS)}.")
    expected = f"{root}/<wnid>/<image> (the original archive) or {root}/{{train,test}}/<wnid>/<image> (pre-split)"
    if root is None:
        raise DatasetError(f"imagenet_r needs data.root laid out as {expected}.")
    _require_dir(root, expected)
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    if split == "folders":
        if not presplit:
            raise DatasetError(
                f"imagenet_r_split='folders' needs a pre-split copy at {root} (train/<wnid>/ and test/<wnid>/); "
                f"for the original archive use imagenet_r_split='coda'."
            )
        splits = _presplit_loader("ImageNet-R", 200)(root, options)
        return replace(splits, info={"imagenet_r_split": split})
    classes = _package_list("imagenet_r_coda_classes.txt")
    test_names = _package_list("imagenet_r_coda_test.txt")
    found: dict[str, str] = {}
    for folder in [root / "train", root / "test"] if presplit else [root]:
        for class_dir in _class_dirs(folder, expected):
            for path in _image_files(class_dir):
                name = f"{class_dir.name}/{Path(path).name}"
                if name in found:
                    raise DatasetError(f"ImageNet-R at {root} holds {name!r} twice ({found[name]!r} and {path!r}).")
                found[name] = path
    unknown = sorted({name.split("/")[0] for name in found} - set(classes))
    if unknown:
        raise DatasetError(f"ImageNet-R at {root} has class folders {unknown[:5]} that are not among its 200 wnids.")
    missing = [name for name in test_names if name not in found]
    if missing or len(found) != IMAGENET_R_IMAGES:
        raise DatasetError(
            f"ImageNet-R at {root} holds {len(found):,} images, {len(missing):,} of CODA-Prompt's test list missing"
            + (f" (e.g. {missing[0]!r})" if missing else "")
            + f"; the split needs all {IMAGENET_R_IMAGES:,} images of the original archive."
        )
    label = {wnid: index for index, wnid in enumerate(classes)}
    held_out = set(test_names)

    def to_split(names: list[str]) -> ImageSplit:
        targets = torch.tensor([label[name.split("/")[0]] for name in names], dtype=torch.long)
        return ImageSplit(targets, torch.zeros(len(names), dtype=torch.long), paths=[found[name] for name in names])

    train = to_split(sorted(name for name in found if name not in held_out))
    return DatasetSplits(train, to_split(test_names), classes, info={"imagenet_r_split": split})


def _load_domains(root: Path | None, options: DatasetOptions) -> DatasetSplits:
    """One folder per domain, ``<root>/<domain>/<class>/*`` (e.g. PACS), split per domain and class."""
    expected = f"{root}/<domain>/<class>/<image>"
    if root is None:
        raise DatasetError(f"domains needs data.root laid out as {expected}.")
    available = [p.name for p in _class_dirs(root, expected)]
    domains = list(options.domains) if options.domains else available
    unknown = [d for d in domains if d not in available]
    if unknown:
        raise DatasetError(f"domains {unknown} are not folders of {root}; available: {available}.")
    class_names = [p.name for p in _class_dirs(root / domains[0], expected)]
    parts = []
    for group, domain in enumerate(domains):
        names = [p.name for p in _class_dirs(root / domain, expected)]
        if names != class_names:
            raise DatasetError(
                f"domain {domain!r} has classes {names}, but {domains[0]!r} has {class_names}; "
                f"every domain must hold the same class folders."
            )
        parts.append(_folder_split(root / domain, class_names, expected, group=group))
    full = ImageSplit(
        torch.cat([p.targets for p in parts]),
        torch.cat([p.groups for p in parts]),
        paths=[path for p in parts for path in (p.paths or [])],
    )
    train, test = _stratified_split(full, options.test_fraction, options.split_seed)
    info = {"split_seed": options.split_seed, "test_fraction": options.test_fraction, "domains": domains}
    return DatasetSplits(train, test, class_names, domain_names=domains, info=info)


#: name -> (loader, image channels, keep in memory by default)
DATASETS: dict[str, tuple[Callable[[Path | None, DatasetOptions], DatasetSplits], int, bool]] = {
    "digits": (_load_digits, 1, True),
    "cifar10": (_cifar_loader(10), 3, True),
    "cifar100": (_cifar_loader(100), 3, True),
    "imagenet100": (_imagenet_loader(100), 3, False),
    "imagenet1000": (_imagenet_loader(1000), 3, False),
    "imagenet_r": (_load_imagenet_r, 3, False),
    "imagenet_a": (_presplit_loader("ImageNet-A", 200), 3, False),
    "cub200": (_presplit_loader("CUB-200", 200), 3, False),
    "objectnet": (_presplit_loader("ObjectNet", 200), 3, False),
    "omnibenchmark": (_presplit_loader("OmniBenchmark", 300), 3, False),
    "vtab": (_presplit_loader("VTAB", 50), 3, False),
    "imagefolder": (_load_image_folder, 3, False),
    "domains": (_load_domains, 3, True),
}


def _entry(name: str):
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is unknown; choose one of {sorted(DATASETS)}.")
    return DATASETS[name]


def dataset_channels(name: str) -> int:
    return _entry(name)[1]


def load_dataset(name: str, root: str | os.PathLike | None, options: DatasetOptions) -> DatasetSplits:
    loader, _, _ = _entry(name)
    return loader(Path(root).expanduser() if root is not None else None, options)


def default_in_memory(name: str) -> bool:
    return _entry(name)[2]

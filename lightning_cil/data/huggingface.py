"""A split of a Hugging Face ``datasets`` dataset as a map-style dataset of ``(image, label)`` pairs, so that it can
be given as ``data.dataset`` / ``data.test_dataset`` by ``class_path`` (needs the ``hf`` extra:
``pip install "lightning-cil[hf]"``)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from lightning_cil.data.datasets import DatasetError

__all__ = ["HuggingFaceDataset"]


class HuggingFaceDataset(Dataset):
    """``datasets.load_dataset(path, name, split=split, data_dir=..., ...)`` read as ``(image, label)``.

    The labels (``targets``) are the label column, read once; ``classes`` are its ``ClassLabel`` names when it has
    them. Images are what the image column decodes to (PIL for an ``Image`` feature). Works with hub datasets where
    there is internet (``path: cifar100``, ``label_column: fine_label``) and with local ones, e.g. the ``imagefolder``
    builder over ``data_dir/<split>/<class>/*``.

    Args:
        path: the dataset's hub name or builder (``imagefolder``), or a local folder.
        split: ``train``, ``test``, ``validation``, or any split expression (``train[:80%]``).
        image_column / label_column: the columns holding the image and its integer label.
        name: the dataset's configuration name, if it has several.
        data_dir: the folder a builder reads (``imagefolder``).
        cache_dir: where ``datasets`` keeps its Arrow files.
        load_args: further keyword arguments of ``datasets.load_dataset``.
    """

    def __init__(
        self,
        path: str,
        split: str,
        image_column: str = "image",
        label_column: str = "label",
        name: str | None = None,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        load_args: dict[str, Any] | None = None,
    ) -> None:
        try:
            from datasets import ClassLabel, load_dataset
        except ImportError as error:
            raise DatasetError(
                f"HuggingFaceDataset needs the datasets package: pip install 'lightning-cil[hf]' ({error})."
            ) from error
        self.data = load_dataset(path, name, split=split, data_dir=data_dir, cache_dir=cache_dir, **(load_args or {}))
        columns = list(self.data.column_names)
        missing = [c for c in (image_column, label_column) if c not in columns]
        if missing:
            raise DatasetError(
                f"HuggingFaceDataset({path!r}, split={split!r}) has no column {missing}; its columns are {columns} "
                f"(set image_column / label_column)."
            )
        self.image_column, self.label_column = image_column, label_column
        self.targets = list(self.data[label_column])
        feature = self.data.features[label_column]
        self.classes = list(feature.names) if isinstance(feature, ClassLabel) else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.data[int(index)]
        return row[self.image_column], int(row[self.label_column])

"""JPEG decoding of a batch on the training device (nvJPEG on CUDA), for file-backed datasets (ImageNet).

A core decodes and crops a few hundred ImageNet JPEGs a second, and one GPU trains on thousands: with
``data.decode_on_device`` the loader workers only read each file's bytes, the whole batch is decoded at once on
the device (one batched ``decode_jpeg`` call of ``image_codec``), and the transform runs there, image by image: the
training transform drawing from each sample's own seed exactly as the CPU path does, and for evaluation and task-end
features the test transform. On the CPU the batches are therefore identical to the default path's (the same
libjpeg-turbo, the same draws; a test compares them); on CUDA, nvJPEG's pixels differ from libjpeg-turbo's by
rounding. A file the batched decoder refuses (a PNG named ``.jpg``, a CMYK JPEG on CUDA) is read by the CPU path
alone and moved to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import default_collate

from lightning_cil.data.image_codec import ImageDecodeError, decode_jpegs
from lightning_cil.seeding import seed_sample

__all__ = ["EncodedBatch", "collate_encoded", "decode_batch"]


class EncodedBatch(NamedTuple):
    """A training batch's files, undecoded: their bytes end to end in one ``uint8`` tensor (a loader worker hands
    the main process one shared-memory block, not one per file) and each file's length, in batch order."""

    data: Tensor
    lengths: Tensor
    labels: Tensor
    tasks: Tensor
    seeds: Tensor
    indices: Tensor


def collate_encoded(samples: Sequence[tuple[Tensor, int, int, int, int]]) -> EncodedBatch:
    """Collate ``(bytes, label, task, seed, split index)`` samples into an :class:`EncodedBatch`."""
    encoded, *rest = zip(*samples)
    lengths = torch.tensor([len(data) for data in encoded], dtype=torch.long)
    return EncodedBatch(torch.cat(encoded), lengths, *(default_collate(list(column)) for column in rest))


def decode_batch(
    batch: EncodedBatch,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    read_on_cpu: Callable[[int], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, labels, tasks)`` of an encoded batch: decoded on ``device``, each image transformed there after
    seeding with its sample's seed (the global generator is left as it was). ``read_on_cpu(split_index)`` reads a
    file the batched decoder refuses."""
    encoded = list(torch.split(batch.data, batch.lengths.tolist()))
    try:
        images = decode_jpegs(encoded, device)
    except ImageDecodeError:  # one file the decoder refuses fails the whole batch: decode one by one
        images = [_decode_one(data, int(j), device, read_on_cpu) for data, j in zip(encoded, batch.indices)]
    out = []
    with torch.random.fork_rng(devices=[]):
        for image, seed in zip(images, batch.seeds.tolist()):
            seed_sample(seed)
            out.append(transform(image))
    return torch.stack(out), batch.labels, batch.tasks


def _decode_one(data: Tensor, index: int, device: torch.device, read_on_cpu: Callable[[int], Tensor]) -> Tensor:
    try:
        return decode_jpegs([data], device)[0]
    except ImageDecodeError:
        return read_on_cpu(index).to(device)

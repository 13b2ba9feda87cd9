"""Image decoding into ``uint8 [3, H, W]`` tensors: TorchCodec's decoders, or torchvision's where TorchCodec is
missing.

torchvision deprecated its image decoders in 0.29 in favour of TorchCodec's (from torchcodec 0.16), and will
remove them. TorchCodec is a dependency of the project. A torch too old for the installed TorchCodec makes its
native library fail to load; the decoding then falls back to torchvision's decoders. Both wrap the same
libjpeg-turbo / libpng / libwebp and nvJPEG on CUDA. Their pixels are identical (a test compares them), and so is
their speed: 1,750-1,810 ImageNet-sized JPEGs a second per core, best of 4 rounds, measured side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DECODERS", "Decoders", "ImageDecodeError", "decode_image", "decode_jpegs", "load_decoders", "read_bytes"]


class Decoders(NamedTuple):
    """One library's decoders: ``decode_image(bytes, mode=rgb)`` and ``decode_jpeg(list, mode=rgb, device=...)``."""

    backend: str
    decode_image: Callable[..., Tensor]
    decode_jpeg: Callable[..., list[Tensor]]
    rgb: object


def load_decoders(backend: str) -> Decoders:
    """The decoders of ``backend`` (``torchcodec`` or ``torchvision``); raises if it cannot be loaded."""
    if backend == "torchcodec":
        from torchcodec.decoders import decode_image, decode_jpeg

        return Decoders(backend, decode_image, decode_jpeg, "RGB")
    if backend == "torchvision":
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        return Decoders(backend, decode_image, decode_jpeg, ImageReadMode.RGB)
    raise ValueError(f"image decoding backend {backend!r} is unknown; choose one of ['torchcodec', 'torchvision'].")


try:  # TorchCodec's image decoders need no FFmpeg; loading its library fails against an incompatible torch
    DECODERS = load_decoders("torchcodec")
except (ImportError, OSError, RuntimeError):
    DECODERS = load_decoders("torchvision")


class ImageDecodeError(RuntimeError):
    """The decoder refused the bytes: another format, a damaged file, a variant it does not read."""


def read_bytes(path: str | Path) -> Tensor:
    """A file's bytes as ``uint8 [n]`` (what the decoders take, and what ``decode_on_device`` sends)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def decode_image(data: Tensor) -> Tensor:
    """Decode one JPEG, PNG or WebP file's bytes as RGB ``uint8 [3, H, W]``. An animated file raises
    :class:`ImageDecodeError`, so that its reader falls back to PIL's first frame."""
    try:
        image = DECODERS.decode_image(data, mode=DECODERS.rgb)
    except (RuntimeError, ValueError) as error:
        raise ImageDecodeError(str(error)) from error
    if image.ndim != 3:
        raise ImageDecodeError(f"an image of {image.shape[0]} frames")
    return image


def decode_jpegs(data: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """Decode a batch of JPEG files' bytes (on the CPU) as RGB ``uint8 [3, H, W]`` images on ``device``: one nvJPEG
    call for the whole batch on CUDA. One file the decoder refuses fails the batch with :class:`ImageDecodeError`."""
    try:
        return list(DECODERS.decode_jpeg(data, mode=DECODERS.rgb, device=device))
    except (RuntimeError, ValueError) as error:
        raise ImageDecodeError(str(error)) from error

"""NVIDIA DALI as the decoder of ``data.decode_on_device`` (``data.device_decoder: dali``, the ``dali`` extra).

DALI decodes only the part of each JPEG that the random crop keeps (``decoders.image_slice``; nvJPEG, and the
GPU's hardware JPEG decoder where it has one, on CUDA), and resizes, flips and normalises in the same C++ pipeline.
What the data module owns stays its own: the sampler, DDP sharding, the epoch order and the stateful loader that
resumes mid-epoch hand over the files' bytes (:class:`EncodedBatch`) as they do for torchvision's decoder. The
crop and flip of every image are torchvision's own draws (``RandomResizedCrop.make_params``, the flip's coin) from
the sample's seed, on the image size read from the file's header, so DALI crops and flips exactly what the CPU
path does, and a resumed run gets the identical batches. Its pixels differ from the CPU path's only by resampling
(a test bounds the difference).

It runs the training pipelines of the ImageNet preset and of a timm backbone's data config: RandomResizedCrop, an
optional RandomHorizontalFlip, ``ToDtype(float32, scale=True)`` and ``Normalize``. Other steps are refused by name
before training.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import v2

from lightning_cil.data.device_decoding import EncodedBatch
from lightning_cil.seeding import seed_sample

__all__ = ["DaliDecoder", "DaliPlan", "require_dali"]

#: torchvision interpolation -> DALI's resize interpolation (by name: DALI is imported only when used)
_INTERPOLATION = {
    v2.InterpolationMode.NEAREST: "INTERP_NN",
    v2.InterpolationMode.BILINEAR: "INTERP_LINEAR",
    v2.InterpolationMode.BICUBIC: "INTERP_CUBIC",
}


def require_dali() -> None:
    """Refuse ``device_decoder: dali`` in one line when DALI is not installed."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        raise ValueError(
            "data.device_decoder='dali' needs NVIDIA DALI, which is not installed: pip install 'lightning_cil[dali]' "
            "(Linux), or use device_decoder: torchvision."
        )


@dataclass(frozen=True)
class DaliPlan:
    """The training transform as DALI runs it: torchvision's crop (and flip) draws, then resize and normalise."""

    crop: v2.RandomResizedCrop
    flip: v2.RandomHorizontalFlip | None
    interpolation: v2.InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, transform: v2.Transform) -> DaliPlan:
        """The plan of a training pipeline, or a ValueError naming the step DALI cannot run."""
        steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
        kinds = [type(step) for step in steps]
        supported = [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.Normalize]
        shape_ok = kinds in (supported, [supported[0], *supported[2:]])
        bad = next((step for step in steps if type(step) not in supported), None)
        if bad is not None or not shape_ok:
            what = f"has {type(bad).__name__}" if bad is not None else f"is {[k.__name__ for k in kinds]}"
            raise ValueError(
                f"data.device_decoder='dali' runs RandomResizedCrop, RandomHorizontalFlip (optional), ToDtype and "
                f"Normalize in that order (the imagenet preset, a timm backbone's training transform); the training "
                f"transform {what}: use device_decoder: torchvision for it."
            )
        crop, to_dtype, normalize = steps[0], steps[-2], steps[-1]
        if to_dtype.dtype != torch.float32 or not to_dtype.scale:
            raise ValueError(f"data.device_decoder='dali' needs ToDtype(torch.float32, scale=True), not {to_dtype}.")
        interpolation = v2.InterpolationMode(crop.interpolation)  # torchvision keeps the name as given
        if interpolation not in _INTERPOLATION or not crop.antialias:
            raise ValueError(
                f"data.device_decoder='dali' resizes with antialiasing and {sorted(m.value for m in _INTERPOLATION)} "
                f"interpolation, not {interpolation.value!r} (antialias={crop.antialias})."
            )
        flip = steps[1] if len(steps) == 4 else None
        return cls(crop, flip, interpolation, tuple(normalize.mean), tuple(normalize.std))

    def apply(self, image: Tensor, draw: tuple[float, float, float, float, int]) -> Tensor:
        """The CPU path's transform of a ``uint8`` image for a given draw (a file DALI refuses)."""
        left, top, width, height, flip = (int(v) for v in draw)
        crop = self.crop
        image = v2.functional.resized_crop(
            image, top, left, height, width, crop.size, crop.interpolation, antialias=True
        )
        image = v2.functional.horizontal_flip(image) if flip else image
        return v2.functional.normalize(v2.functional.to_dtype(image, torch.float32, scale=True), self.mean, self.std)

    def draw(self, width: int, height: int, seed: int) -> tuple[float, float, float, float, int]:
        """``(left, top, width, height, flip)`` of one image: what the CPU path draws from ``seed``."""
        seed_sample(seed)
        box = self.crop.make_params([torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, height, width)])
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)
        return float(box["left"]), float(box["top"]), float(box["width"]), float(box["height"]), int(flip)


class DaliDecoder:
    """Decodes and transforms :class:`EncodedBatch` es with one DALI pipeline on the training device."""

    def __init__(self, plan: DaliPlan, device: torch.device, max_batch: int, threads: int = 2) -> None:
        require_dali()
        self.plan, self.device, self.max_batch, self.threads = plan, device, max_batch, threads
        self._pipeline = self._build()

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline

        plan = self.plan
        cuda = self.device.type == "cuda"
        pipeline = Pipeline(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=(self.device.index or 0) if cuda else None,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        height, width = plan.crop.size
        with pipeline:
            files = fn.external_source(name="files", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(
                files,
                anchor,
                shape,
                device="mixed" if cuda else "cpu",
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
                axis_names="WH",
                adjust_orientation=False,  # as torchvision's decoder: the stored pixels, EXIF orientation ignored
            )
            images = fn.resize(
                images,
                resize_x=width,
                resize_y=height,
                interp_type=getattr(types, _INTERPOLATION[plan.interpolation]),
                antialias=True,
            )
            images = fn.crop_mirror_normalize(
                images,
                mirror=flip,
                mean=[255 * m for m in plan.mean],
                std=[255 * s for s in plan.std],
                dtype=types.FLOAT,
                output_layout="CHW",
            )
            pipeline.set_outputs(images)
        pipeline.build()
        return pipeline

    def __call__(self, batch: EncodedBatch, read_on_cpu: Callable[[int], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(images, labels, tasks)`` of an encoded batch, the images float32 on the training device.
        ``read_on_cpu(split_index)`` reads a file DALI does not decode (a GIF, a CMYK JPEG, a file it refuses);
        the CPU path's transform then runs on it with the same draws, and names the file if it cannot read it."""
        files = [part.numpy() for part in torch.split(batch.data, batch.lengths.tolist())]
        indices = batch.indices.tolist()
        headers = [_header(data, j, read_on_cpu) for data, j in zip(files, indices)]
        with torch.random.fork_rng(devices=[]):
            draws = [self.plan.draw(w, h, seed) for (w, h, _), seed in zip(headers, batch.seeds.tolist())]
        images: list[Tensor | None] = [None] * len(files)
        rows = [i for i, (_, _, decodable) in enumerate(headers) if decodable]
        if rows:
            try:
                decoded = self._run([files[i] for i in rows], [draws[i] for i in rows])
                for i, image in zip(rows, decoded):
                    images[i] = image
            except RuntimeError:  # a file DALI refuses fails the batch, and the pipeline: one by one
                for i in rows:
                    images[i] = self._run_one(files[i], draws[i])
        for i, image in enumerate(images):
            if image is None:
                images[i] = self.plan.apply(read_on_cpu(indices[i]), draws[i]).to(self.device)
        return torch.stack(images), batch.labels, batch.tasks

    def _run_one(self, data: np.ndarray, draw: tuple[float, float, float, float, int]) -> Tensor | None:
        try:
            return self._run([data], [draw])[0]
        except RuntimeError:
            self._pipeline = self._build()
            return None

    def _run(self, files: list[np.ndarray], draws: list[tuple[float, float, float, float, int]]) -> Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipeline = self._pipeline
        pipeline.feed_input("files", files)
        pipeline.feed_input("anchor", [np.array(d[:2], dtype=np.float32) for d in draws])
        pipeline.feed_input("shape", [np.array(d[2:4], dtype=np.float32) for d in draws])
        pipeline.feed_input("flip", [np.array(d[4], dtype=np.int32) for d in draws])
        (output,) = pipeline.run()
        output = output.as_tensor()
        images = torch.empty(output.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(output, images, cuda_stream=stream)
        return images


#: what DALI's decoders read here (PIL's format names); anything else goes to the CPU path
_DALI_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM")


def _header(data: np.ndarray, index: int, read_on_cpu: Callable[[int], Tensor]) -> tuple[int, int, bool]:
    """``(width, height, DALI decodes it)`` of an encoded image, from its header (nothing is decoded); a file PIL
    cannot open is read by the CPU path, which names it if it cannot be read either."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return *image.size, image.format in _DALI_FORMATS and image.mode in ("RGB", "L")
    except (UnidentifiedImageError, OSError):
        height, width = read_on_cpu(index).shape[-2:]
        return width, height, False

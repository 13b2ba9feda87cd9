"""Image loading speed per CPU core on ImageNet-shaped JPEGs: PIL against the image codec (TorchCodec's decoders,
and torchvision's, its fallback), alone and with the ImageNet training transform, and through the stream's own
training loader.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/loader.py --source <cifar10>/train --count 400

ImageNet's training images average about 500x375 px. The script makes ``--count`` such JPEGs (quality 90, 4:2:0)
from the shared images (upscaled, so their content is smoother than a photograph's and decodes a little faster),
in 4 class folders, and then measures, on one thread of one process:

- decode: file to ``uint8 [3, H, W]``, with PIL (``read_image_with_pil``: ``Image.open`` + ``convert("RGB")`` + a
  tensor copy, the project's earlier path) and with ``read_image`` (``image_codec``), once with each codec
  library that loads (``decode_torchcodec``, ``decode_torchvision``); all must give identical pixels, which the
  script checks on every file;
- decode + the ``imagenet`` preset's training transform (RandomResizedCrop 224, flip, float, normalise);
- the stream's training loader (``TaskStreamDataModule``, imagefolder, its first task, 0 workers): sampler,
  decode, transform, collate, per image;
- with ``--device``: the same loader with ``data.decode_on_device`` (it only reads the files' bytes), its batches
  decoded and transformed on that device (``decode_batch``, nvJPEG on CUDA), per image including the reads;
- with ``--dali`` too: the same with ``data.device_decoder: dali`` (NVIDIA DALI's region-of-interest decode,
  resize, flip and normalisation; one DALI thread on the CPU).

Each figure is the best of ``--repeats`` passes over every file. Writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import machine, write_result  # benchmarks/harness.py
from PIL import Image

from lightning_cil.data import TaskStreamDataModule, image_codec
from lightning_cil.data.dali_decoding import DaliDecoder, DaliPlan
from lightning_cil.data.datasets import read_image, read_image_with_pil
from lightning_cil.data.device_decoding import decode_batch
from lightning_cil.data.transforms import build_transforms

SIZE = (500, 375)
CLASSES = 4


def make_jpegs(source: Path, count: int, dest: Path) -> list[Path]:
    """``count`` 500x375 JPEGs from the images under ``source``, as train/ and test/ ImageFolder trees."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if len(files) < count:
        raise SystemExit(f"{source} holds {len(files)} images; --count {count} needs that many")
    made = []
    for i, path in enumerate(files):
        for split in ("train", "test"):
            folder = dest / split / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{i:05d}.jpg"
            with Image.open(path) as image:
                image.convert("RGB").resize(SIZE, Image.BICUBIC).save(target, quality=90)
            if split == "train":
                made.append(target)
    return made


def pil_decode(path: Path) -> torch.Tensor:
    return read_image_with_pil(str(path))


def best_rate(work, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            work(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def loader_rate(folder: str, args: argparse.Namespace, device: torch.device | None, dali: bool = False) -> float:
    """Images/s of the stream's training loader over its first task; with ``device``, decoding there (by DALI
    with ``dali``)."""
    data = TaskStreamDataModule(
        dataset="imagefolder", root=folder, initial_classes=2, increment=2, in_memory=False,
        class_order_seed=None, batch_size=args.batch_size, num_workers=0, decode_on_device=device is not None,
        device_decoder="dali" if dali else "torchvision",
    )  # fmt: skip
    data.prepare_stream()
    data.set_task(0)
    loader = data.train_dataloader()
    if dali:
        decoder = DaliDecoder(DaliPlan.of(data.train_transform), device, args.batch_size, threads=1)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            if dali:
                batch = decoder(batch, data.splits.train.image)
            elif device is not None:
                batch = decode_batch(batch, data.train_transform, device, data.splits.train.image)
            seen += len(batch[0])
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return seen / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a folder of images (e.g. CIFAR-10's train/)")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="also decode the loader's batches on this device (cuda, cpu)")
    parser.add_argument("--dali", action="store_true", help="with --device: also DALI as the device decoder")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_transform, _ = build_transforms("imagenet")
    with tempfile.TemporaryDirectory() as folder:
        files = make_jpegs(Path(args.source), args.count, Path(folder))
        rates = {"decode_pil": best_rate(pil_decode, files, args.repeats)}
        rates["decode_transform_pil"] = best_rate(lambda f: train_transform(pil_decode(f)), files, args.repeats)
        mismatches = {}
        default = image_codec.DECODERS
        for backend in ("torchcodec", "torchvision"):
            try:
                image_codec.DECODERS = image_codec.load_decoders(backend)
            except (ImportError, OSError, RuntimeError):
                continue
            mismatches[backend] = sum(not torch.equal(pil_decode(f), read_image(str(f))) for f in files)
            rates[f"decode_{backend}"] = best_rate(lambda f: read_image(str(f)), files, args.repeats)
            rates[f"decode_transform_{backend}"] = best_rate(
                lambda f: train_transform(read_image(str(f))), files, args.repeats
            )
        image_codec.DECODERS = default
        rates["stream_train_loader"] = loader_rate(folder, args, None)
        if args.device:
            device = torch.device(args.device)
            rates[f"stream_train_loader_decode_on_{args.device}"] = loader_rate(folder, args, device)
            if args.dali:
                rates[f"stream_train_loader_dali_on_{args.device}"] = loader_rate(folder, args, device, dali=True)
    rates = {name: round(rate, 1) for name, rate in rates.items()}
    codec = default.backend
    speedup = {
        "decode": round(rates[f"decode_{codec}"] / rates["decode_pil"], 2),
        "decode_transform": round(rates[f"decode_transform_{codec}"] / rates["decode_transform_pil"], 2),
    }
    print(f"{len(files)} JPEGs of {SIZE[0]}x{SIZE[1]}, 1 thread; images/s per core:")
    for name, rate in rates.items():
        print(f"  {name:30s} {rate:8.1f}")
    print(f"{codec} / PIL: decode {speedup['decode']}x, decode + transform {speedup['decode_transform']}x; "
          f"pixel mismatches against PIL {mismatches}")  # fmt: skip
    write_result(
        args.out,
        {
            "machine": machine(),
            "images": len(files),
            "size": list(SIZE),
            "jpeg_quality": 90,
            "batch_size": args.batch_size,
            "device": args.device,
            "dali": args.dali,
            "images_per_second_per_core": rates,
            "codec": codec,
            "speedup_codec_over_pil": speedup,
            "pixel_mismatches": mismatches,
        },
    )


if __name__ == "__main__":
    main()

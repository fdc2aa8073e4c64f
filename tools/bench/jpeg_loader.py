#!/usr/bin/env python
"""ImageNet-style JPEG loading throughput: the usual PyTorch pipeline against ltscale's two backends.

Usage (from the repository root; on a CUDA machine for the numbers that matter):

    python tools/bench/jpeg_loader.py --images ../shared/data/imagenet-samples --count 20000 --out results/bench_jpeg_loader.json

All variants produce the same thing, a training batch of ``--batch-size`` normalised float
(B, 3, 224, 224) images on ``--device`` with RandomResizedCrop + flip + ColorJitter(0.4) (the
ImageNet-LT / Places-LT recipe; ``--color-jitter 0`` for iNaturalist's, which has none), from the same list of JPEG files (the folder's images repeated to
``--count``, so the files sit in the page cache: decoding and augmentation are measured, not disk):

- ``usual``: what the public long-tail code does (classifier-balancing, BBN, SSD, DiVE):
  ``PIL.Image.open(...).convert("RGB")`` and torchvision ``RandomResizedCrop``,
  ``RandomHorizontalFlip``, ``ColorJitter``, ``ToTensor``, ``Normalize`` per sample in
  ``DataLoader(num_workers=--workers, pin_memory, persistent_workers)``, then ``.to(device)``.
- ``ltscale-torch``: ltscale's DataLoader backend (:class:`FileLoader`: libjpeg-turbo decode,
  uint8 crop and flip in workers, colour jitter and normalisation batched on the device).
- ``ltscale-dali``: ltscale's DALI backend (:class:`DaliLoader`: nvJPEG / hardware decode on the
  GPU with ``--device cuda``, DALI's CPU threads otherwise).
- ``ltscale-ffcv``: ltscale's FFCV backend (:class:`FfcvLoader`: one ``.beton`` file, numba-compiled
  decode, crop and flip in threads, colour jitter and normalisation batched on the device). Writing the file is a one-off per dataset, reported separately as
  ``prepare_seconds`` and not in the epoch times.

Each variant runs ``--warmup-epochs`` (worker start-up, pipeline build) and then ``--epochs``
timed epochs; an epoch is wall-clock between host synchronisations. No model is trained: this is
the loader's ceiling, to compare with what the GPU trains (ResNet-50 bf16 on an H100: ~4k img/s).
Writes JSON (hardware, versions, commit, per-epoch times, the markdown table) to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.cifar_train import environment  # noqa: E402

VARIANTS = ("usual", "ltscale-torch", "ltscale-dali", "ltscale-ffcv")
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "imagenet-samples"


def build_split(images: Path, count: int):
    from ltscale.data.base import FileSplit

    files = sorted(p.name for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise SystemExit(f"jpeg_loader: no .JPEG/.jpg files in {images}")
    paths = [files[i % len(files)] for i in range(count)]
    targets = np.arange(count, dtype=np.int64) % 10
    return FileSplit(name=f"{images.name}x{count}", targets=targets, num_classes=10, root=images, paths=paths)


def usual_loader(split, args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    import PIL.Image
    import torchvision.transforms as T

    from ltscale.data.image_list import IMAGENET_NORMALIZATION as norm

    class Folder(torch.utils.data.Dataset):
        def __init__(self) -> None:
            jitter = [T.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter)] if args.color_jitter > 0 else []
            self.transform = T.Compose([
                T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), *jitter,
                T.ToTensor(), T.Normalize(norm.mean, norm.std),
            ])

        def __len__(self) -> int:
            return len(split)

        def __getitem__(self, index: int):
            with PIL.Image.open(split.root / split.paths[index]) as image:
                return self.transform(image.convert("RGB")), int(split.targets[index])

    loader = torch.utils.data.DataLoader(
        Folder(), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )

    def epoch() -> int:
        seen = 0
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            seen += len(targets)
        return seen

    return epoch


def ltscale_loader(split, args: argparse.Namespace, device: torch.device, backend: str) -> Callable[[], Any]:
    from ltscale.data.image_list import IMAGENET_NORMALIZATION
    from ltscale.data.samplers import InstanceBalancedSampler

    extra: dict[str, Any] = {}
    if backend == "dali":
        from ltscale.data.loaders.dali import DaliLoader as Loader
    elif backend == "ffcv":
        from ltscale.data.config import FfcvConfig
        from ltscale.data.loaders.ffcv_backend import FfcvLoader as Loader

        extra["ffcv"] = FfcvConfig(cache_dir=args.ffcv_dir or str(Path(args.scratch) / "ffcv"))
    else:
        from ltscale.data.loaders.files import FileLoader as Loader
    started = time.perf_counter()
    loader = Loader(
        split, train=True, batch_size=args.batch_size, sampler=InstanceBalancedSampler(len(split), seed=0),
        image_size=args.image_size, normalization=IMAGENET_NORMALIZATION, num_workers=args.workers,
        max_bad_image_fraction=0.0, drop_last=False, device=device, color_jitter=args.color_jitter, **extra,
    )
    args.prepare_seconds[backend] = time.perf_counter() - started
    state = {"epoch": 0}

    def epoch() -> int:
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        return sum(len(batch["index"]) for batch in loader)

    return epoch


def timed(epoch: Callable[[], int], device: torch.device, warmup: int, epochs: int) -> dict[str, Any]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        epoch()
    sync()
    seconds, images = [], 0
    for _ in range(epochs):
        start = time.perf_counter()
        images = epoch()
        sync()
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    return {"epoch_seconds": seconds, "images_per_epoch": images, "seconds_per_epoch": median,
            "images_per_second": images / median}


def markdown(report: dict[str, Any]) -> str:
    env, arguments = report["environment"], report["arguments"]
    lines = [f"JPEG loading, {report['dataset']} ({arguments['image_size']} px, batch {arguments['batch_size']}, "
             f"colour jitter {arguments.get('color_jitter', 0.4):g}, "
             f"{arguments['workers']} workers/threads), {env.get('gpu', env['device'])}, {env['cpu_count']} CPUs, "
             f"torch {env['torch']}, DALI {report.get('dali_version', '—')}, code {env['code_version']}", "",
             "| pipeline | images/s | s/epoch | x usual |", "|---|---:|---:|---:|"]
    usual = report["variants"].get("usual")
    for name, summary in report["variants"].items():
        ratio = f"{summary['images_per_second'] / usual['images_per_second']:.2f}" if usual else "—"
        lines.append(f"| {name} | {summary['images_per_second']:,.0f} | {summary['seconds_per_epoch']:.3f} | {ratio} |")
    return "\n".join(lines)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of JPEGs (default: ../shared/data/imagenet-samples)")
    parser.add_argument("--count", type=int, default=5000, help="images per epoch, the folder's repeated (default 5000)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--color-jitter", type=float, default=0.4,
                        help="ColorJitter strength (0.4: ImageNet-LT / Places-LT; 0: iNaturalist, no jitter)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers / DALI threads (default 8)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ffcv-dir", default="", help="where the FFCV variant writes its .beton (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if not args.images.is_dir():
        parser.error(f"--images: {args.images} is not a folder")
    if args.count < 1 or args.batch_size < 1 or args.epochs < 1 or args.warmup_epochs < 0 or args.workers < 0:
        parser.error("--count, --batch-size and --epochs must be >= 1; --warmup-epochs and --workers >= 0")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out}: is a directory; name the JSON file to write")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; --device cpu measures on the CPU")
    # A backend that is not installed would fail after the other variants were timed, losing them.
    missing = [f"{variant} (pip install 'ltscale[{module}]')" for variant, module in (("ltscale-dali", "dali"), ("ltscale-ffcv", "ffcv"))
               if variant in variants and not _installed({"dali": "nvidia.dali", "ffcv": "ffcv"}[module])]
    if missing:
        parser.error(f"--variants: not installed here: {', '.join(missing)}; or leave them out of --variants")
    device = torch.device(args.device)

    split = build_split(args.images, args.count)
    scratch = tempfile.TemporaryDirectory(prefix="ltscale-bench-")
    args.scratch, args.prepare_seconds = scratch.name, {}
    report: dict[str, Any] = {"arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                            if k not in ("scratch", "prepare_seconds")},
                              "environment": environment(device), "dataset": split.name, "variants": {}}
    if "ltscale-dali" in variants:
        import nvidia.dali

        report["dali_version"] = nvidia.dali.__version__
    for variant in variants:
        epoch = usual_loader(split, args, device) if variant == "usual" else ltscale_loader(
            split, args, device, variant.removeprefix("ltscale-"))
        summary = timed(epoch, device, args.warmup_epochs, args.epochs)
        if variant.removeprefix("ltscale-") in args.prepare_seconds:
            summary["prepare_seconds"] = args.prepare_seconds[variant.removeprefix("ltscale-")]
        report["variants"][variant] = summary
        print(f"{variant}: {summary['images_per_second']:,.0f} img/s, {summary['seconds_per_epoch']:.3f} s/epoch", flush=True)
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

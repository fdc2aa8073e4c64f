"""The torch DataLoader backend for image files (:class:`FileSplit`: ImageNet-LT, Places-LT, iNat).

Workers read and decode JPEGs (``torchvision.io.decode_jpeg``, PIL for anything else), crop and
flip uint8 tensors, and the main process moves each uint8 batch to the device, where colour
jitter (:mod:`ltscale.data.loaders.jitter`) and normalisation run on the whole batch: a uint8 batch
is a quarter of the bytes of a float one to pin and copy, and the arithmetic is free on the GPU
while the workers' cores are what decoding is short of.

Unreadable images follow :mod:`ltscale.data.loaders.bad_images` (same-class substitutes in
training, an error naming the file in evaluation). Workers report failures inside the batch
(``failures`` and ``ok``), so they reach the main process whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL.Image
import torch
import torch.utils.data
import torchvision.transforms.v2 as transforms
from torchvision.io import ImageReadMode, decode_jpeg

from ltscale.data.base import FileSplit, Normalization
from ltscale.data.loaders import ImageFileLoader
from ltscale.data.loaders.bad_images import SameClassCandidates

logger = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_STANDALONE_MARKERS = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])
_JPEG_FRAME_MARKERS = frozenset(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))


def jpeg_frame_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from the frame header of a JPEG whose marker segments chain properly from
    SOI to the first scan (SOS), or None when they do not. A few microseconds: only the segment
    headers are read."""
    # The whole file, not a first window: metadata segments (ICC profiles, XMP, 64 KiB each at most)
    # can put the frame header anywhere before the scan. A memoryview indexes it without a copy.
    header = memoryview(data)
    i, size = 2, None
    while i + 4 <= len(header):
        if header[i] != 0xFF:
            return None
        marker = header[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            i += 2
            continue
        length = (header[i + 2] << 8) | header[i + 3]
        if length < 2:
            return None
        if marker in _JPEG_FRAME_MARKERS:
            if i + 9 > len(header):
                return None
            size = ((header[i + 5] << 8) | header[i + 6], (header[i + 7] << 8) | header[i + 8])
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return size
        i += 2 + length
    return None


def check_pixel_limit(height: int, width: int) -> None:
    """PIL's decompression-bomb rule, for the decoders that do not apply it (libjpeg through
    torchvision, DALI): an image of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is
    refused, so that one hostile or broken file cannot take a worker's memory hours into a run."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise PIL.Image.DecompressionBombError(
            f"a {width} x {height} image ({height * width} pixels) is over the decompression-bomb limit of "
            f"{2 * limit} (twice PIL.Image.MAX_IMAGE_PIXELS); raise PIL.Image.MAX_IMAGE_PIXELS if it is wanted"
        )


def decode_image_file(path: str | Path) -> torch.Tensor:
    """Read and decode one image file into a (3, H, W) uint8 RGB tensor.

    JPEGs go through ``torchvision.io.decode_jpeg`` (libjpeg-turbo, converting greyscale and CMYK
    to RGB); anything it rejects, a JPEG whose frame header :func:`jpeg_frame_size` cannot reach,
    and every non-JPEG (ImageNet holds a PNG and a few CMYK files named .JPEG), go through PIL. Both refuse an image over PIL's decompression-bomb limit
    (:func:`check_pixel_limit`). Raises whatever the decoders raise for an unreadable file.
    """
    data = np.fromfile(path, dtype=np.uint8)
    if data[:3].tobytes() == _JPEG_MAGIC:
        size = jpeg_frame_size(data)
        # Without a size (segments that do not chain: libjpeg skips stray bytes between them with a
        # warning) the limit cannot be checked here, so PIL, which finds the size and applies it, decodes.
        if size is not None:
            check_pixel_limit(*size)
            try:
                return decode_jpeg(torch.from_numpy(data), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass  # PIL below reads some JPEG variants libjpeg rejects, and otherwise gives the error
    try:
        image = PIL.Image.open(io.BytesIO(data.tobytes()))
    except PIL.UnidentifiedImageError:
        # PIL's own message names its in-memory buffer, not the file or what it holds.
        raise PIL.UnidentifiedImageError(f"not an image format PIL knows (first bytes {data[:8].tobytes()!r})") from None
    with image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit (and 32-bit integer) greyscale: convert("RGB") would clip every value above
            # 255 to white. Scale the full range down to 8 bits instead, as DALI's decoder does.
            values = np.asarray(image, dtype=np.uint32)
            shift = 8 if image.mode.startswith("I;16") or values.max() < 65536 else 24
            grey = (values >> shift).astype(np.uint8)
            return torch.from_numpy(grey).expand(3, *grey.shape).contiguous()
        rgb = image.convert("RGB")  # convert() forces the full decode: a truncated file raises here
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def describe_error(error: BaseException) -> str:
    """One line (at most 300 characters) naming the error's type and message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def build_transform(train: bool, image_size: int) -> transforms.Transform:
    """The per-sample uint8 transform of the workers: ImageNet-style random-resized-crop + flip for
    training (colour jitter follows on the device), resize to ``image_size * 256 / 224`` + centre
    crop for evaluation."""
    if train:
        return transforms.Compose(
            [transforms.RandomResizedCrop(image_size, antialias=True), transforms.RandomHorizontalFlip()]
        )
    return transforms.Compose(
        [transforms.Resize(int(image_size * 256 / 224), antialias=True), transforms.CenterCrop(image_size)]
    )


def build_key_transform(image_size: int) -> transforms.Transform:
    """MoCo v2's augmentation, for the key view of two-view batches: RandomResizedCrop (scale
    0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, greyscale with p 0.2, Gaussian blur
    (sigma 0.1-2, kernel ~10% of the image as in SimCLR) with p 0.5, horizontal flip."""
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
    )


class _EpochDraws(torch.utils.data.Sampler):
    """The sampler's indices, each paired with the seed of that sample's crop and flip.

    The seeds are drawn per epoch from ``(seed, epoch, rank)`` in delivery order, so an epoch's
    augmentation depends neither on the workers (how many, which one decodes what) nor on what
    ran before it: a run resumed at epoch k crops epoch k as an unbroken run does.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, seed: int, rank: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draws = np.random.default_rng([self.seed, self.epoch, 11, self.rank]).integers(0, 2**63 - 1, len(self.sampler))
        return zip((int(i) for i in self.sampler), draws.tolist())


class _PackedPaths:
    """The split's relative paths as one bytes array, for the DataLoader's forked workers.

    Reading a Python string writes its reference count, so a worker reading a list of 437k paths
    copies the pages holding them: ~100 MiB more private memory per worker on iNat18 (measured),
    per training and evaluation worker of every rank. A fixed-width numpy array has no per-path
    objects to touch.
    """

    def __init__(self, paths) -> None:
        self._paths = np.array([path.encode() for path in paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        return self._paths[index].decode()


@contextlib.contextmanager
def _seeded(draw: int | None) -> Iterator[None]:
    """torchvision's transforms draw from the global RNG: seed it with ``draw`` for one sample and
    give it back afterwards (with num_workers=0 this runs in the training process). ``None``
    (evaluation, which draws nothing) leaves it alone."""
    if draw is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only, which is all fork_rng gives back: torch.manual_seed would also
        # reseed every GPU's generator of the training process (num_workers=0) for good, and
        # costs ~95 us a sample against ~1 us.
        torch.default_generator.manual_seed(draw)
        yield


class _FileDataset(torch.utils.data.Dataset):
    """Map-style dataset over a FileSplit; an item is ``(image, target, index, ok, failures, key)``.

    ``index`` is the dataset index of the image actually returned (the substitute's when one was
    used); ``failures`` lists ``(index, reason)`` of every file that failed to decode on the way;
    ``ok`` is False when no usable image was produced (always the case for a bad evaluation image).
    ``key``: with a ``key_transform``, a second augmentation of the same decoded image, else None.
    """

    def __init__(self, split: FileSplit, transform: transforms.Transform, image_size: int, substitute: bool,
                 key_transform: transforms.Transform | None = None) -> None:
        self.root = split.root
        self.paths = _PackedPaths(split.paths)
        self.targets = split.targets
        self.transform = transform
        self.key_transform = key_transform
        self.image_size = image_size
        self.substitute = substitute
        self.candidates = SameClassCandidates(self.targets, split.num_classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, bool, list[tuple[int, str]], torch.Tensor | None]:
        # Training items come with the seed of their augmentation (_EpochDraws); evaluation's are plain.
        index, draw = item if isinstance(item, tuple) else (item, None)
        failures: list[tuple[int, str]] = []
        tries = [index] + (self.candidates(index) if self.substitute else [])
        for candidate in tries:
            try:
                image = decode_image_file(self.root / self.paths[candidate])
            except Exception as error:  # any decoder failure is a bad file, reported below
                failures.append((candidate, describe_error(error)))
                continue
            with _seeded(draw):
                key = self.key_transform(image) if self.key_transform is not None else None
                return self.transform(image), int(self.targets[index]), candidate, True, failures, key
        blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return blank, int(self.targets[index]), index, False, failures, blank if self.key_transform is not None else None


def _collate(samples: list[tuple]) -> dict:
    images, targets, indices, ok, failures, keys = zip(*samples)
    batch = {
        "image": torch.stack(images),  # (B, 3, H, W) uint8
        "target": torch.tensor(targets, dtype=torch.int64),
        "index": torch.tensor(indices, dtype=torch.int64),
        "ok": torch.tensor(ok, dtype=torch.bool),
        "failures": [failure for sample_failures in failures for failure in sample_failures],
    }
    if keys[0] is not None:
        batch["image_key"] = torch.stack(keys)  # (B, 3, H, W) uint8, the second view
    return batch


class FileLoader(ImageFileLoader):
    """Batches of a :class:`FileSplit` on ``device``: ``{"image", "target", "index"}``.

    ``image`` is (B, 3, image_size, image_size) float32, normalised with ``normalization``;
    ``target`` and ``index`` are (B,) int64, ``index`` being the dataset index of each image
    (a substitute's index when a corrupt training image was replaced, so per-sample look-ups such
    as teacher soft labels match the pixels). ``color_jitter`` is the training ColorJitter strength
    (0.4 for ImageNet-LT / Places-LT, 0 for iNat: ``ImageListSpec.train_color_jitter``).
    ``views=2`` (training only) adds ``image_key``: the same images under an independent second
    augmentation, MoCo v2's (:func:`build_key_transform`), normalised like ``image``.

    Crops and flips (and the key view's augmentation) are seeded per sample from ``seed``,
    ``rank`` and the epoch (:class:`_EpochDraws`), colour jitter per epoch from the same
    (:class:`EpochColorJitter`): an epoch's batches are the same whatever the number of workers
    and whether the run was resumed, and the training process's RNG is left alone.
    ``max_bad_image_fraction`` is checked against this process's count as files are met, and
    against every rank's together at the end of each epoch (:meth:`check_bad_images_across_ranks`).
    """

    def __init__(
        self,
        split: FileSplit,
        *,
        train: bool,
        batch_size: int,
        sampler: torch.utils.data.Sampler | None,
        image_size: int,
        normalization: Normalization,
        num_workers: int,
        max_bad_image_fraction: float,
        drop_last: bool,
        device: torch.device | str,
        color_jitter: float = 0.4,
        views: int = 1,
        seed: int = 0,
        rank: int = 0,
        substitute: bool | None = None,
    ) -> None:
        super().__init__(split, train=train, batch_size=batch_size, sampler=sampler, drop_last=drop_last, device=device,
                         views=views, max_bad_image_fraction=max_bad_image_fraction, normalization=normalization,
                         color_jitter=color_jitter, seed=seed, rank=rank, substitute=substitute)
        self.dataset = _FileDataset(
            split, build_transform(train, image_size), image_size, substitute=self.substitute,
            key_transform=build_key_transform(image_size) if views == 2 else None,
        )
        pin = self.device.type == "cuda"
        self._draws = _EpochDraws(self.sampler, seed, rank) if train else None
        self._loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self._draws if train else self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
            drop_last=drop_last,
            # The augmentation is seeded per sample; this only keeps the DataLoader's own draw of
            # worker seeds off the training process's global RNG.
            generator=torch.Generator().manual_seed(seed * 1_000_003 + rank),
        )
        self._non_blocking = pin

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._start_epoch(len(self.sampler))
        if self._draws is not None:
            self._draws.epoch = self._epoch
        for batch in self._loader:
            # Both checks read CPU tensors and lists the workers built: no device sync.
            if batch["failures"]:
                self.ledger.record(batch["failures"])
            if not bool(batch["ok"].all()):
                raise self.ledger.unusable(int(batch["index"][int(torch.nonzero(~batch["ok"])[0])]))
            image = batch["image"].to(self.device, non_blocking=self._non_blocking)
            out = {
                "image": self._on_device(image),  # (B, 3, H, W)
                "target": batch["target"].to(self.device, non_blocking=self._non_blocking),
                "index": batch["index"].to(self.device, non_blocking=self._non_blocking),
            }
            if "image_key" in batch:
                key = batch["image_key"].to(self.device, non_blocking=self._non_blocking)
                out["image_key"] = self._on_device(key, jitter=False)  # (B, 3, H, W): MoCo's own augmentation
            yield out


class _VerifyDataset(torch.utils.data.Dataset):
    def __init__(self, split: FileSplit) -> None:
        self.root = split.root
        self.paths = _PackedPaths(split.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, str]:
        try:
            decode_image_file(self.root / self.paths[index])
        except Exception as error:  # any decoder failure marks the file bad
            return index, describe_error(error)
        return index, ""


def verify_images(split: FileSplit, num_workers: int = 4) -> list[str]:
    """Decode every image of ``split``; return the sorted paths of those that fail (each logged)."""
    loader = torch.utils.data.DataLoader(
        _VerifyDataset(split), batch_size=64, num_workers=num_workers, collate_fn=list
    )
    bad: list[str] = []
    checked = 0
    for results in loader:
        for index, reason in results:
            if reason:
                path = str(split.root / split.paths[index])
                logger.warning("unreadable image %s (%s)", path, reason)
                bad.append(path)
        checked += len(results)
        if checked % 50_000 < len(results):
            logger.info("verified %d of %d images of %s, %d unreadable", checked, len(split), split.name, len(bad))
    return sorted(bad)

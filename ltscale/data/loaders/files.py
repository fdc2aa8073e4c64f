"""The torch DataLoader backend for image files (:class:`FileSplit`: ImageNet-LT, Places-LT, iNat).

Workers read and decode JPEGs (``torchvision.io.decode_jpeg``, PIL for anything else), crop and
flip uint8 tensors, and the main process moves each uint8 batch to the device and normalises it
there: a uint8 batch is a quarter of the bytes of a float one to pin and copy, and the arithmetic
is free on the GPU.

Unreadable images. A 437k-image set usually holds a few broken files, and a run should not die
hours in because of one, nor hide it. A training loader replaces an image that cannot be decoded
by the next readable image of the *same class* (a fixed choice, so reruns see the same data),
logs a warning naming the file, and keeps the names in :attr:`FileLoader.bad_files`; more than
``floor(max_bad_image_fraction * len(split))`` distinct bad files stops the run with the list. An
evaluation loader never substitutes: accuracy measured on a replacement image would be wrong, so
a bad test image raises :class:`DatasetError` naming it. Workers report failures inside the batch
(``failures`` and ``ok``), so they reach the main process whatever the number of workers.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL.Image
import torch
import torch.utils.data
import torchvision.transforms.v2 as transforms
from torchvision.io import ImageReadMode, decode_jpeg

from ltscale.data.base import FileSplit, Normalization
from ltscale.data.errors import DatasetError

logger = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
# Same-class candidates tried before giving up on a sample: a class whose next 8 images are all
# broken means the data, not an odd file, is the problem.
MAX_SUBSTITUTES = 8
_MAX_LISTED = 20  # bad files quoted in an error message


def decode_image_file(path: str | Path) -> torch.Tensor:
    """Read and decode one image file into a (3, H, W) uint8 RGB tensor.

    JPEGs go through ``torchvision.io.decode_jpeg`` (libjpeg-turbo, converting greyscale and CMYK
    to RGB); anything it rejects, and every non-JPEG (ImageNet holds a PNG and a few CMYK files
    named .JPEG), goes through PIL. Raises whatever the decoders raise for an unreadable file.
    """
    data = np.fromfile(path, dtype=np.uint8)
    if data[:3].tobytes() == _JPEG_MAGIC:
        try:
            return decode_jpeg(torch.from_numpy(data), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL below reads some JPEG variants libjpeg rejects, and otherwise gives the error
    with PIL.Image.open(io.BytesIO(data.tobytes())) as image:
        rgb = image.convert("RGB")  # convert() forces the full decode: a truncated file raises here
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def build_transform(train: bool, image_size: int, color_jitter: float = 0.4) -> transforms.Transform:
    """The per-sample uint8 transform: ImageNet-style random-resized-crop + flip (+ colour jitter)
    for training, resize to ``image_size * 256 / 224`` + centre crop for evaluation."""
    if train:
        steps: list[transforms.Transform] = [
            transforms.RandomResizedCrop(image_size, antialias=True),
            transforms.RandomHorizontalFlip(),
        ]
        if color_jitter > 0:
            steps.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
        return transforms.Compose(steps)
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
        self.paths = split.paths
        self.targets = split.targets
        self.transform = transform
        self.key_transform = key_transform
        self.image_size = image_size
        self.substitute = substitute
        # Per class, its members in list order; position_in_class lets a bad image find "the next
        # images of its class" in O(1).
        order = np.argsort(self.targets, kind="stable")
        bounds = np.searchsorted(self.targets[order], np.arange(split.num_classes + 1))
        self.class_members = [order[bounds[c] : bounds[c + 1]] for c in range(split.num_classes)]
        self.position_in_class = np.empty(len(order), dtype=np.int64)
        for members in self.class_members:
            self.position_in_class[members] = np.arange(len(members))

    def __len__(self) -> int:
        return len(self.paths)

    def _candidates(self, index: int) -> np.ndarray:
        """The same-class images to try instead of ``index``: the ones after it, cycling."""
        members = self.class_members[self.targets[index]]
        after = np.roll(members, -int(self.position_in_class[index]))[1:]
        return after[:MAX_SUBSTITUTES]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool, list[tuple[int, str]], torch.Tensor | None]:
        failures: list[tuple[int, str]] = []
        tries = [index] + (self._candidates(index).tolist() if self.substitute else [])
        for candidate in tries:
            try:
                image = decode_image_file(self.root / self.paths[candidate])
            except Exception as error:  # any decoder failure is a bad file, reported below
                failures.append((candidate, _describe(error)))
                continue
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


class FileLoader:
    """Batches of a :class:`FileSplit` on ``device``: ``{"image", "target", "index"}``.

    ``image`` is (B, 3, image_size, image_size) float32, normalised with ``normalization``;
    ``target`` and ``index`` are (B,) int64, ``index`` being the dataset index of each image
    (a substitute's index when a corrupt training image was replaced, so per-sample look-ups such
    as teacher soft labels match the pixels). ``color_jitter`` is the training ColorJitter strength
    (0.4 for ImageNet-LT / Places-LT, 0 for iNat: ``ImageListSpec.train_color_jitter``).
    ``views=2`` (training only) adds ``image_key``: the same images under an independent second
    augmentation, MoCo v2's (:func:`build_key_transform`), normalised like ``image``.

    Augmentation randomness comes from torch's RNG: the DataLoader seeds each worker from the
    main process's generator, so ``torch.manual_seed`` before building the loader fixes it (ranks
    other than 0 draw from their own generator, seeded from ``seed`` and ``rank``).
    ``max_bad_image_fraction`` is checked against this process's count, so under DDP each rank
    stops on its own share of bad files.
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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if views == 2 and not train:
            raise ValueError("views=2 is for training (two augmentations); an evaluation loader has one view")
        self.split = split
        self.train = train
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.dataset = _FileDataset(
            split, build_transform(train, image_size, color_jitter), image_size, substitute=train,
            key_transform=build_key_transform(image_size) if views == 2 else None,
        )
        self.sampler = sampler if sampler is not None else torch.utils.data.SequentialSampler(self.dataset)
        self.allowed_bad_files = math.floor(max_bad_image_fraction * len(split))
        self._bad: dict[int, str] = {}  # dataset index -> decoder error
        pin = self.device.type == "cuda"
        self._mean = torch.tensor(normalization.mean, device=self.device).mul(255).view(1, 3, 1, 1)
        self._std = torch.tensor(normalization.std, device=self.device).mul(255).view(1, 3, 1, 1)
        self._loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
            drop_last=drop_last,
            # Rank 0 keeps the global RNG's stream (a single-process run is unchanged); the other
            # ranks get their own, or every rank would crop and flip its images the same way.
            generator=torch.Generator().manual_seed(seed * 1_000_003 + rank) if rank else None,
        )
        self._non_blocking = pin

    def __len__(self) -> int:
        samples = len(self.sampler)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def bad_files(self) -> list[str]:
        """Paths (root / relative path) of every image that failed to decode so far, sorted."""
        return sorted(str(self.split.root / self.split.paths[index]) for index in self._bad)

    def _path(self, index: int) -> str:
        return str(self.split.root / self.split.paths[index])

    def _record_failures(self, failures: list[tuple[int, str]]) -> None:
        for index, reason in failures:
            if index in self._bad:
                continue
            self._bad[index] = reason
            if not self.train:
                raise DatasetError(
                    f"{self._path(index)} (in {self.split.name}) cannot be decoded ({reason}). Evaluation "
                    "never substitutes images, since accuracy measured on a replacement would be wrong: "
                    "replace the file or remove it from the split list (`ltscale data verify` lists every "
                    "unreadable file)."
                )
            label = int(self.split.targets[index])
            logger.warning(
                "unreadable image %s (%s); replaced by another image of class %d (%s). %d bad file(s) so far, "
                "at most %d allowed (data.loader.max_bad_image_fraction).",
                self._path(index), reason, label, self.split.class_names[label], len(self._bad), self.allowed_bad_files,
            )
        if len(self._bad) > self.allowed_bad_files:
            listed = self.bad_files[:_MAX_LISTED]
            more = f" and {len(self._bad) - len(listed)} more" if len(self._bad) > len(listed) else ""
            raise DatasetError(
                f"{len(self._bad)} images of {self.split.name} cannot be decoded, more than the "
                f"{self.allowed_bad_files} allowed (data.loader.max_bad_image_fraction x {len(self.split)} images): "
                f"{', '.join(listed)}{more}. Repair or re-download them, or remove them from the split list."
            )

    def _raise_unusable(self, batch: dict) -> None:
        position = int(torch.nonzero(~batch["ok"])[0])
        index = int(batch["index"][position])
        label = int(batch["target"][position])
        if not self.train:
            raise DatasetError(
                f"{self._path(index)} (in {self.split.name}) cannot be decoded "
                f"({self._bad.get(index, 'see the earlier error')}); evaluation never substitutes images."
            )
        tried = [self._path(failed) for failed, _ in batch["failures"] if self.split.targets[failed] == label]
        raise DatasetError(
            f"{self._path(index)} cannot be decoded ({self._bad.get(index, 'unknown error')}) and no readable "
            f"image of its class {label} ({self.split.class_names[label]}) could replace it "
            f"(tried {', '.join(tried)}). Repair the files or remove them from the split list."
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self._loader:
            # Both checks read CPU tensors and lists the workers built: no device sync.
            if batch["failures"]:
                self._record_failures(batch["failures"])
            if not bool(batch["ok"].all()):
                self._raise_unusable(batch)
            image = batch["image"].to(self.device, non_blocking=self._non_blocking)
            out = {
                "image": image.float().sub_(self._mean).div_(self._std),  # (B, 3, H, W)
                "target": batch["target"].to(self.device, non_blocking=self._non_blocking),
                "index": batch["index"].to(self.device, non_blocking=self._non_blocking),
            }
            if "image_key" in batch:
                key = batch["image_key"].to(self.device, non_blocking=self._non_blocking)
                out["image_key"] = key.float().sub_(self._mean).div_(self._std)  # (B, 3, H, W)
            yield out


class _VerifyDataset(torch.utils.data.Dataset):
    def __init__(self, split: FileSplit) -> None:
        self.root = split.root
        self.paths = split.paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, str]:
        try:
            decode_image_file(self.root / self.paths[index])
        except Exception as error:  # any decoder failure marks the file bad
            return index, _describe(error)
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

"""The tensor (GPU-resident) loader for datasets that fit in device memory: CIFAR-LT, synthetic.

The uint8 images live on the training device once. Per epoch, the sampler's index order and all
random augmentation parameters are drawn up front and moved to the device in one transfer; each
step is then pure batched tensor work (gather, random crop with zero padding, horizontal flip,
normalisation) with no per-sample Python and no host synchronisation. On a CPU the same code runs,
just slower.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ltscale.data.base import ArraySplit, Normalization


def random_crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding)`` (zero fill) + ``RandomHorizontalFlip``.

    images: (B, C, H, W) uint8; offsets: (B, 2) int64 in [0, 2*padding] (top, left) into the
    padded image; flips: (B,) bool. Equivalent to torchvision's per-sample transforms with the
    same parameters (see tests/test_tensor_loader.py).
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip is reading the columns backwards
    b = torch.arange(batch, device=images.device)[:, None, None, None]
    c = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Batched Cutout (DeVries & Taylor, 2017): zero a ``size`` x ``size`` square of each image.

    images: (B, C, H, W) normalised float, so zero is the dataset's mean colour; centres: (B, 2)
    int64 (row, column) anywhere in the image, the square clipped at the borders as in the
    paper's code (a square centred near an edge removes less).
    """
    height, width = images.shape[-2:]
    low, high = centres - size // 2, centres + size - size // 2  # [low, high) per axis
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    inside_rows = (rows >= low[:, 0, None]) & (rows < high[:, 0, None])  # (B, H)
    inside_cols = (cols >= low[:, 1, None]) & (cols < high[:, 1, None])  # (B, W)
    square = inside_rows[:, :, None] & inside_cols[:, None, :]  # (B, H, W)
    return images.masked_fill(square[:, None], 0.0)


class TensorLoader:
    """Batches of ``{"image", "target", "index"}`` from an :class:`ArraySplit` held on ``device``.

    ``sampler`` supplies this rank's indices per epoch (instance- or class-balanced).
    ``augment``: random crop with ``padding`` and horizontal flip (training), or none (evaluation).
    ``views=2`` (with ``augment``) adds ``image_key``: the same images under a second, independently
    drawn crop and flip (MoCo's key view). ``cutout`` > 0 (with ``augment``) also zeroes a
    ``cutout``-pixel square of each training image (of the first view), from its own random stream.
    """

    def __init__(
        self,
        split: ArraySplit,
        *,
        sampler,
        batch_size: int,
        normalization: Normalization,
        device: torch.device,
        augment: bool,
        padding: int = 4,
        drop_last: bool = False,
        seed: int = 0,
        views: int = 1,
        rank: int = 0,
        cutout: int = 0,
    ) -> None:
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if views == 2 and not augment:
            raise ValueError("views=2 needs augment=True: without augmentation both views are the same image")
        self.split = split
        self.sampler = sampler
        self.batch_size = batch_size
        self.device = device
        self.augment = augment
        self.padding = padding
        self.drop_last = drop_last
        self.seed = seed
        self.views = views
        self.rank = rank
        self.cutout = cutout if augment else 0
        self.epoch = 0
        self.bad_files: list[str] = []  # in-memory arrays cannot be corrupt; kept for the loader interface
        # (N, 3, H, W) contiguous uint8 on the device: 150 MB for all of CIFAR-100.
        self.images = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2))).to(device)
        self.targets = torch.from_numpy(split.targets).to(device)
        self.mean = torch.tensor(normalization.mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(normalization.std, device=device).view(1, 3, 1, 1) * 255)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) * self.inv_std

    def _seed_words(self, stream: int) -> list[int]:
        """Seed of one random stream for this epoch; other ranks get their own draws (rank 0's
        are those of a single-process run)."""
        return [self.seed, self.epoch, stream] + ([self.rank] if self.rank else [])

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        order = self.sampler.indices(self.epoch)
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        if not self.augment:
            return torch.from_numpy(order).to(self.device), None, None
        rng = np.random.default_rng(self._seed_words(7))
        offsets = rng.integers(0, 2 * self.padding + 1, size=(len(order), 2))
        flips = rng.random(len(order)) < 0.5
        plan = [torch.from_numpy(a) for a in (order, offsets, flips)]
        return tuple(t.to(self.device, non_blocking=True) for t in plan)  # type: ignore[return-value]

    def _key_view_plan(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets (count, 2) and flips (count,) of the second view: its own random stream, so
        the first view's draws (and runs without a second view) are unchanged."""
        rng = np.random.default_rng(self._seed_words(8))
        offsets = rng.integers(0, 2 * self.padding + 1, size=(count, 2))
        flips = rng.random(count) < 0.5
        return torch.from_numpy(offsets).to(self.device, non_blocking=True), torch.from_numpy(flips).to(self.device, non_blocking=True)

    def _cutout_plan(self, count: int) -> torch.Tensor:
        """Square centres (count, 2), uniform over the image; a stream of their own, so the crops
        and flips of a run with Cutout are those of the same run without it."""
        rng = np.random.default_rng(self._seed_words(9))
        height, width = self.images.shape[-2:]
        centres = np.stack([rng.integers(0, height, size=count), rng.integers(0, width, size=count)], axis=1)
        return torch.from_numpy(centres).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order, offsets, flips = self._epoch_plan()
        key_offsets, key_flips = self._key_view_plan(len(order)) if self.views == 2 else (None, None)
        centres = self._cutout_plan(len(order)) if self.cutout else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            source = images = self.images[index]  # (B, 3, H, W) uint8; each view crops it anew
            if offsets is not None and flips is not None:
                images = random_crop_flip(images, offsets[start : start + self.batch_size], flips[start : start + self.batch_size], self.padding)
            image = self.normalize(images)
            if centres is not None:
                image = cutout(image, centres[start : start + self.batch_size], self.cutout)
            batch = {"image": image, "target": self.targets[index], "index": index}
            if key_offsets is not None and key_flips is not None:
                stop = start + self.batch_size
                batch["image_key"] = self.normalize(random_crop_flip(source, key_offsets[start:stop], key_flips[start:stop], self.padding))
            yield batch

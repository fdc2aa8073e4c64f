"""Loader backends: one module per way of turning a split into device batches."""

from __future__ import annotations

import torch
import torch.utils.data

from ltscale.data.base import FileSplit


class ImageFileLoader:
    """What every image-file backend (torch DataLoader, DALI, FFCV) shares: the sampler's epoch
    cut into batches of ``batch_size``, the arguments' checks, and the bad files met so far
    (:mod:`ltscale.data.loaders.bad_images`; a backend records into ``self.ledger``)."""

    def __init__(self, split: FileSplit, *, train: bool, batch_size: int, sampler: torch.utils.data.Sampler | None,
                 drop_last: bool, device: torch.device | str, views: int, max_bad_image_fraction: float) -> None:
        from ltscale.data.loaders.bad_images import BadImageLedger

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        if views == 2 and not train:
            raise ValueError("views=2 is for training (two augmentations); an evaluation loader has one view")
        self.split = split
        self.train = train
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.views = views
        self.sampler = sampler if sampler is not None else torch.utils.data.SequentialSampler(range(len(split)))
        self.ledger = BadImageLedger(split, substitute=train, max_bad_image_fraction=max_bad_image_fraction)
        self._epoch = 0

    def __len__(self) -> int:
        samples = len(self.sampler)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def bad_files(self) -> list[str]:
        """Paths (root / relative path) of every image found unreadable so far, sorted."""
        return self.ledger.bad_files

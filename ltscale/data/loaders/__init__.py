"""Loader backends: one module per way of turning a split into device batches."""

from __future__ import annotations

import torch
import torch.utils.data

from ltscale.data.base import FileSplit, Normalization


class ImageFileLoader:
    """What every image-file backend (torch DataLoader, DALI, FFCV) shares: the sampler's epoch
    cut into batches of ``batch_size``, the arguments' checks, the bad files met so far
    (:mod:`ltscale.data.loaders.bad_images`; a backend records into ``self.ledger``), and the
    device-side end of the training augmentation: colour jitter of the first view
    (:mod:`ltscale.data.loaders.jitter`, drawn per epoch from ``seed`` and ``rank``) and
    normalisation (:meth:`_on_device`)."""

    def __init__(self, split: FileSplit, *, train: bool, batch_size: int, sampler: torch.utils.data.Sampler | None,
                 drop_last: bool, device: torch.device | str, views: int, max_bad_image_fraction: float,
                 normalization: Normalization, color_jitter: float, seed: int, rank: int,
                 substitute: bool | None = None) -> None:
        from ltscale.data.loaders.bad_images import BadImageLedger
        from ltscale.data.loaders.jitter import EpochColorJitter

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
        if self.device.type == "cuda" and self.device.index is None:  # DALI needs the device id
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.views = views
        self.sampler = sampler if sampler is not None else torch.utils.data.SequentialSampler(range(len(split)))
        # Substituting follows training unless asked otherwise: an unaugmented pass over the
        # training split (soft labels, virtual examples) keeps the training policy (``substitute``).
        self.substitute = train if substitute is None else substitute
        self.ledger = BadImageLedger(split, substitute=self.substitute, max_bad_image_fraction=max_bad_image_fraction)
        self._epoch = 0
        self.normalization = normalization
        self._mean = torch.tensor(normalization.mean, device=self.device).mul(255).view(1, 3, 1, 1)
        self._std = torch.tensor(normalization.std, device=self.device).mul(255).view(1, 3, 1, 1)
        self._jitter = (
            EpochColorJitter(color_jitter, seed=seed, rank=rank, device=self.device) if train and color_jitter > 0 else None
        )

    def __len__(self) -> int:
        samples = len(self.sampler)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _start_epoch(self, count: int) -> None:
        """Draw the colour jitter of the ``count`` images this epoch delivers, in delivery order."""
        if self._jitter is not None:
            self._jitter.start(self._epoch, count)

    def _on_device(self, images: torch.Tensor, *, jitter: bool = True) -> torch.Tensor:
        """(B, 3, H, W) uint8, or float in [0, 255], on the device -> the epoch's next colour
        jitter (with ``jitter``, training only) and normalisation; a float input is modified."""
        images = images.float()
        if jitter and self._jitter is not None:
            images = self._jitter(images)
        return images.sub_(self._mean).div_(self._std)

    @property
    def bad_files(self) -> list[str]:
        """Paths (root / relative path) of every image found unreadable so far, sorted."""
        return self.ledger.bad_files

    def check_bad_images_across_ranks(self) -> None:
        """The bad-image budget against every rank's unreadable images together (a collective:
        every rank calls it, at the end of an epoch). Each rank's loader counts only the files it
        met, so W ranks could otherwise pass up to W times the budget between them."""
        from ltscale.dist.gather import all_gather_object, rank_and_world_size

        if not self.substitute or rank_and_world_size()[1] == 1:
            return
        merged: dict[int, str] = {}
        for bad in all_gather_object(dict(self.ledger.bad)):
            merged.update(bad)
        self.ledger.bad.update(merged)
        self.ledger.record([])  # raises with the whole list when over the budget

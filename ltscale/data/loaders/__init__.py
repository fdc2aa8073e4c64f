"""Loader backends: one module per way of turning a split into device batches."""

from __future__ import annotations


def check_file_loader_arguments(batch_size: int, views: int, train: bool) -> None:
    """The argument checks every image-file backend (torch, DALI) shares."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    if views == 2 and not train:
        raise ValueError("views=2 is for training (two augmentations); an evaluation loader has one view")

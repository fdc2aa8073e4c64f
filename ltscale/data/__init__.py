"""Datasets, samplers and loaders."""

from __future__ import annotations

import torch

from ltscale.data.base import ArraySplit, ClassGroups, DatasetBundle, FileSplit, Split
from ltscale.data.config import DataConfig, LoaderConfig, SamplerConfig, SyntheticConfig
from ltscale.data.samplers import ClassBalancedSampler, InstanceBalancedSampler, ShardSampler, build_sampler

__all__ = [
    "ArraySplit",
    "ClassBalancedSampler",
    "ClassGroups",
    "DataConfig",
    "DatasetBundle",
    "FileSplit",
    "InstanceBalancedSampler",
    "LoaderConfig",
    "SamplerConfig",
    "ShardSampler",
    "Split",
    "SyntheticConfig",
    "build_dataset",
    "build_loader",
    "build_sampler",
]


def build_dataset(config: DataConfig, check_files: bool = True) -> DatasetBundle:
    """The splits ``config`` names. ``check_files=False`` reads split lists without the images."""
    if config.dataset == "synthetic":
        from ltscale.data.synthetic import make_synthetic

        return make_synthetic(config.synthetic)
    if config.dataset in ("cifar100_lt", "cifar10_lt"):
        from ltscale.data.cifar import load_cifar_lt

        return load_cifar_lt(config.dataset, config.root, config.imbalance_factor)
    from ltscale.data.image_list import build_image_list_dataset

    return build_image_list_dataset(config, check_files=check_files)


def build_loader(
    split: Split,
    bundle: DatasetBundle,
    *,
    train: bool,
    batch_size: int,
    loader: LoaderConfig,
    device: torch.device,
    seed: int,
    sampler: SamplerConfig | None = None,
    augment: bool | None = None,
    views: int = 1,
    substitute: bool | None = None,
):
    """A loader over ``split``: shuffled with ``sampler`` and augmented when ``train``, else
    sequential, unaugmented and unpadded (for evaluation and soft labels). ``views=2`` adds
    ``image_key``, a second independent augmentation of the same images (MoCo's key view).
    ``substitute`` (image files): replace unreadable images as training does (default: when
    ``train``); an inference pass over the training split sets it, evaluation never does.

    In a multi-process run each rank gets its own part of the data: a training loader this rank's
    share of the epoch (``batch_size`` is then per rank), an evaluation loader the unpadded
    round-robin shard of :class:`ShardSampler`."""
    from ltscale.dist.gather import rank_and_world_size

    rank, world_size = rank_and_world_size()
    augment = train if augment is None else augment
    if train:
        index_sampler = build_sampler(sampler or SamplerConfig(), split.targets, seed, rank, world_size)
    else:
        index_sampler = ShardSampler(len(split), rank, world_size)
    if isinstance(split, ArraySplit):
        if loader.backend in ("torch", "dali", "ffcv"):
            raise ValueError(
                f"data.loader.backend={loader.backend} decodes image files; in-memory datasets use 'tensor' or 'auto'"
            )
        from ltscale.data.loaders.tensor import TensorLoader

        return TensorLoader(
            split, sampler=index_sampler, batch_size=batch_size, normalization=bundle.normalization,
            device=device, augment=augment, seed=seed, views=views, rank=rank, cutout=loader.cutout,
        )
    if isinstance(split, FileSplit):
        if loader.backend == "tensor":
            raise ValueError("data.loader.backend=tensor needs an in-memory dataset; image-file datasets use 'torch', 'dali', 'ffcv' or 'auto'")
        if loader.cutout:
            raise ValueError(f"data.loader.cutout={loader.cutout}: Cutout is a CIFAR-scale augmentation of the in-memory "
                             "loader; image-file datasets do not use it (set data.loader.cutout=0)")
        from ltscale.data.image_list import DATASET_SPECS
        from ltscale.data.loaders.dali import DaliLoader, dali_available
        from ltscale.data.loaders.files import FileLoader

        common = dict(
            train=augment, batch_size=batch_size, sampler=index_sampler, image_size=bundle.image_size,
            normalization=bundle.normalization, num_workers=loader.num_workers,
            max_bad_image_fraction=loader.max_bad_image_fraction, drop_last=False, device=device,
            color_jitter=DATASET_SPECS[bundle.name].train_color_jitter if bundle.name in DATASET_SPECS else 0.0,
            views=views, seed=seed, rank=rank, substitute=substitute,
        )
        if loader.backend == "ffcv":
            from ltscale.data.loaders.ffcv_backend import FfcvLoader

            return FfcvLoader(split, ffcv=loader.ffcv, **common)
        use_dali = loader.backend == "dali" or (loader.backend == "auto" and device.type == "cuda" and dali_available())
        return (DaliLoader if use_dali else FileLoader)(split, **common)
    raise TypeError(f"no loader for split type {type(split).__name__}")

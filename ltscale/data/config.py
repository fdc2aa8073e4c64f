"""Typed configs of the data layer: which dataset, how it is sampled and loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ltscale.config.hashing import keyed_when_set
from ltscale.data.cifar import TRAINING_SETS as CIFAR_TRAINING_SETS
from ltscale.data.cifar import long_tailed_counts

DatasetName = Literal["synthetic", "cifar100_lt", "cifar10_lt", "imagenet_lt", "places_lt", "inat2018"]


@dataclass(frozen=True)
class SyntheticConfig:
    """The procedurally generated long-tailed image set (see :mod:`ltscale.data.synthetic`)."""

    num_classes: int = 30
    max_per_class: int = 400
    imbalance_factor: float = 80.0
    test_per_class: int = 40
    image_size: int = 16
    noise: float = 0.35
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"data.synthetic.num_classes must be >= 2, got {self.num_classes}")
        if self.max_per_class < 1:
            raise ValueError(f"data.synthetic.max_per_class must be >= 1, got {self.max_per_class}")
        if not (math.isfinite(self.imbalance_factor) and self.imbalance_factor >= 1):
            raise ValueError(f"data.synthetic.imbalance_factor must be a finite number >= 1, got {self.imbalance_factor}")
        if self.test_per_class < 1:
            raise ValueError(f"data.synthetic.test_per_class must be >= 1, got {self.test_per_class}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"data.synthetic.noise must be a finite number >= 0 (pixel noise scale), got {self.noise}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.synthetic.seed must be in [0, 2**32), got {self.seed}")
        try:
            long_tailed_counts(self.max_per_class, self.num_classes, self.imbalance_factor)
        except ValueError as error:
            raise ValueError(f"data.synthetic: {error}; lower imbalance_factor or raise max_per_class") from None
        if not 8 <= self.image_size <= 256:  # generated in memory at once; larger images are real data's business
            raise ValueError(f"data.synthetic.image_size must be in [8, 256], got {self.image_size}")


@dataclass(frozen=True)
class FfcvConfig:
    """How ``.beton`` files are written and where they are kept.

    ``cache_dir``: where the files go (default ``~/.cache/ltscale/ffcv``); on a cluster, a file
    system every node reads. ``max_resolution``: images are stored with their longer side at most
    this (the crops are 224 px; FFCV's ImageNet setting is 256-512). ``jpeg_quality``: of the stored
    JPEGs. ``write_workers``: processes that decode and encode while writing (0: every CPU this process may use).
    """

    cache_dir: str = ""
    max_resolution: int = 512
    jpeg_quality: int = 90
    write_workers: int = 0

    def __post_init__(self) -> None:
        if self.max_resolution < 16:
            raise ValueError(f"data.loader.ffcv.max_resolution must be >= 16, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"data.loader.ffcv.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.write_workers < 0:
            raise ValueError(f"data.loader.ffcv.write_workers must be >= 0, got {self.write_workers}")

    def directory(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "ltscale" / "ffcv"


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are produced.

    ``backend``: ``auto`` keeps in-memory datasets (CIFAR, synthetic) as tensors on the training
    device and batches them there (the GPU-resident path on a GPU); image-file datasets are
    decoded by DALI on a GPU when DALI is installed (the ``dali`` extra), else by the torch
    DataLoader backend. ``dali``, ``torch`` and ``ffcv`` force a backend for image files (all
    three also run on CPU); ``ffcv`` first writes each split to a ``.beton`` file (``ffcv``
    settings). ``num_workers``: DataLoader worker processes, or DALI's / FFCV's threads.
    """

    backend: Literal["auto", "tensor", "torch", "dali", "ffcv"] = "auto"
    num_workers: int = 4
    ffcv: FfcvConfig = field(default_factory=FfcvConfig)
    # Cutout square side for training batches of in-memory datasets (16 on CIFAR in DeVries &
    # Taylor 2017; 0 = off, as in the papers' recipes). Image-file datasets refuse it.
    cutout: int = 0
    # A few unreadable JPEGs in a 437k-image set should not kill a run hours in; more than this
    # fraction means the data is broken and the run stops with the list of files.
    max_bad_image_fraction: float = 0.001

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.loader.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.max_bad_image_fraction < 1:
            raise ValueError(f"data.loader.max_bad_image_fraction must be in [0, 1), got {self.max_bad_image_fraction}")
        if self.cutout < 0:
            raise ValueError(f"data.loader.cutout must be >= 0 (pixels; 0 = off), got {self.cutout}")


IN_MEMORY_DATASETS = ("synthetic", "cifar100_lt", "cifar10_lt")
"""Datasets decoded into memory when built (the tensor loader's); the others are image files."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and where it lives.

    ``root``: for CIFAR the official python archive (``cifar-100-python.tar.gz``) or its extracted
    folder; for ImageNet-LT / Places-LT / iNaturalist the image root the split lists are relative to.
    ``train_list`` / ``val_list`` / ``test_list``: ``<relative path> <label>`` split lists.
    ``train_annotations`` / ``test_annotations``: iNaturalist 2018 COCO-style JSON files, an
    alternative to the lists.
    """

    dataset: DatasetName = "synthetic"
    root: str = ""
    imbalance_factor: float = 100.0
    train_list: str = ""
    val_list: str = ""
    test_list: str = ""
    train_annotations: str = ""
    test_annotations: str = ""
    image_size: int = 224
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        if self.dataset in ("cifar100_lt", "cifar10_lt") and not (
            math.isfinite(self.imbalance_factor) and self.imbalance_factor >= 1
        ):
            raise ValueError(f"data.imbalance_factor must be a finite number >= 1, got {self.imbalance_factor}")
        if self.dataset in CIFAR_TRAINING_SETS:
            try:
                long_tailed_counts(CIFAR_TRAINING_SETS[self.dataset][1], CIFAR_TRAINING_SETS[self.dataset][0],
                                   self.imbalance_factor)
            except ValueError as error:
                raise ValueError(f"data.imbalance_factor: {self.dataset}'s {error}") from None
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be >= 1 (pixels), got {self.image_size}")
        if self.dataset in IN_MEMORY_DATASETS and self.loader.backend in ("torch", "dali", "ffcv"):
            raise ValueError(f"data.loader.backend={self.loader.backend} decodes image files; {self.dataset} is held "
                             "in memory and is read by the 'tensor' backend ('auto' picks it)")
        # A missing data.root is reported when the data is built, so recipes can be listed without it.
        unused = self._unused_settings()
        if unused:
            raise ValueError(f"data.dataset={self.dataset} does not read {'; '.join(unused)}")

    def _unused_settings(self) -> list[str]:
        """Settings given that ``dataset`` would ignore, each with what to set instead: a value
        that is silently dropped (an archive path on the generated set, an imbalance factor on a
        dataset whose split lists fix it) makes a run that is not the one asked for."""
        files = ("root", "train_list", "val_list", "test_list", "train_annotations", "test_annotations")
        defaults = DataConfig.__dataclass_fields__
        unused = []
        if self.dataset == "synthetic":
            unused += [f"data.{name} (the images are generated; set data.dataset to the dataset it names)"
                       for name in files if getattr(self, name)]
            if self.imbalance_factor != defaults["imbalance_factor"].default:
                unused.append("data.imbalance_factor (the generated set's is data.synthetic.imbalance_factor)")
            if self.image_size != defaults["image_size"].default:
                unused.append("data.image_size (the generated set's is data.synthetic.image_size)")
            return unused
        if self.synthetic != SyntheticConfig():
            unused.append("data.synthetic.* (that is the generated set's config)")
        if self.dataset in ("cifar100_lt", "cifar10_lt"):
            unused += [f"data.{name} (the CIFAR-LT split is drawn from data.root's archive by data.imbalance_factor)"
                       for name in files[1:] if getattr(self, name)]
            if self.image_size != defaults["image_size"].default:
                unused.append("data.image_size (CIFAR images are 32 px, cropped at 32 after 4 px padding)")
        else:
            if self.imbalance_factor != defaults["imbalance_factor"].default:
                unused.append(f"data.imbalance_factor (the {self.dataset} split lists fix its imbalance; "
                              "it applies to cifar100_lt and cifar10_lt)")
            for role in ("train", "test"):
                if not getattr(self, f"{role}_annotations"):
                    continue
                if self.dataset != "inat2018":
                    unused.append(f"data.{role}_annotations (iNaturalist 2018's JSON files; {self.dataset} reads split lists)")
                elif getattr(self, f"{role}_list"):
                    unused.append(f"data.{role}_list when data.{role}_annotations is set (the annotation file replaces "
                                  "the list; set one of them)")
        return unused


@dataclass(frozen=True)
class SamplerConfig:
    """``instance``: every image once per epoch. ``class_balanced``: pick a class, then
    ``samples_per_class`` images of it (cycling through a per-class shuffled list), as in the
    classifier-balancing code. The epoch has as many samples as the dataset, as in SSD-LT's code
    and in classifier-balancing's training loop (its sampler's length is the largest class's size
    times the number of classes, 4.6x the dataset on CIFAR-100-LT IF 100, but the loop stops after
    len(dataset) / batch steps).

    ``class_order`` (class_balanced only): ``random`` draws each class independently and uniformly
    (frequencies uniform in expectation); ``cycle`` walks a shuffled list of the classes,
    re-shuffled at each wrap, as classifier-balancing's sampler does, so over an epoch every class
    is drawn the same number of times, give or take one."""

    kind: Literal["instance", "class_balanced"] = "instance"
    samples_per_class: int = 1
    class_order: Literal["random", "cycle"] = keyed_when_set("random")  # stages stored before it keep their keys

    def __post_init__(self) -> None:
        if self.samples_per_class < 1:
            raise ValueError(f"sampler.samples_per_class must be >= 1, got {self.samples_per_class}")
        if self.samples_per_class != 1 and self.kind != "class_balanced":
            raise ValueError(f"sampler.samples_per_class={self.samples_per_class} groups class draws; it needs "
                             f"sampler.kind=class_balanced, not {self.kind}")
        if self.class_order != "random" and self.kind != "class_balanced":
            raise ValueError(f"sampler.class_order={self.class_order} orders class draws; it needs "
                             f"sampler.kind=class_balanced, not {self.kind}")

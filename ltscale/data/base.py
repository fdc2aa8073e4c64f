"""What every dataset split provides, independent of where its images live.

Two kinds of split exist: :class:`ArraySplit` holds decoded uint8 images in memory (CIFAR-LT,
the synthetic set; these can live on the GPU), :class:`FileSplit` holds image paths that a loader
backend decodes (ImageNet-LT, Places-LT, iNaturalist 2018).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANY_SHOT_MIN = 100  # "many" = more than 100 training images
FEW_SHOT_MAX = 20  # "few" = fewer than 20 training images; "medium" is 20..100 inclusive


@dataclass(frozen=True)
class ClassGroups:
    """Many / medium / few class indices derived from training counts (> 100, 20-100, < 20)."""

    many: np.ndarray
    medium: np.ndarray
    few: np.ndarray

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "ClassGroups":
        counts = np.asarray(counts)
        classes = np.arange(len(counts))
        return cls(
            many=classes[counts > MANY_SHOT_MIN],
            medium=classes[(counts >= FEW_SHOT_MAX) & (counts <= MANY_SHOT_MIN)],
            few=classes[counts < FEW_SHOT_MAX],
        )

    def as_dict(self) -> dict[str, list[int]]:
        return {name: getattr(self, name).tolist() for name in ("many", "medium", "few")}


@dataclass
class Split:
    """A labelled split: targets (N,) int64 over ``num_classes`` classes."""

    name: str
    targets: np.ndarray
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if self.targets.ndim != 1:
            raise ValueError(f"{self.name}: targets must be one-dimensional, got shape {self.targets.shape}")
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), "
                f"found {self.targets.min()}..{self.targets.max()}"
            )
        if not self.class_names:
            self.class_names = [str(c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def class_counts(self) -> np.ndarray:
        """Images per class, (num_classes,) int64."""
        return np.bincount(self.targets, minlength=self.num_classes).astype(np.int64)

    def fingerprint(self) -> str:
        """A content identity for lineage: changes when labels or image sources change."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        digest.update(self.targets.tobytes())
        self._update_fingerprint(digest)
        return digest.hexdigest()[:16]

    def _update_fingerprint(self, digest: "hashlib._Hash") -> None:
        pass


@dataclass
class ArraySplit(Split):
    """Decoded images in memory: ``images`` is (N, H, W, 3) uint8."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be (N, H, W, 3) uint8, got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.targets):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.targets)} labels")

    def _update_fingerprint(self, digest: "hashlib._Hash") -> None:
        # Hashing every pixel costs ~0.1 s for CIFAR; a strided sample keeps lineage cheap while
        # still catching a different archive or subset.
        digest.update(np.ascontiguousarray(self.images[:: max(1, len(self.images) // 512)]).tobytes())


@dataclass
class FileSplit(Split):
    """Images on disk: ``paths`` relative to ``root``; decoding is the loader backend's job."""

    root: Path = Path(".")
    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = Path(self.root)
        if len(self.paths) != len(self.targets):
            raise ValueError(f"{self.name}: {len(self.paths)} paths but {len(self.targets)} labels")

    def _update_fingerprint(self, digest: "hashlib._Hash") -> None:
        digest.update("\n".join(self.paths).encode())


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class DatasetBundle:
    """The splits of one dataset plus what models and loaders need to know about it."""

    name: str
    train: Split
    test: Split
    normalization: Normalization
    image_size: int
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def groups(self) -> ClassGroups:
        return ClassGroups.from_counts(self.train.class_counts())

    def stats(self) -> dict:
        """Per-class counts, groups and totals (what ``ltscale data stats`` prints)."""
        counts = self.train.class_counts()
        groups = self.groups()
        report = {
            "dataset": self.name,
            "num_classes": int(self.num_classes),
            "train_images": int(counts.sum()),
            "test_images": int(len(self.test)),
            "max_class_count": int(counts.max()),
            "min_class_count": int(counts.min()),
            "imbalance_factor": float(counts.max() / max(counts.min(), 1)),
            "groups": {name: len(idx) for name, idx in dataclasses.asdict(groups).items()},
            "group_images": {name: int(counts[idx].sum()) for name, idx in dataclasses.asdict(groups).items()},
            "train_class_counts": counts.tolist(),
        }
        if self.val is not None:
            report["val_images"] = int(len(self.val))
        return report

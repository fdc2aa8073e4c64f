"""Instance- and class-balanced samplers, distributed-aware and deterministic per (seed, epoch).

Every rank draws the same global order from ``(seed, epoch)`` and keeps every ``world_size``-th
element starting at its rank, so ranks never need to communicate and together cover the epoch
exactly. The order is padded by wrapping to a multiple of ``world_size`` (the usual
DistributedSampler behaviour for *training*; evaluation never pads, see ``engine.evaluate``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch.utils.data

from ltscale.data.config import SamplerConfig


class _RankSampler(torch.utils.data.Sampler[int]):
    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def global_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for ``epoch`` (default: the epoch last set)."""
        order = self.global_order(self.epoch if epoch is None else epoch)
        per_rank = -(-len(order) // self.world_size)
        padded = np.resize(order, per_rank * self.world_size)  # np.resize wraps around
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


class InstanceBalancedSampler(_RankSampler):
    """Each image once per epoch, in a fresh random order (or in order with ``shuffle=False``)."""

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        super().__init__(dataset_size, seed, rank, world_size)
        self.shuffle = shuffle

    def global_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return self._rng(epoch).permutation(self.num_samples)


def _indices_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per class, the positions holding it, ascending: one stable sort, not a scan per class
    (8,142 scans of 437k labels took 1.5 s per epoch on iNat18)."""
    grouped = np.argsort(labels, kind="stable")
    ends = np.cumsum(np.bincount(labels, minlength=num_classes))
    return np.split(grouped, ends[:-1])


class ClassBalancedSampler(_RankSampler):
    """Classes drawn uniformly; ``samples_per_class`` consecutive images of the drawn class.

    ``class_order="random"`` draws each class independently; ``"cycle"`` walks shuffled passes over
    the classes (each class once per pass), so every class is drawn equally often, give or take one.
    Within a class the images are visited in a shuffled cycle (re-shuffled at each wrap), so a
    tail class with 5 images shows each of them before repeating any.
    """

    def __init__(
        self,
        targets: np.ndarray,
        samples_per_class: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int | None = None,
        class_order: str = "random",
    ):
        targets = np.asarray(targets)
        super().__init__(len(targets) if num_samples is None else num_samples, seed, rank, world_size)
        if class_order not in ("random", "cycle"):
            raise ValueError(f"class_order must be 'random' or 'cycle', got {class_order!r}")
        self.samples_per_class = samples_per_class
        self.class_order = class_order
        self.class_indices = _indices_by_class(targets, int(targets.max()) + 1)
        self.present_classes = np.array([c for c, idx in enumerate(self.class_indices) if len(idx)])

    def global_order(self, epoch: int) -> np.ndarray:
        return self._whole_draws(epoch)[: self.num_samples]

    def _whole_draws(self, epoch: int) -> np.ndarray:
        """The epoch's draws, the last one whole (``num_samples`` rounded up to a multiple of
        ``samples_per_class``)."""
        rng = self._rng(epoch)
        draws = -(-self.num_samples // self.samples_per_class)
        if self.class_order == "cycle":
            passes = -(-draws // len(self.present_classes))
            classes = np.concatenate([rng.permutation(self.present_classes) for _ in range(passes)])[:draws]
        else:
            classes = rng.choice(self.present_classes, size=draws)
        needed = np.bincount(classes, minlength=len(self.class_indices)) * self.samples_per_class
        # Build, per class, a long enough stream of shuffled cycles, then hand out consecutive chunks.
        streams: dict[int, np.ndarray] = {}
        for c in np.flatnonzero(needed):
            pool = self.class_indices[c]
            cycles = -(-needed[c] // len(pool))
            streams[c] = np.concatenate([rng.permutation(pool) for _ in range(cycles)])
        s = self.samples_per_class
        order = np.empty(draws * s, dtype=np.int64)
        draws_of = _indices_by_class(classes, len(self.class_indices))
        for c, stream in streams.items():
            # The k-th draw of class c takes stream[c][k*s:(k+1)*s].
            positions = draws_of[c]
            chunks = stream[: len(positions) * s].reshape(len(positions), s)
            order[(positions[:, None] * s + np.arange(s)).ravel()] = chunks.ravel()
        return order

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices: whole draws (``samples_per_class`` images of one class) are dealt
        round-robin to the ranks, so each rank still sees same-class groups."""
        epoch = self.epoch if epoch is None else epoch
        if self.world_size == 1:
            return self.global_order(epoch)
        s = self.samples_per_class
        # The last draw whole (the single-process order cuts it at num_samples): padded with the
        # epoch's first images instead, it mixed another class into a draw.
        grouped = self._whole_draws(epoch).reshape(-1, s)
        draws = len(grouped)
        per_rank = -(-draws // self.world_size)
        rows = np.resize(np.arange(draws), per_rank * self.world_size)[self.rank :: self.world_size]
        return grouped[rows].ravel()

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_samples
        draws = -(-self.num_samples // self.samples_per_class)
        return -(-draws // self.world_size) * self.samples_per_class


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation's shard: rank r reads images r, r + W, r + 2W, ... in order, NOT padded.

    Padding (as the training samplers do) would count some test images twice and skew the
    per-class accuracy of few-shot classes; the shards instead differ in length by at most one,
    and :func:`ltscale.dist.gather.gather_strided_rows_to_main` puts per-image results back in order.
    """

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        pass  # the same shard every time

    def indices(self, epoch: int | None = None) -> np.ndarray:
        return np.arange(self.rank, self.dataset_size, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.world_size))


def build_sampler(
    config: SamplerConfig, targets: np.ndarray, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> _RankSampler:
    """The sampler a stage asked for, over a split with labels ``targets``."""
    if config.kind == "class_balanced":
        return ClassBalancedSampler(targets, config.samples_per_class, seed, rank, world_size,
                                    class_order=config.class_order)
    return InstanceBalancedSampler(len(targets), seed, rank, world_size, shuffle=shuffle)

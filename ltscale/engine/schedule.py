"""Learning-rate schedules as per-iteration arrays computed once (DINO style)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum and a warm-up + step/cosine schedule.

    ``milestones`` / ``decay_factors``: after epoch ``milestones[i]`` the lr is
    ``lr * decay_factors[i]`` (absolute, not cumulative): LDAM-DRW's CIFAR schedule is
    milestones (160, 180) with factors (0.01, 0.0001); BBN's (119, 159) with (0.01, 0.0001) (its
    paper's "120th and 160th epoch", counted from 1: milestones here count finished epochs).
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    warmup_epochs: int = 5
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: tuple[int, ...] = (160, 180)
    decay_factors: tuple[float, ...] = (0.01, 0.0001)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"optim.batch_size must be >= 1, got {self.batch_size}")
        # ``not x > 0`` rather than ``x <= 0``: nan compares False both ways and must be rejected here,
        # not as a JSON error when the config is recorded.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.warmup_epochs >= self.epochs):
            raise ValueError(f"optim.warmup_epochs ({self.warmup_epochs}) must be in [0, optim.epochs={self.epochs}); "
                             "shortening a schedule, set warmup_epochs too (e.g. --set 'stages.*.optim.warmup_epochs=0')")
        if self.schedule == "step":
            if len(self.milestones) != len(self.decay_factors):
                raise ValueError(
                    f"optim.milestones {self.milestones} and optim.decay_factors {self.decay_factors} must have "
                    "the same length (one factor per milestone)"
                )
            if list(self.milestones) != sorted(self.milestones):
                raise ValueError(f"optim.milestones must be increasing, got {self.milestones}")
            if any(m < 0 for m in self.milestones):
                raise ValueError(f"optim.milestones must be epochs >= 0, got {self.milestones}")
            if not all(math.isfinite(f) and f > 0 for f in self.decay_factors):
                raise ValueError(f"optim.decay_factors must be finite numbers > 0 (lr multipliers), got {self.decay_factors}")


def lr_schedule(config: OptimConfig, iterations_per_epoch: int) -> np.ndarray:
    """The lr of every iteration, (epochs * iterations_per_epoch,) float64.

    Warm-up rises linearly from lr / (warmup_epochs * iters) to lr over the warm-up epochs.
    """
    total = config.epochs * iterations_per_epoch
    step = np.arange(total)
    epoch = step / iterations_per_epoch
    if config.schedule == "cosine":
        start = config.warmup_epochs * iterations_per_epoch
        progress = np.clip((step - start) / max(1, total - start), 0, 1)
        lrs = 0.5 * config.lr * (1 + np.cos(np.pi * progress))
    elif config.schedule == "step":
        lrs = np.full(total, config.lr)
        for milestone, factor in zip(config.milestones, config.decay_factors):
            lrs[epoch >= milestone] = config.lr * factor
    else:
        lrs = np.full(total, config.lr)
    warmup = config.warmup_epochs * iterations_per_epoch
    if warmup:
        lrs[:warmup] = config.lr * (step[:warmup] + 1) / warmup
    return lrs

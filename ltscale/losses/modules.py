"""Loss configs and the per-stage loss objects built from them.

``backend`` selects the implementation of the distillation losses: ``torch`` (the plain
references in :mod:`ltscale.losses.functional`), ``triton`` (the fused kernels in
:mod:`ltscale.kernels`), or ``auto``: the kernels when they can run on the logits' device.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from ltscale.dist.gather import all_reduce_sum, rank_and_world_size
from ltscale.losses import functional

LossBackend = Literal["auto", "torch", "triton"]


@dataclass(frozen=True)
class LossConfig:
    """The supervised loss of a teacher / baseline stage.

    ``ldam``: LDAM with ``ldam_max_margin`` and ``ldam_scale``; with ``drw_epoch`` > 0 the DRW
    re-weighting (effective-number weights with ``drw_beta``) starts at that epoch (160 in LDAM-DRW).
    """

    kind: Literal["ce", "bsce", "ldam"] = "ce"
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_epoch: int = 0
    drw_beta: float = 0.9999

    def __post_init__(self) -> None:
        if self.drw_epoch < 0:
            raise ValueError(f"loss.drw_epoch must be >= 0 (the epoch DRW starts; 0: no DRW), got {self.drw_epoch}")
        if self.drw_epoch and self.kind != "ldam":
            raise ValueError("loss.drw_epoch applies to loss.kind=ldam only; set it to 0 or use ldam")
        # Written as ``not x > 0`` so that nan is refused too.
        if not self.ldam_max_margin > 0 or not math.isfinite(self.ldam_max_margin):
            raise ValueError(f"loss.ldam_max_margin must be a finite number > 0, got {self.ldam_max_margin}")
        if not self.ldam_scale > 0 or not math.isfinite(self.ldam_scale):
            raise ValueError(f"loss.ldam_scale must be a finite number > 0, got {self.ldam_scale}")
        if not 0 < self.drw_beta < 1:
            raise ValueError(f"loss.drw_beta must be in (0, 1), got {self.drw_beta}")


def effective_number_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to sum to C (Cui et al. 2019)."""
    weights = (1.0 - beta) / (1.0 - np.power(beta, class_counts.astype(np.float64)))
    return weights / weights.sum() * len(class_counts)


class ClassificationLoss:
    """``loss(logits, targets)``; ``set_epoch`` switches LDAM to its DRW phase."""

    def __init__(self, config: LossConfig, class_counts: np.ndarray, device: torch.device) -> None:
        self.config = config
        self.counts = torch.as_tensor(class_counts, device=device)
        if (class_counts <= 0).any() and config.kind in ("bsce", "ldam"):
            empty = np.flatnonzero(class_counts <= 0)[:5].tolist()
            raise ValueError(f"loss.kind={config.kind} needs every class to have training images; classes {empty} have none")
        # Only LDAM uses the DRW weights; for CE an empty class (legal there) would make them inf.
        self.drw_weights = (
            torch.as_tensor(effective_number_weights(class_counts, config.drw_beta), dtype=torch.float32, device=device)
            if config.kind == "ldam"
            else None
        )
        self.weights: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        drw = self.config.kind == "ldam" and self.config.drw_epoch and epoch >= self.config.drw_epoch
        self.weights = self.drw_weights if drw else None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "bsce":
            return functional.balanced_softmax_cross_entropy(logits, targets, self.counts)
        if self.config.kind == "ldam":
            weight_sum = None
            world_size = rank_and_world_size()[1]
            if self.weights is not None and world_size > 1:
                # DDP averages the processes' gradients: each divides by the global batch's weight
                # sum over the world size so that the average is the global weighted mean.
                weight_sum = all_reduce_sum(self.weights[targets].sum()) / world_size
            return functional.ldam_loss(
                logits, targets, self.counts, self.config.ldam_max_margin, self.config.ldam_scale, self.weights, weight_sum
            )
        return functional.cross_entropy(logits, targets)


def build_classification_loss(config: LossConfig, class_counts: np.ndarray, device: torch.device) -> ClassificationLoss:
    return ClassificationLoss(config, class_counts, device)


@dataclass(frozen=True)
class DistillationLosses:
    kd: Callable[..., torch.Tensor]
    dive: Callable[..., torch.Tensor]
    ssd_hybrid: Callable[..., torch.Tensor]


_REFERENCE = DistillationLosses(functional.kd_loss, functional.dive_loss, functional.ssd_hybrid_loss)


def distillation_losses(backend: LossBackend, device: torch.device) -> DistillationLosses:
    """The distillation loss functions for ``backend`` on ``device``; all share one signature set."""
    if backend == "torch":
        return _REFERENCE
    try:
        from ltscale import kernels
    except ImportError as error:
        if backend == "triton":
            raise RuntimeError(f"loss backend 'triton' was requested but ltscale.kernels cannot be imported: {error}") from None
        return _REFERENCE
    usable = kernels.kernels_usable(torch.empty(0, device=device))
    if backend == "auto" and device.type != "cuda":
        # Triton's interpreter makes the kernels usable on a CPU, but only for testing them: far
        # slower than the references there.
        usable = False
    if backend == "triton" and not usable:
        raise RuntimeError(
            f"loss backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU); the stage runs on {device}. "
            "Use backend=auto or backend=torch."
        )
    if not usable:
        return _REFERENCE
    return DistillationLosses(kernels.fused_kd_loss, kernels.fused_dive_loss, kernels.fused_ssd_hybrid_loss)

"""Plain-PyTorch losses for long-tailed recognition.

These are the reference implementations: the CPU path, and the ground truth that the fused
Triton kernels in :mod:`ltscale.kernels` are tested against. Notation in docstrings follows
``METHODS.md``: logits ``z`` (N x C), labels ``y``, per-class training counts ``n_c``.
"""

from ltscale.losses.functional import (
    balanced_softmax_cross_entropy,
    cross_entropy,
    dive_loss,
    kd_loss,
    ldam_loss,
    ldam_margins,
    ssd_hybrid_loss,
    teacher_distribution,
)
from ltscale.losses.modules import LossConfig, build_classification_loss

__all__ = [
    "LossConfig",
    "balanced_softmax_cross_entropy",
    "build_classification_loss",
    "cross_entropy",
    "dive_loss",
    "kd_loss",
    "ldam_loss",
    "ldam_margins",
    "ssd_hybrid_loss",
    "teacher_distribution",
]

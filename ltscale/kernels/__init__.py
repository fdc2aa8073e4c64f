"""Fused Triton kernels for the distillation losses (see ``README.md`` in this folder).

Public API (same signatures, semantics and 0-dim fp32 return value as the references in
:mod:`ltscale.losses.functional`; the teacher / soft-label logits receive no gradient):

* :func:`fused_kd_loss`
* :func:`fused_dive_loss`
* :func:`fused_ssd_hybrid_loss`
* :func:`kernels_usable`

``triton`` is imported lazily, on the first kernel launch, never at ``import ltscale`` time, so
``TRITON_INTERPRET=1`` (CPU interpreter) can be set after importing this package.  When the
kernels cannot run on the given tensors the ``fused_*`` functions fall back to the reference.
"""

from ltscale.kernels.distill import (
    fused_dive_loss,
    fused_kd_loss,
    fused_ssd_hybrid_loss,
    kernels_usable,
)

__all__ = [
    "fused_dive_loss",
    "fused_kd_loss",
    "fused_ssd_hybrid_loss",
    "kernels_usable",
]

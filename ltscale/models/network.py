"""A backbone plus named heads; the forward returns every head's logits and the feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn

from ltscale.models.heads import HeadSpec, build_head

Arch = Literal["resnet8", "resnet20", "resnet32", "resnet50", "resnet101", "resnet152", "resnext50_32x4d"]


@dataclass(frozen=True)
class ModelConfig:
    """``arch``: CIFAR ResNets (32 px, option-A shortcuts) or torchvision ImageNet backbones.
    ``width``: base channels of the CIFAR ResNets (16 in the papers). ``classifier``: ``cosine`` for
    LDAM's normalised head, ``linear`` otherwise. ``init_from``: pretrained backbone weights a
    fresh network starts from, ``torchvision:ResNet152_Weights.IMAGENET1K_V1`` or a file's path
    (``ltscale/models/pretrained.py``); "" starts from random weights."""

    arch: Arch = "resnet32"
    width: int = 16
    classifier: Literal["linear", "cosine"] = "linear"
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.arch not in get_args(Arch):  # typed overrides check it; a checkpoint's spec is read back unchecked
            raise ValueError(f"model.arch must be one of {', '.join(get_args(Arch))}, got {self.arch!r}")
        if self.width < 4:
            raise ValueError(f"model.width must be >= 4, got {self.width}")
        if self.width != 16 and not is_cifar_arch(self.arch):
            # torchvision's ImageNet backbones have fixed widths; a width they ignore would still
            # change the stage's key, and so retrain a finished stage to the same network.
            raise ValueError(f"model.width={self.width} sets the CIFAR ResNets' base channels; "
                             f"model.arch={self.arch} has a fixed width: leave model.width at 16")


def is_cifar_arch(arch: str) -> bool:
    """A CIFAR ResNet (32 px input, option-A shortcuts, ``width`` base channels)."""
    return arch.startswith("resnet") and arch[6:].isdigit() and int(arch[6:]) < 50


def build_backbone(config: ModelConfig) -> nn.Module:
    if is_cifar_arch(config.arch):
        from ltscale.models.resnet_cifar import CifarResNet

        return CifarResNet(depth=int(config.arch[6:]), width=config.width)
    import torchvision.models as tvm

    net = getattr(tvm, config.arch)(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.feature_dim = feature_dim
    return net


class Network(nn.Module):
    """``forward(x)`` -> ``{"features": (N, D), <head name>: (N, outputs), ...}``.

    ``predict_head`` names the head whose logits are the model's prediction.
    """

    def __init__(self, config: ModelConfig, heads: dict[str, HeadSpec], predict_head: str) -> None:
        super().__init__()
        if predict_head not in heads:
            raise ValueError(f"predict_head {predict_head!r} is not one of the heads {sorted(heads)}")
        self.config = config
        self.head_specs = dict(heads)
        self.predict_head = predict_head
        self.backbone = build_backbone(config)
        self.feature_dim: int = self.backbone.feature_dim
        self.heads = nn.ModuleDict({name: build_head(spec, self.feature_dim) for name, spec in heads.items()})

    def forward(self, images: torch.Tensor, heads: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        names = self.heads.keys() if heads is None else heads
        return {"features": features, **{name: self.heads[name](features) for name in names}}

    def classifier_heads(self) -> list[str]:
        return [name for name, spec in self.head_specs.items() if spec.classifier]

    def spec(self) -> dict:
        """Everything needed to rebuild this network before loading its state dict."""
        from dataclasses import asdict

        return {
            "model": asdict(self.config),
            "heads": {name: asdict(spec) for name, spec in self.head_specs.items()},
            "predict_head": self.predict_head,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "Network":
        model = spec["model"]
        arch = model.get("arch") if isinstance(model, dict) else None
        if isinstance(arch, str) and not is_cifar_arch(arch):  # saved before the width was checked: the same network
            model = {**model, "width": ModelConfig.width}
        return cls(
            ModelConfig(**model),
            {name: HeadSpec(**head) for name, head in spec["heads"].items()},
            spec["predict_head"],
        )


def build_network(config: ModelConfig, heads: dict[str, HeadSpec], predict_head: str) -> Network:
    return Network(config, heads, predict_head)


def replace_head(network: Network, name: str, head: nn.Module, spec: HeadSpec) -> None:
    """Swap head ``name`` for ``head`` (moved to the network's device) and record its spec."""
    device = next(network.parameters()).device
    network.heads[name] = head.to(device)
    network.head_specs[name] = spec

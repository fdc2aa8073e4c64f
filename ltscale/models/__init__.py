"""Backbones, heads and the network that joins them."""

from ltscale.models.heads import HeadSpec, build_head
from ltscale.models.network import ModelConfig, Network, build_network

__all__ = ["HeadSpec", "ModelConfig", "Network", "build_head", "build_network"]

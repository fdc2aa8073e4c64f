"""MoCo v2 instance discrimination: SSD's self-supervised task on ImageNet-LT and iNat18.

A query feature f_q (the classifier network's backbone on the query view) is projected by a 2-layer
MLP and L2-normalised to q. The key view goes through a momentum ("key") encoder, an exponential
moving average of the query backbone + projection, to the normalised key k+. Against a queue of
K earlier keys the InfoNCE loss is

    logits = [q . k+, q . queue_1, ..., q . queue_K] / temperature        (N, 1 + K)
    loss   = cross_entropy(logits, 0)                                      (the positive at index 0)

SSD-LT additionally masks queued keys that carry the query's own label out of the negatives
(their logits become -inf, so they drop out of the softmax exactly).

The queue (K, dim), its labels (K,) and the write pointer are registered buffers, so progress
checkpoints carry them and a resumed stage continues with the same negatives. The pointer stays
on the device and the enqueue indexes modulo K: K need not be a multiple of the batch, a partial
last batch is simply written (wrapping around the end), and no step synchronises with the host.

Shuffled batch norm. Batch norm lets a query "recognise" its positive key through the batch
statistics both were normalised with (the MoCo paper's intra-batch information leak); MoCo breaks
the link by normalising the keys over a different set of samples than the queries:

- ``ddp``: the key batch is all-gathered, permuted with a permutation drawn on rank 0 and
  broadcast, each rank encodes its slice of the shuffled global batch, and the keys are gathered
  and unshuffled back to this rank's images;
- ``sub_batch`` (each process its own batch): the key batch is permuted and encoded in ``sub_batches`` chunks,
  each in train mode, so each key is normalised with the statistics of a random sub-batch while
  the queries are normalised over the whole batch (one GPU cannot emulate per-GPU BN otherwise);
- ``none``: plain batch norm over the whole key batch (for ablations; prone to the leak);
- ``auto``: ``ddp`` under ``torch.distributed`` with more than one rank, else ``sub_batch``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltscale.dist.gather import all_gather_no_grad, broadcast_from_rank0, rank_and_world_size

ShuffleBN = Literal["auto", "ddp", "sub_batch", "none"]


@dataclass(frozen=True)
class MoCoConfig:
    """MoCo v2 settings (the defaults are MoCo v2's and SSD-LT's).

    ``hidden_dim``: the projection MLP's hidden width; 0 means the backbone's feature dimension
    (2048 for ResNet-50 / ResNeXt-50, as in MoCo v2). ``sub_batches``: the number of chunks the key
    batch is split into for ``shuffle_bn=sub_batch`` (each chunk keeps at least 2 images).
    """

    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    projection_dim: int = 128
    hidden_dim: int = 0
    mask_same_class: bool = True
    shuffle_bn: ShuffleBN = "auto"
    sub_batches: int = 4

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"moco.queue_size must be >= 1, got {self.queue_size}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"moco.momentum must be in [0, 1], got {self.momentum}")
        if not self.temperature > 0 or self.temperature == float("inf"):  # nan fails ``> 0``
            raise ValueError(f"moco.temperature must be a finite number > 0, got {self.temperature}")
        if self.projection_dim < 1 or self.hidden_dim < 0:
            raise ValueError("moco.projection_dim must be >= 1 and moco.hidden_dim >= 0 (0: the backbone's feature dim)")
        if self.sub_batches < 1:
            raise ValueError(f"moco.sub_batches must be >= 1, got {self.sub_batches}")


def projection_head(feature_dim: int, hidden_dim: int, projection_dim: int) -> nn.Sequential:
    """MoCo v2's projection: Linear(D, H) -> ReLU -> Linear(H, P)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, projection_dim))


def info_nce_logits(
    query: torch.Tensor,
    positive_keys: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    query_labels: torch.Tensor | None = None,
    queue_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE logits with the positive at column 0, in float32.

    query, positive_keys: (N, P) normalised; queue: (K, P) normalised; labels: (N,) and (K,) int64.
    With labels, a queued key of the query's own class is masked out of the negatives (-inf).
    Returns (N, 1 + K).
    """
    with torch.autocast(query.device.type, enabled=False):  # bf16 similarities / 0.2 lose too much
        query, positive_keys, queue = query.float(), positive_keys.float(), queue.float()
        positive = (query * positive_keys).sum(dim=1, keepdim=True)  # (N, 1)
        negative = query @ queue.t()  # (N, K)
        if query_labels is not None and queue_labels is not None:
            same_class = query_labels[:, None] == queue_labels[None, :]  # (N, K)
            negative = negative.masked_fill(same_class, float("-inf"))
        return torch.cat([positive, negative], dim=1) / temperature  # (N, 1 + K)


def info_nce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of :func:`info_nce_logits` against the positive (column 0), batch mean."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


class MoCo(nn.Module):
    """The MoCo v2 parts next to a classifier network: the query projection, the momentum key
    encoder (a deep copy of the query backbone + of the query projection), and the key queue.

    The query backbone itself stays in the classifier network (it is what the task trains and the
    stage saves); :meth:`momentum_update` receives it. ``forward`` computes the InfoNCE loss of one
    step and enqueues that step's keys.
    """

    def __init__(self, config: MoCoConfig, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.config = config
        self.query_projection = projection_head(feature_dim, config.hidden_dim or feature_dim, config.projection_dim)
        # The key side starts as an exact copy of the query side and is never touched by the optimiser.
        self.key_encoder = copy.deepcopy(backbone).requires_grad_(False)
        self.key_projection = copy.deepcopy(self.query_projection).requires_grad_(False)
        queue = F.normalize(torch.randn(config.queue_size, config.projection_dim), dim=1)
        self.register_buffer("queue", queue)  # (K, P) unit rows; random until K keys were written
        # -1: an initial random key of no class, never masked as "same class".
        self.register_buffer("queue_labels", torch.full((config.queue_size,), -1, dtype=torch.long))  # (K,)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))  # the next slot to write

    def shuffle_mode(self) -> str:
        """The resolved ``shuffle_bn`` (``auto`` depends on the process group at call time)."""
        _, world_size = rank_and_world_size()
        mode = self.config.shuffle_bn
        if mode == "auto":
            return "ddp" if world_size > 1 else "sub_batch"
        if mode == "ddp" and world_size == 1:
            raise ValueError("moco.shuffle_bn=ddp needs torch.distributed with more than one rank; "
                             "use 'auto' or 'sub_batch' on one process")
        return mode

    @torch.no_grad()
    def momentum_update(self, query_backbone: nn.Module) -> None:
        """key = m * key + (1 - m) * query for every parameter of the backbone and projection.

        Buffers (batch-norm running statistics) are not averaged: the key encoder's come from its
        own forward passes, as in MoCo. Called once per step, before the keys are computed.
        """
        query = [*query_backbone.parameters(), *self.query_projection.parameters()]
        key = [*self.key_encoder.parameters(), *self.key_projection.parameters()]
        if len(query) != len(key):
            raise ValueError(f"the query backbone has {len(query)} parameter tensors, the key encoder {len(key)}")
        momentum = self.config.momentum
        torch._foreach_mul_(key, momentum)
        torch._foreach_add_(key, query, alpha=1.0 - momentum)

    def project_queries(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) query features -> (N, P) normalised queries, float32 (under bf16 autocast the
        projection is bf16; normalised in bf16, the similarities / 0.2 would be off by up to ~0.005)."""
        return F.normalize(self.query_projection(features).float(), dim=1)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projection(self.key_encoder(images)).float(), dim=1)  # (B, P), float32 as the queries

    @torch.no_grad()
    def encode_keys(self, images: torch.Tensor, permutation: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) key view -> (B, P) normalised keys, in the order of ``images``.

        ``permutation``: the shuffle for shuffled BN, (B,) on one process or (world_size * B,) under
        DDP (only rank 0's is used; it is broadcast); drawn here when None.
        """
        mode = self.shuffle_mode()
        if mode == "none":
            return self._encode(images)
        if mode == "ddp":
            return self._encode_ddp(images, permutation)
        batch = images.shape[0]
        if permutation is None:
            permutation = torch.randperm(batch, device=images.device)
        # At least 2 images per chunk: batch norm needs more than one value per channel.
        chunks = max(1, min(self.config.sub_batches, batch // 2))
        shuffled = images[permutation]
        keys = torch.cat([self._encode(chunk) for chunk in shuffled.tensor_split(chunks)])  # (B, P), shuffled order
        unshuffled = torch.empty_like(keys)
        unshuffled[permutation] = keys  # key i of the shuffled batch belongs to image permutation[i]
        return unshuffled

    @torch.no_grad()
    def _encode_ddp(self, images: torch.Tensor, permutation: torch.Tensor | None) -> torch.Tensor:
        """Shuffle across ranks: gather, permute (rank 0's permutation), encode this rank's slice,
        gather the keys, and take back the ones of this rank's images. Every rank's batch must
        have the same size (the rank samplers deal equal shares)."""
        rank, world_size = rank_and_world_size()
        gathered = all_gather_no_grad(images)  # (W * B, C, H, W)
        total = gathered.shape[0]
        if permutation is None or permutation.shape[0] != total:
            permutation = torch.randperm(total, device=images.device)
        permutation = broadcast_from_rank0(permutation.clone())  # (W * B,): rank 0's on every rank
        mine = permutation.view(world_size, -1)[rank]  # (B,) global indices this rank encodes
        keys = all_gather_no_grad(self._encode(gathered[mine]))  # (W * B, P), in shuffled order
        inverse = torch.argsort(permutation)  # global image i's key is keys[inverse[i]]
        return keys[inverse.view(world_size, -1)[rank]]  # (B, P), this rank's images in order

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write every rank's keys (B, P) and labels (B,) at the pointer, wrapping around the end."""
        keys = all_gather_no_grad(keys)  # (W * B, P)
        labels = all_gather_no_grad(labels)  # (W * B,)
        size = self.queue.shape[0]
        if keys.shape[0] > size:  # more keys than slots: the newest K survive either way
            keys, labels = keys[-size:], labels[-size:]
        slots = (self.queue_pointer + torch.arange(keys.shape[0], device=keys.device)) % size  # (W * B,)
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.queue_labels.index_copy_(0, slots, labels)
        self.queue_pointer.copy_((self.queue_pointer + keys.shape[0]) % size)

    def forward(
        self, query_features: torch.Tensor, key_images: torch.Tensor, labels: torch.Tensor,
        permutation: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One step: InfoNCE of the queries against (positive key, queue), then enqueue the keys.

        query_features: (N, D) with gradient; key_images: (N, C, H, W); labels: (N,).
        Call :meth:`momentum_update` first. Returns ``{"loss", "logits"}`` (logits (N, 1 + K)).
        """
        query = self.project_queries(query_features)  # (N, P)
        keys = self.encode_keys(key_images, permutation)  # (N, P), no gradient
        mask = self.config.mask_same_class
        # A copy of the queue: the enqueue below writes in place, and backward needs the old one.
        logits = info_nce_logits(query, keys, self.queue.clone(), self.config.temperature,
                                 labels if mask else None, self.queue_labels if mask else None)
        loss = info_nce_loss(logits)
        self.enqueue(keys, labels)
        return {"loss": loss, "logits": logits}

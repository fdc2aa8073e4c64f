"""Collectives used outside the optimiser's reach (MoCo's key queue and shuffled batch norm).

Every function here is the identity (or a trivial answer) on a single process, so the same code
runs unchanged with and without ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, WITHOUT gradient.

    ``dist.all_gather`` does not propagate gradient, and this function makes that explicit: use it
    only for values that must not be back-propagated through (MoCo's keys, labels, shuffled
    inputs). Each rank must pass a tensor of the same shape. One process: ``tensor`` itself.
    tensor: (B, ...) -> (world_size * B, ...)
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


@torch.no_grad()
def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (in place), without gradient. One process: unchanged."""
    _, world_size = rank_and_world_size()
    if world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor

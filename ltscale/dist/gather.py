"""Collectives used outside the optimiser's reach (MoCo's key queue and shuffled batch norm).

Every function here is the identity (or a trivial answer) on a single process, so the same code
runs unchanged with and without ``torch.distributed``.
"""

from __future__ import annotations

import math

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


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and tracks."""
    return rank_and_world_size()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if rank_and_world_size()[1] > 1:
        dist.barrier()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place. One process: unchanged."""
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value):
    """Rank 0's ``value`` (any picklable object) on every rank; rank 0's decision is everyone's."""
    if rank_and_world_size()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


GATHER_CHUNK_BYTES = 256 << 20
"""What each rank receives per collective in :func:`gather_strided_rows_to_main`, all ranks' rows together."""


@torch.no_grad()
def gather_strided_rows_to_main(local: torch.Tensor, total_rows: int) -> torch.Tensor | None:
    """Reassemble rows sharded round-robin (rank r holds rows r, r + W, r + 2W, ...) on rank 0
    only, in host memory, in the original order: (total_rows, ...) there, None on other ranks.
    The shards differ in length by at most one row; each is padded to the longest per collective.

    The shards travel in chunks of rows (about ``GATHER_CHUNK_BYTES`` per collective), so no rank
    ever holds more than its own shard plus one chunk on the device. iNat18's soft labels (437k x
    8,142 in fp16, 6.6 GiB) gathered whole would need ~2.5 times that on every GPU.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return local.cpu()
    per_rank = -(-total_rows // world_size)
    expected = len(range(rank, total_rows, world_size))
    if local.shape[0] != expected:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows of a {total_rows}-row round-robin shard; expected {expected}")
    tail = tuple(local.shape[1:])
    row_bytes = max(1, math.prod(tail) * local.element_size())
    chunk = max(1, GATHER_CHUNK_BYTES // (row_bytes * world_size))
    result = torch.empty((total_rows, *tail), dtype=local.dtype) if rank == 0 else None
    for start in range(0, per_rank, chunk):
        rows = min(chunk, per_rank - start)
        piece = local.new_zeros((rows, *tail))
        mine = local[start : start + rows]
        piece[: mine.shape[0]] = mine
        gathered = all_gather_no_grad(piece)  # (world_size * rows, ...): rank r's block r
        if result is not None:
            blocks = gathered.view(world_size, rows, *tail).cpu()
            for source in range(world_size):  # rank r's local row i is global row i * W + r
                positions = torch.arange(start, start + rows) * world_size + source
                valid = positions < total_rows
                result[positions[valid]] = blocks[source][valid]
    return result


def all_gather_object(value) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank. One process: ``[value]``."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values

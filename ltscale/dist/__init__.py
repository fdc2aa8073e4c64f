"""Process-group helpers and collectives; each gather says in its name whether it carries gradient."""

from ltscale.dist.gather import all_gather_no_grad, broadcast_from_rank0, rank_and_world_size

__all__ = ["all_gather_no_grad", "broadcast_from_rank0", "rank_and_world_size"]

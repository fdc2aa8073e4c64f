"""Soft labels: the re-balanced teacher's logits on every training image, stored once."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ltscale.dist.gather import all_reduce_sum, gather_strided_rows_to_main, rank_and_world_size
from ltscale.engine.checkpoint import atomic_save, load_checkpoint
from ltscale.stages.config import SoftLabelsConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.store import StageOutput

SOFT_LABELS_KIND = "ltscale.soft_labels"
# Above this many values the logits are stored in fp16 (iNat18: 437k x 8142 would be 14 GB in fp32).
FP16_ABOVE = 50_000_000


@torch.no_grad()
def predicted_logits(network, loader, device, autocast) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``(logits of the predicted head, batch)`` for each batch of ``loader``, in its order.

    ``loader`` is a sequential evaluation loader; in a multi-process run it reads this rank's
    round-robin shard. Consumers reduce or store each batch as it comes, so no pass holds every
    image's logits at full precision (iNat18: 437k x 8,142 in fp32 is 13 GiB).
    """
    network.eval()
    for batch in loader:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = network(batch["image"].to(device), heads=(network.predict_head,))
        yield out[network.predict_head], batch


def storage_dtype(rows: int, classes: int) -> torch.dtype:
    """fp16 above ``FP16_ABOVE`` values (logits of a trained network are far inside fp16's range)."""
    return torch.float16 if rows * classes > FP16_ABOVE else torch.float32


def run(config: SoftLabelsConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    network = load_model(inputs["source"].file("model"), ctx.device)
    rows, classes = len(ctx.bundle.train), ctx.bundle.num_classes
    dtype = storage_dtype(rows, classes)
    rank, world_size = rank_and_world_size()
    # This rank's shard, filled in place as the batches come (no list of chunks to concatenate).
    local = torch.empty((len(range(rank, rows, world_size)), classes), dtype=dtype, device=ctx.device)
    tally = torch.zeros(4, dtype=torch.int64, device=ctx.device)  # correct, images, non-finite values, short ranks
    filled = 0
    for logits, batch in predicted_logits(network, ctx.eval_loader(ctx.bundle.train, substitute=True), ctx.device, ctx.autocast):
        stored = logits.to(dtype)  # checked as stored: fp16 can overflow where fp32 did not
        local[filled : filled + len(stored)] = stored
        filled += len(stored)
        tally[0] += (stored.argmax(1) == batch["target"].to(ctx.device)).sum()
        tally[1] += len(stored)
        tally[2] += (~torch.isfinite(stored)).sum()
    tally[3] = int(filled != local.shape[0])  # known to every rank after the sum: none raises alone
    correct, images, nonfinite, short = (int(v) for v in all_reduce_sum(tally).tolist())
    if short:
        raise RuntimeError(f"stage {ctx.name}: {short} rank(s) did not predict their whole shard of the training split "
                           f"(rank {rank}: {filled} of {local.shape[0]} images); the evaluation loader dropped images")
    if nonfinite:  # every rank knows, after the sum: all of them stop here, none waits in a collective
        raise ValueError(f"stage {ctx.name}: the soft labels of {inputs['source'].name!r} are not all finite "
                         f"({nonfinite} values, stored as {dtype}); the source model diverged or overflows {dtype}")
    logits = gather_strided_rows_to_main(local, rows)  # rank 0 alone holds them all, in host memory
    del local
    if logits is not None:
        atomic_save(
            {"kind": SOFT_LABELS_KIND, "logits": logits, "train_fingerprint": ctx.bundle.train.fingerprint()},
            ctx.directory / "soft_labels.pt",
        )
    top1 = correct / max(images, 1)
    ctx.record.log_metrics({"soft_labels/train_top1": 100 * top1})
    ctx.metrics["soft_labels/train_top1"] = 100 * top1
    return {"soft_labels": "soft_labels.pt"}


DEVICE_SHARE = 0.25
"""Soft labels larger than this share of a GPU's memory stay in host memory when the step allows."""


def soft_label_device(table_bytes: int, device: torch.device, step: str) -> torch.device:
    """Where the student looks its soft labels up: on the GPU (one gather per step, no host
    round trip) unless the table is large for it, then in host memory, where the memory-mapped
    file is one page cache shared by every rank of the node.

    ``step`` is the trainer's resolved step: the fast step is one CUDA graph, which cannot read
    host memory, so it keeps the table on the GPU whatever its size.
    """
    if device.type != "cuda" or step == "fast":
        return device
    if table_bytes <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory:
        return device
    return torch.device("cpu")


def load_soft_labels(output: StageOutput, expected_fingerprint: str, expected_rows: int) -> torch.Tensor:
    path = output.file("soft_labels")
    # Memory-mapped: the ranks of a node share one page cache of the file instead of each reading
    # a private copy (iNat18: 6.6 GiB per rank).
    payload = load_checkpoint(path, kind=SOFT_LABELS_KIND, required=("logits", "train_fingerprint"), mmap=True)
    if payload["train_fingerprint"] != expected_fingerprint or payload["logits"].shape[0] != expected_rows:
        raise ValueError(
            f"soft labels {path} were computed on a different training set (fingerprint "
            f"{payload['train_fingerprint']}, {payload['logits'].shape[0]} rows; expected {expected_fingerprint}, {expected_rows})"
        )
    return payload["logits"]

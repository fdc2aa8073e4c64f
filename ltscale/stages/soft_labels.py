"""Soft labels: the re-balanced teacher's logits on every training image, stored once."""

from __future__ import annotations

import torch

from ltscale.dist.gather import gather_strided_rows
from ltscale.engine.checkpoint import atomic_save, load_checkpoint
from ltscale.stages.config import SoftLabelsConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.store import StageOutput

SOFT_LABELS_KIND = "ltscale.soft_labels"
# Above this many values the logits are stored in fp16 (iNat18: 437k x 8142 would be 14 GB in fp32).
FP16_ABOVE = 50_000_000


@torch.no_grad()
def predict_logits(network, loader, device, autocast, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, C) logits of the network's predicted head, in dataset order, on the device, as ``dtype``.

    ``loader`` is a sequential evaluation loader over an N-image split; in a multi-process run it
    reads this rank's round-robin shard, and the shards are gathered so every rank gets all N rows.
    Each batch is cast as it comes, so fp16 halves the peak memory, gathered copy included.
    """
    network.eval()
    chunks = []
    for batch in loader:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = network(batch["image"].to(device), heads=(network.predict_head,))
        chunks.append(out[network.predict_head].to(dtype))
    return gather_strided_rows(torch.cat(chunks), len(loader.split))


def storage_dtype(rows: int, classes: int) -> torch.dtype:
    """fp16 above ``FP16_ABOVE`` values (logits of a trained network are far inside fp16's range)."""
    return torch.float16 if rows * classes > FP16_ABOVE else torch.float32


def run(config: SoftLabelsConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    network = load_model(inputs["source"].file("model"), ctx.device)
    dtype = storage_dtype(len(ctx.bundle.train), ctx.bundle.num_classes)
    logits = predict_logits(network, ctx.eval_loader(ctx.bundle.train, substitute=True), ctx.device, ctx.autocast, dtype)
    if not torch.isfinite(logits).all():
        raise ValueError(f"stage {ctx.name}: the soft labels of {inputs['source'].name!r} are not all finite "
                         f"(stored as {dtype}); the source model diverged or overflows {dtype}")
    if ctx.is_main:  # every rank has gathered the same logits; one writer
        atomic_save(
            {"kind": SOFT_LABELS_KIND, "logits": logits.cpu(), "train_fingerprint": ctx.bundle.train.fingerprint()},
            ctx.directory / "soft_labels.pt",
        )
    top1 = (logits.argmax(1).cpu() == torch.from_numpy(ctx.bundle.train.targets)).float().mean().item()
    ctx.run.log_metrics({"soft_labels/train_top1": 100 * top1})
    ctx.metrics["soft_labels/train_top1"] = 100 * top1
    return {"soft_labels": "soft_labels.pt"}


def load_soft_labels(output: StageOutput, expected_fingerprint: str, expected_rows: int) -> torch.Tensor:
    path = output.file("soft_labels")
    payload = load_checkpoint(path, kind=SOFT_LABELS_KIND, required=("logits", "train_fingerprint"))
    if payload["train_fingerprint"] != expected_fingerprint or payload["logits"].shape[0] != expected_rows:
        raise ValueError(
            f"soft labels {path} were computed on a different training set (fingerprint "
            f"{payload['train_fingerprint']}, {payload['logits'].shape[0]} rows; expected {expected_fingerprint}, {expected_rows})"
        )
    return payload["logits"]

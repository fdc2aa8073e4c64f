"""Exact evaluation: top-1 / top-5, per-class accuracy and many / medium / few groups.

Every test image is counted exactly once (no padded duplicates: padding would skew the per-class
accuracy of few-shot classes). Per-class hit counts are accumulated on the device and read once.
Group accuracy is the mean of the per-class accuracies of the group's classes, as in the
classifier-balancing code; on balanced test sets this equals the sample-level accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ltscale.data.base import ClassGroups
from ltscale.dist.gather import all_reduce_sum


@dataclass
class EvalResult:
    per_class_top1: np.ndarray  # (C,) accuracy in [0, 1]; NaN for classes absent from the test set
    per_class_count: np.ndarray  # (C,) test images per class
    top1: float
    top5: float
    many: float
    medium: float
    few: float

    def metrics(self, prefix: str) -> dict[str, float]:
        """Percentages under the metric names every method shares (``test/top1``, ``test/few``...)."""
        values = {"top1": self.top1, "top5": self.top5, "many": self.many, "medium": self.medium, "few": self.few}
        return {f"{prefix}/{name}": round(100.0 * value, 4) for name, value in values.items() if not np.isnan(value)}


def _group_mean(per_class: np.ndarray, classes: np.ndarray) -> float:
    values = per_class[classes]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


@torch.no_grad()
def evaluate(
    network: torch.nn.Module,
    loader,
    train_class_counts: np.ndarray,
    heads: list[str],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, EvalResult]:
    """Evaluate each head in ``heads`` over one full pass of ``loader`` (a sequential loader; in a
    multi-process run, this rank's shard of the split, and every rank gets the whole result)."""
    was_training = network.training
    network.eval()
    num_classes = len(train_class_counts)
    hits1 = {h: torch.zeros(num_classes, device=device) for h in heads}
    hits5 = {h: torch.zeros(num_classes, device=device) for h in heads}
    totals = torch.zeros(num_classes, device=device)
    for batch in loader:
        images, targets = batch["image"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            outputs = network(images, heads=tuple(heads))
        totals.index_add_(0, targets, torch.ones_like(targets, dtype=totals.dtype))
        for head in heads:
            logits = outputs[head].float()
            topk = logits.topk(min(5, num_classes), dim=1).indices
            correct = topk == targets[:, None]
            hits1[head].index_add_(0, targets, correct[:, 0].float())
            hits5[head].index_add_(0, targets, correct.any(dim=1).float())
    network.train(was_training)
    # Under DDP each rank has seen its own unpadded shard: one all-reduce of every count gives
    # exactly the single-process result, each test image counted once.
    stacked = all_reduce_sum(torch.stack([totals, *(hits1[h] for h in heads), *(hits5[h] for h in heads)]))
    totals, stacked_hits = stacked[0], stacked[1:].cpu().numpy()  # host sync: once per evaluation
    host_hits1 = {h: stacked_hits[i] for i, h in enumerate(heads)}
    host_hits5 = {h: stacked_hits[len(heads) + i] for i, h in enumerate(heads)}
    counts = totals.cpu().numpy()
    groups = ClassGroups.from_counts(train_class_counts)
    results = {}
    for head in heads:
        h1, h5 = host_hits1[head], host_hits5[head]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(counts > 0, h1 / counts, np.nan)
        results[head] = EvalResult(
            per_class_top1=per_class,
            per_class_count=counts.astype(np.int64),
            top1=float(h1.sum() / max(counts.sum(), 1)),
            top5=float(h5.sum() / max(counts.sum(), 1)),
            many=_group_mean(per_class, groups.many),
            medium=_group_mean(per_class, groups.medium),
            few=_group_mean(per_class, groups.few),
        )
    return results

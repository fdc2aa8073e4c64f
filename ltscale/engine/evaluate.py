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


class HitCounter:
    """Per-class top-1 / top-5 hits of some heads, accumulated on the device over batches."""

    def __init__(self, heads: list[str], num_classes: int, device: torch.device) -> None:
        self.heads = list(heads)
        self.num_classes = num_classes
        self.hits1 = {h: torch.zeros(num_classes, device=device) for h in heads}
        self.hits5 = {h: torch.zeros(num_classes, device=device) for h in heads}
        self.totals = torch.zeros(num_classes, device=device)

    def add(self, targets: torch.Tensor, logits: dict[str, torch.Tensor]) -> None:
        self.totals.index_add_(0, targets, torch.ones_like(targets, dtype=self.totals.dtype))
        for head in self.heads:
            topk = logits[head].float().topk(min(5, self.num_classes), dim=1).indices
            correct = topk == targets[:, None]
            self.hits1[head].index_add_(0, targets, correct[:, 0].float())
            self.hits5[head].index_add_(0, targets, correct.any(dim=1).float())

    def results(self, train_class_counts: np.ndarray) -> dict[str, EvalResult]:
        """Every rank's counts summed (each image counted once), as :class:`EvalResult` per head."""
        # Under DDP each rank has seen its own unpadded shard: one all-reduce of every count gives
        # exactly the single-process result, each test image counted once.
        heads = self.heads
        stacked = all_reduce_sum(torch.stack([self.totals, *(self.hits1[h] for h in heads), *(self.hits5[h] for h in heads)]))
        stacked = stacked.cpu().numpy()  # host sync: once per evaluation
        counts = stacked[0]
        groups = ClassGroups.from_counts(train_class_counts)
        results = {}
        for index, head in enumerate(heads):
            h1, h5 = stacked[1 + index], stacked[1 + len(heads) + index]
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class = np.where(counts > 0, h1 / counts, np.nan)
            results[head] = EvalResult(
                per_class_top1=per_class,
                per_class_count=counts.astype(np.int64),
                top1=float(h1.sum() / max(counts.sum(), 1)),
                # With 5 classes or fewer every image is in its top 5: 100 % says nothing, so none.
                top5=float(h5.sum() / max(counts.sum(), 1)) if self.num_classes > 5 else float("nan"),
                many=_group_mean(per_class, groups.many),
                medium=_group_mean(per_class, groups.medium),
                few=_group_mean(per_class, groups.few),
            )
        return results


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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
    counter = HitCounter(heads, len(train_class_counts), device)
    for batch in loader:
        images, targets = batch["image"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            outputs = network(images, heads=tuple(heads))
        counter.add(targets, outputs)
    network.train(was_training)
    return counter.results(train_class_counts)


@torch.no_grad()
def extract_features(network: torch.nn.Module, loader, device: torch.device,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets of one full pass of ``loader`` (this rank's shard), kept on ``device``.

    For choices that only change a head (tau-norm's tau): one pass of the backbone instead of one
    per candidate. The features keep the dtype the backbone produced under ``autocast_dtype``, so
    heads applied to them under the same autocast give what :func:`evaluate` would.
    """
    was_training = network.training
    network.eval()
    features, targets = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            features.append(network(images, heads=())["features"])
        targets.append(batch["target"].to(device, non_blocking=True))
    network.train(was_training)
    if not features:
        # A rank's shard of a split smaller than the number of ranks is empty; it still takes part
        # in the collectives that count the other ranks' hits (raising here would leave them waiting).
        dim = getattr(network, "feature_dim", None)
        if dim is None:
            raise ValueError("extract_features: the loader yielded no batches")
        return torch.empty((0, dim), device=device), torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(features), torch.cat(targets)


@torch.no_grad()
def evaluate_head_on_features(head: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                              train_class_counts: np.ndarray, device: torch.device,
                              autocast_dtype: torch.dtype | None = None, chunk: int = 4096) -> EvalResult:
    """:func:`evaluate` of one head on features from :func:`extract_features` (all ranks' shards counted)."""
    counter = HitCounter(["head"], len(train_class_counts), device)
    for start in range(0, len(features), chunk):
        with _autocast(device, autocast_dtype):
            logits = head(features[start : start + chunk])
        counter.add(targets[start : start + chunk], {"head": logits})
    return counter.results(train_class_counts)["head"]

"""The evaluation numbers against hand-counted values: top-1 over images, top-5, per-class accuracy
and the many / medium / few means, on a split that is unbalanced, misses a class and spans all three
groups (the synthetic and CIFAR test sets are balanced, where several wrong definitions agree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ltscale.data.base import ClassGroups
from ltscale.engine.evaluate import HitCounter


def test_class_groups_at_their_boundaries():
    """Many: more than 100 training images; medium: 20 to 100 inclusive; few: fewer than 20."""
    groups = ClassGroups.from_counts(np.array([101, 100, 20, 19, 500, 1]))
    assert groups.as_dict() == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}


def _ranked_logits(classes: int, order: list[int]) -> torch.Tensor:
    """One row whose classes rank in ``order`` (first = top-1)."""
    row = torch.zeros(classes)
    row[torch.tensor(order)] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return row


def test_hit_counter_hand_counted_on_an_unbalanced_split():
    classes = 10
    # Train counts: classes 0-2 many, 3-5 medium, 6-9 few.
    train_counts = np.array([300, 200, 150, 80, 50, 20, 15, 10, 5, 2])
    # Test images (target, rank of the target in the prediction, 1 = top-1). Class 9 has none.
    images = [
        (0, 1), (0, 1), (0, 1), (0, 2),  # class 0: 3 of 4 right, 4 of 4 in the top 5
        (1, 6),                          # class 1: wrong, outside the top 5
        (2, 1),                          # class 2: right
        (3, 5), (3, 1),                  # class 3: 1 of 2; both in the top 5
        (4, 1),
        (5, 7),
        (6, 1), (6, 1), (6, 3),
        (7, 2),
        (8, 1),
    ]
    targets = torch.tensor([target for target, _ in images])
    rows = []
    for target, rank in images:
        others = [c for c in range(classes) if c != target]
        order = others[: rank - 1] + [target] + others[rank - 1 :]
        rows.append(_ranked_logits(classes, order))
    counter = HitCounter(["cls"], classes, torch.device("cpu"))
    counter.add(targets[:7], {"cls": torch.stack(rows[:7])})  # two batches, as a loader feeds them
    counter.add(targets[7:], {"cls": torch.stack(rows[7:])})
    result = counter.results(train_counts)["cls"]

    right = [rank == 1 for _, rank in images]
    in_top5 = [rank <= 5 for _, rank in images]
    assert result.top1 == pytest.approx(sum(right) / len(images))  # 9 / 15, over images
    assert result.top5 == pytest.approx(sum(in_top5) / len(images))  # 13 / 15
    per_class = {c: [r for (t, _), r in zip(images, right) if t == c] for c in range(classes)}
    expected = np.array([np.mean(v) if v else np.nan for v in per_class.values()])
    np.testing.assert_allclose(result.per_class_top1, expected)  # NaN where the class has no test image
    assert np.isnan(result.per_class_top1[9])
    np.testing.assert_array_equal(result.per_class_count, [len(per_class[c]) for c in range(classes)])
    # Group means are means of per-class accuracies; the absent class 9 is left out of "few".
    assert result.many == pytest.approx(np.mean([3 / 4, 0, 1]))
    assert result.medium == pytest.approx(np.mean([1 / 2, 1, 0]))
    assert result.few == pytest.approx(np.mean([2 / 3, 0, 1]))
    # On this split the image-level and class-level means differ, so the test tells them apart.
    assert result.top1 != pytest.approx(np.nanmean(expected))
    metrics = result.metrics("test")
    assert metrics == {"test/top1": 60.0, "test/top5": pytest.approx(86.6667, abs=1e-4), "test/many": pytest.approx(58.3333, abs=1e-4),
                       "test/medium": 50.0, "test/few": pytest.approx(55.5556, abs=1e-4)}


def test_a_group_without_test_images_is_left_out_of_the_metrics():
    counter = HitCounter(["cls"], 6, torch.device("cpu"))
    counter.add(torch.tensor([0, 1]), {"cls": torch.eye(6)[[0, 2]]})  # class 0 right, class 1 wrong
    result = counter.results(np.array([500, 400, 50, 50, 3, 3]))["cls"]
    assert np.isnan(result.medium) and np.isnan(result.few)
    assert result.many == pytest.approx(0.5)
    assert set(result.metrics("test")) == {"test/top1", "test/top5", "test/many"}

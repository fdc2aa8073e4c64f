"""Traversal orders of the samplers (in the style of ffcv's ``tests/test_traversal_orders.py``).

Ranks are simulated by building one sampler per rank with the same (seed, epoch): the samplers
never communicate, so this is exactly what 1-4 processes would see.

Run:  python -m pytest tests/test_samplers.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ltscale.data.config import SamplerConfig
from ltscale.data.samplers import ClassBalancedSampler, InstanceBalancedSampler, build_sampler

WORLD_SIZES = [1, 2, 3, 4]


def _ranks(make, world_size: int, epoch: int = 0) -> list[np.ndarray]:
    samplers = [make(rank, world_size) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [np.array(list(iter(sampler))) for sampler in samplers]


def _instance(size: int, seed: int = 0):
    return lambda rank, world: InstanceBalancedSampler(size, seed=seed, rank=rank, world_size=world)


def _long_tailed_targets(counts: list[int], seed: int = 0) -> np.ndarray:
    targets = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(targets)


# ---- instance-balanced ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_instance_full_coverage_no_duplicates_when_divisible(world_size):
    size = 96  # divisible by 1, 2, 3 and 4
    for epoch in range(3):
        per_rank = _ranks(_instance(size), world_size, epoch)
        assert all(len(indices) == size // world_size for indices in per_rank)
        union = np.concatenate(per_rank)
        assert len(union) == size
        np.testing.assert_array_equal(np.sort(union), np.arange(size))  # every index exactly once


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_instance_pads_by_wrapping_when_not_divisible(world_size):
    size = 97  # prime: never divisible
    per_rank_len = math.ceil(size / world_size)
    global_order = InstanceBalancedSampler(size, seed=5).global_order(2)
    per_rank = _ranks(_instance(size, seed=5), world_size, epoch=2)
    assert [len(indices) for indices in per_rank] == [per_rank_len] * world_size
    # rank r holds positions r, r + W, r + 2W, ... of the global order padded by its own start
    interleaved = np.stack(per_rank, axis=1).ravel()
    padding = per_rank_len * world_size - size
    np.testing.assert_array_equal(interleaved, np.concatenate([global_order, global_order[:padding]]))
    counts = np.bincount(interleaved, minlength=size)
    assert counts.min() == 1  # full coverage
    assert counts.sum() - size == padding  # the only duplicates are the wrapped padding
    assert sorted(np.flatnonzero(counts == 2)) == sorted(global_order[:padding])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_instance_len_matches_iteration(world_size):
    for size in (1, 7, 96, 97):
        for rank in range(world_size):
            sampler = InstanceBalancedSampler(size, rank=rank, world_size=world_size)
            assert len(sampler) == len(list(sampler)) == math.ceil(size / world_size)


def test_instance_order_changes_per_epoch_and_is_reproducible():
    sampler = InstanceBalancedSampler(200, seed=3)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert all(sorted(order) == list(range(200)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4  # a fresh order every epoch
    assert orders[0] != list(range(200))  # actually shuffled
    fresh = InstanceBalancedSampler(200, seed=3)
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]  # same (seed, epoch) -> same order, in a new process too
    other_seed = InstanceBalancedSampler(200, seed=4)
    other_seed.set_epoch(2)
    assert list(other_seed) != orders[2]


def test_instance_without_shuffle_is_in_order_and_sharded():
    per_rank = _ranks(lambda r, w: InstanceBalancedSampler(10, rank=r, world_size=w, shuffle=False), 3, epoch=4)
    assert [indices.tolist() for indices in per_rank] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]


def test_invalid_rank_rejected():
    with pytest.raises(ValueError, match="rank 2 is not valid for world_size 2"):
        InstanceBalancedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size 0"):
        InstanceBalancedSampler(10, rank=0, world_size=0)


# ---- class-balanced -------------------------------------------------------------------------------


def test_class_balanced_class_frequencies_are_uniform():
    counts = [400, 120, 30, 9, 5, 1]  # long-tailed, one class with a single image
    targets = _long_tailed_targets(counts)
    draws = 60_000
    sampler = ClassBalancedSampler(targets, seed=1, num_samples=draws)
    drawn = targets[sampler.indices(0)]
    frequency = np.bincount(drawn, minlength=len(counts)) / draws
    p = 1.0 / len(counts)
    sigma = math.sqrt(p * (1 - p) / draws)  # binomial std of a class frequency
    assert np.all(np.abs(frequency - p) < 5 * sigma), (frequency, 5 * sigma)


def test_class_balanced_frequencies_with_samples_per_class():
    counts = [300, 40, 7, 3]
    targets = _long_tailed_targets(counts, seed=2)
    per_class, draws = 4, 20_000
    sampler = ClassBalancedSampler(targets, samples_per_class=per_class, seed=0, num_samples=draws * per_class)
    drawn = targets[sampler.indices(0)].reshape(draws, per_class)
    frequency = np.bincount(drawn[:, 0], minlength=len(counts)) / draws  # one class draw per chunk
    p = 1.0 / len(counts)
    assert np.all(np.abs(frequency - p) < 5 * math.sqrt(p * (1 - p) / draws)), frequency


@pytest.mark.parametrize("num_samples", [400, 401, 403])
def test_samples_per_class_consecutive_samples_share_a_class(num_samples):
    targets = _long_tailed_targets([50, 20, 6, 2], seed=3)
    order = ClassBalancedSampler(targets, samples_per_class=4, seed=7, num_samples=num_samples).indices(1)
    assert len(order) == num_samples
    labels = targets[order]
    for start in range(0, num_samples, 4):
        chunk = labels[start : start + 4]
        assert np.all(chunk == chunk[0]), (start, chunk)
    # chunks are not all the same class (the draw really varies)
    assert len(set(labels[::4].tolist())) == 4


@pytest.mark.parametrize("samples_per_class", [1, 3])
def test_class_balanced_cycles_through_a_class_before_repeating(samples_per_class):
    targets = _long_tailed_targets([60, 5, 13], seed=4)
    sampler = ClassBalancedSampler(targets, samples_per_class=samples_per_class, seed=2, num_samples=900)
    order = sampler.indices(0)
    for c, size in ((1, 5), (2, 13)):
        pool = set(np.flatnonzero(targets == c).tolist())
        seen = [i for i in order.tolist() if targets[i] == c]
        assert len(seen) >= 3 * size  # enough draws to see several cycles
        cycles = [seen[k : k + size] for k in range(0, len(seen) - size + 1, size)]
        for cycle in cycles:
            assert set(cycle) == pool  # every image of the class once per cycle, no early repeat
        assert len({tuple(cycle) for cycle in cycles}) > 1  # re-shuffled at each wrap


def test_class_balanced_default_length_and_epoch_and_seed_dependence():
    targets = _long_tailed_targets([80, 20, 5], seed=5)
    sampler = ClassBalancedSampler(targets, seed=0)
    assert len(sampler) == len(targets) == len(list(sampler))
    assert not np.array_equal(sampler.indices(0), sampler.indices(1))
    np.testing.assert_array_equal(sampler.indices(3), ClassBalancedSampler(targets, seed=0).indices(3))
    assert not np.array_equal(sampler.indices(3), ClassBalancedSampler(targets, seed=1).indices(3))


@pytest.mark.parametrize("samples_per_class", [1, 2, 4])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_class_balanced_length_is_what_each_rank_yields(samples_per_class, world_size):
    """The trainer's steps per epoch (and the lr schedule's length) come from len(sampler): it must
    count what the rank really yields, whole draws dealt over the ranks."""
    targets = _long_tailed_targets([50, 20, 6, 2], seed=3)
    for num_samples in (78, 401):
        lengths = []
        for rank in range(world_size):
            sampler = ClassBalancedSampler(targets, samples_per_class=samples_per_class, seed=1, rank=rank,
                                           world_size=world_size, num_samples=num_samples)
            sampler.set_epoch(2)
            lengths.append(len(list(sampler)))
            assert len(sampler) == lengths[-1], (num_samples, rank)
        draws = -(-num_samples // samples_per_class)  # one process cuts the last draw at num_samples
        expected = num_samples if world_size == 1 else -(-draws // world_size) * samples_per_class
        assert lengths == [expected] * world_size


def test_class_balanced_skips_classes_without_images():
    targets = np.array([0, 0, 0, 2, 2, 4])  # classes 1 and 3 are empty
    order = ClassBalancedSampler(targets, seed=0, num_samples=3000).indices(0)
    labels = targets[order]
    assert set(labels.tolist()) == {0, 2, 4}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_class_balanced_ranks_deal_whole_draws_round_robin(world_size):
    targets = _long_tailed_targets([70, 21, 8, 3], seed=6)  # 102 images = 51 draws of 2
    s = 2
    make = lambda r, w: ClassBalancedSampler(targets, samples_per_class=s, seed=9, rank=r, world_size=w)  # noqa: E731
    per_rank = _ranks(make, world_size, epoch=1)
    draws = math.ceil(len(targets) / s)
    per_rank_len = math.ceil(draws / world_size) * s
    assert [len(indices) for indices in per_rank] == [per_rank_len] * world_size
    global_order = make(0, 1).indices(1)
    assert len(global_order) == len(targets)
    # Every rank's groups of s consecutive samples are whole draws of one class...
    for indices in per_rank:
        assert all(len(set(targets[g].tolist())) == 1 for g in indices.reshape(-1, s))
    # ...and dealing the draws round-robin over the ranks rebuilds the global order (+ wrap padding).
    rows = [indices.reshape(-1, s) for indices in per_rank]
    interleaved = np.stack(rows, axis=1).reshape(-1)
    assert len(interleaved) == per_rank_len * world_size
    np.testing.assert_array_equal(interleaved[: len(targets)], global_order)
    np.testing.assert_array_equal(interleaved[len(targets) :], global_order[: len(interleaved) - len(targets)])


@pytest.mark.parametrize("class_order", ["random", "cycle"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_a_ragged_last_draw_is_completed_from_its_own_class_on_several_ranks(world_size, class_order):
    # 121 images = 30 draws of 4 and a ragged one of 1: on several ranks the last draw is made whole
    # from its own class (padding it with the epoch's first images mixed another class in).
    targets = _long_tailed_targets([70, 30, 15, 6], seed=4)
    s = 4
    make = lambda r, w: ClassBalancedSampler(targets, samples_per_class=s, seed=1, rank=r, world_size=w,  # noqa: E731
                                             class_order=class_order)
    global_order = make(0, 1).indices(1)
    per_rank = _ranks(make, world_size, epoch=1)
    for indices in per_rank:
        assert all(len(set(targets[g].tolist())) == 1 for g in indices.reshape(-1, s))
    interleaved = np.stack([indices.reshape(-1, s) for indices in per_rank], axis=1).reshape(-1)
    np.testing.assert_array_equal(interleaved[: len(targets)], global_order)
    whole = math.ceil(len(targets) / s) * s
    assert targets[interleaved[len(targets) - 1]] == targets[interleaved[whole - 1]]  # the completed draw
    # what pads the ranks to equal length are whole draws from the start of the epoch
    np.testing.assert_array_equal(interleaved[whole:], interleaved[: len(interleaved) - whole])


@pytest.mark.parametrize("samples_per_class", [1, 3])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_class_cycle_draws_every_class_once_per_pass_on_every_rank_count(samples_per_class, world_size):
    counts = [500, 90, 17, 4, 1]
    targets = _long_tailed_targets(counts, seed=8)
    num_classes, s = len(counts), samples_per_class
    make = lambda r, w: ClassBalancedSampler(targets, samples_per_class=s, seed=3, rank=r, world_size=w,  # noqa: E731
                                             class_order="cycle")
    global_order = make(0, 1).indices(2)
    classes = targets[global_order][::s]  # the class of each draw, in order
    # every full pass of num_classes draws holds each class exactly once (classifier-balancing's
    # RandomCycleIter) and the passes are re-shuffled
    passes = classes[: len(classes) // num_classes * num_classes].reshape(-1, num_classes)
    assert len(passes) >= 20
    assert all(sorted(row.tolist()) == list(range(num_classes)) for row in passes)
    assert len({tuple(row) for row in passes}) > 1
    counts_drawn = np.bincount(classes, minlength=num_classes)
    assert counts_drawn.max() - counts_drawn.min() <= 1  # 'random' would spread by ~sqrt(draws / C)
    # over the ranks: the draws are dealt whole, and together they are the global order (+ wrap)
    per_rank = _ranks(make, world_size, epoch=2)
    for indices in per_rank:
        assert all(len(set(targets[g].tolist())) == 1 for g in indices.reshape(-1, s))
    interleaved = np.stack([indices.reshape(-1, s) for indices in per_rank], axis=1).reshape(-1)
    np.testing.assert_array_equal(interleaved[: len(targets)], global_order)
    # within a class the images still cycle before repeating (the tail class with 4 images)
    seen = [i for i in global_order.tolist() if targets[i] == 3]
    pool = set(np.flatnonzero(targets == 3).tolist())
    assert all(set(seen[k : k + 4]) == pool for k in range(0, len(seen) - 3, 4))


def test_class_cycle_is_reproducible_and_config_checked():
    targets = _long_tailed_targets([40, 10, 3], seed=1)
    config = SamplerConfig(kind="class_balanced", class_order="cycle")
    sampler = build_sampler(config, targets, seed=5)
    assert sampler.class_order == "cycle"
    np.testing.assert_array_equal(sampler.indices(1), build_sampler(config, targets, seed=5).indices(1))
    assert not np.array_equal(sampler.indices(1), sampler.indices(2))
    with pytest.raises(ValueError, match="sampler.class_order=cycle orders class draws; it needs sampler.kind=class_balanced"):
        SamplerConfig(class_order="cycle")
    # The instance sampler ignores samples_per_class too (it would only have changed the stage's key).
    with pytest.raises(ValueError, match="sampler.samples_per_class=4 groups class draws; it needs sampler.kind=class_balanced, not instance"):
        SamplerConfig(samples_per_class=4)
    with pytest.raises(ValueError, match="class_order must be 'random' or 'cycle', got 'sorted'"):
        ClassBalancedSampler(targets, class_order="sorted")


def test_class_order_at_its_default_keeps_stored_stage_keys():
    from ltscale.config import config_hash

    plain = SamplerConfig(kind="class_balanced")
    assert config_hash(plain) == config_hash({"kind": "class_balanced", "samples_per_class": 1})
    assert config_hash(SamplerConfig(kind="class_balanced", class_order="cycle")) != config_hash(plain)


# ---- building and DataLoader integration --------------------------------------------------------


def test_build_sampler_follows_the_config():
    targets = _long_tailed_targets([30, 10, 3])
    instance = build_sampler(SamplerConfig(), targets, seed=4, rank=1, world_size=2)
    assert isinstance(instance, InstanceBalancedSampler) and (instance.rank, instance.world_size, instance.seed) == (1, 2, 4)
    balanced = build_sampler(SamplerConfig(kind="class_balanced", samples_per_class=4), targets, seed=4)
    assert isinstance(balanced, ClassBalancedSampler) and balanced.samples_per_class == 4
    ordered = build_sampler(SamplerConfig(), targets, seed=4, shuffle=False)
    assert list(ordered) == list(range(len(targets)))


@pytest.mark.parametrize("kind", ["instance", "class_balanced"])
def test_torch_dataloader_accepts_the_samplers(kind):
    targets = _long_tailed_targets([40, 12, 4])
    dataset = torch.utils.data.TensorDataset(torch.arange(len(targets)), torch.from_numpy(targets))
    for rank in range(2):
        sampler = build_sampler(SamplerConfig(kind=kind), targets, seed=11, rank=rank, world_size=2)
        sampler.set_epoch(3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=5, sampler=sampler)
        indices = torch.cat([batch_index for batch_index, _ in loader])
        assert indices.tolist() == sampler.indices(3).tolist()
        assert len(loader) == math.ceil(len(sampler) / 5)

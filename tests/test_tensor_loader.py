"""The tensor (GPU-resident) loader, run on CPU: batched augmentation, normalisation, epoch plans.

The batched crop/flip is compared with torchvision's per-sample transforms for the same random
parameters (exact uint8 equality); the rotation task's batched rotation with per-sample rot90.

Run:  python -m pytest tests/test_tensor_loader.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ltscale.data.base import ArraySplit, Normalization
from ltscale.data.loaders.tensor import TensorLoader, cutout, random_crop_flip
from ltscale.data.samplers import ClassBalancedSampler, InstanceBalancedSampler
from ltscale.stages.tasks import rotate_batch

CPU = torch.device("cpu")
NORMALIZATION = Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(counts: list[int], height: int = 8, width: int = 8, seed: int = 0) -> ArraySplit:
    rng = np.random.default_rng(seed)
    targets = rng.permutation(np.concatenate([np.full(n, c) for c, n in enumerate(counts)]))
    images = rng.integers(0, 256, size=(len(targets), height, width, 3), dtype=np.uint8)
    return ArraySplit(name="toy/train", targets=targets, num_classes=len(counts), images=images)


def _loader(split: ArraySplit, sampler, *, augment: bool, batch_size: int = 8, seed: int = 0, **kwargs) -> TensorLoader:
    return TensorLoader(split, sampler=sampler, batch_size=batch_size, normalization=NORMALIZATION, device=CPU,
                        augment=augment, seed=seed, **kwargs)


def _epoch(loader: TensorLoader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


# ---- batched augmentation ------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "padding"), [(32, 32, 4), (7, 11, 3), (5, 5, 0)])
def test_random_crop_flip_matches_torchvision_per_sample(height, width, padding):
    batch = 64
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=_gen(1))
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=_gen(2))
    flips = torch.rand(batch, generator=_gen(3)) < 0.5
    # make sure the extremes (no shift / full shift on either axis) and both flip states are covered
    offsets[:4] = torch.tensor([[0, 0], [2 * padding, 2 * padding], [0, 2 * padding], [2 * padding, 0]])
    flips[:2] = torch.tensor([True, False])
    got = random_crop_flip(images, offsets, flips, padding)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    for i in range(batch):
        top, left = offsets[i].tolist()
        expected = TF.pad(images[i], [padding], fill=0)
        expected = TF.crop(expected, top, left, height, width)
        if flips[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(got[i], expected), i


def test_random_crop_flip_centre_crop_without_flip_is_identity():
    images = torch.randint(0, 256, (5, 3, 9, 9), dtype=torch.uint8, generator=_gen(4))
    centre = torch.full((5, 2), 4)
    assert torch.equal(random_crop_flip(images, centre, torch.zeros(5, dtype=torch.bool), 4), images)
    assert torch.equal(random_crop_flip(images, centre, torch.ones(5, dtype=torch.bool), 4), images.flip(3))


def test_normalisation_matches_the_definition():
    split = _split([10, 5])
    loader = _loader(split, InstanceBalancedSampler(len(split), shuffle=False), augment=False)
    images = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)  # every pixel value
    got = loader.normalize(images)
    assert got.dtype == torch.float32
    mean = torch.tensor(NORMALIZATION.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION.std, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    # |values| < 3.3: a few float32 ulp (2.4e-7 each) of rounding from the fused (x - 255m) / (255s)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


# ---- epoch plans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize(("world_size", "rank"), [(1, 0), (3, 2)])
def test_an_epoch_yields_the_sampler_indices_once_in_order(augment, world_size, rank):
    split = _split([20, 11, 6])  # 37 images: batches of 8 leave a partial last batch
    sampler = InstanceBalancedSampler(len(split), seed=3, rank=rank, world_size=world_size)
    loader = _loader(split, sampler, augment=augment)
    batches = _epoch(loader, 2)
    assert len(batches) == len(loader) == math.ceil(len(sampler) / 8)
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == sampler.indices(2).tolist()
    for batch in batches:
        assert torch.equal(batch["target"], torch.from_numpy(split.targets)[batch["index"]])
        assert batch["image"].dtype == torch.float32
        assert batch["image"].shape == (len(batch["index"]), 3, 8, 8)
        if not augment:
            raw = torch.from_numpy(split.images).permute(0, 3, 1, 2)[batch["index"]]
            torch.testing.assert_close(batch["image"], loader.normalize(raw), rtol=0, atol=0)


def test_drop_last_drops_only_the_partial_batch():
    split = _split([20, 11, 6])
    sampler = InstanceBalancedSampler(len(split), seed=3)
    loader = _loader(split, sampler, augment=True, drop_last=True)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 37 // 8
    assert all(len(b["index"]) == 8 for b in batches)
    assert torch.cat([b["index"] for b in batches]).tolist() == sampler.indices(0)[:32].tolist()


def test_augmented_images_are_crops_and_flips_of_the_sampled_images():
    split = _split([12, 4], height=6, width=6)
    loader = _loader(split, InstanceBalancedSampler(len(split), seed=1), augment=True, padding=2)
    raw_all = torch.from_numpy(split.images).permute(0, 3, 1, 2)
    for batch in _epoch(loader, 0):
        raw = raw_all[batch["index"]]
        # undo the normalisation exactly enough to recover the uint8 pixels
        pixels = (batch["image"].double() * torch.tensor(NORMALIZATION.std, dtype=torch.float64).view(1, 3, 1, 1)
                  + torch.tensor(NORMALIZATION.mean, dtype=torch.float64).view(1, 3, 1, 1)) * 255
        pixels = pixels.round().to(torch.uint8)
        for i in range(len(raw)):
            candidates = [
                random_crop_flip(raw[i : i + 1], torch.tensor([[top, left]]), torch.tensor([flip]), 2)[0]
                for top in range(5) for left in range(5) for flip in (False, True)
            ]
            assert any(torch.equal(pixels[i], c) for c in candidates)


def test_batches_are_deterministic_per_seed_and_epoch_and_differ_across_epochs():
    split = _split([30, 10, 4])

    def images(epoch: int, seed: int = 0) -> torch.Tensor:
        loader = _loader(split, InstanceBalancedSampler(len(split), seed=seed), augment=True, seed=seed)
        return torch.cat([b["image"] for b in _epoch(loader, epoch)])

    first = images(1)
    assert torch.equal(first, images(1))  # a fresh loader, same (seed, epoch): bit-identical batches
    assert not torch.equal(first, images(2))
    assert not torch.equal(first, images(1, seed=1))


def test_augmentation_parameters_vary_within_an_epoch():
    # the same image sampled many times in one epoch must not always get the same crop and flip
    single = _split([1])
    sampler = ClassBalancedSampler(single.targets, seed=0, num_samples=200)  # its only image, 200 times
    loader = _loader(single, sampler, augment=True, batch_size=50)
    views = torch.cat([b["image"] for b in _epoch(loader, 0)])
    distinct = {views[i].numpy().tobytes() for i in range(len(views))}
    assert len(distinct) > 50  # 81 offsets x 2 flips are possible


def test_class_balanced_sampler_gives_uniform_class_frequencies():
    counts = [300, 60, 12, 3]
    split = _split(counts, height=4, width=4)
    draws = 20_000
    sampler = ClassBalancedSampler(split.targets, seed=5, num_samples=draws)
    loader = _loader(split, sampler, augment=False, batch_size=1000)
    targets = torch.cat([b["target"] for b in _epoch(loader, 0)])
    assert len(targets) == draws
    frequency = torch.bincount(targets, minlength=4).double() / draws
    p = 1.0 / len(counts)
    sigma = math.sqrt(p * (1 - p) / draws)
    assert torch.all((frequency - p).abs() < 5 * sigma), frequency


def test_training_crops_use_every_offset_of_the_4_pixel_padding_and_flip_half_the_images():
    """The CIFAR recipe: RandomCrop(32, padding=4) draws each of the 9 x 9 offsets, and the
    horizontal flip has probability 0.5. Each delivered image is matched to the one crop and flip
    of its source that produces it (the source's pixels are random, so the match is unique)."""
    from ltscale.data import LoaderConfig, build_loader
    from ltscale.data.base import DatasetBundle

    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    split = ArraySplit(name="one/train", targets=np.zeros(600, np.int64), num_classes=1, images=np.repeat(image, 600, axis=0))
    bundle = DatasetBundle(name="one", train=split, test=split, normalization=NORMALIZATION, image_size=32)
    loader = build_loader(split, bundle, train=True, batch_size=100, loader=LoaderConfig(), device=CPU, seed=0)
    source = torch.from_numpy(image).permute(0, 3, 1, 2)
    views = {
        random_crop_flip(source, torch.tensor([[top, left]]), torch.tensor([flip]), 4)[0].numpy().tobytes(): (top, left, flip)
        for top in range(9) for left in range(9) for flip in (False, True)
    }
    assert len(views) == 162
    mean = torch.tensor(NORMALIZATION.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION.std, dtype=torch.float64).view(1, 3, 1, 1)
    drawn = []
    for batch in _epoch(loader, 0):
        pixels = ((batch["image"].double() * std + mean) * 255).round().to(torch.uint8)
        drawn += [views[pixels[i].numpy().tobytes()] for i in range(len(pixels))]
    assert len(drawn) == 600
    assert {top for top, _, _ in drawn} == set(range(9)) and {left for _, left, _ in drawn} == set(range(9))
    flipped = sum(flip for _, _, flip in drawn) / len(drawn)
    assert abs(flipped - 0.5) < 0.1  # sd 0.02


def test_a_split_refuses_labels_outside_its_classes():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), found 0..3"):
        ArraySplit(name="toy/train", targets=np.array([0, 3]), num_classes=3, images=images)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), found -1..2"):
        ArraySplit(name="toy/train", targets=np.array([-1, 2]), num_classes=3, images=images)
    assert len(ArraySplit(name="toy/train", targets=np.array([0, 2]), num_classes=3, images=images)) == 2

# ---- the rotation task's batched rotation -----------------------------------------------------------


def test_rotate_batch_matches_per_sample_rot90():
    images = torch.randn(32, 3, 9, 9, generator=_gen(6))
    turns = torch.randint(0, 4, (32,), generator=_gen(7))
    turns[:4] = torch.arange(4)
    got = rotate_batch(images, turns)
    for i in range(32):
        assert torch.equal(got[i], torch.rot90(images[i], int(turns[i]), dims=(1, 2))), i


def test_rotate_batch_turns_counter_clockwise():
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    quarter = rotate_batch(image, torch.tensor([1]))[0, 0]
    assert quarter.tolist() == [[2.0, 4.0], [1.0, 3.0]]  # the top-right corner moves to the top-left
    assert rotate_batch(image, torch.tensor([2]))[0, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert rotate_batch(image, torch.tensor([0]))[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("size", [16, 5])
def test_cutout_matches_the_per_sample_definition(size):
    images = torch.randn(6, 3, 32, 32, generator=_gen(3))
    centres = torch.tensor([[0, 0], [31, 31], [16, 16], [3, 28], [30, 2], [10, 20]])
    expected = images.clone()
    for i, (row, col) in enumerate(centres.tolist()):
        top, left = max(row - size // 2, 0), max(col - size // 2, 0)
        bottom, right = min(row + size - size // 2, 32), min(col + size - size // 2, 32)
        expected[i, :, top:bottom, left:right] = 0.0  # the dataset's mean colour after normalisation
    torch.testing.assert_close(cutout(images, centres, size), expected, rtol=0, atol=0)
    assert (cutout(images, centres, size)[2] == 0).all(dim=0).sum() == size * size  # a full square inside


def test_loader_cutout_leaves_crops_and_flips_alone_and_removes_the_expected_area():
    split = _split([400, 300, 100], height=32, width=32)
    plain = list(_loader(split, InstanceBalancedSampler(len(split.targets), seed=0), augment=True, batch_size=64))
    cut = list(_loader(split, InstanceBalancedSampler(len(split.targets), seed=0), augment=True, batch_size=64, cutout=16))
    zeroed, total = 0, 0
    for a, b in zip(plain, cut, strict=True):
        torch.testing.assert_close(a["index"], b["index"])
        kept = (b["image"] != 0).any(dim=1, keepdim=True)  # pixels outside the square
        torch.testing.assert_close(b["image"], torch.where(kept, a["image"], torch.zeros_like(a["image"])), rtol=0, atol=0)
        removed = (~kept).flatten(1).sum(1)
        assert (removed <= 256).all() and (removed >= 64).all()  # a corner centre still removes 8 x 8
        zeroed, total = zeroed + int(removed.sum()), total + removed.numel()
    # Mean removed area for a uniform centre: the mean clipped extent along one axis, squared (independent axes).
    expected = (sum(min(c + 8, 32) - max(c - 8, 0) for c in range(32)) / 32) ** 2
    assert abs(zeroed / total - expected) < 0.05 * expected
    # Evaluation batches are never cut.
    evaluation = next(iter(_loader(split, InstanceBalancedSampler(len(split.targets), seed=0), augment=False, cutout=16)))
    assert evaluation["image"].ne(0).flatten(1).all(1).float().mean() > 0.99


def test_cutout_is_refused_for_image_files(tmp_path):
    from ltscale.data import LoaderConfig, build_loader
    from ltscale.data.base import FileSplit

    split = FileSplit(name="files/train", targets=np.array([0, 1]), num_classes=2, root=tmp_path, paths=["a.jpg", "b.jpg"])
    bundle = type("B", (), {"image_size": 224, "normalization": NORMALIZATION, "name": "imagenet_lt"})()
    with pytest.raises(ValueError, match="data.loader.cutout=16: Cutout is a CIFAR-scale augmentation"):
        build_loader(split, bundle, train=True, batch_size=2, loader=LoaderConfig(cutout=16), device=CPU, seed=0)
    with pytest.raises(ValueError, match="data.loader.cutout must be >= 0"):
        LoaderConfig(cutout=-1)

"""Batched colour jitter on the device (:mod:`ltscale.data.loaders.jitter`): equal to torchvision's
per-image definition, its random draws, its per-epoch stream, and the torch and FFCV backends
applying it to exactly the images they deliver (real JPEGs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ltscale.data.image_list import IMAGENET_NORMALIZATION
from ltscale.data.loaders.jitter import (
    BRIGHTNESS,
    CONTRAST,
    SATURATION,
    EpochColorJitter,
    color_jitter,
    draw_color_jitter,
)

ADJUST = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}


def _reference(images: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter, one image at a time on float images in [0, 1], given its draws."""
    out = []
    for image, factor, order in zip(images / 255, factors, orders):
        for operation in order.tolist():
            image = ADJUST[operation](image, float(factor[operation]))
        out.append(image)
    return torch.stack(out) * 255


def _images(count: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator).float()


def test_matches_torchvision_per_image_in_every_order():
    orders = torch.tensor(list(itertools.permutations(range(3))) * 4)  # each of the 6 orders 4 times
    count = len(orders)
    factors = torch.from_numpy(np.random.default_rng(1).uniform(0.2, 1.8, size=(count, 3)).astype(np.float32))
    images = _images(count)
    expected = _reference(images, factors, orders)
    got = color_jitter(images.clone(), factors, orders)
    # fp32 arithmetic in a different association: within 2e-3 grey levels of 255.
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert got.min() >= 0 and got.max() <= 255
    # The order matters (the test would pass for a fixed order otherwise): two orders differ.
    fixed = color_jitter(images.clone(), factors, torch.tensor([[0, 1, 2]] * count))
    assert not torch.allclose(fixed, got, atol=1e-2)


def test_identity_factors_leave_images_unchanged_and_clipping_happens_per_step():
    images = _images(6)
    orders = torch.tensor(list(itertools.permutations(range(3))))
    assert torch.equal(color_jitter(images.clone(), torch.ones(6, 3), orders), images)
    # Brightness x1.8 then x0.5 clips at 255 in between: not the same as x0.9 at once.
    bright = torch.full((1, 3, 1, 1), 200.0)
    out = color_jitter(bright.clone(), torch.tensor([[1.8, 1.0, 1.0]]), torch.tensor([[BRIGHTNESS, CONTRAST, SATURATION]]))
    out = color_jitter(out, torch.tensor([[0.5, 1.0, 1.0]]), torch.tensor([[BRIGHTNESS, CONTRAST, SATURATION]]))
    assert torch.allclose(out, torch.full_like(out, 127.5))


def test_draws_cover_factor_range_and_orders_uniformly():
    factors, orders = draw_color_jitter(60_000, 0.4, np.random.default_rng(0))
    assert factors.dtype == np.float32 and factors.shape == (60_000, 3)
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert abs(factors.mean() - 1.0) < 0.005 and abs(factors.std() - 0.8 / np.sqrt(12)) < 0.003
    assert (np.sort(orders, axis=1) == np.arange(3)).all()  # each row a permutation
    counts = np.unique(orders @ np.array([9, 3, 1]), return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 9_600 and counts.max() < 10_400  # 10,000 each; sd ~91
    # A strength above 1 cannot make a factor negative (torchvision clamps the range at 0).
    assert draw_color_jitter(1000, 1.5, np.random.default_rng(0))[0].min() >= 0


def test_epoch_stream_batches_deterministic_and_rank_specific():
    images = _images(10)
    jitter = EpochColorJitter(0.4, seed=3, rank=0, device=torch.device("cpu"))
    jitter.start(epoch=2, count=10)
    batched = torch.cat([jitter(images[:4].clone()), jitter(images[4:8].clone()), jitter(images[8:].clone())])
    jitter.start(epoch=2, count=10)
    whole = jitter(images.clone())
    assert torch.equal(batched, whole)  # batches take consecutive draws
    factors, orders = draw_color_jitter(10, 0.4, np.random.default_rng([3, 2, 10]))
    assert torch.equal(whole, color_jitter(images.clone(), torch.from_numpy(factors), torch.from_numpy(orders)))

    def epoch_output(epoch: int, rank: int) -> torch.Tensor:
        other = EpochColorJitter(0.4, seed=3, rank=rank, device=torch.device("cpu"))
        other.start(epoch=epoch, count=10)
        return other(images.clone())

    assert torch.equal(epoch_output(2, 0), whole)
    assert not torch.equal(epoch_output(3, 0), whole)
    assert not torch.equal(epoch_output(2, 1), whole)
    with pytest.raises(RuntimeError, match="drawn for 10 images"):
        jitter(images[:1].clone())
    with pytest.raises(ValueError, match=">= 0"):
        EpochColorJitter(-0.1, seed=0, rank=0, device=torch.device("cpu"))


# ---------------------------------------------------------------- the backends, on real JPEGs

def _unnormalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_NORMALIZATION.std).view(1, 3, 1, 1) * 255
    return images * std + mean


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_NORMALIZATION.std).view(1, 3, 1, 1) * 255
    return (images - mean) / std


def _expected_jittered(plain_batches: list[torch.Tensor], *, seed: int, epoch: int, count: int) -> list[torch.Tensor]:
    """What a loader with colour jitter must deliver, given the same loader's batches without it."""
    jitter = EpochColorJitter(0.4, seed=seed, rank=0, device=torch.device("cpu"))
    jitter.start(epoch, count)
    return [jitter(_unnormalise(batch)) for batch in plain_batches]


def _image_tree_split(tmp_path):
    from ltscale.data.image_list import build_image_list_dataset
    from tests.test_image_list import _make_tree

    return build_image_list_dataset(_make_tree(tmp_path / "tree")).train


def _loader(cls, split, color_jitter: float, num_workers: int = 1, **extra):
    from ltscale.data.samplers import InstanceBalancedSampler
    from tests.test_image_list import IMAGE_SIZE

    return cls(
        split, train=True, batch_size=4, sampler=InstanceBalancedSampler(len(split), seed=0),
        image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION, num_workers=num_workers, max_bad_image_fraction=0.0,
        drop_last=False, device="cpu", color_jitter=color_jitter, seed=5, **extra,
    )


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_backend_jitters_exactly_the_images_it_delivers(tmp_path, backend):
    """Same seeds with and without jitter: the same crops, then the epoch's jitter draws."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install 'ltscale[dali]')")
        from ltscale.data.loaders.dali import DaliLoader as Loader
    else:
        from ltscale.data.loaders.files import FileLoader as Loader

    split = _image_tree_split(tmp_path)

    def epoch_batches(color_jitter: float, epoch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        loader = _loader(Loader, split, color_jitter)
        loader.set_epoch(epoch)
        batches = list(loader)
        return [b["image"] for b in batches], [b["index"] for b in batches]

    for epoch in (0, 1):
        plain, plain_index = epoch_batches(0.0, epoch)
        jittered, index = epoch_batches(0.4, epoch)
        assert all(torch.equal(a, b) for a, b in zip(index, plain_index))  # same images, same order
        expected = _expected_jittered(plain, seed=5, epoch=epoch, count=len(split))
        for got, want in zip(jittered, expected):
            torch.testing.assert_close(_unnormalise(got), want, atol=2e-3, rtol=0)
        assert max((a - b).abs().max().item() for a, b in zip(jittered, plain)) > 0.5  # it did change pixels


def test_ffcv_backend_jitters_its_crops_with_the_epoch_draws(tmp_path, monkeypatch):
    """FFCV 1.0.2's crops come from numba's unseeded per-thread generators, so a second loader
    cannot reproduce them; the images entering the jitter are recorded instead, and the delivered
    batches must be those images under the epoch's draws, in order."""
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install 'ltscale[ffcv]')")
    threads = torch.get_num_threads()
    import ltscale.data.loaders.jitter as jitter_module
    from ltscale.data.config import FfcvConfig
    from ltscale.data.loaders.ffcv_backend import FfcvLoader

    entering: list[torch.Tensor] = []
    original = jitter_module.color_jitter

    def recording(images, factors, orders, **kwargs):
        entering.append(images.clone())
        return original(images, factors, orders, **kwargs)

    monkeypatch.setattr(jitter_module, "color_jitter", recording)
    try:
        split = _image_tree_split(tmp_path)
        loader = _loader(FfcvLoader, split, 0.4, ffcv=FfcvConfig(cache_dir=str(tmp_path / "ffcv"), write_workers=1))
        for epoch in (0, 1):
            entering.clear()
            loader.set_epoch(epoch)
            delivered = [batch["image"] for batch in loader]
            assert len(entering) == len(delivered) == 3
            assert all(0 <= float(x.min()) and float(x.max()) <= 255 and x.shape[0] == y.shape[0]
                       for x, y in zip(entering, delivered))
            expected = _expected_jittered([_normalise(x) for x in entering], seed=5, epoch=epoch, count=len(split))
            for got, want in zip(delivered, expected):
                torch.testing.assert_close(_unnormalise(got), want, atol=2e-3, rtol=0)
    finally:
        torch.set_num_threads(threads)  # importing FFCV sets it to 1 for the process


def test_torch_backend_epochs_do_not_depend_on_workers_or_history(tmp_path):
    """Crops, flips and the MoCo key view are seeded per sample from (seed, epoch, rank): epoch 1
    is the same batches with 0 or 2 workers, after epoch 0 or straight away (a resumed run), and
    the training process's RNG is not touched."""
    from ltscale.data.loaders.files import FileLoader

    split = _image_tree_split(tmp_path)

    def epoch(workers: int, number: int, history: tuple[int, ...] = (), rank: int = 0) -> list[dict]:
        loader = _loader(FileLoader, split, 0.4, num_workers=workers, views=2, rank=rank)
        for earlier in history:
            loader.set_epoch(earlier)
            list(loader)
        loader.set_epoch(number)
        return list(loader)

    def same(a: list[dict], b: list[dict]) -> bool:
        return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("image", "image_key", "index"))

    state = torch.get_rng_state()
    reference = epoch(0, 1)
    assert torch.equal(torch.get_rng_state(), state)  # in-process decoding gave the RNG back
    assert same(reference, epoch(2, 1)) and same(reference, epoch(0, 1, history=(0,)))
    assert same(reference, epoch(2, 1, history=(0,)))
    assert not same(reference, epoch(0, 2))  # each epoch has its own draws (same order, new crops)
    assert not same(reference, epoch(0, 1, rank=1))

"""The DALI backend for image files, run CPU-only on real JPEGs (its GPU path: the gpu-marked test).

The same contract as the torch backend (tests/test_image_list.py): the sampler's epochs, batch
contents, normalisation, the bad-image policy; plus what is DALI's own: evaluation pixels equal to
torchvision's transform within a grey level, per-epoch seeding, recovery from a pipeline that
dies on a corrupt JPEG mid-epoch, MoCo's key view.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'ltscale[dali]')")

from ltscale.data import build_loader  # noqa: E402
from ltscale.data.base import DatasetBundle, FileSplit  # noqa: E402
from ltscale.data.config import LoaderConfig  # noqa: E402
from ltscale.data.errors import DatasetError  # noqa: E402
from ltscale.data.image_list import IMAGENET_NORMALIZATION, build_image_list_dataset  # noqa: E402
from ltscale.data.loaders import dali as dali_module  # noqa: E402
from ltscale.data.loaders.dali import DaliLoader  # noqa: E402
from ltscale.data.loaders.files import FileLoader  # noqa: E402
from ltscale.data.samplers import InstanceBalancedSampler, ShardSampler  # noqa: E402
from ltscale.data.synthetic import make_synthetic  # noqa: E402
from ltscale.data.config import SyntheticConfig  # noqa: E402
from tests.test_image_list import (  # noqa: E402
    IMAGE_SIZE,
    _make_tree,
    _oversized_split,
    _sample_files,
    _truncate,
    crop_extents,
    ramp_split,
)

ONE_GREY_LEVEL = 1.01 / 255 / min(IMAGENET_NORMALIZATION.std)  # in normalised units


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> DatasetBundle:
    return build_image_list_dataset(_make_tree(tmp_path_factory.mktemp("imagenet_lt")))


def _loader(cls, split: FileSplit, *, train: bool, shuffle: bool = True, fraction: float = 0.001,
            sampler=None, views: int = 1, seed: int = 0, batch_size: int = 4, **overrides):
    arguments = dict(
        train=train, batch_size=batch_size,
        sampler=sampler if sampler is not None else InstanceBalancedSampler(len(split), seed=0, shuffle=shuffle),
        image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION, num_workers=2,
        max_bad_image_fraction=fraction, drop_last=False, device="cpu", views=views, seed=seed,
    )
    return cls(split, **{**arguments, **overrides})


def test_training_epochs_follow_the_sampler_like_the_torch_backend(bundle):
    dali = _loader(DaliLoader, bundle.train, train=True)
    torch_backend = _loader(FileLoader, bundle.train, train=True)
    assert len(dali) == len(torch_backend) == 3
    orders = []
    for epoch in range(2):
        dali.set_epoch(epoch)
        torch_backend.set_epoch(epoch)
        batches = list(dali)
        assert [len(b["index"]) for b in batches] == [4, 4, 2]
        # Same sampler, same epoch: the same images in the same order as the torch backend.
        assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in torch_backend]
        for batch in batches:
            assert batch["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.float32
            assert batch["target"].dtype == batch["index"].dtype == torch.int64
            assert batch["target"].tolist() == bundle.train.targets[batch["index"].numpy()].tolist()
        images = torch.cat([b["image"] for b in batches])
        assert images.mean().abs() < 0.5 and 0.5 < images.std() < 1.5  # ImageNet normalisation
        orders.append(torch.cat([b["index"] for b in batches]).tolist())
        assert sorted(orders[-1]) == list(range(10))
    assert orders[0] != orders[1]
    assert dali.bad_files == []


def test_augmentation_depends_on_seed_and_epoch_only(bundle):
    def epoch_images(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([b["image"] for b in loader])

    first, second = _loader(DaliLoader, bundle.train, train=True), _loader(DaliLoader, bundle.train, train=True)
    epoch_one = epoch_images(first, 1)
    # A fresh loader asked straight for epoch 1 (a resumed run) sees exactly what the first saw.
    assert torch.equal(epoch_images(second, 1), epoch_one)
    assert not torch.equal(epoch_images(first, 0), epoch_one)
    other_seed = _loader(DaliLoader, bundle.train, train=True, seed=1)
    assert not torch.equal(epoch_images(other_seed, 1), epoch_one)


def test_evaluation_pixels_equal_torchvision_within_a_grey_level(bundle):
    dali = _loader(DaliLoader, bundle.test, train=False, shuffle=False)
    for _ in range(2):  # the second pass reuses the reset pipeline
        batches = list(dali)
        images = torch.cat([b["image"] for b in batches])
        assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
        reference = torch.cat([b["image"] for b in _loader(FileLoader, bundle.test, train=False, shuffle=False)])
        # Both decode with libjpeg-turbo; resampling differs by at most one grey level, and the
        # crop geometry (floored resize, half-to-even centre offset) is torchvision's exactly.
        assert (images - reference).abs().max() <= ONE_GREY_LEVEL
    assert dali._reusable


def test_a_dropped_loader_frees_its_pipeline_at_once(bundle):
    """No reference cycle through the pipeline's callback: a DALI pipeline left for the cyclic
    collector can be collected in a forked DataLoader worker, which then dies with SIGSEGV."""
    import gc
    import weakref

    loader = _loader(DaliLoader, bundle.test, train=False, shuffle=False)
    list(loader)
    pipe = weakref.ref(loader._pipe)
    gc.disable()
    try:
        del loader
        assert pipe() is None
    finally:
        gc.enable()
    closed = _loader(DaliLoader, bundle.test, train=False, shuffle=False)
    first = torch.cat([b["image"] for b in closed])
    closed.close()
    assert closed._pipe is None and torch.equal(torch.cat([b["image"] for b in closed]), first)  # rebuilt on demand


def test_rank_shards_are_served_in_order(bundle):
    for rank in range(2):
        sampler = ShardSampler(len(bundle.test), rank, 2)
        loader = _loader(DaliLoader, bundle.test, train=False, sampler=sampler, batch_size=2)
        assert torch.cat([b["index"] for b in loader]).tolist() == list(range(rank, 10, 2))


def _garble(path: Path) -> None:
    """A JPEG that still starts and ends like one (so only decoding finds it bad): the bytes after
    its first marker zeroed up to the middle of the file."""
    data = bytearray(path.read_bytes())
    data[4 : len(data) // 2] = bytes(len(data) // 2 - 4)
    path.write_bytes(bytes(data))


def test_corrupt_training_image_mid_epoch_is_replaced_and_no_batch_is_lost(tmp_path, caplog, monkeypatch):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    bad_path = split.root / split.paths[6]  # class 1, in the second batch: the pipeline dies mid-epoch
    _garble(bad_path)
    # A file whose damage the pre-checks do not see (here: the header check switched off), so it
    # reaches DALI and fails the pipeline.
    monkeypatch.setattr(dali_module, "_jpeg_header_ok", lambda data: True)
    loader = _loader(DaliLoader, split, train=True, shuffle=False, fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="ltscale.data.loaders"):
        batches = list(loader)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    # Every position served once, in order; index 6 by the next image of class 1, index 7.
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert indices == [0, 1, 2, 3, 4, 5, 7, 7, 8, 9]
    assert torch.cat([b["target"] for b in batches]).tolist() == split.targets[indices].tolist()
    assert loader.bad_files == [str(bad_path)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad_path) in message for message in warnings)
    assert any("rebuilding the DALI pipeline" in message for message in warnings)  # it did die and recover
    # The next epoch substitutes before DALI sees the file: no failure, same served images.
    loader.set_epoch(1)
    assert torch.cat([b["index"] for b in loader]).tolist() == indices


def test_pipeline_failure_no_cpu_decoder_reproduces_is_raised_with_dalis_message(tmp_path, monkeypatch):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    _garble(split.root / split.paths[6])
    monkeypatch.setattr(dali_module, "_jpeg_header_ok", lambda data: True)  # it reaches DALI ...
    monkeypatch.setattr(dali_module, "_check_decodes", lambda path: "")  # ... and the CPU decoders "read" it
    with pytest.raises(RuntimeError, match="decodes with the CPU decoders") as caught:
        list(_loader(DaliLoader, split, train=True, shuffle=False, fraction=0.2))
    assert "DALI said" in str(caught.value) and str(split.root / split.paths[6]) in str(caught.value)


def test_missing_and_empty_files_are_substituted_before_decoding(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    (split.root / split.paths[1]).unlink()
    (split.root / split.paths[7]).write_bytes(b"")
    loader = _loader(DaliLoader, split, train=True, shuffle=False, fraction=0.2)
    indices = torch.cat([b["index"] for b in loader]).tolist()
    assert indices == [0, 2, 2, 3, 4, 5, 6, 8, 8, 9]
    assert loader.bad_files == sorted(str(split.root / split.paths[i]) for i in (1, 7))


def test_too_many_corrupt_images_raise_with_the_list(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    bad = [split.root / split.paths[i] for i in (2, 7)]
    for path in bad:
        _truncate(path)
    with pytest.raises(DatasetError, match="more than the 1 allowed") as caught:
        list(_loader(DaliLoader, split, train=True, shuffle=False, fraction=0.1))
    assert str(bad[0]) in str(caught.value) and str(bad[1]) in str(caught.value)


def test_corrupt_image_without_readable_class_mate_raises(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    _truncate(split.root / split.paths[9])  # class 2 has a single image
    with pytest.raises(DatasetError, match=r"no readable image of its class 2"):
        list(_loader(DaliLoader, split, train=True, shuffle=False, fraction=0.5))


def test_corrupt_or_missing_test_image_raises_naming_it(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).test
    bad_path = split.root / split.paths[4]
    _truncate(bad_path)
    with pytest.raises(DatasetError, match="never substitutes") as caught:
        list(_loader(DaliLoader, split, train=False, shuffle=False, fraction=0.5))
    assert str(bad_path) in str(caught.value)
    bad_path.unlink()
    with pytest.raises(DatasetError, match="never substitutes") as caught:
        list(_loader(DaliLoader, split, train=False, shuffle=False, fraction=0.5))
    assert str(bad_path) in str(caught.value)


def test_unusual_files_decode_like_the_torch_backend(tmp_path):
    source = _sample_files()[0]
    with PIL.Image.open(source) as image:
        image.convert("CMYK").save(tmp_path / "cmyk.JPEG", "JPEG")
        image.save(tmp_path / "png_named.JPEG", "PNG")  # ImageNet holds a PNG named .JPEG
    shutil.copyfile(_sample_files()[-1], tmp_path / "grey.JPEG")  # the greyscale sample
    names = ["cmyk.JPEG", "png_named.JPEG", "grey.JPEG"]
    split = FileSplit(name="odd", targets=np.zeros(3, dtype=np.int64), num_classes=1, root=tmp_path, paths=names)
    dali = torch.cat([b["image"] for b in _loader(DaliLoader, split, train=False, shuffle=False)])
    reference = torch.cat([b["image"] for b in _loader(FileLoader, split, train=False, shuffle=False)])
    assert dali.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # CMYK -> RGB conversions differ between decoders by a few levels; PNG and greyscale by one.
    assert (dali[1:] - reference[1:]).abs().max() <= ONE_GREY_LEVEL
    assert (dali[0] - reference[0]).abs().mean() <= 4 * ONE_GREY_LEVEL


def test_gif_is_served_and_a_truncated_jpeg_is_caught_whatever_the_crop(tmp_path):
    """DALI decodes no GIF (PIL does): it is decoded on the CPU and served, as by the torch backend.
    DALI decodes only a training crop's region, so a JPEG missing its last bytes read cleanly
    whenever the crop missed the missing rows: it is now checked on the CPU and replaced at once."""
    samples = _sample_files()
    with PIL.Image.open(samples[0]) as image:
        image.convert("P").save(tmp_path / "gif_named.JPEG", "GIF")
    shutil.copyfile(samples[1], tmp_path / "tail_cut.JPEG")
    data = (tmp_path / "tail_cut.JPEG").read_bytes()
    (tmp_path / "tail_cut.JPEG").write_bytes(data[:-200])
    shutil.copyfile(samples[2], tmp_path / "mate.JPEG")
    names = ["gif_named.JPEG", "tail_cut.JPEG", "mate.JPEG"]
    split = FileSplit(name="odd", targets=np.array([0, 1, 1]), num_classes=2, root=tmp_path, paths=names)
    evaluation = FileSplit(name="odd", targets=np.array([0]), num_classes=1, root=tmp_path, paths=names[:1])
    dali = torch.cat([b["image"] for b in _loader(DaliLoader, evaluation, train=False, shuffle=False)])
    reference = torch.cat([b["image"] for b in _loader(FileLoader, evaluation, train=False, shuffle=False)])
    assert (dali - reference).abs().max() <= ONE_GREY_LEVEL
    for seed in range(3):  # whatever the crops: replaced in the first epoch
        loader = _loader(DaliLoader, split, train=True, shuffle=False, fraction=0.5, seed=seed)
        assert torch.cat([b["index"] for b in loader]).tolist() == [0, 2, 2]
        assert loader.bad_files == [str(tmp_path / "tail_cut.JPEG")]
    # A JPEG whose segments do not chain up to its scan is decided on the CPU too (DALI 2.4's CPU
    # decoder could crash the process on one in a batch of 64), whatever the batch size.
    shutil.copyfile(samples[3], tmp_path / "garbled.JPEG")
    _garble(tmp_path / "garbled.JPEG")
    many = FileSplit(name="many", targets=np.repeat([0, 1], 40), num_classes=2, root=tmp_path,
                     paths=["garbled.JPEG"] + ["mate.JPEG"] * 79)
    loader = _loader(DaliLoader, many, train=True, shuffle=False, fraction=0.05, batch_size=64)
    assert torch.cat([b["index"] for b in loader]).tolist()[:2] == [1, 1] and loader.bad_files == [str(tmp_path / "garbled.JPEG")]
    assert all(dali_module._jpeg_header_ok(np.fromfile(path, dtype=np.uint8)) for path in samples)
    # A JPEG with bytes after its end marker (some cameras pad files) is not suspected.
    padded = tmp_path / "padded.JPEG"
    padded.write_bytes(samples[1].read_bytes() + b"\0" * 100)
    assert isinstance(dali_module._read_bytes(str(padded)), np.ndarray)


def test_an_image_over_the_decompression_bomb_limit_is_a_bad_file(tmp_path, monkeypatch):
    """DALI's decoders do not apply PIL's limit: a JPEG's frame header and other formats' PIL header
    are checked before DALI sees the bytes, and an oversized file is replaced like a corrupt one."""
    split = _oversized_split(tmp_path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)  # refused: over 20,000 pixels
    for name in ("big.JPEG", "big.png"):
        verdict = dali_module._read_bytes(str(tmp_path / name))
        assert isinstance(verdict, str) and "DecompressionBombError" in verdict, verdict
    assert all(isinstance(dali_module._read_bytes(str(tmp_path / n)), np.ndarray) for n in ("mate0.JPEG", "mate1.png"))
    loader = _loader(DaliLoader, split, train=True, shuffle=False, fraction=0.5)
    assert torch.cat([b["index"] for b in loader]).tolist() == [1, 1, 3, 3]
    assert loader.bad_files == sorted(str(tmp_path / name) for name in ("big.JPEG", "big.png"))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    assert isinstance(dali_module._read_bytes(str(tmp_path / "big.png")), np.ndarray)


def test_moco_key_view_follows_its_definition(tmp_path):
    """Two views of the same images; the key view (MoCo v2) is greyscale with probability
    0.2 x (no colour from jitter), the query never."""
    source = _sample_files()[0]  # a colour image
    shutil.copyfile(source, tmp_path / "a.JPEG")
    n = 400
    split = FileSplit(name="one", targets=np.zeros(n, dtype=np.int64), num_classes=1, root=tmp_path, paths=["a.JPEG"] * n)
    loader = _loader(DaliLoader, split, train=True, views=2, batch_size=100)
    batches = list(loader)
    query = torch.cat([b["image"] for b in batches])
    key = torch.cat([b["image_key"] for b in batches])
    assert query.shape == key.shape == (n, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.equal(query, key)

    def is_grey(images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_NORMALIZATION.std).view(1, 3, 1, 1)
        pixels = images * std + mean
        return (pixels.amax(1) - pixels.amin(1)).amax(dim=(1, 2)) < 3 / 255

    assert not is_grey(query).any()
    grey = is_grey(key).float().mean().item()
    assert abs(grey - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5  # binomial, 4 sigma


def _grating_cycles(profiles: torch.Tensor) -> torch.Tensor:
    """(N, S) profiles of a cosine -> the cycles each spans, at the peak of its Hann-windowed spectrum
    (0.005-cycle steps; within about 1 % of the truth from 3 cycles up, measured on the crops below)."""
    size = profiles.shape[-1]
    centred = (profiles - profiles.mean(-1, keepdim=True)) * torch.hann_window(size, periodic=False, dtype=profiles.dtype)
    cycles = torch.arange(1.0, 20.0, 0.005, dtype=profiles.dtype)
    phase = 2 * np.pi * cycles[:, None] * torch.arange(size, dtype=profiles.dtype)[None, :] / size
    power = (centred @ torch.cos(phase).T) ** 2 + (centred @ torch.sin(phase).T) ** 2
    return cycles[power.argmax(-1)]


def test_moco_key_crops_take_a_fifth_to_all_of_the_image(tmp_path):
    """MoCo v2's key view crops 0.2-1 of the image (ratio 3/4-4/3), the query view 0.08-1. Measured on a
    grey grating, 8 cycles across each axis: a crop's width and height are the cycles it shows over 8.
    Grey survives the colour jitter and greyscale, which move only the grating's level and contrast,
    and blur does not move its frequency (the ramp of the training-crop test does not survive them)."""
    wave = np.cos(2 * np.pi * np.arange(256) / 32)
    grey = np.round(128 + 50 * wave[None, :] + 50 * wave[:, None]).astype(np.uint8)
    PIL.Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(tmp_path / "grating.png")
    n = 200
    split = FileSplit(name="grating", targets=np.zeros(n, dtype=np.int64), num_classes=1, root=tmp_path, paths=["grating.png"] * n)
    batches = list(_loader(DaliLoader, split, train=True, views=2, batch_size=100))
    for view, smallest in (("image_key", 0.2), ("image", 0.08)):
        images = torch.cat([b[view] for b in batches]).double().mean(1)  # (N, S, S): grey, any scale will do
        width, height = _grating_cycles(images.mean(1)) / 8, _grating_cycles(images.mean(2)) / 8
        area, ratio = width * height, width / height
        assert smallest - 0.015 < area.min() < smallest + 0.1, view  # the lower bound, and reached
        assert area.max() < 1.03 and 0.72 < ratio.min() < 0.85 and 1.18 < ratio.max() < 4 / 3 + 0.03, view


def test_moco_key_blur_has_probability_half_and_sigma_a_tenth_to_two():
    """MoCo v2's key blur: with probability 0.5, sigma uniform in [0.1, 2]. Measured on a grating of
    period 6 pixels, whose amplitude a blur multiplies by its kernel's response at that frequency: that
    response, decreasing in sigma for the 7-pixel window of 64-pixel images, gives back each image's sigma
    from about 0.2 up (under about 0.17 the kernel is the identity in float32), so the coin and sigma's
    distribution are counted above 0.25."""
    from nvidia.dali import Pipeline, fn

    size, period = IMAGE_SIZE, 6
    x = np.arange(size)
    grating = 128 + 100 * np.cos(2 * np.pi * x / period)
    # Float pixels: uint8 would round every row alike, a bias no average removes.
    image = np.repeat(np.repeat(grating[None, :, None], size, 0), 3, 2).astype(np.float32)
    batch, batches = 250, 32  # 8000 images: the fraction blurred above 0.25 to +-0.022 (4 sigma)
    pipe = Pipeline(batch_size=batch, num_threads=1, device_id=None, seed=7)
    with pipe:
        pipe.set_outputs(dali_module.random_blur(fn.external_source(lambda: [image] * batch, batch=True, layout="HWC"), size))
    pipe.build()
    rows = np.concatenate([np.stack([np.asarray(t) for t in pipe.run()[0]]) for _ in range(batches)])
    rows = rows[:, :, 3:-3].astype(float).mean((1, 3))  # (N, columns) away from the borders' reflection
    basis = np.stack([np.cos(2 * np.pi * x[3:-3] / period), np.sin(2 * np.pi * x[3:-3] / period), np.ones(size - 6)], 1)
    fitted = np.linalg.lstsq(basis, np.concatenate([rows.T, grating[3:-3, None]], 1), rcond=None)[0]
    response = fitted[0, :-1] / fitted[0, -1]  # the cosine's amplitude over the unblurred one's

    # Responses over the curve's start (1 - 4e-6 at 0.2) are clamped to it by np.interp: sigma 0.2.
    sigmas = np.linspace(0.2, 2.5, 2301)
    taps = np.arange(-3, 4)
    weights = np.exp(-taps[None, :] ** 2 / (2 * sigmas[:, None] ** 2))
    curve = (weights * np.cos(2 * np.pi * taps / period)).sum(1) / weights.sum(1)
    assert np.all(np.diff(curve) < 0)
    sigma = np.interp(response, curve[::-1], sigmas[::-1])

    cut = 0.25
    blurred = np.sort(sigma[sigma > cut])
    # The lower end of sigma's range shows in this fraction: 0.2 or 0.3 for 0.1 moves it by 0.026 or 0.054.
    expected = 0.5 * (2.0 - cut) / (2.0 - 0.1)
    n = len(sigma)
    assert abs(len(blurred) / n - expected) < 4 * (expected * (1 - expected) / n) ** 0.5  # binomial, 4 sigma
    assert 1.99 < blurred[-1] < 2.0005  # the upper end, and reached
    uniform, m = (blurred - cut) / (2.0 - cut), len(blurred)
    distance = max((np.arange(1, m + 1) / m - uniform).max(), (uniform - np.arange(m) / m).max())
    assert distance < 1.95 / m ** 0.5  # Kolmogorov-Smirnov against uniform on (cut, 2], p ~ 0.001


def test_build_loader_chooses_and_refuses_backends(bundle, monkeypatch):
    common = dict(train=False, batch_size=4, device=torch.device("cpu"), seed=0)
    assert isinstance(build_loader(bundle.test, bundle, loader=LoaderConfig(backend="dali", num_workers=1), **common), DaliLoader)
    # auto on a CPU keeps the torch DataLoader (DALI pays off where it decodes on the GPU).
    assert isinstance(build_loader(bundle.test, bundle, loader=LoaderConfig(num_workers=0), **common), FileLoader)
    synthetic = make_synthetic(SyntheticConfig(num_classes=4, max_per_class=20, imbalance_factor=2.0, image_size=8))
    with pytest.raises(ValueError, match="backend=dali decodes image files"):
        build_loader(synthetic.train, synthetic, loader=LoaderConfig(backend="dali"), **common)
    monkeypatch.setattr(dali_module, "dali_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'ltscale\[dali\]'"):
        build_loader(bundle.test, bundle, loader=LoaderConfig(backend="dali"), **common)


def test_training_crops_and_flips_follow_random_resized_crop(tmp_path):
    """RandomResizedCrop's scale 0.08-1 and ratio 3/4-4/3, and a horizontal flip with probability 1/2,
    measured on crops of a ramp image (the pixel comparisons with torchvision cover evaluation only)."""
    n = 200
    loader = DaliLoader(
        ramp_split(tmp_path, n), train=True, batch_size=50, sampler=None, image_size=IMAGE_SIZE,
        normalization=IMAGENET_NORMALIZATION, num_workers=2, max_bad_image_fraction=0.0, drop_last=False, device="cpu",
        color_jitter=0.0,
    )
    width, height = crop_extents(torch.cat([b["image"] for b in loader]))
    assert abs((width < 0).float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5  # binomial, 4 sigma
    area, ratio = width.abs() * height, width.abs() / height
    assert area.min() > 0.06 and area.max() < 1.02 and ratio.min() > 0.7 and ratio.max() < 4 / 3 + 0.05
    # The whole ranges are drawn from (one crop in 200 outside these would be a ~1e-20 chance).
    assert area.min() < 0.3 and ratio.min() < 0.85 and ratio.max() > 1.18


def test_crops_and_flips_are_drawn_anew_each_epoch_and_per_rank(bundle):
    """The pipeline seed includes the epoch and the rank: with the same images in the same order (an
    unshuffled sampler) and no colour jitter (seeded apart), epochs and ranks must not crop and flip
    alike, while the same epoch and rank repeat exactly."""
    def images(epoch, rank):
        loader = _loader(DaliLoader, bundle.train, train=True, shuffle=False, rank=rank, color_jitter=0.0)
        loader.set_epoch(epoch)
        return torch.cat([b["image"] for b in loader])

    first = images(0, 0)
    assert torch.equal(images(0, 0), first)
    assert not torch.equal(images(1, 0), first) and not torch.equal(images(0, 1), first)


def test_drop_last_drops_the_short_batch_and_len_agrees(bundle):
    loader = _loader(DaliLoader, bundle.train, train=True, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and [len(b["index"]) for b in batches] == [4, 4]
    assert len(set(torch.cat([b["index"] for b in batches]).tolist())) == 8


def test_a_sound_or_padded_jpeg_reaches_dali_as_its_own_bytes(tmp_path):
    """Only suspect files go through the CPU decoders: a sound JPEG, or one with bytes after its end
    marker (some cameras pad files), is handed to DALI unchanged (not re-encoded as a PNG)."""
    padded = tmp_path / "padded.JPEG"
    padded.write_bytes(_sample_files()[1].read_bytes() + b"\0" * 100)
    for path in (_sample_files()[1], padded):
        assert np.array_equal(dali_module._read_bytes(str(path)), np.fromfile(path, dtype=np.uint8))


@pytest.mark.gpu
def test_gpu_decoding_matches_the_cpu_pipeline(bundle):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = torch.cat([b["image"] for b in _loader(DaliLoader, bundle.test, train=False, shuffle=False)])
    loader = DaliLoader(
        bundle.test, train=False, batch_size=4, sampler=None, image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION,
        num_workers=2, max_bad_image_fraction=0.0, drop_last=False, device="cuda",
    )
    batches = list(loader)
    assert all(b["image"].is_cuda and b["index"].is_cuda for b in batches)
    gpu = torch.cat([b["image"] for b in batches]).cpu()
    # nvJPEG's IDCT and the GPU resampler differ from libjpeg-turbo's by a few grey levels.
    assert (gpu - cpu).abs().mean() <= 2 * ONE_GREY_LEVEL
    train = DaliLoader(
        bundle.train, train=True, batch_size=4, sampler=None, image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION,
        num_workers=2, max_bad_image_fraction=0.0, drop_last=False, device="cuda", views=2,
    )
    batch = next(iter(train))
    assert batch["image"].shape == batch["image_key"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_jpeg_loader_benchmark_cpu_smoke(tmp_path):
    """tools/bench/jpeg_loader.py end to end on a CPU: three pipelines side by side, the report."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    images = tmp_path / "images"
    images.mkdir()
    for source in _sample_files()[:4]:
        shutil.copyfile(source, images / source.name)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(repo / "tools" / "bench" / "jpeg_loader.py"), "--images", str(images), "--count", "24",
         "--batch-size", "8", "--image-size", "32", "--workers", "1", "--epochs", "1", "--warmup-epochs", "0",
         "--device", "cpu", "--variants", "usual,ltscale-torch,ltscale-dali", "--color-jitter", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["usual", "ltscale-torch", "ltscale-dali"]  # ffcv: tests/test_ffcv_loader.py
    for summary in report["variants"].values():
        assert summary["images_per_epoch"] == 24 and summary["images_per_second"] > 0
    assert report["environment"]["code_version"] and report["dali_version"]
    assert "| ltscale-dali |" in report["markdown"] and "| ltscale-dali |" in done.stdout
    assert "colour jitter 0," in report["markdown"]  # iNaturalist's setting, as asked

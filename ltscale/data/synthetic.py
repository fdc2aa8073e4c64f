"""A procedurally generated long-tailed image dataset, the embedded default for the demo and tests.

Each class is an oriented sinusoidal grating with a class-specific orientation, spatial frequency
and colour, drawn on a grid of attributes so that neighbouring classes share two of their three
attributes and are genuinely confusable. Every image jitters its class's attributes, adds a random
phase, a random distractor grating and pixel noise. A small CNN learns it in a few epochs, yet with
few examples the tail classes are easily swallowed by similar head classes, so long-tail methods
visibly differ on it (the reason it exists).

Class sizes follow the CIFAR-LT exponential profile: class 0 is the largest.
"""

from __future__ import annotations

import numpy as np

from ltscale.data.base import ArraySplit, DatasetBundle, Normalization
from ltscale.data.cifar import long_tailed_counts
from ltscale.data.config import SyntheticConfig


def _class_attributes(config: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    num_orientations = int(np.ceil(np.sqrt(config.num_classes)))
    num_frequencies = int(np.ceil(config.num_classes / num_orientations))
    grid = [(o, f) for o in range(num_orientations) for f in range(num_frequencies)][: config.num_classes]
    # Which grid cell is a head class and which a tail class is random, so that the tail is not a
    # contiguous (and therefore trivially separable) corner of attribute space.
    grid = [grid[i] for i in rng.permutation(len(grid))]
    orientation = np.array([np.pi * o / num_orientations for o, _ in grid])
    frequency = np.array([1.5 + 1.2 * f for _, f in grid]) / config.image_size
    palette = rng.uniform(0.2, 1.0, size=(config.num_classes, 3))
    return {
        "orientation": orientation,
        "frequency": frequency,
        "colour": palette,
        "orientation_step": np.array(np.pi / num_orientations),
    }


def _render(labels: np.ndarray, attributes: dict[str, np.ndarray], config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W, 3) uint8 images of the given labels, vectorised over the batch."""
    n, size = len(labels), config.image_size
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    step = float(attributes["orientation_step"])
    theta = attributes["orientation"][labels] + rng.normal(0, 0.18 * step, n)
    freq = attributes["frequency"][labels] * rng.uniform(0.85, 1.15, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
    grating = np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    colour = attributes["colour"][labels] * rng.uniform(0.8, 1.2, (n, 3))
    image = 0.5 + 0.35 * grating[..., None] * colour[:, None, None, :]
    # A distractor grating of random orientation and frequency: class evidence is not the only
    # structure in the image.
    d_theta = rng.uniform(0, np.pi, n)
    d_freq = rng.uniform(1.0, 5.0, n) / size
    d_proj = xx[None] * np.cos(d_theta)[:, None, None] + yy[None] * np.sin(d_theta)[:, None, None]
    distractor = np.sin(2 * np.pi * d_freq[:, None, None] * d_proj + rng.uniform(0, 2 * np.pi, n)[:, None, None])
    image += 0.15 * distractor[..., None] * rng.uniform(0.3, 1.0, (n, 1, 1, 3))
    image += rng.normal(0, config.noise * 0.35, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def make_synthetic(config: SyntheticConfig) -> DatasetBundle:
    """The synthetic long-tailed training set and a balanced test set, deterministic in ``config.seed``."""
    rng = np.random.default_rng([config.seed, 1])
    attributes = _class_attributes(config, rng)
    counts = long_tailed_counts(config.max_per_class, config.num_classes, config.imbalance_factor)
    train_labels = np.repeat(np.arange(config.num_classes), counts)
    test_labels = np.repeat(np.arange(config.num_classes), config.test_per_class)
    train_images = _render(train_labels, attributes, config, np.random.default_rng([config.seed, 2]))
    test_images = _render(test_labels, attributes, config, np.random.default_rng([config.seed, 3]))
    names = [f"class_{c:02d}" for c in range(config.num_classes)]
    name = f"synthetic-c{config.num_classes}-if{config.imbalance_factor:g}"
    mean = tuple(float(v) for v in train_images.reshape(-1, 3).mean(0) / 255)
    std = tuple(float(v) for v in train_images.reshape(-1, 3).std(0) / 255)
    return DatasetBundle(
        name=name,
        train=ArraySplit(f"{name}/train", train_labels, config.num_classes, names, images=train_images),
        test=ArraySplit(f"{name}/test", test_labels, config.num_classes, names, images=test_images),
        normalization=Normalization(mean, std),  # type: ignore[arg-type]
        image_size=config.image_size,
    )

"""Colour jitter for whole batches on the training device, shared by the torch, DALI and FFCV backends.

Why not in the decoding workers: colour jitter is pure arithmetic on every pixel, which the GPU
does for free on a batch, while in the decoding threads it costs throughput the loader needs:
on 2 CPU cores, moving it here took the FFCV backend from ~230 to ~390 images/s
(``tools/bench/jpeg_loader.py``, interleaved runs in RESULTS.md): its numba jitter operators had
taken 40 % of its time. Drawing every image's parameters once per epoch from a seed (as the
tensor loader does for its crops) also makes an epoch's colours independent of the workers and of
what ran before.

The definition is torchvision's ``ColorJitter(brightness=s, contrast=s, saturation=s)`` on float
images: each image gets factors b, c, t uniform in [max(0, 1 - s), 1 + s] and a random order of
the three operations, each a blend ``clamp(f * x + (1 - f) * reference)`` with reference 0
(brightness), the mean of the image's greyscale (contrast) or its greyscale (saturation), where
greyscale is 0.2989 R + 0.587 G + 0.114 B. (DALI's ``color_twist``, one linear map in a fixed
order with contrast around mid grey, is a different augmentation; MoCo's key view keeps it.)
"""

from __future__ import annotations

import numpy as np
import torch

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
JITTER_STREAM = 10  # the random stream's word in the epoch seed (the tensor loader's use 7-9)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor, *, maximum: float = 255.0) -> torch.Tensor:
    """Apply per-image brightness / contrast / saturation jitter in per-image order, in place.

    images: (B, 3, H, W) float in [0, ``maximum``], modified and returned; factors: (B, 3) float,
    the brightness, contrast and saturation factors of each image; orders: (B, 3) int64, a
    permutation of (BRIGHTNESS, CONTRAST, SATURATION) per image, applied left to right. No host
    synchronisation: which operation an image gets at each step is selected arithmetically.
    """
    batch, _, height, width = images.shape
    # One (B, 1, H, W) buffer, reused by every step, and in-place arithmetic throughout: on a CPU,
    # fresh 50 MB temporaries cost more in page faults than the arithmetic (0.6 s per 256-image
    # batch written with out-of-place ops, against 0.15 s like this, on 2 cores).
    grey = torch.empty(batch, 1, height, width, device=images.device, dtype=images.dtype)
    for position in range(3):
        operation = orders[:, position]  # (B,)
        factor = factors.gather(1, operation[:, None]).to(images.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        is_contrast = (operation == CONTRAST).to(images.dtype).view(-1, 1, 1, 1)
        is_saturation = (operation == SATURATION).to(images.dtype).view(-1, 1, 1, 1)
        torch.mul(images[:, 0:1], GREY_WEIGHTS[0], out=grey)
        grey.add_(images[:, 1:2], alpha=GREY_WEIGHTS[1]).add_(images[:, 2:3], alpha=GREY_WEIGHTS[2])
        grey_mean = grey.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        # The blend's reference: black for brightness (0), the grey mean for contrast, grey for
        # saturation; made arithmetically so no step depends on a value read back to the host.
        grey.mul_(is_saturation).add_(grey_mean * is_contrast).mul_(1 - factor)  # (1 - f) * reference
        # f * x + (1 - f) * reference in one pass (an elementwise op may write over its input).
        torch.addcmul(grey, images, factor, out=images).clamp_(0, maximum)
    return images


def draw_color_jitter(count: int, strength: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Parameters of ``count`` images: factors (count, 3) float32 uniform in
    [max(0, 1 - strength), 1 + strength] and orders (count, 3) int64, uniform permutations."""
    factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=(count, 3)).astype(np.float32)
    orders = np.argsort(rng.random((count, 3)), axis=1)  # argsort of i.i.d. keys: a uniform permutation
    return factors, orders.astype(np.int64)


class EpochColorJitter:
    """Colour jitter of ``strength`` for a loader's batches, in the order they are delivered.

    ``start(epoch, count)`` draws the parameters of the epoch's ``count`` images from a seed of
    (``seed``, epoch, stream, ``rank``) and moves them to ``device`` in one transfer; each call then
    jitters the next ``len(images)`` of them. Rank 0 draws what a single-process run draws.
    """

    def __init__(self, strength: float, *, seed: int, rank: int, device: torch.device) -> None:
        if strength < 0:
            raise ValueError(f"colour jitter strength must be >= 0, got {strength}")
        self.strength = strength
        self.seed = seed
        self.rank = rank
        self.device = device
        self._factors = torch.empty(0, 3, device=device)
        self._orders = torch.empty(0, 3, dtype=torch.int64, device=device)
        self._cursor = 0

    def start(self, epoch: int, count: int) -> None:
        words = [self.seed, epoch, JITTER_STREAM] + ([self.rank] if self.rank else [])
        factors, orders = draw_color_jitter(count, self.strength, np.random.default_rng(words))
        non_blocking = self.device.type == "cuda"
        self._factors = torch.from_numpy(factors).to(self.device, non_blocking=non_blocking)
        self._orders = torch.from_numpy(orders).to(self.device, non_blocking=non_blocking)
        self._cursor = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Jitter ``images`` ((B, 3, H, W) float in [0, 255]) in place with the next B draws."""
        rows = slice(self._cursor, self._cursor + images.shape[0])
        if rows.stop > self._factors.shape[0]:
            raise RuntimeError(
                f"colour jitter drawn for {self._factors.shape[0]} images this epoch, asked for rows "
                f"{rows.start}-{rows.stop}: the loader delivered more images than its sampler has"
            )
        self._cursor = rows.stop
        return color_jitter(images, self._factors[rows], self._orders[rows])

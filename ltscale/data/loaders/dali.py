"""The NVIDIA DALI backend for image files (:class:`FileSplit`: ImageNet-LT, Places-LT, iNat).

Why DALI: at ImageNet scale the torch DataLoader decodes JPEGs on CPU workers at ~400 images/s
per core, fewer than one GPU trains on. DALI decodes on the GPU (nvJPEG and the A100/H100
hardware decoder, ``device="mixed"``) and runs crop, resize, colour, flip and normalisation there;
on a CPU device the same graph runs on DALI's CPU threads (how the tests run it).

Sampling stays ltscale's: the loader's sampler (instance, class-balanced, rank shards) decides
the images of every batch, and an ``external_source`` callback reads their bytes (on a thread
pool) into the pipeline, so a run sees the same epochs with either backend and ``index`` names
the image each row came from.

Unreadable images follow :mod:`ltscale.data.loaders.bad_images`. A file that cannot be read is
substituted before it reaches DALI. A file DALI cannot decode makes the pipeline fail as a whole
(DALI has no per-sample error path, and a failed pipeline is dead); the loader then decodes the
images of the batches in flight with the CPU decoders to find the bad ones, records them, and
rebuilds the pipeline from the first batch not yet delivered, now with substitutes, so no batch
is lost or repeated. A failure no CPU decoder reproduces is raised with DALI's message.

Augmentations, as the torch backend's (:func:`ltscale.data.loaders.files.build_transform` and
``build_key_transform``) in DALI operators: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, fused
into the decoder so only the crop is decoded) + flip for training, then the same colour jitter as
the torch and FFCV backends, applied to DALI's output batch on the device
(:mod:`ltscale.data.loaders.jitter`: torchvision's definition, random order, contrast around the
image's mean; DALI's ``color_twist`` is one linear map in a fixed order with contrast around mid
grey, a different augmentation from the papers' recipes); shorter side to
``image_size * 256 / 224`` + centre crop for evaluation; MoCo v2's key view (scale 0.2-1,
jitter 0.4/0.4/0.4/0.1 with p 0.8, greyscale p 0.2, blur p 0.5, flip), whose jitter stays DALI's
``color_twist``. DALI's resampling filters differ from torchvision's by about a grey level.
"""

from __future__ import annotations

import concurrent.futures
import gc
import io
import logging
import os
import weakref
from typing import Any, Iterator

import numpy as np
import PIL.Image
import torch
import torch.utils.data

from ltscale.data.base import FileSplit, Normalization
from ltscale.data.errors import DatasetError
from ltscale.data.loaders import ImageFileLoader
from ltscale.data.loaders.files import _JPEG_MAGIC, check_pixel_limit, decode_image_file, describe_error, jpeg_frame_size

logger = logging.getLogger(__name__)

# Batches DALI works on ahead of the one being trained on: the CPU stage of batch k+2 overlaps
# the GPU stage of k+1 and the training step on k.
PREFETCH_DEPTH = 2
_MAX_LISTED = 8  # images quoted in an error message
_IDENTITY_SIGMA = 0.01


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (the ``dali`` extra is installed)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _require_dali() -> None:
    if not dali_available():
        raise RuntimeError(
            "data.loader.backend=dali needs NVIDIA DALI, which is not installed: "
            "pip install 'ltscale[dali]' (or choose data.loader.backend=torch)"
        )


# Formats DALI's decoders read, by their first bytes (JPEG, PNG, BMP, TIFF, WebP, PNM, JPEG 2000).
_DALI_FORMATS = (_JPEG_MAGIC, b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4",
                 b"P5", b"P6", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")
_EOI_WINDOW = 4096  # a JPEG's end-of-image marker is this close to the end (trailing padding allowed)


def _jpeg_header_ok(data: np.ndarray) -> bool:
    """Whether the JPEG's marker segments chain properly up to its first scan, with a frame header
    before it, and the frame is within PIL's decompression-bomb limit."""
    size = jpeg_frame_size(data)
    if size is None:
        return False
    try:
        check_pixel_limit(*size)
    except PIL.Image.DecompressionBombError:
        return False
    return True


def _header_within_pixel_limit(data: np.ndarray) -> bool:
    """Whether PIL, opening a non-JPEG image lazily (its header only: nothing is decoded), finds it
    within its decompression-bomb limit. A header PIL cannot read is DALI's decoder's to judge."""
    try:
        with PIL.Image.open(io.BytesIO(data.tobytes())):
            return True
    except PIL.Image.DecompressionBombError:
        return False
    except Exception:  # noqa: BLE001 - not PIL's to decide
        return True


def _decoded_on_cpu(path: str) -> np.ndarray | str:
    """The image decoded by the CPU decoders and re-encoded losslessly (PNG), or why it cannot be."""
    try:
        image = decode_image_file(path)
    except Exception as error:  # any decoder failure is a bad file
        return describe_error(error)
    encoded = io.BytesIO()
    PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(encoded, "PNG", compress_level=1)
    return np.frombuffer(encoded.getbuffer(), dtype=np.uint8).copy()


def _read_bytes(path: str) -> np.ndarray | str:
    """The file's bytes as DALI should decode them, or why they cannot be had (a string).

    What DALI would mishandle goes through the CPU decoders first (which decide whether the file is
    bad, as for the torch backend) and reaches DALI as a PNG of their result:
    - a JPEG without its end-of-image marker (truncated): DALI decodes only a training crop's
      region, so it read a truncated file whenever the crop missed the missing rows;
    - a JPEG whose marker segments do not chain up to the scan: DALI 2.4's CPU decoder can crash
      the process on such a file ("[jpeg_parser] Invalid marker", then a segmentation fault) in
      batches of 64 and more, instead of failing the pipeline;
    - a format DALI does not decode (GIF, for one);
    - an image over PIL's decompression-bomb limit (the CPU decoders refuse it: a bad file).
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        return describe_error(error)
    if not data.size:
        return "empty file"
    head = data[:12].tobytes()
    if head.startswith(_JPEG_MAGIC):
        if b"\xff\xd9" in data[-_EOI_WINDOW:].tobytes() and _jpeg_header_ok(data):
            return data
        return _decoded_on_cpu(path)
    if head.startswith(_DALI_FORMATS) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        if _header_within_pixel_limit(data):
            return data
    return _decoded_on_cpu(path)


def _check_decodes(path: str) -> str:
    try:
        decode_image_file(path)
    except Exception as error:  # any decoder failure marks the file bad
        return describe_error(error)
    return ""


_fork_guard_installed = False


def _install_fork_guard() -> None:
    """Collect garbage before every fork of this process.

    A DALI pipeline left in a reference cycle is freed by whichever garbage collection finds it;
    if that is the one Python runs in a freshly forked child (a DataLoader worker), the
    pipeline's destructor reaches for threads the child does not have and the worker dies with
    SIGSEGV. Collecting in the parent first frees such pipelines where their threads live.
    """
    global _fork_guard_installed
    if not _fork_guard_installed:
        os.register_at_fork(before=gc.collect)
        _fork_guard_installed = True


def random_blur(images: Any, image_size: int) -> Any:
    """MoCo v2's (SimCLR's) Gaussian blur, inside a DALI pipeline definition: with probability 0.5,
    sigma uniform in [0.1, 2], a window of about a tenth of the ``image_size`` images (odd, at
    least 3 pixels)."""
    from nvidia.dali import fn, types

    window = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    # Unblurred samples get sigma 0.01, whose kernel is the identity to float precision: per-
    # sample arguments keep image arithmetic (and CPU/GPU operand mixing) out of the graph.
    blur = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
    sigma = _IDENTITY_SIGMA + blur * (fn.random.uniform(range=[0.1, 2.0]) - _IDENTITY_SIGMA)
    return fn.gaussian_blur(images, window_size=window, sigma=sigma)


class _EpochSource:
    """DALI's ``external_source`` callback for one pipeline: batch ``start + iteration`` of
    ``batches``, read with the loader's substitutions; remembers what it served per batch.

    It holds its loader weakly: the loader owns the pipeline, which owns this callback, and a
    strong reference back would make every dropped loader cyclic garbage (see
    :func:`_install_fork_guard` for why that matters)."""

    def __init__(self, loader: "DaliLoader", batches: list[np.ndarray], start: int) -> None:
        self._read_batch = weakref.WeakMethod(loader._read_batch)
        self.batches = batches
        self.start = start
        self.served: dict[int, np.ndarray] = {}  # batch number -> dataset indices fed to DALI

    def __call__(self, info: Any) -> list[np.ndarray]:
        number = self.start + info.iteration
        if number >= len(self.batches):
            raise StopIteration
        read_batch = self._read_batch()
        if read_batch is None:  # the loader is gone; nothing will consume this batch
            raise StopIteration
        served, data = read_batch(self.batches[number])
        self.served[number] = served
        return data


class DaliLoader(ImageFileLoader):
    """Batches of a :class:`FileSplit` on ``device``, decoded and augmented by a DALI pipeline.

    Same interface and batch contents as :class:`ltscale.data.loaders.files.FileLoader`:
    ``{"image", "target", "index"}`` (+ ``"image_key"`` with ``views=2``), ``image`` float32
    (B, 3, image_size, image_size) normalised with ``normalization``, ``index`` the dataset index
    each row came from (a substitute's for a replaced training image). ``num_workers`` is the
    number of DALI CPU threads and file-reading threads. Augmentation randomness comes from the
    pipeline seed, derived from ``seed``, ``rank`` and the epoch, so an epoch's crops do not
    depend on what ran before it (a resumed run sees the epochs an unbroken one would). One
    exception: the pipeline is rebuilt, with a new seed for the rest of the epoch, after a file
    fails to decode; a resumed run meets an earlier epoch's bad file again (the loader's list of
    bad files is not part of the checkpoint), so from there its epoch's crops differ.
    """

    def __init__(
        self,
        split: FileSplit,
        *,
        train: bool,
        batch_size: int,
        sampler: torch.utils.data.Sampler | None,
        image_size: int,
        normalization: Normalization,
        num_workers: int,
        max_bad_image_fraction: float,
        drop_last: bool,
        device: torch.device | str,
        color_jitter: float = 0.4,
        views: int = 1,
        seed: int = 0,
        rank: int = 0,
        substitute: bool | None = None,
    ) -> None:
        _require_dali()
        super().__init__(split, train=train, batch_size=batch_size, sampler=sampler, drop_last=drop_last, device=device,
                         views=views, max_bad_image_fraction=max_bad_image_fraction, normalization=normalization,
                         color_jitter=color_jitter, seed=seed, rank=rank, substitute=substitute)
        self.image_size = image_size
        self.threads = max(1, num_workers)
        self.seed = seed
        self.rank = rank
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # file-reading threads, made on first use
        # A pipeline that finished its last epoch cleanly is reset and reused when the next epoch
        # asks for the same seed (evaluation loaders); anything else gets a fresh one.
        self._pipe: Any = None
        self._source: _EpochSource | None = None
        self._pipe_seed: int | None = None
        self._reusable = False

    # ------------------------------------------------------------------ reading

    def _read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The bytes of ``indices``' images, known-bad and unreadable ones replaced per the policy."""
        served = np.array([self.ledger.replacement(int(i)) for i in indices], dtype=np.int64)
        data: list[Any] = list(self._readers().map(_read_bytes, [self.ledger.path(int(i)) for i in served]))
        while True:
            failed = [position for position, item in enumerate(data) if isinstance(item, str)]
            if not failed:
                return served, data
            self.ledger.record([(int(served[p]), data[p]) for p in failed])
            for position in failed:
                served[position] = self.ledger.replacement(int(indices[position]))
            reread = self._readers().map(_read_bytes, [self.ledger.path(int(served[p])) for p in failed])
            for position, item in zip(failed, reread):
                data[position] = item

    # ------------------------------------------------------------------ the pipeline

    def _seed_for(self, attempt: int) -> int:
        epoch = self._epoch if self.train else 0
        return (self.seed * 1_000_003 + self.rank * 7_919 + epoch * 104_729 + attempt * 15_485_863) % (2**31 - 1)

    def _build(self, source: _EpochSource, seed: int) -> Any:
        from nvidia.dali import Pipeline

        _install_fork_guard()
        on_gpu = self.device.type == "cuda"
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device.index if on_gpu else None,
            seed=seed,
            prefetch_queue_depth=PREFETCH_DEPTH,
        )
        with pipe:
            pipe.set_outputs(*self._graph(source, decoder_device="mixed" if on_gpu else "cpu"))
        pipe.build()
        return pipe

    def _graph(self, source: _EpochSource, decoder_device: str) -> list[Any]:
        from nvidia.dali import fn, types

        size = self.image_size
        mean = [255 * m for m in self.normalization.mean]
        std = [255 * s for s in self.normalization.std]

        def normalize(images: Any, crop: dict[str, Any] | None = None, **mirror: Any) -> Any:
            return fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, **(crop or {}), **mirror
            )

        jpegs = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.UINT8, ndim=1)
        # EXIF orientation is ignored, as torchvision's and PIL's decoders do for the torch backend.
        decode = dict(device=decoder_device, output_type=types.RGB, adjust_orientation=False)
        if not self.train:
            return [normalize(*self._resize_centre_crop(jpegs, decode))]

        if self.views == 1:
            # Decoding only the crop's region saves most of the decode work on large images.
            query = fn.decoders.image_random_crop(
                jpegs, **decode, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
            )
            query = fn.resize(query, size=[size, size])
            decoded = None
        else:
            decoded = fn.decoders.image(jpegs, **decode)
            query = fn.random_resized_crop(
                decoded, size=[size, size], random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
            )
        flip = fn.random.coin_flip(probability=0.5)
        if self._jitter is not None:
            # Colour jitter and normalisation follow in torch, on the device (see the module doc):
            # the query leaves DALI as float in [0, 255].
            outputs = [fn.crop_mirror_normalize(query, dtype=types.FLOAT, output_layout="CHW", mirror=flip)]
        else:
            outputs = [normalize(query, mirror=flip)]
        if decoded is not None:
            outputs.append(normalize(self._moco_key(decoded), mirror=fn.random.coin_flip(probability=0.5)))
        return outputs

    def _resize_centre_crop(self, jpegs: Any, decode: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """torchvision's ``Resize(image_size * 256 / 224)`` + ``CenterCrop(image_size)`` to the
        pixel: sizes floored and the crop offset rounded half to even as torchvision does (DALI's
        own ``resize_shorter`` rounds the long side and its centre crop rounds halves up, which
        shifts the crop by a pixel on most ImageNet images). Returns the resized images and the
        crop arguments for :func:`crop_mirror_normalize`."""
        import nvidia.dali.math as dali_math
        from nvidia.dali import fn, types

        size = self.image_size
        shorter = int(size * 256 / 224)
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C) from the header
        height, width = shape[0], shape[1]
        short_side = dali_math.min(height, width)
        new_height, new_width = (shorter * height) // short_side, (shorter * width) // short_side
        images = fn.resize(
            fn.decoders.image(jpegs, **decode),
            size=fn.cast(fn.stack(new_height, new_width), dtype=types.FLOAT),
        )

        def position(extent: Any) -> Any:
            # Offset round((extent - size) / 2) with halves to even, as a crop_pos in [0, 1];
            # the +0.25 keeps DALI's own rounding of crop_pos * (extent - size) on that integer.
            slack = extent - size
            half = slack // 2
            offset = half + (slack % 2) * (half % 2)
            return (fn.cast(offset, dtype=types.FLOAT) + 0.25) / fn.cast(dali_math.max(slack, 1), dtype=types.FLOAT)

        return images, {"crop": (size, size), "crop_pos_y": position(new_height), "crop_pos_x": position(new_width)}

    def _moco_key(self, decoded: Any) -> Any:
        """MoCo v2's key augmentation; "with probability p" is a per-sample coin that switches an
        operator's parameters between their random values and the identity, so the graph has no
        branches."""
        from nvidia.dali import fn, types

        size = self.image_size
        key = fn.random_resized_crop(decoded, size=[size, size], random_area=[0.2, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        jitter = fn.cast(fn.random.coin_flip(probability=0.8), dtype=types.FLOAT)
        keep_colour = 1.0 - fn.cast(fn.random.coin_flip(probability=0.2), dtype=types.FLOAT)

        def factor(strength: float) -> Any:
            return 1.0 + jitter * fn.random.uniform(range=[-strength, strength])

        key = fn.color_twist(
            key,
            brightness=factor(0.4),
            contrast=factor(0.4),
            saturation=factor(0.4) * keep_colour,  # saturation 0 is greyscale
            hue=jitter * fn.random.uniform(range=[-36.0, 36.0]),  # torchvision's hue 0.1 of a turn, in degrees
        )
        return random_blur(key, size)

    def _start(self, batches: list[np.ndarray], first: int, attempt: int) -> tuple[Any, _EpochSource]:
        seed = self._seed_for(attempt)
        if self._reusable and first == 0 and seed == self._pipe_seed and self._pipe is not None:
            assert self._source is not None
            self._source.batches, self._source.start, self._source.served = batches, 0, {}
            self._pipe.reset()
            return self._pipe, self._source
        self._discard()
        source = _EpochSource(self, batches, first)
        self._pipe, self._source, self._pipe_seed = self._build(source, seed), source, seed
        return self._pipe, source

    def _discard(self) -> None:
        self._pipe = self._source = self._pipe_seed = None
        self._reusable = False

    def close(self) -> None:
        """Release the DALI pipeline (its threads and buffers) and the file-reading threads now
        rather than when the loader is garbage collected. The loader rebuilds what it needs if
        iterated again."""
        self._discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _readers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="ltscale-dali-read")
        return self._pool

    def _diagnose(self, source: _EpochSource, first: int, error: BaseException) -> None:
        """After a pipeline failure: find and record the bad images among the batches in flight
        (from ``first``), or raise when none of them fails to decode on the CPU."""
        suspects = sorted({int(i) for number, served in source.served.items() if number >= first for i in served})
        reasons = list(self._readers().map(_check_decodes, [self.ledger.path(i) for i in suspects]))
        failures = [(index, reason) for index, reason in zip(suspects, reasons) if reason]
        if not failures:
            listed = ", ".join(self.ledger.path(i) for i in suspects[:_MAX_LISTED])
            raise RuntimeError(
                f"the DALI pipeline of {self.split.name} failed, but every image of the batches it was "
                f"working on decodes with the CPU decoders ({len(suspects)} images: {listed}"
                f"{', ...' if len(suspects) > _MAX_LISTED else ''}). DALI said: {describe_error(error)}. "
                "If DALI cannot decode these files, re-encode them or use data.loader.backend=torch."
            ) from error
        self.ledger.record(failures)

    # ------------------------------------------------------------------ iteration

    def _to_torch(self, tensors: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensors.as_tensor()  # every sample has the same (3, S, S) shape
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        # On a GPU the copy is ordered on torch's current stream, so no host sync is needed.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(dense, out, cuda_stream=stream)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
        batches = [indices[i : min(i + self.batch_size, stop)] for i in range(0, stop, self.batch_size)]
        if not batches:
            return
        self._start_epoch(stop)  # rows in delivery order, across pipeline rebuilds
        delivered, attempt = 0, 0
        pipe, source = self._start(batches, 0, attempt)
        self._reusable = False
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                break
            except DatasetError:
                self._discard()  # raised by the source: the bad-image policy says stop
                raise
            except Exception as error:  # DALI reports a failed operator as RuntimeError
                self._discard()
                self._diagnose(source, delivered, error)
                attempt += 1
                logger.warning("rebuilding the DALI pipeline of %s from batch %d after a decoding failure", self.split.name, delivered)
                pipe, source = self._start(batches, delivered, attempt)
                continue
            served = source.served.pop(delivered)
            delivered += 1
            index = torch.from_numpy(served)
            image = self._to_torch(outputs[0])  # (B, 3, S, S)
            if self._jitter is not None:  # DALI left it in [0, 255] (see _graph)
                image = self._on_device(image)
            batch = {
                "image": image,
                "target": torch.from_numpy(self.split.targets[served]).to(self.device, non_blocking=True),
                "index": index.to(self.device, non_blocking=True),
            }
            if self.views == 2:
                batch["image_key"] = self._to_torch(outputs[1])
            yield batch
        self._reusable = True

"""The FFCV backend for image files (:class:`FileSplit`: ImageNet-LT, Places-LT, iNat).

Why FFCV: it reads one pre-written ``.beton`` file (images stored as JPEGs at a capped
resolution, labels, indices) with memory-mapped pages and decodes + crops in compiled (numba)
worker threads, which removes the per-file open and the Python per-sample cost of a DataLoader.

The ``.beton`` is written once per split, image root and image settings (``data.loader.ffcv``),
into a cache directory, and reused by every later run (written again when an image it stored a
substitute for has been repaired). Writing is where the
bad-image policy of :mod:`ltscale.data.loaders.bad_images` applies: every image is decoded then,
so an unreadable training image is replaced by the next readable image of its class (warned
about and remembered in the file's sidecar, so ``bad_files`` still names it), more than the
allowed fraction stops the write with the list, and an unreadable test image is an error naming
it. A refused or interrupted write leaves no file under the final name.

Sampling stays ltscale's: a traversal order hands FFCV the loader's sampler's indices for the
epoch, so instance / class-balanced sampling and rank shards behave as in the other backends and
``index`` names the image of each row. Augmentations: FFCV's RandomResizedCrop decoder (scale
0.08-1, ratio 3/4-4/3) and flip for training, then brightness / contrast / saturation jitter on
the device, on the whole batch, as the torch backend does (:mod:`ltscale.data.loaders.jitter`:
FFCV's own numba jitter operators took 40 % of this loader's time on a 2-core machine); centre
crop of ``224 / 256`` of the shorter side, resized, for evaluation (FFCV decodes crop-then-resize,
torchvision resizes then crops the same region). FFCV has one pipeline per field, so MoCo's
second view (``views=2``) is not available here; use the ``dali`` or ``torch`` backend for it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.utils.data

from ltscale.data.base import FileSplit, Normalization
from ltscale.data.config import FfcvConfig
from ltscale.data.errors import DatasetError
from ltscale.data.loaders import ImageFileLoader
from ltscale.data.loaders.bad_images import BadImageLedger, SameClassCandidates
from ltscale.data.loaders.ffcv_write import FAILURE_PREFIX, SEGMENT_PREFIX, WriteJob, remove_segment
from ltscale.data.loaders.files import decode_image_file, describe_error
from ltscale.dist.runtime import usable_cpus
from ltscale.engine.checkpoint import atomic_write_json

logger = logging.getLogger(__name__)

WRITE_POLL_S = 5.0
"""How often the ranks of a multi-process run ask whether rank 0's ``.beton`` write is done."""


def ffcv_available() -> bool:
    """Whether FFCV can be imported (the ``ffcv`` extra and its system libraries are installed)."""
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


class _KeepTorchThreads:
    """Undo FFCV's changes to torch's intra-op thread count.

    FFCV sets ``torch.set_num_threads`` process-wide: to 1 when it is imported, and to the
    loader's ``num_workers`` whenever a loader is built or an epoch starts (from its epoch
    thread). A training process should keep the count it had; so the count is taken before the
    first import and restored after each of those moments."""

    threads: int | None = None

    @classmethod
    def remember(cls) -> None:
        if cls.threads is None:
            cls.threads = torch.get_num_threads()

    @classmethod
    def restore(cls) -> None:
        if cls.threads is not None and torch.get_num_threads() != cls.threads:
            torch.set_num_threads(cls.threads)


def _require_ffcv() -> None:
    _KeepTorchThreads.remember()
    available = ffcv_available()
    _KeepTorchThreads.restore()
    if not available:
        raise RuntimeError(
            "data.loader.backend=ffcv needs FFCV, which is not installed: apt-get install libturbojpeg0-dev "
            "libopencv-dev, then pip install 'ltscale[ffcv]' (or choose data.loader.backend=torch or dali)"
        )


# ---------------------------------------------------------------------- writing


class _WriterDataset(torch.utils.data.Dataset):
    """What FFCV's writer reads (in its worker processes): ``(HWC uint8 image, label, served)``.
    ``served`` is the index of the image actually stored (a same-class substitute's for a bad
    training image), or -1 when none could be, which the write then reports."""

    def __init__(self, split: FileSplit, substitute: bool) -> None:
        self.split = split
        self.substitute = substitute
        self.candidates = SameClassCandidates(split.targets, split.num_classes)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        tries = [index] + (self.candidates(index) if self.substitute else [])
        for candidate in tries:
            try:
                image = decode_image_file(self.split.root / self.split.paths[candidate])
            except Exception:  # any decoder failure: the next candidate; the reason is re-read later
                continue
            return np.ascontiguousarray(image.permute(1, 2, 0).numpy()), int(self.split.targets[index]), int(candidate)
        return np.zeros((8, 8, 3), dtype=np.uint8), int(self.split.targets[index]), -1


def beton_path(split: FileSplit, config: FfcvConfig) -> Path:
    """Where ``split``'s file lives: named by the split's fingerprint (its list: paths and labels),
    the image root it was read from, and the stored-image settings.

    The root is in the name because the list does not describe the pixels: the same list over
    another copy of the images (another root) is other data until shown otherwise. Files changed
    in place under the same root and names are not noticed, except the ones the write found
    unreadable (:func:`_repaired`); delete the cached file after editing images in place.
    """
    from ltscale.config.hashing import config_hash

    settings = config_hash(config.max_resolution, config.jpeg_quality, str(Path(split.root).resolve()))
    name = split.name.replace("/", "-")  # imagenet_lt/train -> imagenet_lt-train
    return config.directory() / f"{name}-{split.fingerprint()}-{settings}.beton"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_served(path: Path) -> np.ndarray:
    """The ``served`` column of a written file, in order: integer fields live in the file's
    metadata table, so this reads no image."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return np.asarray(reader.metadata[f"f{reader.field_names.index('served')}"], dtype=np.int64)


def _stored_bad(path: Path) -> dict[int, str]:
    """The images the write of ``path`` found unreadable (dataset index -> reason), from its sidecar."""
    return {int(k): v for k, v in json.loads(_sidecar(path).read_text()).get("bad", {}).items()}


def _repaired(split: FileSplit, path: Path) -> list[str]:
    """The files the write of ``path`` found unreadable (and stored substitutes for) that decode now:
    repaired or re-downloaded since, as the bad-image error asks. The file is then stale."""
    repaired = []
    for index in sorted(_stored_bad(path)):
        try:
            decode_image_file(split.root / split.paths[index])
        except Exception:  # still unreadable: the stored substitute stands
            continue
        repaired.append(str(split.root / split.paths[index]))
    return repaired


def _remove_abandoned_partials(path: Path) -> None:
    """Delete this host's partial writes of ``path`` whose writer process is gone (a killed write
    leaves one, as large as the file). Other hosts' are left alone: their processes are not
    visible from here, and a write there may be running."""
    from ltscale.tracking.attempts import pid_exists

    host = socket.gethostname()
    for partial in path.parent.glob(f".{path.name}.{host}.*.partial"):
        pid = partial.name[len(f".{path.name}.{host}.") : -len(".partial")]
        if pid.isdigit() and not pid_exists(int(pid)):
            logger.info("removing %s, left by an interrupted write (process %s is gone)", partial, pid)
            partial.unlink(missing_ok=True)


def write_beton(split: FileSplit, config: FfcvConfig, *, substitute: bool, max_bad_image_fraction: float) -> Path:
    """Write ``split`` to its ``.beton`` (unless a complete one exists) and return its path.

    FFCV's writer runs in a fresh process (:mod:`ltscale.data.loaders.ffcv_write`); the bad-image
    policy is applied here, to what its workers stored. Raises :class:`DatasetError` (leaving no
    file) when the policy says stop or the write fails."""
    path = beton_path(split, config)
    if path.is_file() and _sidecar(path).is_file():
        repaired = _repaired(split, path)
        if not repaired:
            return path
        logger.warning("%d image(s) stored as substitutes in %s decode now (%s%s); writing the file again",
                       len(repaired), path, ", ".join(repaired[:3]), ", ..." if len(repaired) > 3 else "")
        _sidecar(path).unlink(missing_ok=True)  # incomplete from here until the new file is in place
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(path)
    partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
    # A job given 8 of 128 cores must not start 128 encoders on them.
    workers = config.write_workers or usable_cpus()
    logger.info("writing %d images of %s to %s (%d workers)", len(split), split.name, path, workers)
    try:
        _write_in_fresh_process(WriteJob(partial=str(partial), split=split, config=config, substitute=substitute,
                                         workers=workers, caller_pid=os.getpid()))
        served = _read_served(partial)
        if len(served) != len(split):
            raise DatasetError(f"{partial}: {len(served)} images written for the {len(split)} of {split.name}")
        ledger = BadImageLedger(split, substitute=substitute, max_bad_image_fraction=max_bad_image_fraction)
        replaced = np.flatnonzero(served != np.arange(len(split)))
        for index in replaced.tolist():
            # The workers only said "not this one"; decode again here for the reason, and every
            # candidate tried before the one that was stored.
            tried = [index] + (ledger.candidates(index) if substitute else [])
            for candidate in tried:
                if candidate == served[index]:
                    break
                try:
                    decode_image_file(split.root / split.paths[candidate])
                except Exception as error:
                    ledger.record([(candidate, describe_error(error))])
                else:
                    # It failed in a writer worker (a read error that passed: NFS, memory) and a
                    # substitute is stored in its place. Recorded like a bad file, so it is named and
                    # counted, and the next use of the file writes it again (it decodes then).
                    ledger.record([(candidate, "failed to decode while the file was written, decodes now "
                                               "(a passing read error?); stored a substitute this time")])
            if served[index] < 0:
                raise ledger.unusable(index)
        sidecar = {"kind": "ltscale.ffcv", "split": split.name, "images": len(split), "settings": asdict(config),
                   "bad": {str(k): v for k, v in ledger.bad.items()}}
        os.replace(partial, path)
        atomic_write_json(sidecar, _sidecar(path))  # written last, whole or not at all: it marks the file complete
    finally:
        partial.unlink(missing_ok=True)
    return path


def _write_in_fresh_process(job: WriteJob) -> None:
    """Run ``job`` in a new process (:mod:`ltscale.data.loaders.ffcv_write` says why), in a session
    of its own so that stopping it stops its workers too. Raises :class:`DatasetError` with its
    reason when it fails; stops it when this process is interrupted."""
    import ltscale

    env = dict(os.environ)
    # The child imports ltscale as this process does, installed or from a source tree.
    source = str(Path(ltscale.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # FFCV starts numba's threading layer on import; the writer runs nothing parallel in it, and
    # TBB's (numba's first choice) fork handling is what can hang a process that forks workers.
    env["NUMBA_THREADING_LAYER"] = "workqueue"
    payload = pickle.dumps(job)
    process = subprocess.Popen([sys.executable, "-m", "ltscale.data.loaders.ffcv_write"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=env, start_new_session=True)
    # Not communicate(): it waits for the end of stdout, which the writer's workers hold open too,
    # and a writer killed outright (the OOM killer may pick it; kill -9) left them writing on, for
    # hours on a large split. The writer's exit is what counts; its workers end with it.
    report: list[bytes] = []
    reader: threading.Thread | None = None
    try:
        reader = threading.Thread(target=lambda: report.append(process.stdout.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            with process.stdin:  # type: ignore[union-attr]
                process.stdin.write(payload)  # type: ignore[union-attr]
        except BrokenPipeError:  # it ended before reading its job: its exit code and output say why
            pass
        if hasattr(os, "waitid"):
            # Waited for without being reaped: its process group id cannot be reused before it is.
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        else:  # a platform without os.waitid: reaped first, a (tiny) chance of the id's reuse below
            process.wait()
    finally:
        # What is left of the write: workers that outlived a killed writer, or all of it when
        # interrupted here (Ctrl-C); workers still exiting after a success (FFCV does not join them).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if reader is not None:
            reader.join()
        process.stdout.close()  # type: ignore[union-attr]
        lines = b"".join(report).decode(errors="replace").splitlines()
        if process.returncode != 0:  # its resource tracker, which would remove the segment, is killed too
            for line in lines:
                if line.startswith(SEGMENT_PREFIX):
                    remove_segment(line[len(SEGMENT_PREFIX):])
    if process.returncode != 0:
        reasons = [line[len(FAILURE_PREFIX):] for line in lines if line.startswith(FAILURE_PREFIX)]
        reason = reasons[0] if reasons else f"the writer process exited with code {process.returncode} (its output is above)"
        raise DatasetError(f"writing {job.split.name} to {job.partial} failed: {reason}")


def _run_into(future: concurrent.futures.Future, call: Any) -> None:
    try:
        future.set_result(call())
    except BaseException as error:  # handed to the waiting thread, which decides
        future.set_exception(error)


# ---------------------------------------------------------------------- reading


class FfcvLoader(ImageFileLoader):
    """Batches of a :class:`FileSplit` read from its ``.beton`` by an FFCV loader.

    Same interface and batch contents as :class:`ltscale.data.loaders.files.FileLoader` (one view:
    ``views=2`` is refused). The ``.beton`` is written on first use (by rank 0 in a multi-process
    run, the others wait for it); ``num_workers`` is FFCV's decoding threads. Colour jitter is
    drawn per epoch from ``seed``, ``rank`` and the epoch; the crops and flips are not
    reproducible (FFCV 1.0.2 draws them from numba's unseeded per-thread generators).
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
        ffcv: FfcvConfig | None = None,
    ) -> None:
        _require_ffcv()
        super().__init__(split, train=train, batch_size=batch_size, sampler=sampler, drop_last=drop_last, device=device,
                         views=views, max_bad_image_fraction=max_bad_image_fraction, normalization=normalization,
                         color_jitter=color_jitter, seed=seed, rank=rank, substitute=substitute)
        if views != 1:
            raise ValueError(
                "data.loader.backend=ffcv gives one augmented view per image (FFCV has one pipeline per field); "
                "MoCo's two views need data.loader.backend=dali or torch"
            )
        self.config = ffcv or FfcvConfig()
        self.path = self._shared_write(max_bad_image_fraction)
        # The images the write found unreadable (and replaced), for bad_files. A file written with
        # substitutes (by a training loader) read by a loader that must not substitute: its error.
        bad = _stored_bad(self.path)
        if bad and not self.substitute:
            self.ledger.record(sorted(bad.items()))  # raises, naming the first
        self.ledger.bad.update(bad)
        # A file found in the cache was written under the budget of the run that wrote it (the
        # budget does not name the file); this run's may be stricter.
        self.ledger.record([])
        self._loader = self._build(image_size, max(1, num_workers), seed * 1_000_003 + rank)

    def _shared_write(self, max_bad_image_fraction: float) -> Path:
        """Rank 0 writes (or finds) the file; the others get its path or its error.

        Writing iNaturalist's 437k images can take longer than the process group's timeout, so
        the others do not wait in one collective: rank 0 writes on a thread and every rank asks
        "done?" every :data:`WRITE_POLL_S` seconds in a short broadcast.
        """
        from ltscale.dist.gather import broadcast_object, is_main_process, rank_and_world_size

        write = functools.partial(write_beton, self.split, self.config, substitute=self.substitute,
                                  max_bad_image_fraction=max_bad_image_fraction)
        _, world_size = rank_and_world_size()
        if world_size == 1:
            return write()
        future: concurrent.futures.Future | None = None
        if is_main_process():
            # A daemon thread: Ctrl-C ends the process without waiting for the write (whose
            # partial file the next write on this host removes).
            future = concurrent.futures.Future()
            threading.Thread(target=_run_into, args=(future, write), name="ltscale-ffcv-write", daemon=True).start()
        while True:
            outcome: tuple[str, str] | None = None
            if future is not None and future.done():
                error = future.exception()
                if error is not None and not isinstance(error, DatasetError):
                    raise error  # a bug or an I/O failure: the others then fail on the lost connection
                outcome = ("", str(error)) if error is not None else (str(future.result()), "")
            outcome = broadcast_object(outcome)
            if outcome is not None:
                break
            time.sleep(WRITE_POLL_S)
        path, message = outcome
        if message:
            raise DatasetError(message)
        return Path(path)

    def _build(self, image_size: int, workers: int, seed: int) -> Any:
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.traversal_order.base import TraversalOrder
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        owner = self

        class SamplerOrder(TraversalOrder):
            """The epoch's indices from the loader's sampler (FFCV's own epoch count is ignored:
            ``set_epoch`` decides, as for the other backends).

            FFCV 1.0.2 accepts a custom order only as an *instance* of a TraversalOrder that it
            then calls with the loader, so this is made without the loader and bound on that call."""

            def __init__(self) -> None:  # noqa: D107 - bound in __call__
                pass

            def __call__(self, loader: Any) -> "SamplerOrder":
                TraversalOrder.__init__(self, loader)
                return self

            def sample_order(self, epoch: int) -> np.ndarray:
                return np.fromiter(iter(owner.sampler), dtype=np.int64)

        if self.train:
            image: list[Any] = [RandomResizedCropRGBImageDecoder((image_size, image_size)), RandomHorizontalFlip()]
        else:
            image = [CenterCropRGBImageDecoder((image_size, image_size), ratio=224 / 256)]
        non_blocking = self.device.type == "cuda"
        image += [ToTensor(), ToDevice(self.device, non_blocking=non_blocking), ToTorchImage(channels_last=False)]
        integers = [IntDecoder(), ToTensor(), Squeeze(-1), ToDevice(self.device, non_blocking=non_blocking)]
        loader = Loader(
            str(self.path), batch_size=self.batch_size, num_workers=workers, order=SamplerOrder(), seed=seed,
            drop_last=self.drop_last, os_cache=True, pipelines={"image": image, "label": integers, "served": list(integers)},
        )
        _KeepTorchThreads.restore()
        return loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._start_epoch(len(self.sampler))
        for position, (image, target, served) in enumerate(self._loader):
            if position == 0:  # the epoch thread has set its thread count by the first batch
                _KeepTorchThreads.restore()
            yield {
                "image": self._on_device(image),  # (B, 3, H, W); a float copy of FFCV's uint8 buffer
                # Copies: these are views of FFCV's output buffers, which it refills a few batches
                # later (int64 already, so .long() would not copy); a caller keeping the batch's
                # labels (feature extraction) would find later batches' labels in them.
                "target": target.clone(),
                "index": served.clone(),
            }

"""The FFCV backend for image files, CPU-only on real JPEGs: the ``.beton`` written once (with the
bad-image policy applied while writing), the sampler's epochs, batch contents, pixels close to the
torch backend's. The first FFCV epoch in a process spends ~10-40 s compiling (numba)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

_THREADS = torch.get_num_threads()
pytest.importorskip("ffcv", reason="FFCV is not installed (apt-get install libturbojpeg0-dev libopencv-dev; pip install 'ltscale[ffcv]')")
# Importing FFCV sets torch's thread count to 1 for the whole process (this test session included);
# the backend undoes that for its users, and this module for the tests collected after it.
torch.set_num_threads(_THREADS)

from ltscale.data import build_loader  # noqa: E402
from ltscale.data.base import DatasetBundle, FileSplit  # noqa: E402
from ltscale.data.config import FfcvConfig, LoaderConfig, SyntheticConfig  # noqa: E402
from ltscale.data.errors import DatasetError  # noqa: E402
from ltscale.data.image_list import IMAGENET_NORMALIZATION, build_image_list_dataset  # noqa: E402
from ltscale.data.loaders.ffcv_backend import FfcvLoader, beton_path, write_beton  # noqa: E402
from ltscale.data.loaders.files import FileLoader  # noqa: E402
from ltscale.data.samplers import InstanceBalancedSampler  # noqa: E402
from ltscale.data.synthetic import make_synthetic  # noqa: E402
from tests.test_image_list import IMAGE_SIZE, _make_tree, _truncate, crop_extents, ramp_split  # noqa: E402
# Imported here, not inside the test that uses it: importing a test module runs pytest's assertion
# rewriting (ast.parse), and CPython before 3.11.8 keeps the ast module's recursion count per
# interpreter. An earlier test's FFCV loader thread, compiling its pipeline (numba's array-expression
# lowering calls ast.parse there: checked), parsing at the same moment failed the import with
# "SystemError: AST constructor recursion depth mismatch" (this file run alone on 3.11.7; cpython#106905).
from ltscale.dist.ports import free_port  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> DatasetBundle:
    return build_image_list_dataset(_make_tree(tmp_path_factory.mktemp("imagenet_lt")))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> FfcvConfig:
    return FfcvConfig(cache_dir=str(tmp_path_factory.mktemp("ffcv")), write_workers=1)


def _loader(cls, split: FileSplit, *, train: bool, shuffle: bool = True, fraction: float = 0.001, ffcv: FfcvConfig | None = None,
            views: int = 1, substitute: bool | None = None, **overrides):
    extra = {"ffcv": ffcv} if cls is FfcvLoader else {}
    arguments = dict(
        train=train, batch_size=4, sampler=InstanceBalancedSampler(len(split), seed=0, shuffle=shuffle),
        image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION, num_workers=1, max_bad_image_fraction=fraction,
        drop_last=False, device="cpu", views=views, substitute=substitute, **extra,
    )
    return cls(split, **{**arguments, **overrides})


def test_training_epochs_follow_the_sampler_and_the_file_is_written_once(bundle, cache):
    ffcv = _loader(FfcvLoader, bundle.train, train=True, ffcv=cache)
    path = beton_path(bundle.train, cache)
    assert ffcv.path == path and path.is_file() and ffcv.bad_files == []
    written = path.stat().st_mtime_ns
    reference = _loader(FileLoader, bundle.train, train=True)
    assert len(ffcv) == 3
    orders = []
    for epoch in range(2):
        ffcv.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches = list(ffcv)
        assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in reference]  # same sampler, same order
        for batch in batches:
            assert batch["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.float32
            assert batch["target"].dtype == batch["index"].dtype == torch.int64
            assert batch["target"].tolist() == bundle.train.targets[batch["index"].numpy()].tolist()
        images = torch.cat([b["image"] for b in batches])
        assert images.mean().abs() < 0.5 and 0.5 < images.std() < 1.5
        orders.append(torch.cat([b["index"] for b in batches]).tolist())
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(10))
    # A second loader (another stage, another run) reuses the file.
    _loader(FfcvLoader, bundle.train, train=True, ffcv=cache)
    assert path.stat().st_mtime_ns == written


def test_batches_kept_by_the_caller_keep_their_labels_and_indices(bundle, cache):
    """FFCV refills its output buffers a few batches on; a caller that keeps every batch's labels
    (feature extraction for tau-norm, soft labels) must still hold each batch's own."""
    split = bundle.train
    loader = _loader(FfcvLoader, split, train=False, shuffle=False, ffcv=cache, batch_size=1)
    batches = list(loader)
    assert len(batches) == len(split) > 5  # more batches than FFCV's buffers
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(split)))
    assert torch.cat([b["target"] for b in batches]).tolist() == [int(t) for t in split.targets]


def test_evaluation_pixels_are_close_to_the_torch_backend(bundle, cache):
    batches = list(_loader(FfcvLoader, bundle.test, train=False, shuffle=False, ffcv=cache))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    images = torch.cat([b["image"] for b in batches])
    reference = torch.cat([b["image"] for b in _loader(FileLoader, bundle.test, train=False, shuffle=False)])
    # Stored as JPEG (quality 90) and cropped before resizing: close, not equal (~8 grey levels
    # on average here; a wrong crop or channel order is several times that).
    assert (images - reference).abs().mean() < 0.25
    grey = images[9] * torch.tensor(IMAGENET_NORMALIZATION.std).view(3, 1, 1) + torch.tensor(IMAGENET_NORMALIZATION.mean).view(3, 1, 1)
    assert (grey.amax(0) - grey.amin(0)).max() < 3 / 255  # the greyscale sample has three equal channels


def test_corrupt_training_image_is_replaced_when_writing(tmp_path, caplog):
    split = build_image_list_dataset(_make_tree(tmp_path / "tree")).train
    bad_path = split.root / split.paths[6]
    good = bad_path.read_bytes()
    _truncate(bad_path)
    config = FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1)
    with caplog.at_level(logging.WARNING, logger="ltscale.data.loaders"):
        loader = _loader(FfcvLoader, split, train=True, shuffle=False, fraction=0.2, ffcv=config)
    assert any(str(bad_path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    indices = torch.cat([b["index"] for b in loader]).tolist()
    assert indices == [0, 1, 2, 3, 4, 5, 7, 7, 8, 9]  # index 6 (class 1) served by index 7
    assert loader.bad_files == [str(bad_path)]
    # Remembered with the file: a later loader still names the bad image.
    assert _loader(FfcvLoader, split, train=True, shuffle=False, fraction=0.2, ffcv=config).bad_files == [str(bad_path)]
    # ... and holds it to its own budget: a run allowing no bad image stops, as the torch backend does.
    for cls in (FileLoader, FfcvLoader):
        with pytest.raises(DatasetError, match="more than the 0 allowed") as caught:
            list(_loader(cls, split, train=True, shuffle=False, fraction=0.0, ffcv=config))
        assert str(bad_path) in str(caught.value), cls
    # The file holds a substitute: an evaluation loader over this split must not serve it ...
    with pytest.raises(DatasetError, match="never substitutes") as caught:
        _loader(FfcvLoader, split, train=False, shuffle=False, fraction=0.2, ffcv=config)
    assert str(bad_path) in str(caught.value)
    # ... an unaugmented pass that substitutes (soft labels) does, as training did.
    passed = _loader(FfcvLoader, split, train=False, shuffle=False, fraction=0.2, ffcv=config, substitute=True)
    assert torch.cat([b["index"] for b in passed]).tolist() == [0, 1, 2, 3, 4, 5, 7, 7, 8, 9]
    # Repaired, as the warning asks: the stored substitute is stale, and the file is written again.
    bad_path.write_bytes(good)
    with caplog.at_level(logging.WARNING, logger="ltscale.data.loaders"):
        repaired = _loader(FfcvLoader, split, train=True, shuffle=False, fraction=0.2, ffcv=config)
    assert any("decode now" in r.getMessage() and str(bad_path) in r.getMessage() for r in caplog.records)
    assert repaired.bad_files == [] and torch.cat([b["index"] for b in repaired]).tolist() == list(range(10))
    assert len(list(Path(config.cache_dir).glob("*.beton"))) == 1


def test_an_image_that_failed_only_while_writing_is_named_and_written_again(tmp_path, monkeypatch, caplog):
    """A read that failed in a writer worker and works again afterwards (NFS, memory): the stored
    substitute is recorded like a bad file, not kept silently, and the next use writes the file again."""
    from ltscale.data.loaders import ffcv_backend

    split = build_image_list_dataset(_make_tree(tmp_path / "tree")).train
    passing = split.root / split.paths[6]
    good = passing.read_bytes()
    real = ffcv_backend._write_in_fresh_process

    def unreadable_while_written(job):  # image 6 reads as truncated in the workers, whole again after
        _truncate(passing)
        try:
            real(job)
        finally:
            passing.write_bytes(good)

    monkeypatch.setattr(ffcv_backend, "_write_in_fresh_process", unreadable_while_written)
    config = FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1)
    with caplog.at_level(logging.WARNING, logger="ltscale.data.loaders"):
        loader = _loader(FfcvLoader, split, train=True, shuffle=False, fraction=0.2, ffcv=config)
    assert loader.bad_files == [str(passing)]
    assert any("decodes now" in r.getMessage() and str(passing) in r.getMessage() for r in caplog.records)
    assert torch.cat([b["index"] for b in loader]).tolist() == [0, 1, 2, 3, 4, 5, 7, 7, 8, 9]
    monkeypatch.setattr(ffcv_backend, "_write_in_fresh_process", real)
    again = _loader(FfcvLoader, split, train=True, shuffle=False, fraction=0.2, ffcv=config)
    assert again.bad_files == [] and torch.cat([b["index"] for b in again]).tolist() == list(range(10))


class _PathsThatKillTheirReader(list):
    """A split's paths whose entry ``fatal`` (if given) kills any process but their maker that reads
    it: an FFCV writer worker dying in the middle of a write, as under the OOM killer. Entry ``stall``
    (if given) holds its reader for ten minutes: a worker still busy."""

    def __init__(self, paths: list[str], fatal: int | None = None, stall: int | None = None) -> None:
        super().__init__(paths)
        self.fatal, self.stall = fatal, stall
        self.maker = os.getpid()

    def __getitem__(self, index):
        if os.getpid() != self.maker:
            if index == self.fatal:
                os.kill(os.getpid(), signal.SIGKILL)
            if index == self.stall:
                time.sleep(600)
        return super().__getitem__(index)


def _held_split(tmp_path: Path, **entries: int) -> FileSplit:
    """250 images (FFCV's chunks of 100: 0-99, 100-199, 200-249) with ``_PathsThatKillTheirReader``'s
    ``entries``."""
    split = build_image_list_dataset(_make_tree(tmp_path / "tree")).train
    n = 250
    return dataclasses.replace(split, paths=_PathsThatKillTheirReader(list(np.resize(split.paths, n)), **entries),
                               targets=np.resize(split.targets, n))


def _segments() -> set[str]:
    """The POSIX shared-memory segments Python's SharedMemory made (FFCV's writer keeps its metadata in one)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def _segments_left(before: set[str], wait_s: float = 120.0) -> set[str]:
    """The segments made since ``before`` that outlast ``wait_s``. Another test process on the
    machine (the suite runs files in parallel) may be in the middle of a write of its own: its
    segment goes when that write ends, a leaked one stays."""
    deadline = time.monotonic() + wait_s
    while (new := _segments() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return new


def _kill_write_processes() -> None:
    """A failed test's leftovers, so that the next test's count of processes starts from none."""
    for line in _write_processes():
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


# Marks the environment of the processes a test here starts (writers and workers inherit it), so that
# _write_processes counts this test's and not those of another test run on the machine.
_MARK = f"LTSCALE_TEST_FFCV_WRITE={os.getpid()}-{time.time_ns()}"


@pytest.fixture(autouse=True)
def _mark_processes(monkeypatch):
    name, value = _MARK.split("=")
    monkeypatch.setenv(name, value)


def _write_processes() -> list[str]:
    """The processes of an FFCV write (the writer and its workers) that a test here started, alive."""
    listing = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        if "ltscale.data.loaders.ffcv_write" not in line or " Z" in line:
            continue
        try:
            environment = Path(f"/proc/{line.split()[0]}/environ").read_bytes().split(b"\0")
        except OSError:  # ended since the listing
            continue
        if _MARK.encode() in environment:
            found.append(line)
    return found


@pytest.mark.timeout(300)
def test_a_writer_worker_that_dies_ends_the_write_with_its_reason(tmp_path):
    """FFCV's writer waits for every sample and never looks at its workers: one killed mid-write
    left it waiting forever. The write ends at once, says why, and leaves no file, no process and
    no shared memory (the other worker is held at image 150 meanwhile)."""
    dying = _held_split(tmp_path, fatal=3, stall=150)
    cache_dir = tmp_path / "cache"
    segments = _segments()
    try:
        with pytest.raises(DatasetError, match="killed by signal 9") as caught:
            write_beton(dying, FfcvConfig(cache_dir=str(cache_dir), write_workers=2), substitute=True,
                        max_bad_image_fraction=0.2)
    finally:
        left = _write_processes()
        _kill_write_processes()
    assert "OOM killer" in str(caught.value) and dying.name in str(caught.value)
    assert list(cache_dir.iterdir()) == []  # no partial file, no .beton, no sidecar
    assert left == [] and _segments_left(segments) == set()


@pytest.mark.timeout(300)
def test_a_write_whose_caller_is_gone_stops(tmp_path):
    """A training process killed outright (no chance to stop its write): the writer and its workers
    notice and end, instead of writing a file nobody will rename."""
    ramp_split(tmp_path, 1)
    script = f"""
import numpy as np
from pathlib import Path
from ltscale.data.base import FileSplit
from ltscale.data.config import FfcvConfig
from ltscale.data.loaders.ffcv_backend import write_beton
split = FileSplit(name="ramp", targets=np.zeros(20000, dtype=np.int64), num_classes=1, root=Path({str(tmp_path)!r}),
                  paths=["ramp.png"] * 20000)
write_beton(split, FfcvConfig(cache_dir={str(tmp_path / "cache")!r}, write_workers=1), substitute=False,
            max_bad_image_fraction=0.0)
"""
    segments = _segments()
    caller = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any("ffcv_write" in line for line in _write_processes()) or not list(tmp_path.glob("cache/.*.partial")):
            assert caller.poll() is None and time.monotonic() < deadline, "the write never started"
            time.sleep(0.2)
        time.sleep(1.0)
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 30
        while _write_processes():
            assert time.monotonic() < deadline, f"still running after the caller was killed: {_write_processes()}"
            time.sleep(0.2)
    finally:
        caller.kill()
        _kill_write_processes()
    assert not list(tmp_path.glob("cache/*.beton")) and _segments_left(segments) == set()


@pytest.mark.timeout(300)
def test_a_writer_killed_outright_ends_the_write_and_its_workers(tmp_path):
    """The writer process itself killed (the OOM killer may pick it, or kill -9): its workers, still
    holding the pipe the caller reads, went on with the split. The caller ends them at the writer's
    exit and raises, leaving no file, no process and no shared memory (the writer's resource tracker,
    which would have removed it, is in the group the caller kills)."""
    held = _held_split(tmp_path, stall=150)  # the worker at image 150 stays, as on a split still being written
    cache_dir = tmp_path / "cache"
    segments = _segments()
    outcome: list[BaseException | Path] = []

    def write() -> None:
        try:
            outcome.append(write_beton(held, FfcvConfig(cache_dir=str(cache_dir), write_workers=2), substitute=True,
                                       max_bad_image_fraction=0.0))
        except BaseException as error:  # noqa: BLE001 - looked at below
            outcome.append(error)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        # The writer and a worker: the worker that is not held may already have finished.
        while len(_write_processes()) < 2:
            assert thread.is_alive() and time.monotonic() < deadline, f"the write never started: {outcome}"
            time.sleep(0.2)
        writer = next(int(line.split()[0]) for line in _write_processes()
                      if Path(f"/proc/{line.split()[0]}/stat").read_text().split(")")[1].split()[1] == str(os.getpid()))
        os.kill(writer, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), f"the caller still waits for the killed writer's workers: {_write_processes()}"
    finally:
        left = _write_processes()
        _kill_write_processes()
    assert isinstance(outcome[0], DatasetError) and "code -9" in str(outcome[0]) and held.name in str(outcome[0])
    assert left == [] and list(cache_dir.iterdir()) == [] and _segments_left(segments) == set()


@pytest.mark.timeout(300)
def test_a_write_after_reading_in_the_same_process_finishes(bundle, cache, tmp_path):
    """FFCV's reading leaves torch's OpenMP and OpenCV's thread pools started in this process. Workers
    forked from it got those pools without their threads, and the first parallel region there (the
    decode of a PNG makes a tensor contiguous) waited for them forever: this write hung."""
    assert sum(len(b["index"]) for b in _loader(FfcvLoader, bundle.train, train=True, ffcv=cache)) == len(bundle.train)
    split = ramp_split(tmp_path, 8)
    path = write_beton(split, FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1), substitute=False,
                       max_bad_image_fraction=0.0)
    assert path.is_file()


def test_the_file_belongs_to_its_image_root_and_abandoned_partials_are_removed(tmp_path):
    import shutil
    import socket

    data = _make_tree(tmp_path / "tree")
    split = build_image_list_dataset(data).train
    config = FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1)
    shutil.copytree(tmp_path / "tree", tmp_path / "copy")
    copy = build_image_list_dataset(dataclasses.replace(data, root=str(tmp_path / "copy"))).train
    assert copy.fingerprint() == split.fingerprint()  # same lists ...
    assert beton_path(copy, config) != beton_path(split, config)  # ... other images, until shown otherwise

    path = beton_path(split, config)
    path.parent.mkdir(parents=True)
    host = socket.gethostname()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    abandoned = path.with_name(f".{path.name}.{host}.{gone}.partial")
    running = path.with_name(f".{path.name}.{host}.{os.getppid()}.partial")  # a live writer's
    elsewhere = path.with_name(f".{path.name}.other-node.{gone}.partial")  # another host's: not ours to judge
    for partial in (abandoned, running, elsewhere):
        partial.write_bytes(b"\0" * 1024)
    _loader(FfcvLoader, split, train=True, ffcv=config)
    assert path.is_file() and not abandoned.exists() and running.exists() and elsewhere.exists()


def test_refused_writes_name_the_files_and_leave_nothing(tmp_path):
    tree = build_image_list_dataset(_make_tree(tmp_path / "tree"))
    bad = [tree.train.root / tree.train.paths[i] for i in (2, 7)]
    for path in bad:
        _truncate(path)
    config = FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1)
    with pytest.raises(DatasetError, match="more than the 1 allowed") as caught:
        _loader(FfcvLoader, tree.train, train=True, fraction=0.1, ffcv=config)
    assert str(bad[0]) in str(caught.value) and str(bad[1]) in str(caught.value)

    bad_test = tree.test.root / tree.test.paths[4]
    _truncate(bad_test)
    with pytest.raises(DatasetError, match="never substitutes") as caught:
        _loader(FfcvLoader, tree.test, train=False, shuffle=False, fraction=0.5, ffcv=config)
    assert str(bad_test) in str(caught.value)
    assert sorted(p.name for p in Path(config.cache_dir).iterdir()) == []  # no .beton, no partial file


def test_ffcv_leaves_torch_thread_count_alone(bundle, cache):
    threads = torch.get_num_threads()
    loader = _loader(FfcvLoader, bundle.test, train=False, shuffle=False, ffcv=cache)  # num_workers=1
    list(loader)
    assert torch.get_num_threads() == threads


def test_backend_choice_and_refusals(bundle, cache):
    common = dict(train=False, batch_size=4, device=torch.device("cpu"), seed=0)
    chosen = build_loader(bundle.test, bundle, loader=LoaderConfig(backend="ffcv", num_workers=1, ffcv=cache), **common)
    assert isinstance(chosen, FfcvLoader) and chosen.path.parent == Path(cache.cache_dir)
    with pytest.raises(ValueError, match="MoCo's two views"):
        _loader(FfcvLoader, bundle.train, train=True, ffcv=cache, views=2)
    synthetic = make_synthetic(SyntheticConfig(num_classes=4, max_per_class=20, imbalance_factor=2.0, image_size=8))
    with pytest.raises(ValueError, match="backend=ffcv decodes image files"):
        build_loader(synthetic.train, synthetic, loader=LoaderConfig(backend="ffcv"), **common)
    with pytest.raises(ValueError, match="jpeg_quality"):
        FfcvConfig(jpeg_quality=0)
    assert np.isfinite(len(chosen))


def test_crops_and_flips_follow_random_resized_crop_and_the_centre_crop(tmp_path):
    """Training: RandomResizedCrop's scale 0.08-1 and ratio 3/4-4/3, a horizontal flip with probability
    1/2; evaluation: the centre 224/256 of the shorter side. Measured on crops of a ramp image (the
    evaluation comparison with the torch backend is too loose to see a wrong crop fraction)."""
    n = 200
    split = ramp_split(tmp_path, n)
    common = dict(batch_size=50, sampler=None, image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION, num_workers=1,
                  max_bad_image_fraction=0.0, drop_last=False, device="cpu", color_jitter=0.0,
                  ffcv=FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1))
    width, height = crop_extents(torch.cat([b["image"] for b in FfcvLoader(split, train=True, **common)]))
    assert abs((width < 0).float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5  # binomial, 4 sigma
    area, ratio = width.abs() * height, width.abs() / height
    assert area.min() > 0.06 and area.max() < 1.02 and ratio.min() > 0.7 and ratio.max() < 4 / 3 + 0.05
    # The whole ranges are drawn from (one crop in 200 outside these would be a ~1e-20 chance).
    assert area.min() < 0.3 and ratio.min() < 0.85 and ratio.max() > 1.18
    width, height = crop_extents(torch.cat([b["image"] for b in FfcvLoader(split, train=False, **common)]))
    assert torch.allclose(width, torch.full_like(width, 224 / 256), atol=0.02)
    assert torch.allclose(height, torch.full_like(height, 224 / 256), atol=0.02)


def test_stored_images_follow_the_image_settings_which_name_the_file(bundle, tmp_path):
    from ffcv.reader import Reader

    small = FfcvConfig(cache_dir=str(tmp_path), write_workers=1, max_resolution=32, jpeg_quality=20)
    fine = dataclasses.replace(small, jpeg_quality=95)
    larger = dataclasses.replace(small, max_resolution=48)
    paths = [_loader(FfcvLoader, bundle.test, train=False, shuffle=False, ffcv=config).path for config in (small, fine, larger)]
    assert len(set(paths)) == 3  # a setting changed: another file, not the stale one
    for path, limit in zip(paths, (32, 32, 48)):
        reader = Reader(str(path))
        stored = reader.metadata[f"f{reader.field_names.index('image')}"]
        assert max(stored["width"].max(), stored["height"].max()) == limit  # the samples are larger than 48 px
    stored_bytes = [int(Reader(str(path)).alloc_table["size"].sum()) for path in paths[:2]]  # the JPEGs, not the file's pages
    assert stored_bytes[0] < 0.7 * stored_bytes[1]  # quality 20 against 95


def test_a_file_without_its_sidecar_is_written_again(bundle, tmp_path):
    """The sidecar is written last and marks the file complete: a ``.beton`` without one (a write
    killed between the two) is written again, not read."""
    config = FfcvConfig(cache_dir=str(tmp_path), write_workers=1)
    path = _loader(FfcvLoader, bundle.test, train=False, shuffle=False, ffcv=config).path
    path.with_name(path.name + ".json").unlink()
    loader = _loader(FfcvLoader, bundle.test, train=False, shuffle=False, ffcv=config)
    assert path.with_name(path.name + ".json").is_file()
    assert torch.cat([b["index"] for b in loader]).tolist() == list(range(10))


def test_corrupt_image_without_readable_class_mate_stops_the_write(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path / "tree")).train
    _truncate(split.root / split.paths[9])  # class 2 has a single image
    config = FfcvConfig(cache_dir=str(tmp_path / "cache"), write_workers=1)
    with pytest.raises(DatasetError, match=r"no readable image of its class 2"):
        _loader(FfcvLoader, split, train=True, shuffle=False, fraction=0.5, ffcv=config)
    assert list(Path(config.cache_dir).iterdir()) == []


def test_drop_last_drops_the_short_batch_and_len_agrees(bundle, cache):
    loader = _loader(FfcvLoader, bundle.train, train=True, ffcv=cache, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and [len(b["index"]) for b in batches] == [4, 4]
    assert len(set(torch.cat([b["index"] for b in batches]).tolist())) == 8


def test_jpeg_loader_benchmark_ffcv_variant_cpu_smoke(tmp_path):
    """tools/bench/jpeg_loader.py's FFCV variant: the one-off write reported apart from the epochs."""
    import json
    import shutil

    from tests.test_image_list import _sample_files

    images = tmp_path / "images"
    images.mkdir()
    for source in _sample_files()[:4]:
        shutil.copyfile(source, images / source.name)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "bench" / "jpeg_loader.py"), "--images", str(images),
         "--count", "24", "--batch-size", "8", "--image-size", "32", "--workers", "1", "--epochs", "1", "--warmup-epochs", "1",
         "--device", "cpu", "--variants", "usual,ltscale-ffcv", "--ffcv-dir", str(tmp_path / "beton"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    ffcv = report["variants"]["ltscale-ffcv"]
    assert ffcv["images_per_epoch"] == 24 and ffcv["prepare_seconds"] > 0 and "prepare_seconds" not in report["variants"]["usual"]
    assert len(list((tmp_path / "beton").glob("*.beton"))) == 1


def _slow_write_worker(rank: int, world: int, port: int, root: str, cache: str, out: str) -> None:
    import datetime
    import time as clock

    import torch.distributed as dist

    import ltscale.data.loaders.ffcv_backend as backend
    from ltscale.data.config import DataConfig
    from ltscale.dist import runtime

    torch.set_num_threads(1)
    # Generous where the ranks only meet (they start seconds apart on a machine shared with other tests) ...
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    backend.WRITE_POLL_S = 0.5
    real = backend.write_beton
    backend.write_beton = lambda *a, **k: (clock.sleep(7), real(*a, **k))[1]
    split = build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=root, image_size=IMAGE_SIZE)).train
    # ... and far shorter than the write while the loaders are made: one collective waiting for it would fail.
    dist.distributed_c10d.set_timeout(datetime.timedelta(seconds=4))
    loader = _loader(FfcvLoader, split, train=True, ffcv=FfcvConfig(cache_dir=cache, write_workers=1))
    dist.distributed_c10d.set_timeout(datetime.timedelta(seconds=120))
    Path(out, f"rank{rank}.txt").write_text(str(loader.path))
    dist.barrier()
    runtime.leave_process_group()  # drains gloo's threads first: a bare destroy aborted now and then


def test_a_write_longer_than_the_process_group_timeout_does_not_fail_the_other_ranks(tmp_path):
    import torch.multiprocessing as mp

    data = _make_tree(tmp_path / "tree")
    mp.spawn(_slow_write_worker, args=(2, free_port(), data.root, str(tmp_path / "cache"), str(tmp_path)), nprocs=2, join=True)
    paths = {(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)}
    assert len(paths) == 1 and Path(paths.pop()).is_file()


def test_writers_default_to_the_cpus_this_process_may_use(tmp_path, caplog):
    """write_workers=0 counts the CPU affinity (a SLURM allocation), not the machine's cores."""
    split = build_image_list_dataset(_make_tree(tmp_path / "tree")).train
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        with caplog.at_level(logging.INFO, logger="ltscale.data.loaders"):
            _loader(FfcvLoader, split, train=False, shuffle=False, ffcv=FfcvConfig(cache_dir=str(tmp_path / "cache")))
    finally:
        os.sched_setaffinity(0, before)
    assert any("(1 workers)" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]

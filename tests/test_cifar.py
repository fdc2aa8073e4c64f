"""CIFAR-100-LT from the real archive in ``../shared/data`` (skipped when it is absent).

The long-tailed subset is checked against an independent re-implementation of the LDAM-DRW
protocol, written here from the raw pickles: n_c = int(500 * (1/IF) ** (c / 99)); seed numpy's
RNG with 0 once, then for c = 0..99 shuffle ``np.where(labels == c)[0]`` and keep the first n_c.
The error cases use small hand-made archives, so they run without the real data.

Run:  python -m pytest tests/test_cifar.py -q
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ltscale.cli import main
from ltscale.data.cifar import load_cifar_lt, long_tailed_indices
from ltscale.data.errors import DatasetError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCHIVE = DATA / "cifar-100-python.tar.gz"
TOTALS = {100: 10_847, 50: 12_608, 10: 19_573}
SMALLEST = {100: 5, 50: 10, 10: 50}


def _require_archive() -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-100 archive not found at {ARCHIVE} (needs ../shared/data next to the repository)")
    return ARCHIVE


def _protocol_counts(imbalance: int) -> np.ndarray:
    return np.array([int(500 * (1.0 / imbalance) ** (c / 99)) for c in range(100)])


def _protocol_subset(labels: np.ndarray, imbalance: int) -> np.ndarray:
    # np.random.seed(0) + np.random.shuffle draw from the same MT19937 stream as RandomState(0);
    # a private RandomState keeps this test from touching the global RNG itself.
    rng = np.random.RandomState(0)
    kept = []
    for c, n_c in enumerate(_protocol_counts(imbalance)):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept)


def _as_images(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def raw():
    """The archive's train/test/meta pickles, read directly (not through ltscale)."""
    archive = _require_archive()
    with tarfile.open(archive, "r:gz") as tar:
        return {
            name: pickle.load(tar.extractfile(f"cifar-100-python/{name}"), encoding="latin1")
            for name in ("train", "test", "meta")
        }


@pytest.fixture(scope="module")
def bundles():
    archive = _require_archive()
    np.random.seed(1234)
    before = np.random.get_state()
    loaded = {imbalance: load_cifar_lt("cifar100_lt", archive, imbalance) for imbalance in (100, 50, 10)}
    after = np.random.get_state()
    return loaded, (before, after)


# ---- the real archive --------------------------------------------------------------------------------


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_subset_sizes(bundles, imbalance):
    bundle = bundles[0][imbalance]
    counts = bundle.train.class_counts()
    assert len(bundle.train) == TOTALS[imbalance]
    assert counts.sum() == TOTALS[imbalance]
    assert counts[0] == 500 and counts[-1] == SMALLEST[imbalance] and counts.min() == SMALLEST[imbalance]
    assert np.all(np.diff(counts) <= 0)  # class 0 is the head, class 99 the tail
    np.testing.assert_array_equal(counts, _protocol_counts(imbalance))
    assert bundle.num_classes == 100 and bundle.image_size == 32
    assert bundle.name == f"cifar100_lt-if{imbalance}"


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_balanced_test_set(bundles, raw, imbalance):
    test = bundles[0][imbalance].test
    assert len(test) == 10_000
    np.testing.assert_array_equal(test.class_counts(), np.full(100, 100))
    if imbalance == 100:
        np.testing.assert_array_equal(test.targets, raw["test"]["fine_labels"])
        assert test.images.dtype == np.uint8 and test.images.shape == (10_000, 32, 32, 3)
        assert np.array_equal(test.images, _as_images(np.asarray(raw["test"]["data"])))


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_subset_is_the_ldam_drw_protocol_image_for_image(bundles, raw, imbalance):
    labels = np.asarray(raw["train"]["fine_labels"])
    keep = _protocol_subset(labels, imbalance)
    train = bundles[0][imbalance].train
    np.testing.assert_array_equal(train.targets, labels[keep])
    assert train.images.dtype == np.uint8 and train.images.shape == (TOTALS[imbalance], 32, 32, 3)
    expected = np.ascontiguousarray(_as_images(np.asarray(raw["train"]["data"])[keep]))
    assert np.ascontiguousarray(train.images).tobytes() == expected.tobytes()


def test_subset_is_not_just_the_first_images_of_each_class(raw):
    # guards the test above: the protocol's shuffle must matter on this archive
    labels = np.asarray(raw["train"]["fine_labels"])
    keep = _protocol_subset(labels, 100)
    first = np.concatenate([np.where(labels == c)[0][:n] for c, n in enumerate(_protocol_counts(100))])
    assert not np.array_equal(keep, first)


def test_class_names_in_official_order(bundles, raw):
    names = bundles[0][100].train.class_names
    assert names == list(raw["meta"]["fine_label_names"])
    assert (names[0], names[1], names[-1], len(names)) == ("apple", "aquarium_fish", "worm", 100)


def test_global_numpy_rng_state_is_left_untouched(bundles):
    before, after = bundles[1]
    assert before[0] == after[0] and before[2:] == after[2:]
    np.testing.assert_array_equal(before[1], after[1])


def test_normalisation_is_the_statistics_of_the_official_training_set(bundles, raw):
    """The loaders normalise with these constants; they must be CIFAR-100's own per-channel
    training mean and std (the CIFAR-10 values, or a typo, would shift every input)."""
    pixels = _as_images(np.asarray(raw["train"]["data"])).reshape(-1, 3).astype(np.float64) / 255
    normalization = bundles[0][100].normalization
    np.testing.assert_allclose(normalization.mean, pixels.mean(axis=0), atol=5e-4)
    np.testing.assert_allclose(normalization.std, pixels.std(axis=0), atol=5e-4)


def test_long_tailed_indices_restores_the_global_rng_even_on_error():
    np.random.seed(99)
    expected = np.random.RandomState(99).random_sample(3)
    with pytest.raises(TypeError):
        long_tailed_indices(np.zeros(5, dtype=np.int64), np.array([object()]))  # n_c not usable as a slice bound
    np.testing.assert_array_equal(np.random.random_sample(3), expected)


def test_extracted_folder_gives_the_same_subset(bundles, tmp_path_factory):
    archive = _require_archive()
    folder = tmp_path_factory.mktemp("cifar")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(folder, filter="data")
    reference = bundles[0][100].train
    for root in (folder, folder / "cifar-100-python"):  # the parent of the top folder, or the top folder itself
        bundle = load_cifar_lt("cifar100_lt", root, 100)
        np.testing.assert_array_equal(bundle.train.targets, reference.targets)
        assert np.array_equal(bundle.train.images, reference.images)
        assert len(bundle.test) == 10_000
    # a folder missing a member names the file it expected
    (folder / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetError, match=rf"{folder / 'cifar-100-python' / 'meta'} is missing"):
        load_cifar_lt("cifar100_lt", folder, 100)


def test_cli_data_stats(capsys):
    archive = _require_archive()
    code = main(["data", "stats", "cifar100_lt", "--root", str(archive), "--imbalance-factor", "50", "--compact"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1  # --compact: one line of JSON
    stats = json.loads(lines[0])
    assert stats["train_images"] == 12_608 and stats["test_images"] == 10_000
    assert (stats["num_classes"], stats["max_class_count"], stats["min_class_count"]) == (100, 500, 10)
    assert stats["imbalance_factor"] == 50.0
    assert stats["train_class_counts"] == _protocol_counts(50).tolist()
    counts = _protocol_counts(50)
    assert stats["groups"] == {
        "many": int((counts > 100).sum()),
        "medium": int(((counts >= 20) & (counts <= 100)).sum()),
        "few": int((counts < 20).sum()),
    }


# ---- errors (hand-made archives: no real data needed) -------------------------------------------


def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _fake_members(per_class: int = 3, classes: int = 100) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class).tolist()
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {
        "test": _pickle_bytes({"data": data, "fine_labels": labels}),
        "train": _pickle_bytes({"data": data, "fine_labels": labels}),
        "meta": _pickle_bytes({"fine_label_names": [f"class{c}" for c in range(classes)]}),
    }


def _write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_fake_archive_loads(tmp_path):
    # the hand-made archives below differ from this one only in the defect under test
    bundle = load_cifar_lt("cifar100_lt", _write_tar(tmp_path / "ok.tar.gz", _fake_members()), 1.0)
    assert len(bundle.train) == 300 and len(bundle.test) == 300


def test_integer_pixels_of_a_wider_type_load_as_the_same_images(tmp_path):
    """A batch built from Python lists holds int64: values in 0..255 convert without loss."""
    members = _fake_members()
    reference = load_cifar_lt("cifar100_lt", _write_tar(tmp_path / "ok.tar.gz", members), 1.0)
    wide = {name: _pickle_bytes({**pickle.loads(payload), "data": pickle.loads(payload)["data"].astype(np.int64)})
            if name != "meta" else payload for name, payload in members.items()}
    bundle = load_cifar_lt("cifar100_lt", _write_tar(tmp_path / "wide.tar.gz", wide), 1.0)
    assert bundle.train.images.dtype == np.uint8 and np.array_equal(bundle.train.images, reference.train.images)


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere" / "cifar-100-python.tar.gz"
    with pytest.raises(DatasetError, match=rf"data.root '{missing}' does not exist"):
        load_cifar_lt("cifar100_lt", missing, 100)


def test_empty_root():
    with pytest.raises(DatasetError, match="data.root is empty"):
        load_cifar_lt("cifar100_lt", "", 100)


def test_a_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(b"this is not a tar archive\n" * 40)
    with pytest.raises(DatasetError, match=rf"data.root '{path}' is a file but not a readable tar archive"):
        load_cifar_lt("cifar100_lt", path, 100)


@pytest.mark.parametrize("keep_bytes", [60, 4_000, 200_000])
def test_truncated_gzip_archive(tmp_path, keep_bytes):
    full = _write_tar(tmp_path / "full.tar.gz", _fake_members(per_class=5))
    assert full.stat().st_size > 2 * 200_000
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(full.read_bytes()[:keep_bytes])
    with pytest.raises(DatasetError, match=rf"{path}"):
        load_cifar_lt("cifar100_lt", path, 100)


@pytest.mark.parametrize("keep_bytes", [700_000, 2_000_000])
def test_truncated_plain_tar_archive(tmp_path, keep_bytes):
    # cut inside the data of the first member (test) or of train: reaching train hits the end of the file
    full = _write_tar(tmp_path / "full.tar", _fake_members(per_class=10), mode="w")
    assert full.stat().st_size > 2_000_000
    path = tmp_path / "cut.tar"
    path.write_bytes(full.read_bytes()[:keep_bytes])
    with pytest.raises(DatasetError, match=rf"{path}:cifar-100-python/train .*may be truncated"):
        load_cifar_lt("cifar100_lt", path, 100)


@pytest.mark.parametrize("missing", ["train", "test", "meta"])
def test_missing_member(tmp_path, missing):
    members = _fake_members()
    del members[missing]
    path = _write_tar(tmp_path / "partial.tar.gz", members)
    with pytest.raises(DatasetError, match=rf"{path}:cifar-100-python/{missing} is missing from the archive"):
        load_cifar_lt("cifar100_lt", path, 100)


def test_member_that_is_not_a_pickle(tmp_path):
    members = _fake_members()
    members["train"] = b"garbage" * 100
    path = _write_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DatasetError, match=rf"{path}:cifar-100-python/train is not a readable CIFAR pickle"):
        load_cifar_lt("cifar100_lt", path, 100)


def test_cli_reports_dataset_errors(tmp_path, capsys):
    missing = tmp_path / "absent.tar.gz"
    assert main(["data", "stats", "cifar100_lt", "--root", str(missing)]) == 2
    assert f"data.root '{missing}' does not exist" in capsys.readouterr().err


def test_corruption_in_the_middle_of_the_gzip_stream_is_detected(tmp_path):
    """gzip verifies its CRC only at the end of the stream; the loader must read that far."""
    archive = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-100-python.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent (it ships in ../shared/data)")
    damaged = tmp_path / "cifar-100-python.tar.gz"
    data = bytearray(archive.read_bytes())
    data[80_000_000 : 80_000_050] = bytes(50)
    damaged.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt"):
        load_cifar_lt("cifar100_lt", damaged, 100)


class _Exploit:
    """A pickle that would run a command on load if the loader trusted it: ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        import shlex

        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("member, payload, problem", [
    ("meta", [1], r"cifar-100-python/meta holds a list, not the dict of a CIFAR python batch"),
    ("meta", {"fine_label_names": ["a", "b"]}, r"cifar-100-python/meta: key 'fine_label_names' must be a list of 100 class names"),
    ("train", {"data": np.zeros((300, 3072), np.uint8)}, r"cifar-100-python/train has no key 'fine_labels' \(its keys: \['data'\]\)"),
    ("train", {"data": np.zeros((300, 3072), np.uint8), "fine_labels": [0] * 299 + [150]},
     r"cifar-100-python/train: key 'fine_labels' has labels outside 0..99 \(row 299: 150; 1 in all\)"),
    ("train", {"data": np.zeros((300, 3072), np.uint8), "fine_labels": [0] * 299 + [100]},
     r"cifar-100-python/train: key 'fine_labels' has labels outside 0..99 \(row 299: 100; 1 in all\)"),
    ("test", {"data": np.zeros((300, 3072), np.uint8), "fine_labels": [-1] * 300},
     r"cifar-100-python/test: key 'fine_labels' has labels outside 0..99 \(row 0: -1; 300 in all\)"),
    ("train", {"data": np.zeros((300, 3072), np.uint8), "fine_labels": [0] * 10},
     r"cifar-100-python/train: key 'fine_labels' must be one integer label per image \(300\), got shape \(10,\)"),
    ("train", {"data": np.zeros((300, 3072), np.uint8), "fine_labels": ["a"] * 300},
     r"cifar-100-python/train: key 'fine_labels' must be one integer label per image"),
    ("train", {"data": np.zeros((300, 3072), np.float32), "fine_labels": [0] * 300},
     r"cifar-100-python/train: key 'data' must be N x 3072 uint8 \(channel-planar 32x32 RGB\), got float32 of shape \(300, 3072\)"),
    ("train", {"data": np.full((300, 3072), 256, np.int64), "fine_labels": [0] * 300},
     r"cifar-100-python/train: key 'data' must be N x 3072 uint8 \(channel-planar 32x32 RGB\), got int64 of shape \(300, 3072\) "
     r"with values in 256..256"),
    ("test", {"data": np.zeros((300, 1024), np.uint8), "fine_labels": [0] * 300},
     r"cifar-100-python/test: key 'data' must be N x 3072 uint8 \(channel-planar 32x32 RGB\), got uint8 of shape \(300, 1024\)"),
])
def test_malformed_batches_are_named(tmp_path, member, payload, problem):
    members = _fake_members()
    members[member] = _pickle_bytes(payload)
    path = _write_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DatasetError, match=rf"{path}:{problem}"):
        load_cifar_lt("cifar100_lt", path, 100)


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    """The loader unpickles numpy arrays only: a data file cannot run code (nor import modules)."""
    marker = tmp_path / "pwned"
    members = _fake_members()
    members["train"] = _pickle_bytes({"data": _Exploit(marker), "fine_labels": []})
    members["test"] = b"cnosuchmodule\nThing\n)R."  # a class of a module that does not exist
    for name in ("train", "test"):
        trimmed = {**_fake_members(), name: members[name]}
        path = _write_tar(tmp_path / f"{name}.tar.gz", trimmed)
        with pytest.raises(DatasetError, match=r"is not a readable CIFAR pickle \(it refers to (posix|os)\.system|nosuchmodule\.Thing"):
            load_cifar_lt("cifar100_lt", path, 100)
    assert not marker.exists()


def test_cifar10_folder_loads_and_names_a_batch_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "labels": np.arange(n).__mod__(10).tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(_pickle_bytes(batch(20)))
    (folder / "test_batch").write_bytes(_pickle_bytes(batch(30)))
    (folder / "batches.meta").write_bytes(_pickle_bytes({"label_names": [f"c{c}" for c in range(10)]}))
    bundle = load_cifar_lt("cifar10_lt", tmp_path, 1.0)
    assert len(bundle.train) == 100 and len(bundle.test) == 30 and bundle.train.class_names[3] == "c3"
    # CIFAR-10's own training statistics, not CIFAR-100's
    assert bundle.normalization.mean == (0.4914, 0.4822, 0.4465) and bundle.normalization.std == (0.2470, 0.2435, 0.2616)

    (folder / "data_batch_3").write_bytes(_pickle_bytes({"data": np.zeros((20, 3072), np.uint8)}))
    with pytest.raises(DatasetError, match=rf"{folder / 'data_batch_3'} has no key 'labels'"):
        load_cifar_lt("cifar10_lt", tmp_path, 1.0)
    (folder / "data_batch_3").write_bytes(b"x")  # the extracted folder's own file is named, not an archive path
    with pytest.raises(DatasetError, match=rf"^{folder / 'data_batch_3'} is not a readable CIFAR pickle .*the file may be truncated"):
        load_cifar_lt("cifar10_lt", tmp_path, 1.0)

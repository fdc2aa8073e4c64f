"""The packed CIFAR-LT file: lossless image codec, the same arrays as the archive at every IF at
or above the packed one, and the LDAM-DRW prefix property it relies on."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from ltscale.data.cifar import load_cifar_lt, long_tailed_counts, long_tailed_indices
from ltscale.data.cifar_npz import decode_images, encode_images, pack_from_archive
from ltscale.data.errors import DatasetError

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-100-python.tar.gz"


def fake_cifar100(root: Path, per_class: int = 20, test_per_class: int = 3) -> Path:
    """A folder in the official CIFAR-100 python layout with random images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for member, count in (("train", per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), count))
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / member, "wb") as stream:
            pickle.dump({"data": data, "fine_labels": labels.tolist()}, stream)
    with open(folder / "meta", "wb") as stream:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)]}, stream)
    return root


def test_codec_is_lossless():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    images[2, :, :, 0] = 255  # extreme colour differences wrap around modulo 256
    assert np.array_equal(decode_images(encode_images(images)), images)


def test_packed_file_equals_archive_at_each_imbalance_factor(tmp_path):
    archive = fake_cifar100(tmp_path / "archive")
    packed = tmp_path / "cifar100_lt_if10.npz"
    summary = pack_from_archive("cifar100_lt", archive, 10.0, packed)
    assert summary["train_images"] == long_tailed_counts(20, 100, 10.0).sum()
    for imbalance_factor in (20.0, 15.0, 10.0):  # up to 20: the fake archive's 20 per class leave one image
        reference = load_cifar_lt("cifar100_lt", archive, imbalance_factor)
        loaded = load_cifar_lt("cifar100_lt", str(packed), imbalance_factor)
        assert loaded.name == reference.name
        for split in ("train", "test"):
            a, b = getattr(reference, split), getattr(loaded, split)
            assert np.array_equal(a.targets, b.targets) and np.array_equal(a.images, b.images)
            assert a.fingerprint() == b.fingerprint() and a.class_names == b.class_names
    with pytest.raises(DatasetError, match="IF 10 subset"):
        load_cifar_lt("cifar100_lt", str(packed), 5.0)
    with pytest.raises(DatasetError, match="holds cifar100_lt"):
        load_cifar_lt("cifar10_lt", str(packed), 10.0)


def test_pack_tool_cli(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import pack_cifar_npz

    archive = fake_cifar100(tmp_path / "archive", per_class=100, test_per_class=1)  # IF 100 leaves one image
    assert pack_cifar_npz.main(["--archive", str(archive), "--out", str(tmp_path / "p.npz"), "--imbalance-factor", "10"]) == 0
    assert '"imbalance_factor": 100.0' in capsys.readouterr().out
    # Refused before the archive is read (packing takes minutes at full size), each naming the option.
    (tmp_path / "dir.npz").mkdir()
    for argv, message in [(["--out", str(tmp_path / "dir.npz")], "is a directory"),
                          (["--out", str(tmp_path / "q.npz"), "--imbalance-factor", "0"], "must be a finite number >= 1"),
                          (["--out", str(tmp_path / "q.npz"), "--verify", "5"], "give IFs >= the packed --imbalance-factor 10"),
                          (["--out", str(tmp_path / "q.npz"), "--verify", "1000"],
                           "--verify 1000: cifar100_lt's imbalance factor 1000 leaves the rarest of 100 classes no image")]:
        with pytest.raises(SystemExit) as refused:
            pack_cifar_npz.main(["--archive", str(archive), *argv])
        assert refused.value.code == 2 and message in capsys.readouterr().err, argv
    assert pack_cifar_npz.main(["--archive", str(tmp_path / "absent.tar.gz"), "--out", str(tmp_path / "q.npz")]) == 2
    assert "pack_cifar_npz: error: --archive: data.root" in capsys.readouterr().err
    assert not (tmp_path / "q.npz").exists()


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="the real CIFAR-100 archive is not at ../shared/data")
def test_real_cifar100_larger_imbalance_keeps_a_prefix_of_each_class():
    """On the real labels: the IF 100 and IF 50 subsets are, class by class, prefixes of IF 10's."""
    import tarfile

    with tarfile.open(SHARED_ARCHIVE) as archive:
        targets = np.asarray(pickle.load(archive.extractfile("cifar-100-python/train"), encoding="latin1")["fine_labels"])
    base = long_tailed_indices(targets, long_tailed_counts(500, 100, 10.0))
    for imbalance_factor in (100.0, 50.0):
        counts = long_tailed_counts(500, 100, imbalance_factor)
        kept = long_tailed_indices(targets, counts)
        prefix = np.concatenate([base[targets[base] == c][:n] for c, n in enumerate(counts)])
        assert np.array_equal(kept, prefix)


def test_a_file_that_is_not_an_npz_is_named_without_pickle_advice(tmp_path):
    from ltscale.data.cifar import load_cifar_lt

    fake = tmp_path / "fake.npz"
    fake.write_text("not a zip\n")
    with pytest.raises(DatasetError, match=rf"data.root '{fake}' is not a packed CIFAR-LT file: not an .npz \(zip\) archive") as caught:
        load_cifar_lt("cifar100_lt", fake, 100)
    assert "pickle" not in str(caught.value)
    missing = tmp_path / "absent.npz"
    with pytest.raises(DatasetError, match=rf"data.root '{missing}' is not a readable packed CIFAR-LT file"):
        load_cifar_lt("cifar100_lt", missing, 100)


def test_a_packed_file_of_another_format_version_is_refused(tmp_path):
    """Members of another layout (a future codec, say) would decode to wrong pixels without error."""
    from ltscale.data.cifar_npz import write_npz

    packed = tmp_path / "p.npz"
    pack_from_archive("cifar100_lt", fake_cifar100(tmp_path / "archive"), 10.0, packed)
    with np.load(packed) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["format"] = np.array("ltscale-cifar-lt-npz-2")
    write_npz(packed, arrays)
    with pytest.raises(DatasetError, match="is not a packed CIFAR-LT file of format ltscale-cifar-lt-npz-1"):
        load_cifar_lt("cifar100_lt", str(packed), 10.0)


def test_a_damaged_member_is_named_as_an_unreadable_file(tmp_path):
    """One flipped byte inside a compressed member: lzma's error, not a traceback."""
    import zipfile

    from ltscale.data.cifar import load_cifar_lt

    packed = tmp_path / "p.npz"
    pack_from_archive("cifar100_lt", fake_cifar100(tmp_path / "archive"), 10.0, packed)
    with zipfile.ZipFile(packed) as archive:
        member = archive.getinfo("train_residuals.npy")
    raw = bytearray(packed.read_bytes())
    local_header = member.header_offset
    name_length, extra_length = (int.from_bytes(raw[local_header + at:local_header + at + 2], "little") for at in (26, 28))
    raw[local_header + 30 + name_length + extra_length + 10] ^= 0xFF  # inside the member's lzma stream
    packed.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=rf"data.root '{packed}' is not a readable packed CIFAR-LT file \(Corrupt input data\)"):
        load_cifar_lt("cifar100_lt", str(packed), 10.0)

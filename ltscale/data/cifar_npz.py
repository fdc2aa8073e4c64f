"""CIFAR-LT packed into one small ``.npz``: the long-tailed training subset plus the test set.

Why: the official CIFAR-100 archive is 169 MB, more than can be carried to a GPU machine in one
go; the IF 10 training subset plus the test set is 87 MiB of pixels, and ~50 MiB packed here.

One file serves every imbalance factor at or above the one it was packed at. In the LDAM-DRW
protocol (``ltscale.data.cifar.long_tailed_indices``) numpy's global RNG is seeded once and each
class's indices are shuffled in turn; every shuffle consumes the RNG the same way whatever the
class sizes are, so each class's shuffled order is the same for IF 10, 50 and 100 and a larger
IF keeps a prefix of it. The file stores the subset class by class in that order (and the
official indices, for provenance); IF x is then the first n_c(x) rows of each class block, the
same arrays (and fingerprint) that reading the archive gives. ``tools/pack_cifar_npz.py`` checks
this against the archive for every IF it is asked to.

Images are stored losslessly as residuals: colour-decorrelated planes (G, R-G, B-G) with a 2-D
difference filter (x - left - up + up-left, modulo 256), which LZMA compresses to ~58% of the raw
pixels (zlib alone reaches ~91%). Decoding is two cumulative sums, a fraction of a second.
"""

from __future__ import annotations

import io
import lzma
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ltscale.data.base import ArraySplit, DatasetBundle
from ltscale.data.errors import DatasetError

FORMAT = "ltscale-cifar-lt-npz-1"


def encode_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 residuals (lossless, see the module docstring)."""
    x = images.astype(np.int16)
    green = x[..., 1]
    planes = np.stack([green, x[..., 0] - green, x[..., 2] - green], axis=1)  # (N, 3, H, W)
    residual = np.diff(np.diff(planes, axis=2, prepend=0), axis=3, prepend=0)
    return (residual % 256).astype(np.uint8)


def decode_images(residual: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_images`: (N, 3, H, W) uint8 residuals -> (N, H, W, 3) uint8."""
    # uint8 arithmetic wraps around, which is exactly the modulo 256 of the encoding.
    planes = np.cumsum(np.cumsum(residual, axis=3, dtype=np.uint8), axis=2, dtype=np.uint8)
    green = planes[:, 0]
    rgb = np.empty((residual.shape[0], *residual.shape[2:], 3), dtype=np.uint8)
    np.add(planes[:, 1], green, out=rgb[..., 0])
    rgb[..., 1] = green
    np.add(planes[:, 2], green, out=rgb[..., 2])
    return rgb


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` (a zip of ``.npy`` members) compressed with LZMA; ``np.load`` reads it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(f"{name}.npy", buffer.getvalue())
    tmp.replace(path)


def pack_arrays(dataset: str, imbalance_factor: float, max_per_class: int, train_indices: np.ndarray,
                train_images: np.ndarray, train_targets: np.ndarray, test_images: np.ndarray,
                test_targets: np.ndarray, class_names: list[str]) -> dict[str, np.ndarray]:
    """The members of a packed file; the training rows must be grouped by class, in protocol order."""
    if np.any(np.diff(train_targets) < 0):
        raise ValueError("the training rows must be grouped by class in increasing class order")
    return {
        "format": np.array(FORMAT),
        "dataset": np.array(dataset),
        "imbalance_factor": np.array(float(imbalance_factor)),
        "max_per_class": np.array(int(max_per_class)),
        "class_names": np.array(class_names, dtype=str),
        "train_indices": np.asarray(train_indices, dtype=np.int64),
        "train_targets": np.asarray(train_targets, dtype=np.int64),
        "train_residuals": encode_images(train_images),
        "test_targets": np.asarray(test_targets, dtype=np.int64),
        "test_residuals": encode_images(test_images),
    }


# What reading a damaged packed file raises: the zip layer, numpy's header, and the members'
# decompressors (lzma, as written here; zlib, as np.savez_compressed writes).
_UNREADABLE = (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, lzma.LZMAError, zlib.error)


def _open_packed(path: Path):
    """The packed file, opened lazily (members are read when indexed)."""
    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would try it as a pickle and answer with advice to load it unsafely
        raise DatasetError(f"data.root {str(path)!r} is not a packed CIFAR-LT file: not an .npz (zip) archive; "
                           "write one with tools/pack_cifar_npz.py")
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as error:
        raise DatasetError(f"data.root {str(path)!r} is not a readable packed CIFAR-LT file ({error})") from None


def _check_packed(packed, path: Path, dataset: str, imbalance_factor: float) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """From the small members only: ``(train_targets, class_names, stored per class, needed per class)``,
    or a DatasetError when the file is not of this format, holds another dataset or too few images."""
    from ltscale.data.cifar import long_tailed_counts

    try:
        if "format" not in packed.files or str(packed["format"]) != FORMAT:
            raise DatasetError(f"{path} is not a packed CIFAR-LT file of format {FORMAT} (write it with tools/pack_cifar_npz.py)")
        if str(packed["dataset"]) != dataset:
            raise DatasetError(f"{path} holds {packed['dataset']}, but the config asks for {dataset}")
        packed_if = float(packed["imbalance_factor"])
        targets = packed["train_targets"]
        class_names = [str(name) for name in packed["class_names"]]
        max_per_class = int(packed["max_per_class"])
    except _UNREADABLE as error:
        raise DatasetError(f"data.root {str(path)!r} is not a readable packed CIFAR-LT file ({error})") from None
    stored = np.bincount(targets, minlength=len(class_names))
    counts = long_tailed_counts(max_per_class, len(class_names), imbalance_factor)
    if np.any(counts > stored):
        raise DatasetError(
            f"{path} holds the IF {packed_if:g} subset, which has fewer images per class than IF {imbalance_factor:g} "
            f"needs; pack it with tools/pack_cifar_npz.py --imbalance-factor {imbalance_factor:g} or use the archive"
        )
    return targets, class_names, stored, counts


def check_packed_cifar_lt(dataset: str, path: Path, imbalance_factor: float) -> None:
    """What ``load_cifar_lt_npz`` would refuse, found in a fraction of a second (the images are not
    decoded): for a tool that starts hours of jobs on the file."""
    with _open_packed(Path(path)) as packed:
        _check_packed(packed, Path(path), dataset, imbalance_factor)


def load_cifar_lt_npz(dataset: str, path: Path, imbalance_factor: float) -> DatasetBundle:
    """CIFAR-LT at ``imbalance_factor`` from a packed file (same arrays as from the archive)."""
    from ltscale.data.cifar import _NORMALIZATION

    with _open_packed(path) as packed:
        targets, class_names, stored, counts = _check_packed(packed, path, dataset, imbalance_factor)
        try:
            train_residuals, test_residuals, test_targets = packed["train_residuals"], packed["test_residuals"], packed["test_targets"]
        except _UNREADABLE as error:
            raise DatasetError(f"data.root {str(path)!r} is not a readable packed CIFAR-LT file ({error})") from None
    num_classes = len(class_names)
    starts = np.concatenate([[0], np.cumsum(stored)[:-1]])
    keep = np.concatenate([np.arange(start, start + n) for start, n in zip(starts, counts)])
    name = f"{dataset}-if{imbalance_factor:g}"
    train = ArraySplit(name=f"{name}/train", targets=targets[keep], num_classes=num_classes, class_names=class_names,
                       images=decode_images(train_residuals[keep]))
    test = ArraySplit(name=f"{name}/test", targets=test_targets, num_classes=num_classes,
                      class_names=class_names, images=decode_images(test_residuals))
    return DatasetBundle(name=name, train=train, test=test, normalization=_NORMALIZATION[dataset], image_size=32)


def pack_from_archive(dataset: str, root: str | Path, imbalance_factor: float, path: Path) -> dict:
    """Read the official archive and write the packed file for IFs >= ``imbalance_factor``."""
    from ltscale.data.cifar import long_tailed_counts, long_tailed_indices, read_archive

    images, labels, test_images, test_labels, class_names = read_archive(dataset, root)
    num_classes = len(class_names)
    max_per_class = int(np.bincount(labels, minlength=num_classes).max())
    keep = long_tailed_indices(labels, long_tailed_counts(max_per_class, num_classes, imbalance_factor))
    arrays = pack_arrays(dataset, imbalance_factor, max_per_class, keep, images[keep], labels[keep],
                         test_images, test_labels, class_names)
    write_npz(path, arrays)
    return {"train_images": int(len(keep)), "test_images": int(len(test_labels)), "bytes": Path(path).stat().st_size}

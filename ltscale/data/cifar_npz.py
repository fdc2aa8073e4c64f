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
import zipfile
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


def load_cifar_lt_npz(dataset: str, path: Path, imbalance_factor: float) -> DatasetBundle:
    """CIFAR-LT at ``imbalance_factor`` from a packed file (same arrays as from the archive)."""
    from ltscale.data.cifar import _NORMALIZATION, long_tailed_counts

    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would try it as a pickle and answer with advice to load it unsafely
        raise DatasetError(f"data.root {str(path)!r} is not a packed CIFAR-LT file: not an .npz (zip) archive; "
                           "write one with tools/pack_cifar_npz.py")
    try:
        with np.load(path, allow_pickle=False) as packed:
            members = {name: packed[name] for name in packed.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"data.root {str(path)!r} is not a readable packed CIFAR-LT file ({error})") from None
    if str(members.get("format", "")) != FORMAT:
        raise DatasetError(f"{path} is not a packed CIFAR-LT file of format {FORMAT} (write it with tools/pack_cifar_npz.py)")
    if str(members["dataset"]) != dataset:
        raise DatasetError(f"{path} holds {members['dataset']}, but the config asks for {dataset}")
    packed_if = float(members["imbalance_factor"])
    targets = members["train_targets"]
    class_names = [str(name) for name in members["class_names"]]
    num_classes = len(class_names)
    stored = np.bincount(targets, minlength=num_classes)
    counts = long_tailed_counts(int(members["max_per_class"]), num_classes, imbalance_factor)
    if np.any(counts > stored):
        raise DatasetError(
            f"{path} holds the IF {packed_if:g} subset, which has fewer images per class than IF {imbalance_factor:g} "
            f"needs; pack it with tools/pack_cifar_npz.py --imbalance-factor {imbalance_factor:g} or use the archive"
        )
    starts = np.concatenate([[0], np.cumsum(stored)[:-1]])
    keep = np.concatenate([np.arange(start, start + n) for start, n in zip(starts, counts)])
    name = f"{dataset}-if{imbalance_factor:g}"
    train = ArraySplit(name=f"{name}/train", targets=targets[keep], num_classes=num_classes, class_names=class_names,
                       images=decode_images(members["train_residuals"][keep]))
    test = ArraySplit(name=f"{name}/test", targets=members["test_targets"], num_classes=num_classes,
                      class_names=class_names, images=decode_images(members["test_residuals"]))
    return DatasetBundle(name=name, train=train, test=test, normalization=_NORMALIZATION[dataset], image_size=32)


def pack_from_archive(dataset: str, root: str | Path, imbalance_factor: float, path: Path) -> dict:
    """Read the official archive and write the packed file for IFs >= ``imbalance_factor``."""
    from ltscale.data.cifar import _LAYOUT, _Archive, _images, long_tailed_counts, long_tailed_indices

    top, train_member, test_member, meta_member, label_key, names_key, num_classes = _LAYOUT[dataset]
    archive = _Archive(Path(root).expanduser(), top)
    try:
        if train_member is None:
            batches = [archive.load(f"data_batch_{i}") for i in range(1, 6)]
            images = np.concatenate([_images(b, f"{root}:data_batch") for b in batches])
            labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
        else:
            batch = archive.load(train_member)
            images, labels = _images(batch, f"{root}:{train_member}"), np.asarray(batch[label_key])
        test = archive.load(test_member)
        meta = archive.load(meta_member)
    finally:
        archive.close()
    class_names = list(meta.get(names_key, [])) or [str(c) for c in range(num_classes)]
    max_per_class = int(np.bincount(labels, minlength=num_classes).max())
    keep = long_tailed_indices(labels, long_tailed_counts(max_per_class, num_classes, imbalance_factor))
    arrays = pack_arrays(dataset, imbalance_factor, max_per_class, keep, images[keep], labels[keep],
                         _images(test, f"{root}:{test_member}"), np.asarray(test[label_key]), class_names)
    write_npz(path, arrays)
    return {"train_images": int(len(keep)), "test_images": int(len(test[label_key])), "bytes": Path(path).stat().st_size}

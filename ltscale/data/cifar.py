"""CIFAR-10/100-LT from the official python archive (``.tar.gz`` or its extracted folder).

The long-tailed training subset follows the LDAM-DRW protocol that BBN, DiVE and SSD use:
n_c = int(n_max * (1/IF) ** (c / (C - 1))); ``np.random.seed(0)`` once, then for each class in
order shuffle its indices (in official order) and keep the first n_c. The test set stays balanced.
"""

from __future__ import annotations

import codecs
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ltscale.data.base import ArraySplit, DatasetBundle, Normalization
from ltscale.data.errors import DatasetError

_LAYOUT = {
    "cifar100_lt": ("cifar-100-python", "train", "test", "meta", "fine_labels", "fine_label_names", 100),
    "cifar10_lt": ("cifar-10-batches-py", None, "test_batch", "batches.meta", "labels", "label_names", 10),
}
_NORMALIZATION = {
    "cifar100_lt": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10_lt": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


# Classes and training images per class of the official training sets (both balanced).
TRAINING_SETS = {"cifar100_lt": (100, 500), "cifar10_lt": (10, 5000)}


def long_tailed_counts(max_per_class: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """n_c = int(n_max * (1/IF) ** (c / (C - 1))), the exponential profile of the LDAM-DRW code.

    Raises ValueError when the rarest class would get no image: a class the training set lacks
    would still be scored at test time as a few-shot class, and the balanced losses need its count.
    """
    counts = np.array(
        [int(max_per_class * (1.0 / imbalance_factor) ** (c / (num_classes - 1))) for c in range(num_classes)],
        dtype=np.int64,
    )
    if counts[-1] < 1:
        # int() as the protocol does: at IF = n_max, n_max * (1/IF) can round to just below 1.
        raise ValueError(
            f"imbalance factor {imbalance_factor:g} leaves the rarest of {num_classes} classes no image "
            f"(int({max_per_class} x 1/{imbalance_factor:g}) = 0 with {max_per_class} images in the largest class)"
        )
    return counts


def long_tailed_indices(targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices of the LDAM-DRW subset (uses and reseeds numpy's *global* RNG, as the protocol does)."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        kept = []
        for c, n_c in enumerate(counts):
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n_c])
        return np.concatenate(kept)
    finally:
        np.random.set_state(state)  # do not leave the caller's global RNG reseeded


try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

# What a CIFAR python pickle may refer to: numpy arrays (written by numpy 1 or 2) and, in a Python 3
# protocol-2 pickle, bytes (rebuilt with codecs.encode). Anything else could run arbitrary code on
# load, and a data file has no business doing that.
_PICKLE_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR pickle does not contain") from None


class _Archive:
    """Reads members of the archive or the extracted folder by their name inside the top folder."""

    def __init__(self, root: Path, top: str) -> None:
        self.root = root
        self.top = top
        if not root.exists():
            raise DatasetError(
                f"data.root {str(root)!r} does not exist. Expected the official CIFAR python archive "
                f"(e.g. cifar-100-python.tar.gz) or the folder it extracts to ({top}/ or its parent)."
            )
        if root.is_file():
            try:
                self.tar: tarfile.TarFile | None = tarfile.open(root, "r:*")
            except (tarfile.TarError, OSError, EOFError) as error:  # EOFError: a gzip cut short
                raise DatasetError(
                    f"data.root {str(root)!r} is a file but not a readable tar archive ({error}). "
                    f"Expected the official CIFAR python archive containing {top}/."
                ) from None
            self.folder: Path | None = None
        else:
            self.tar = None
            self.folder = root / top if (root / top).is_dir() else root

    def where(self, member: str) -> str:
        """How errors name a member: inside the archive, or the file of the extracted folder."""
        if self.tar is not None:
            return f"{self.root}:{self.top}/{member}"
        assert self.folder is not None
        return str(self.folder / member)

    def load(self, member: str) -> dict:
        where = self.where(member)
        try:
            if self.tar is not None:
                try:
                    handle = self.tar.extractfile(f"{self.top}/{member}")
                except KeyError:
                    handle = None
                if handle is None:
                    raise DatasetError(f"{where} is missing from the archive data.root; expected the official layout {self.top}/{member}")
                batch = _CifarUnpickler(handle, encoding="latin1").load()
            else:
                assert self.folder is not None
                path = self.folder / member
                if not path.is_file():
                    raise DatasetError(
                        f"{path} is missing. data.root must be the CIFAR archive or a folder containing "
                        f"{self.top}/{member} (the official python version)."
                    )
                with open(path, "rb") as handle:
                    batch = _CifarUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, tarfile.TarError, OSError, zlib.error) as error:
            if isinstance(error, DatasetError):
                raise
            damaged = "the archive may be truncated" if self.tar is not None else "the file may be truncated or not CIFAR's"
            raise DatasetError(f"{where} is not a readable CIFAR pickle ({error}); {damaged}") from None
        if not isinstance(batch, dict):
            raise DatasetError(f"{where} holds a {type(batch).__name__}, not the dict of a CIFAR python batch")
        return batch

    def verify(self) -> None:
        """Read a compressed archive to its end: gzip checks its CRC only there, so a corrupted
        byte in the middle of the stream would otherwise load as silently wrong images."""
        if self.tar is None:
            return
        try:
            while self.tar.fileobj.read(1 << 24):  # type: ignore[union-attr]
                pass
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(
                f"data.root {str(self.root)!r} is corrupt ({error}); download the CIFAR python archive again"
            ) from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _images(batch: dict, where: str) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    # Integers in 0..255 of a wider type (a batch built from lists) convert without loss; floats
    # (in [0, 1]: black images once converted) and values past 255 (wrapped) are refused.
    exact = data.dtype == np.uint8 or (data.dtype.kind in "iu" and data.size and 0 <= data.min() and data.max() <= 255)
    if data.ndim != 2 or data.shape[1] != 3072 or not exact:
        raise DatasetError(f"{where}: key 'data' must be N x 3072 uint8 (channel-planar 32x32 RGB), "
                           f"got {data.dtype} of shape {data.shape}"
                           + (f" with values in {data.min()}..{data.max()}" if data.dtype.kind in "iu" and data.size else ""))
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8, copy=False)


def _labels(batch: dict, key: str, num_classes: int, where: str) -> np.ndarray:
    """The batch's labels: one integer in [0, num_classes) per image row."""
    if key not in batch:
        raise DatasetError(f"{where} has no key {key!r} (its keys: {sorted(map(str, batch))})")
    labels = np.asarray(batch[key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(batch["data"]):
        raise DatasetError(f"{where}: key {key!r} must be one integer label per image ({len(batch['data'])}), "
                           f"got shape {labels.shape} of {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DatasetError(f"{where}: key {key!r} has labels outside 0..{num_classes - 1} (row {bad[0]}: {labels[bad[0]]}; "
                           f"{len(bad)} in all)")
    return labels.astype(np.int64, copy=False)


def read_archive(dataset: str, root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The whole official training and test sets, in the archive's order, checked (labels, shapes,
    class names, and a compressed archive read to its end): ``(train_images, train_targets,
    test_images, test_targets, class_names)``."""
    top, train_member, test_member, meta_member, label_key, names_key, num_classes = _LAYOUT[dataset]
    archive = _Archive(Path(root).expanduser(), top)

    def images_and_labels(member: str) -> tuple[np.ndarray, np.ndarray]:
        batch = archive.load(member)
        return _images(batch, archive.where(member)), _labels(batch, label_key, num_classes, archive.where(member))

    try:
        # CIFAR-10 ships five training batches
        parts = [images_and_labels(m) for m in ([train_member] if train_member else [f"data_batch_{i}" for i in range(1, 6)])]
        train_images, train_targets = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        test_images, test_targets = images_and_labels(test_member)
        names = archive.load(meta_member).get(names_key, [])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) in (0, num_classes)):
            raise DatasetError(f"{archive.where(meta_member)}: key {names_key!r} must be a list of {num_classes} class names")
        archive.verify()
    finally:
        archive.close()
    return train_images, train_targets, test_images, test_targets, names or [str(c) for c in range(num_classes)]


def load_cifar_lt(dataset: str, root: str | Path, imbalance_factor: float) -> DatasetBundle:
    """CIFAR-10/100-LT: the long-tailed training subset and the balanced test set."""
    if dataset not in _LAYOUT:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}")
    if not str(root):
        raise DatasetError(f"data.root is empty: set it to the CIFAR python archive (for {dataset})")
    if str(root).endswith(".npz"):  # packed by tools/pack_cifar_npz.py: the LT subset + test set, 50 MiB
        from ltscale.data.cifar_npz import load_cifar_lt_npz

        return load_cifar_lt_npz(dataset, Path(root).expanduser(), imbalance_factor)
    train_images, train_targets, test_images, test_targets, class_names = read_archive(dataset, root)
    num_classes = len(class_names)
    per_class = np.bincount(train_targets, minlength=num_classes)
    counts = long_tailed_counts(int(per_class.max()), num_classes, imbalance_factor)
    keep = long_tailed_indices(train_targets, counts)
    name = f"{dataset}-if{imbalance_factor:g}"
    train = ArraySplit(name=f"{name}/train", targets=train_targets[keep], num_classes=num_classes,
                       class_names=class_names, images=train_images[keep])
    test_split = ArraySplit(name=f"{name}/test", targets=test_targets, num_classes=num_classes,
                            class_names=class_names, images=test_images)
    return DatasetBundle(name=name, train=train, test=test_split, normalization=_NORMALIZATION[dataset], image_size=32)

"""ImageNet-LT, Places-LT and iNaturalist 2018: split lists (or iNat JSON) -> :class:`FileSplit`.

The split lists are the ones from the classifier-balancing release that every long-tail paper uses,
one ``<relative path> <label>`` line per image, paths relative to the image root (``data.root``):

    ImageNet-LT   train/n01440764/n01440764_762.JPEG 0           (ILSVRC2012 train/ and val/ folders)
    Places-LT     train/airfield/00004851.jpg 0                  (Places365-Standard, per-class folders)
    iNat 2018     train_val2018/Plantae/7291/<hash>.jpg 7291     (the official train_val2018/ folder)

For iNaturalist 2018 the official COCO-style ``train2018.json`` / ``val2018.json`` can replace the
lists (``data.train_annotations`` / ``data.test_annotations``). In the literature the iNat *val*
set is the test set (the official test labels were never released), so the default iNat test list
is ``iNaturalist18_val.txt`` and there is no separate validation split.

Only labels and paths are read here; decoding is a loader backend's job
(:mod:`ltscale.data.loaders.files`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ltscale.data.base import DatasetBundle, FileSplit, Normalization
from ltscale.data.config import DataConfig
from ltscale.data.errors import DatasetError

IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Per-channel statistics of the iNaturalist 2018 training images (the values the iNat recipes use).
INAT_NORMALIZATION = Normalization(mean=(0.466, 0.471, 0.380), std=(0.195, 0.194, 0.192))

SPLIT_ROLES = ("train", "val", "test")
_MAX_LISTED = 5  # missing / malformed entries quoted in an error message
# Control characters and a byte-order mark inside a line: a list zero-filled by a crash, or two
# lists joined with `cat` (the second one's BOM), would otherwise give a path that looks right
# and is not, or no error at all until the file system refuses it.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")


@dataclass(frozen=True)
class ImageListSpec:
    """What is fixed about one file-based dataset: class count, default list names, statistics.

    ``default_lists`` maps a split role to the standard list file name looked up in ``data.root``
    when the config names none; a role absent from it (iNat's ``val``) has no default split.
    ``train_color_jitter``: the ColorJitter strength of the dataset's usual training recipe (the
    ImageNet-LT / Places-LT recipes use 0.4; the iNaturalist recipes use none).
    """

    name: str
    num_classes: int
    normalization: Normalization
    default_lists: dict[str, str]
    layout: str
    train_color_jitter: float


DATASET_SPECS: dict[str, ImageListSpec] = {
    "imagenet_lt": ImageListSpec(
        name="imagenet_lt",
        num_classes=1000,
        normalization=IMAGENET_NORMALIZATION,
        default_lists={"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
        layout="the ILSVRC2012 folders train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (as in 'train/n01440764/n01440764_762.JPEG')",
        train_color_jitter=0.4,
    ),
    "places_lt": ImageListSpec(
        name="places_lt",
        num_classes=365,
        normalization=IMAGENET_NORMALIZATION,
        default_lists={"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
        layout="Places365-Standard in per-class folders train/<class>/*.jpg and val/<class>/*.jpg "
        "(as in 'train/airfield/00004851.jpg')",
        train_color_jitter=0.4,
    ),
    "inat2018": ImageListSpec(
        name="inat2018",
        num_classes=8142,
        normalization=INAT_NORMALIZATION,
        default_lists={"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"},
        layout="the official train_val2018/<supercategory>/<category id>/<hash>.jpg folder",
        train_color_jitter=0.0,
    ),
}


def _malformed(path: Path, number: int, text: str, problem: str) -> DatasetError:
    return DatasetError(
        f"{path}, line {number}: {problem} in {text!r}; every non-blank line must be "
        "'<relative path> <label>' with a non-negative integer label."
    )


def _listed_twice(path: Path, first: tuple[int, str, int], second: tuple[int, str, int]) -> DatasetError:
    (first_number, first_path, first_label), (number, relative, label) = first, second
    image = repr(first_path) if relative == first_path else f"{first_path!r} (written {relative!r} on line {number})"
    if label == first_label:
        found = f"image {image} is listed twice, both times with label {label}"
    else:
        found = f"image {image} is listed twice with different labels, {first_label} and {label}"
    return DatasetError(
        f"{path}, lines {first_number} and {number}: {found}; every image must appear on exactly one "
        "line with one label (a repeated image would be counted twice in the class counts and in training)."
    )


def _inside_root(relative: str) -> tuple[str, str]:
    """``relative`` normalised, and what is wrong with it ("" if nothing): absolute, or leaving the
    image root through '..'. Lexical only: lists are checked before (or, for ``ltscale data
    stats``, without) the images."""
    normal = posixpath.normpath(relative)
    if normal.startswith("/"):
        return normal, "is absolute"
    if normal == ".." or normal.startswith("../"):
        return normal, "leaves the image root through '..'"
    return normal, ""


def read_split_list(path: str | Path, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Parse a ``<relative path> <label>`` split list into (paths, labels (N,) int64).

    Each line is split on its *last* run of whitespace, so a path containing spaces still parses.
    Blank lines are skipped. A line without a label, with a non-integer or negative label, or (when
    ``num_classes`` is given) with a label >= ``num_classes`` raises :class:`DatasetError` naming
    the file, the line number and the line. So does an absolute path or one whose ``..`` leaves
    the image root, and an image listed twice (naming both lines, and both labels if they differ):
    a repeated line would count the image twice in the class counts and in training.
    """
    path = Path(path)
    paths: list[str] = []
    labels: list[int] = []
    # Normalised path -> (line number, path as written, label) of its first line. Normalising
    # catches 'train/a/x.jpg' and 'train/./a/x.jpg' naming one image; a dict keeps this O(N) for
    # iNat's 437k lines.
    first_seen: dict[str, tuple[int, str, int]] = {}
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                text = line.strip()
                if not text:
                    continue
                invisible = _INVISIBLE.search(text)
                if invisible:
                    raise _malformed(path, number, text, f"an invisible character U+{ord(invisible.group()):04X}")
                parts = text.rsplit(None, 1)
                if len(parts) != 2:
                    raise _malformed(path, number, text, "no label")
                relative, label_text = parts
                digits = label_text[1:] if label_text[:1] in "+-" else label_text
                # isascii: int() would also accept '١٢' or '1_000', which no list should contain.
                if not (digits.isascii() and digits.isdigit()):
                    raise _malformed(path, number, text, f"label {label_text!r} is not an integer")
                label = int(label_text)
                if label < 0:
                    raise _malformed(path, number, text, f"label {label} is negative")
                if num_classes is not None and label >= num_classes:
                    raise DatasetError(
                        f"{path}, line {number}: label {label} in {text!r} is out of range; this "
                        f"dataset has {num_classes} classes, so labels must lie in 0..{num_classes - 1}."
                    )
                normal, where = _inside_root(relative)
                if where:
                    raise DatasetError(
                        f"{path}, line {number}: path {relative!r} {where}; the list's paths must be relative "
                        "to data.root and stay inside it (as in 'train/n01440764/n01440764_762.JPEG')."
                    )
                if normal in first_seen:
                    raise _listed_twice(path, first_seen[normal], (number, relative, label))
                first_seen[normal] = (number, relative, label)
                paths.append(relative)
                labels.append(label)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a UTF-8 text file ({error}); expected a '<relative path> <label>' list.") from None
    return paths, np.asarray(labels, dtype=np.int64)


def _require(mapping: object, key: str, path: Path, where: str) -> object:
    if not isinstance(mapping, dict):
        raise DatasetError(
            f"{path}: {where} is a {type(mapping).__name__}, not an object; expected the iNaturalist 2018 COCO-style "
            "layout (top-level 'images' [{'id', 'file_name'}], 'annotations' [{'image_id', 'category_id'}], "
            "'categories' [{'id', 'name'}])."
        )
    if key not in mapping:
        raise DatasetError(
            f"{path}: {where} has no key {key!r}; expected the iNaturalist 2018 COCO-style layout "
            "(top-level 'images' [{'id', 'file_name'}], 'annotations' [{'image_id', 'category_id'}], "
            "'categories' [{'id', 'name'}])."
        )
    return mapping[key]


def _require_list(data: dict, key: str, path: Path) -> list:
    value = _require(data, key, path, "the top-level object")
    if not isinstance(value, list):
        raise DatasetError(f"{path}: top-level {key!r} must be a list, got {type(value).__name__}.")
    return value


def _entry_id(entry: object, key: str, path: Path, section: str, index: int) -> int:
    """``entry[key]`` of entry ``index`` of ``section``, which must be an integer id."""
    value = _require(entry, key, path, f"entry {index} of {section!r}")
    # The iNat 2018 files use integer ids. Anything else would reach sorted() or a dict as a
    # TypeError (mixed types, lists), or be taken for 0/1 (JSON true/false, a bool in Python).
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(
            f"{path}: entry {index} of {section!r} has {key} {value!r} ({type(value).__name__}); "
            "expected an integer, as every id in the iNaturalist 2018 COCO-style files is."
        )
    return value


def read_inat_annotations(json_path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Read an iNaturalist 2018 COCO-style JSON into (paths, labels (N,) int64, class names).

    Images keep the order of the file's ``images`` list; each must have exactly one annotation.
    Category ids become labels 0..C-1: when the ids are already 0..C-1 (as in iNat 2018) label ==
    id, otherwise labels follow the sorted ids. The official ``test2018.json`` has no labels and
    is rejected (use ``val2018.json`` as the test set, as the literature does).
    """
    path = Path(json_path)
    if not path.is_file():
        raise DatasetError(f"{path}: iNaturalist annotation file not found.")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "expected the iNaturalist 2018 COCO-style annotation file."
        ) from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a UTF-8 JSON file ({error}).") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be a JSON object, got {type(data).__name__}.")

    images = _require_list(data, "images", path)
    if not data.get("annotations"):
        raise DatasetError(
            f"{path}: has no 'annotations' (or an empty list), so its {len(images)} images have no labels. "
            "The iNaturalist 2018 test set (test2018.json) was released without labels; use val2018.json "
            "(or iNaturalist18_val.txt) as the test split, as the long-tail literature does."
        )
    annotations = _require_list(data, "annotations", path)
    categories = _require_list(data, "categories", path)
    if not categories:
        raise DatasetError(f"{path}: 'categories' is empty; expected one entry per class.")

    names_by_id: dict[int, str] = {}
    category_index: dict[int, int] = {}
    for index, entry in enumerate(categories):
        category_id = _entry_id(entry, "id", path, "categories", index)
        if category_id in category_index:
            raise DatasetError(
                f"{path}: entries {category_index[category_id]} and {index} of 'categories' both have id "
                f"{category_id}; expected one entry per category id."
            )
        category_index[category_id] = index
        names_by_id[category_id] = str(_require(entry, "name", path, f"entry {index} of 'categories'"))
    sorted_ids = sorted(names_by_id)
    # iNat 2018 ids are already 0..8141 and the split lists use them as labels: keep id == label
    # then, so JSON- and list-built splits agree. Sorting gives the same result in that case.
    label_of = {category_id: label for label, category_id in enumerate(sorted_ids)}
    class_names = [names_by_id[category_id] for category_id in sorted_ids]

    label_of_image: dict[int, int] = {}
    annotation_index: dict[int, int] = {}
    for index, annotation in enumerate(annotations):
        image_id = _entry_id(annotation, "image_id", path, "annotations", index)
        category_id = _entry_id(annotation, "category_id", path, "annotations", index)
        if category_id not in label_of:
            raise DatasetError(
                f"{path}: entry {index} of 'annotations' (image {image_id}) has category_id {category_id}, "
                "which is not among 'categories'."
            )
        if image_id in label_of_image:
            raise DatasetError(
                f"{path}: image {image_id} has more than one annotation (entries {annotation_index[image_id]} and "
                f"{index} of 'annotations'); expected exactly one label per image."
            )
        label_of_image[image_id] = label_of[category_id]
        annotation_index[image_id] = index

    paths: list[str] = []
    labels = np.empty(len(images), dtype=np.int64)
    unlabelled: list[int] = []
    image_index: dict[int, int] = {}
    file_position: dict[str, int] = {}
    for position, image in enumerate(images):
        image_id = _entry_id(image, "id", path, "images", position)
        # A repeated id would take the same annotation twice: one image counted twice, or two
        # images sharing one label.
        if image_id in image_index:
            raise DatasetError(
                f"{path}: entries {image_index[image_id]} and {position} of 'images' both have id {image_id}; "
                "expected each image id once, with exactly one annotation."
            )
        image_index[image_id] = position
        file_name = str(_require(image, "file_name", path, f"entry {position} of 'images'"))
        normal, where = _inside_root(file_name)
        if where:
            raise DatasetError(
                f"{path}: entry {position} of 'images' has file_name {file_name!r}, which {where}; file names "
                "must be relative to data.root and stay inside it (as in 'train_val2018/Plantae/7291/<hash>.jpg')."
            )
        if normal in file_position:
            raise DatasetError(
                f"{path}: entries {file_position[normal]} and {position} of 'images' both have file_name "
                f"{file_name!r}; each image file must be listed once."
            )
        file_position[normal] = position
        paths.append(file_name)
        label = label_of_image.get(image_id)
        if label is None:
            unlabelled.append(image_id)
            label = -1
        labels[position] = label
    if unlabelled:
        raise DatasetError(
            f"{path}: {len(unlabelled)} of {len(images)} images have no annotation "
            f"(first ids: {unlabelled[:_MAX_LISTED]}); expected exactly one label per image."
        )
    if len(label_of_image) != len(images):
        unknown = sorted(set(label_of_image) - set(image_index))
        raise DatasetError(
            f"{path}: {len(unknown)} annotations refer to image ids that are not among 'images' "
            f"(first: {unknown[:_MAX_LISTED]})."
        )
    return paths, labels, class_names


def _file_names(directory: Path) -> set[str] | None:
    """Names of the regular files in ``directory`` (None when it does not exist)."""
    try:
        with os.scandir(directory) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise DatasetError(f"cannot list {directory}: {error}.") from None


def check_files_exist(root: str | Path, paths: list[str], source: str) -> None:
    """Raise :class:`DatasetError` unless every ``root / path`` is an existing file.

    ``source`` says where the paths came from (the list file and its config key) for the message.
    Each distinct parent directory is listed once with ``os.scandir`` rather than stat-ing every
    file: for iNat's 437k images in 8k folders this is ~50x fewer system calls, which matters on
    network file systems.
    """
    root = Path(root)
    listings: dict[str, set[str] | None] = {}
    missing: list[str] = []
    for relative in paths:
        parent, _, name = relative.rpartition("/")
        if parent not in listings:
            listings[parent] = _file_names(root / parent)
        names = listings[parent]
        if names is None:
            missing.append(relative)
        elif name not in names and not (root / relative).is_file():
            # The is_file() fallback only runs for names absent from the listing: it accepts what
            # the listing spells differently (case-insensitive file systems, './' in a path).
            missing.append(relative)
    if missing:
        # a listed name that exists as a folder: "missing" alone would send the user looking for it
        shown = [f"{relative!r} (a directory)" if (root / relative).is_dir() else repr(relative) for relative in missing[:_MAX_LISTED]]
        raise DatasetError(
            f"{len(missing)} of {len(paths)} files listed in {source} are missing under data.root = {root} "
            f"(first {min(len(missing), _MAX_LISTED)}: {', '.join(shown)}). "
            "Check that data.root is the image root the list's paths are relative to."
        )


def _class_names_from_paths(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Class names from the folder layout: the path between the split folder and the file name.

    'train/n01440764/x.JPEG' -> 'n01440764', 'train_val2018/Plantae/7291/x.jpg' -> 'Plantae/7291'.
    Labels absent from ``labels`` keep their number as name.
    """
    names = [str(label) for label in range(num_classes)]
    present, first = np.unique(labels, return_index=True)
    for label, position in zip(present.tolist(), first.tolist()):
        parts = paths[position].split("/")
        if len(parts) >= 3:
            names[label] = "/".join(parts[1:-1])
    return names


def _resolve_list(config: DataConfig, role: str, spec: ImageListSpec, root: Path) -> tuple[Path | None, str]:
    """The list file of split ``role`` and a description of where it came from (for messages)."""
    key = f"data.{role}_list"
    configured = getattr(config, f"{role}_list")
    if configured:
        candidate = Path(configured).expanduser()
        # A relative list path is taken from the working directory first, then from data.root.
        if not candidate.is_absolute() and not candidate.exists() and (root / candidate).exists():
            candidate = root / candidate
        if candidate.is_dir():
            raise DatasetError(f"{key} = {configured!r}: {candidate.resolve()} is a directory; name the list file "
                               "(lines of '<relative path> <label>') inside it")
        if not candidate.is_file():
            raise DatasetError(f"{key} = {configured!r}: list file not found (looked at {candidate.resolve()}).")
        return candidate, f"{candidate} ({key})"
    default = spec.default_lists.get(role)
    if default is None:
        return None, ""
    candidate = root / default
    if candidate.is_file():
        return candidate, f"{candidate} (default for {key})"
    if role == "val":
        return None, ""  # the validation split is optional
    raise DatasetError(
        f"{key} is not set and the standard list {default} is not in data.root = {root} "
        f"(looked for {candidate}). Set {key} to the {config.dataset} {role} split list, or put {default} in data.root."
    )


def _load_role(
    config: DataConfig, role: str, spec: ImageListSpec, root: Path
) -> tuple[list[str], np.ndarray, list[str] | None, str] | None:
    """(paths, labels, class names from JSON or None, source description) of one split, or None."""
    annotations = getattr(config, f"{role}_annotations", "") if role != "val" else ""
    if annotations:
        key = f"data.{role}_annotations"
        if not Path(annotations).expanduser().is_file():
            raise DatasetError(f"{key} = {annotations!r}: annotation file not found.")
        paths, labels, names = read_inat_annotations(Path(annotations).expanduser())
        if len(names) != spec.num_classes:
            raise DatasetError(
                f"{annotations} ({key}) has {len(names)} categories; {config.dataset} has {spec.num_classes}."
            )
        return paths, labels, names, f"{annotations} ({key})"
    list_path, source = _resolve_list(config, role, spec, root)
    if list_path is None:
        return None
    paths, labels = read_split_list(list_path, num_classes=spec.num_classes)
    if not paths:
        raise DatasetError(f"{source} has no entries; expected one '<relative path> <label>' line per image.")
    return paths, labels, None, source


def _check_disjoint(loaded: dict[str, tuple | None]) -> None:
    """No image may be in two splits: a test (or validation) image that is also trained on makes
    the reported accuracy a training accuracy, silently. The standard lists are disjoint."""
    seen: dict[str, str] = {}
    for role, entry in loaded.items():
        if entry is None:
            continue
        paths, _, _, source = entry
        normal = [posixpath.normpath(path) for path in paths]
        shared = [path for path in normal if path in seen]
        if shared:
            other = seen[shared[0]]
            raise DatasetError(
                f"{len(shared)} image(s) of {source} are also in {other}, e.g. {shared[0]!r}; the training, "
                "validation and test splits must not share images (an image that is trained on and tested on "
                "inflates the test accuracy)."
            )
        seen.update(dict.fromkeys(normal, source))


def build_image_list_dataset(config: DataConfig, check_files: bool = True) -> DatasetBundle:
    """The train / (val) / test splits of ImageNet-LT, Places-LT or iNaturalist 2018.

    Lists default to the standard names in ``data.root`` (``ImageNet_LT_train.txt`` ...). With
    ``check_files=False`` (``ltscale data stats``) the image files are not looked at, so the
    counts of the real lists can be reported without the images; ``data.root`` then only serves
    to find default lists.
    """
    spec = DATASET_SPECS.get(config.dataset)
    if spec is None:
        raise ValueError(f"build_image_list_dataset handles {sorted(DATASET_SPECS)}, not data.dataset = {config.dataset!r}")
    expected = f"Expected data.root to be the image root holding {spec.layout}."
    if not config.root:
        raise DatasetError(f"data.root is not set for {config.dataset}. {expected}")
    root = Path(config.root).expanduser()
    if check_files and not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"data.root = {config.root!r} {state}. {expected}")

    loaded = {role: _load_role(config, role, spec, root) for role in SPLIT_ROLES}
    _check_disjoint(loaded)
    train_paths, train_labels, json_names, _ = loaded["train"]
    class_names = json_names or _class_names_from_paths(train_paths, train_labels, spec.num_classes)

    splits: dict[str, FileSplit | None] = {}
    for role, entry in loaded.items():
        if entry is None:
            splits[role] = None
            continue
        paths, labels, _, source = entry
        if check_files:
            check_files_exist(root, paths, source)
        splits[role] = FileSplit(
            name=f"{config.dataset}/{role}",
            targets=labels,
            num_classes=spec.num_classes,
            class_names=class_names,
            root=root,
            paths=paths,
        )
    return DatasetBundle(
        name=config.dataset,
        train=splits["train"],
        test=splits["test"],
        normalization=spec.normalization,
        image_size=config.image_size,
        val=splits["val"],
    )

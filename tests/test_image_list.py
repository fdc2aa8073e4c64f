"""ImageNet-LT / Places-LT / iNat 2018 split reading and the torch file loader.

The real split lists and JPEGs live in ../shared/data (outside the repository); tests that need
them skip, saying so, when it is absent. Image trees are built in tmp_path from the real samples.
"""

from __future__ import annotations

import json
import re
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ltscale.data.base import FileSplit
from ltscale.data.config import DataConfig
from ltscale.data.errors import DatasetError
from ltscale.data.image_list import (
    DATASET_SPECS,
    IMAGENET_NORMALIZATION,
    build_image_list_dataset,
    check_files_exist,
    read_inat_annotations,
    read_split_list,
)
from ltscale.data.loaders.files import FileLoader, build_transform, decode_image_file, jpeg_frame_size, verify_images
from ltscale.data.samplers import InstanceBalancedSampler

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SPLITS = SHARED_DATA / "splits"
SAMPLES = SHARED_DATA / "imagenet-samples"
GREYSCALE_SAMPLES = {"n04008634_projectile.JPEG", "n04090263_rifle.JPEG", "n04372370_switch.JPEG", "n04532670_viaduct.JPEG"}
IMAGE_SIZE = 64


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives in ../shared/data, outside the repository)")
    return path


# ---------------------------------------------------------------- real split lists


@pytest.mark.parametrize(
    ("name", "lines", "classes", "min_per_class", "max_per_class"),
    [
        ("ImageNet_LT_val.txt", 20_000, 1000, 20, 20),
        ("ImageNet_LT_test.txt", 50_000, 1000, 50, 50),
        ("Places_LT_train.txt", 62_500, 365, 5, 4980),
        ("Places_LT_val.txt", 7_300, 365, 20, 20),
        ("Places_LT_test.txt", 36_500, 365, 100, 100),
    ],
)
def test_real_split_lists_have_their_published_counts(name, lines, classes, min_per_class, max_per_class):
    paths, labels = read_split_list(_need(SPLITS / name))
    counts = np.bincount(labels)
    assert len(paths) == len(labels) == lines
    assert len(counts) == classes
    assert counts.min() == min_per_class and counts.max() == max_per_class
    assert all(" " not in path for path in paths[:100])


def test_places_lt_stats_without_images_and_missing_images_named():
    root = _need(SPLITS)
    bundle = build_image_list_dataset(DataConfig(dataset="places_lt", root=str(root)), check_files=False)
    stats = bundle.stats()
    assert (stats["num_classes"], stats["train_images"], stats["test_images"], stats["val_images"]) == (365, 62_500, 36_500, 7_300)
    assert (stats["max_class_count"], stats["min_class_count"]) == (4980, 5)
    assert bundle.train.class_names[0] == "airfield"  # derived from train/airfield/...
    assert bundle.normalization == IMAGENET_NORMALIZATION and bundle.image_size == 224

    # With the file check on, the images (absent here) are reported with root, list and first path.
    with pytest.raises(DatasetError) as caught:
        build_image_list_dataset(DataConfig(dataset="places_lt", root=str(root)))
    message = str(caught.value)
    assert "62500 of 62500" in message and str(root) in message
    assert "Places_LT_train.txt" in message and "train/airfield/00004851.jpg" in message


def test_missing_default_train_list_names_the_config_key():
    root = _need(SPLITS)  # has ImageNet_LT_val/test.txt but not ImageNet_LT_train.txt
    with pytest.raises(DatasetError, match=r"data\.train_list.*ImageNet_LT_train\.txt"):
        build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=str(root)), check_files=False)


# ---------------------------------------------------------------- list parsing and errors


def test_read_split_list_splits_on_last_whitespace_and_skips_blank_lines(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("\ufefftrain/a b/x.jpg 3\n\n   \ntrain/c/y.jpg\t0\r\n", encoding="utf-8")  # a leading BOM is fine
    paths, labels = read_split_list(list_path)
    assert paths == ["train/a b/x.jpg", "train/c/y.jpg"]
    assert labels.dtype == np.int64 and labels.tolist() == [3, 0]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [("train/c/z.jpg", "no label"), ("train/c/z.jpg cat", "not an integer"), ("train/c/z.jpg 1.5", "not an integer"),
     ("train/c/z.jpg -2", "negative"),
     # A list zero-filled by a crash; two lists joined with `cat` (the second one's byte-order mark).
     ("\x00\x00train/c/z.jpg 1", "invisible character U+0000"), ("\ufefftrain/c/z.jpg 1", "invisible character U+FEFF"),
     ("train/c/\x1bz.jpg 1", "invisible character U+001B")],
)
def test_malformed_line_names_file_line_number_and_text(tmp_path, bad_line, problem):
    list_path = tmp_path / "bad.txt"
    list_path.write_text(f"train/a/x.jpg 0\n\n{bad_line}\n")
    with pytest.raises(DatasetError) as caught:
        read_split_list(list_path)
    message = str(caught.value)
    assert str(list_path) in message and "line 3" in message and repr(bad_line) in message and problem in message


@pytest.mark.parametrize(
    ("lines", "found"),
    [
        (["train/a/x.jpg 3", "train/b/y.jpg 1", "train/a/x.jpg 3"], "'train/a/x.jpg' is listed twice, both times with label 3"),
        (["train/a/x.jpg 3", "train/b/y.jpg 1", "train/a/x.jpg 5"], "listed twice with different labels, 3 and 5"),
        # Two spellings of one file are one image.
        (["train/a/x.jpg 3", "train/b/y.jpg 1", "./train//a/x.jpg 3"], "'train/a/x.jpg' (written './train//a/x.jpg' on line 3)"),
    ],
)
def test_image_listed_twice_names_both_lines(tmp_path, lines, found):
    list_path = tmp_path / "dup.txt"
    list_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as caught:
        read_split_list(list_path)
    message = str(caught.value)
    assert str(list_path) in message and "lines 1 and 3" in message and found in message


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/etc/passwd", "is absolute"),
        ("train/../../etc/passwd", "leaves the image root"),
        ("../x.jpg", "leaves the image root"),
        ("train/../..", "leaves the image root"),  # normalises to '..' itself
    ],
)
def test_path_outside_the_root_names_line_and_path(tmp_path, path, problem):
    list_path = tmp_path / "escape.txt"
    list_path.write_text(f"train/a/x.jpg 0\n{path} 3\n")
    with pytest.raises(DatasetError) as caught:
        read_split_list(list_path)
    message = str(caught.value)
    assert str(list_path) in message and "line 2" in message and repr(path) in message and problem in message
    assert "relative to data.root and stay inside it" in message


def test_dot_dot_inside_the_root_is_kept(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("train/../val/a/x.jpg 0\n")
    assert read_split_list(list_path)[0] == ["train/../val/a/x.jpg"]


def test_list_errors_reach_the_dataset_builder(tmp_path):
    # `ltscale data stats` / `data verify` build the dataset: the list's error must surface there.
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a/x.jpg 0\ntrain/a/x.jpg 1\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("/etc/passwd 0\n")
    with pytest.raises(DatasetError, match=r"ImageNet_LT_train\.txt, lines 1 and 2: .*different labels, 0 and 1"):
        build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=str(tmp_path)), check_files=False)
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a/x.jpg 0\n")
    with pytest.raises(DatasetError, match=r"ImageNet_LT_test\.txt, line 1: path '/etc/passwd' is absolute"):
        build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=str(tmp_path)), check_files=False)


def test_label_out_of_range_names_line(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a/x.jpg 0\ntrain/a/y.jpg 1000\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/a/x.jpg 0\n")
    with pytest.raises(DatasetError, match=r"line 2: label 1000 .*0\.\.999"):
        build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=str(tmp_path)), check_files=False)


def test_missing_or_bad_root_names_data_root(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.root .*does not exist.*train/<wnid>"):
        build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=str(tmp_path / "absent")))
    with pytest.raises(DatasetError, match=r"data\.root is not set"):
        build_image_list_dataset(DataConfig(dataset="inat2018", root=""))
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    with pytest.raises(DatasetError, match=r"data\.root .*is not a directory"):
        build_image_list_dataset(DataConfig(dataset="places_lt", root=str(a_file)))


def test_missing_explicit_list_names_config_key(tmp_path):
    config = DataConfig(dataset="places_lt", root=str(tmp_path), train_list=str(tmp_path / "nope.txt"))
    with pytest.raises(DatasetError, match=r"data\.train_list = .*nope\.txt.*not found"):
        build_image_list_dataset(config)
    (tmp_path / "lists").mkdir()
    config = DataConfig(dataset="places_lt", root=str(tmp_path), train_list=str(tmp_path / "lists"))
    with pytest.raises(DatasetError, match=r"data\.train_list = .*lists.*is a directory; name the list file"):
        build_image_list_dataset(config)


def test_check_files_exist_reports_count_and_first_missing(tmp_path):
    for relative in ("train/a/1.jpg", "train/a/2.jpg", "train/b/3.jpg"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "train/a/sub").mkdir()
    check_files_exist(tmp_path, ["train/a/1.jpg", "train/b/3.jpg", "train/a/2.jpg"], "list.txt")
    listed = ["train/a/1.jpg", "train/a/missing.jpg", "train/c/4.jpg", "train/b/3.jpg", "train/a/sub"]
    with pytest.raises(DatasetError) as caught:
        check_files_exist(tmp_path, listed, "list.txt (data.train_list)")
    message = str(caught.value)
    assert "3 of 5" in message and str(tmp_path) in message and "list.txt (data.train_list)" in message
    assert "'train/a/missing.jpg', 'train/c/4.jpg', 'train/a/sub' (a directory)" in message


# ---------------------------------------------------------------- iNaturalist JSON


def _coco(category_ids, labelled=True):
    images = [{"id": 100 + i, "file_name": f"train_val2018/Plantae/{c}/{i}.jpg"} for i, c in enumerate(category_ids)]
    annotations = [{"id": i, "image_id": 100 + i, "category_id": c} for i, c in enumerate(category_ids)]
    categories = [{"id": c, "name": f"species {c}"} for c in sorted(set(category_ids), reverse=True)]
    return {"images": images, "annotations": annotations if labelled else [], "categories": categories}


def test_inat_json_keeps_contiguous_ids_and_sorts_others(tmp_path):
    contiguous = tmp_path / "contiguous.json"
    contiguous.write_text(json.dumps(_coco([2, 0, 1, 2])))
    paths, labels, names = read_inat_annotations(contiguous)
    assert paths[0] == "train_val2018/Plantae/2/0.jpg"
    assert labels.tolist() == [2, 0, 1, 2] and names == ["species 0", "species 1", "species 2"]

    sparse = tmp_path / "sparse.json"
    sparse.write_text(json.dumps(_coco([10, 3, 7, 3])))
    _, labels, names = read_inat_annotations(sparse)
    assert labels.tolist() == [2, 0, 1, 0] and names == ["species 3", "species 7", "species 10"]


def test_inat_json_errors_name_file_and_key(tmp_path):
    unlabelled = tmp_path / "test2018.json"
    unlabelled.write_text(json.dumps(_coco([0, 1], labelled=False)))
    with pytest.raises(DatasetError, match=r"test2018\.json: has no 'annotations'.*val2018\.json"):
        read_inat_annotations(unlabelled)

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON"):
        read_inat_annotations(broken)

    data = _coco([0, 1])
    del data["images"][1]["file_name"]
    no_file_name = tmp_path / "no_file_name.json"
    no_file_name.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"no_file_name\.json: entry 1 of 'images' has no key 'file_name'"):
        read_inat_annotations(no_file_name)

    data = _coco([0, 1, 2])
    del data["categories"][-1]["name"]
    no_name = tmp_path / "no_name.json"
    no_name.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"no_name\.json: entry {len(data['categories']) - 1} of 'categories' has no key 'name'"):
        read_inat_annotations(no_name)

    data = _coco([0, 1])
    data["annotations"][0] = [0, 1]
    not_an_object = tmp_path / "not_an_object.json"
    not_an_object.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"not_an_object\.json: entry 0 of 'annotations' is a list, not an object"):
        read_inat_annotations(not_an_object)

    data = _coco([0, 1])
    del data["categories"]
    no_categories = tmp_path / "no_categories.json"
    no_categories.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"no_categories\.json: the top-level object has no key 'categories'"):
        read_inat_annotations(no_categories)


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_inat_json_image_id_listed_twice_is_named(tmp_path):
    data = _coco([0, 1, 1])
    data["images"][2]["id"] = data["images"][0]["id"]  # entry 2 repeats image 100; its annotation is left over
    del data["annotations"][2]
    with pytest.raises(DatasetError) as caught:
        read_inat_annotations(_write_json(tmp_path / "dup_image.json", data))
    message = str(caught.value)
    assert "dup_image.json" in message and "entries 0 and 2 of 'images' both have id 100" in message

    data = _coco([0, 1])
    data["annotations"][1]["image_id"] = 100
    with pytest.raises(DatasetError, match=r"dup_annotation\.json: image 100 has more than one annotation \(entries 0 and 1"):
        read_inat_annotations(_write_json(tmp_path / "dup_annotation.json", data))

    data = _coco([0, 1])
    data["categories"].append({"id": 0, "name": "again"})
    with pytest.raises(DatasetError, match=r"dup_category\.json: entries 1 and 2 of 'categories' both have id 0"):
        read_inat_annotations(_write_json(tmp_path / "dup_category.json", data))


@pytest.mark.parametrize(
    ("section", "index", "key", "value"),
    [
        ("categories", 1, "id", "1"),  # mixed with int ids: sorted() used to raise TypeError
        ("categories", 0, "id", [1]),
        ("images", 1, "id", [101]),
        ("images", 0, "id", 1.5),
        ("annotations", 1, "image_id", [101]),
        ("annotations", 0, "category_id", [0]),
        ("annotations", 1, "category_id", True),  # JSON true is not category 1
        ("annotations", 0, "image_id", None),
    ],
)
def test_inat_json_non_integer_id_names_section_entry_and_value(tmp_path, section, index, key, value):
    data = _coco([0, 1])  # categories are listed in reverse: entry 0 has id 1, entry 1 has id 0
    data[section][index][key] = value
    with pytest.raises(DatasetError) as caught:
        read_inat_annotations(_write_json(tmp_path / "bad_id.json", data))
    message = str(caught.value)
    assert str(tmp_path / "bad_id.json") in message
    assert f"entry {index} of '{section}' has {key} {value!r}" in message and "expected an integer" in message


def test_inat_dataset_from_annotation_files(tmp_path):
    num_classes = DATASET_SPECS["inat2018"].num_classes
    train, test = _coco([7291, 0, 8141]), _coco([0, 7291])
    for data in (train, test):
        data["categories"] = [{"id": c, "name": f"species {c}"} for c in range(num_classes)]
        for image in data["images"]:
            (tmp_path / image["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / image["file_name"]).write_bytes(b"")  # the existence check does not decode
    (tmp_path / "train2018.json").write_text(json.dumps(train))
    (tmp_path / "val2018.json").write_text(json.dumps(test))
    config = DataConfig(
        dataset="inat2018",
        root=str(tmp_path),
        train_annotations=str(tmp_path / "train2018.json"),
        test_annotations=str(tmp_path / "val2018.json"),
    )
    bundle = build_image_list_dataset(config)
    assert bundle.num_classes == 8142 and bundle.val is None
    assert bundle.train.targets.tolist() == [7291, 0, 8141] and bundle.test.targets.tolist() == [0, 7291]
    assert bundle.train.class_names[7291] == "species 7291"
    assert bundle.normalization.mean == (0.466, 0.471, 0.380)



def test_class_names_come_from_the_folders_between_the_split_folder_and_the_file(tmp_path):
    """iNat's lists nest two folders deep (super-category / id): the name keeps both, since the
    id alone repeats the label and the super-category alone names thousands of classes."""
    (tmp_path / "train.txt").write_text(
        "train_val2018/Plantae/7291/a.jpg 7291\n"
        "train_val2018/Aves/0/b.jpg 0\n"
        "train_val2018/Plantae/7291/c.jpg 7291\n"
    )
    (tmp_path / "test.txt").write_text("train_val2018/Aves/0/d.jpg 0\n")
    config = DataConfig(dataset="inat2018", root=str(tmp_path), train_list=str(tmp_path / "train.txt"),
                        test_list=str(tmp_path / "test.txt"))
    names = build_image_list_dataset(config, check_files=False).train.class_names
    assert len(names) == 8142
    assert (names[7291], names[0]) == ("Plantae/7291", "Aves/0")
    assert names[1] == "1" and names[8141] == "8141"  # classes absent from the list keep their number

    (tmp_path / "imagenet.txt").write_text("train/n01440764/n01440764_190.JPEG 0\nflat.JPEG 1\ntrain/loose.JPEG 2\n")
    (tmp_path / "imagenet_test.txt").write_text("val/ILSVRC2012_val_00000001.JPEG 0\n")
    config = DataConfig(dataset="imagenet_lt", root=str(tmp_path), train_list=str(tmp_path / "imagenet.txt"),
                        test_list=str(tmp_path / "imagenet_test.txt"))
    names = build_image_list_dataset(config, check_files=False).train.class_names
    assert names[:3] == ["n01440764", "1", "2"]  # a file outside any class folder names nothing


# ---------------------------------------------------------------- image trees and the loader


def _sample_files() -> list[Path]:
    files = sorted(_need(SAMPLES).glob("*.JPEG"))
    colour = [f for f in files if f.name not in GREYSCALE_SAMPLES]
    grey = [f for f in files if f.name in GREYSCALE_SAMPLES]
    return colour[:9] + grey[:1]  # classes of 6, 3 and 1 images; the single class-2 image is greyscale


def _make_tree(root: Path) -> DataConfig:
    """ImageNet layout: train/<wnid>/ and val/<wnid>/, standard list names in the root."""
    files = _sample_files()
    labels = [0] * 6 + [1] * 3 + [2]
    wnids = [files[0].name.split("_")[0], files[6].name.split("_")[0], files[9].name.split("_")[0]]
    for split, list_name in (("train", "ImageNet_LT_train.txt"), ("val", "ImageNet_LT_test.txt")):
        lines = []
        for source, label in zip(files, labels):
            relative = f"{split}/{wnids[label]}/{source.name}"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / relative)
            lines.append(f"{relative} {label}")
        (root / list_name).write_text("\n".join(lines) + "\n")
    return DataConfig(dataset="imagenet_lt", root=str(root), image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    config = _make_tree(tmp_path_factory.mktemp("imagenet_lt"))
    return config, build_image_list_dataset(config)


def _loader(split: FileSplit, *, train: bool, num_workers: int = 0, fraction: float = 0.001, shuffle: bool = True) -> FileLoader:
    return FileLoader(
        split,
        train=train,
        batch_size=4,
        sampler=InstanceBalancedSampler(len(split), seed=0, shuffle=shuffle),
        image_size=IMAGE_SIZE,
        normalization=IMAGENET_NORMALIZATION,
        num_workers=num_workers,
        max_bad_image_fraction=fraction,
        drop_last=False,
        device="cpu",
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def ramp_split(root: Path, count: int) -> FileSplit:
    """One square image listed ``count`` times, whose red channel rises 0..255 left to right and green
    top to bottom: in any crop of it, red's slope across the crop is the crop's width as a fraction of
    the image (negative when flipped) and green's slope its height."""
    ramp = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)), np.full((256, 256), 128, np.uint8)], -1)
    PIL.Image.fromarray(pixels).save(root / "ramp.png")
    return FileSplit(name="ramp", targets=np.zeros(count, dtype=np.int64), num_classes=1, root=root, paths=["ramp.png"] * count)


def crop_extents(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) normalised crops of the ramp -> each crop's signed width and height, as fractions of the image."""
    mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZATION.std).view(1, 3, 1, 1)
    pixels = (images * std + mean) * 255
    size = images.shape[-1]
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2

    def slope(profile: torch.Tensor) -> torch.Tensor:  # least squares, per image: grey levels per output pixel
        return (profile * x).sum(-1) / (x * x).sum()

    return slope(pixels[:, 0].mean(1)) * size / 256, slope(pixels[:, 1].mean(2)) * size / 256


def test_tree_builds_from_default_list_names(tree):
    _, bundle = tree
    assert bundle.val is None  # no ImageNet_LT_val.txt in the root: the validation split is optional
    assert bundle.train.class_counts()[:3].tolist() == [6, 3, 1] and bundle.num_classes == 1000
    assert bundle.train.paths[0].startswith("train/n") and bundle.test.paths[0].startswith("val/n")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_epochs_cover_the_split(tree, num_workers):
    _, bundle = tree
    loader = _loader(bundle.train, train=True, num_workers=num_workers)
    assert len(loader) == 3
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 3 and [len(b["index"]) for b in batches] == [4, 4, 2]
        for batch in batches:
            assert batch["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.float32
            assert batch["target"].dtype == batch["index"].dtype == torch.int64
            assert batch["target"].tolist() == bundle.train.targets[batch["index"].numpy()].tolist()
        order = torch.cat([b["index"] for b in batches])
        assert sorted(order.tolist()) == list(range(10))
        orders.append(order.tolist())
        images = torch.cat([b["image"] for b in batches])
        # Normalised with ImageNet statistics: natural images land near zero mean, unit scale.
        assert images.mean().abs() < 0.5 and 0.5 < images.std() < 1.5
    assert orders[0] != orders[1]
    assert loader.bad_files == []


def test_eval_loader_matches_reference_pixels_and_greyscale_is_three_channel(tree):
    _, bundle = tree
    loader = _loader(bundle.test, train=False, shuffle=False)
    images = torch.cat([batch["image"] for batch in loader])
    mean = torch.tensor(IMAGENET_NORMALIZATION.mean).view(3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZATION.std).view(3, 1, 1)
    reference_transform = build_transform(False, IMAGE_SIZE)
    for index in (0, 9):
        with PIL.Image.open(bundle.test.root / bundle.test.paths[index]) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        expected = (reference_transform(pixels).float() / 255 - mean) / std
        # PIL and torchvision both decode with libjpeg-turbo; allow one grey level for IDCT differences.
        assert (images[index] - expected).abs().max() <= 1.01 / 255 / min(IMAGENET_NORMALIZATION.std)
    grey = images[9] * std + mean  # the greyscale sample: three identical channels
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_training_image_is_replaced_by_same_class_and_recorded(tmp_path, caplog, num_workers):
    config = _make_tree(tmp_path)
    split = build_image_list_dataset(config).train
    bad_path = split.root / split.paths[2]
    _truncate(bad_path)
    loader = _loader(split, train=True, num_workers=num_workers, fraction=0.2, shuffle=False)  # 2 allowed
    with caplog.at_level(logging.WARNING, logger="ltscale.data.loaders"):
        batches = list(loader)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    targets = torch.cat([b["target"] for b in batches]).tolist()
    # Index 2 (class 0) is served by the next image of class 0, index 3; labels stay right.
    assert indices == [0, 1, 3, 3, 4, 5, 6, 7, 8, 9]
    assert targets == split.targets[indices].tolist()
    assert loader.bad_files == [str(bad_path)]
    assert any(str(bad_path) in record.getMessage() and record.levelno == logging.WARNING for record in caplog.records)


def test_too_many_corrupt_images_raise_with_the_list(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    bad = [split.root / split.paths[i] for i in (2, 7)]
    for path in bad:
        _truncate(path)
    loader = _loader(split, train=True, fraction=0.1, shuffle=False)  # floor(0.1 * 10) = 1 allowed
    with pytest.raises(DatasetError, match="more than the 1 allowed") as caught:
        list(loader)
    assert str(bad[0]) in str(caught.value) and str(bad[1]) in str(caught.value)

    # With the default 0.001 a 10-image split allows none.
    with pytest.raises(DatasetError, match="more than the 0 allowed") as caught:
        list(_loader(split, train=True, shuffle=False))
    assert str(bad[0]) in str(caught.value)


def test_corrupt_image_without_readable_class_mate_raises(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    only_image = split.root / split.paths[9]  # class 2 has a single image
    _truncate(only_image)
    with pytest.raises(DatasetError, match=r"no readable image of its class 2"):
        list(_loader(split, train=True, fraction=0.5, shuffle=False))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_test_image_raises_naming_it(tmp_path, num_workers):
    split = build_image_list_dataset(_make_tree(tmp_path)).test
    bad_path = split.root / split.paths[4]
    _truncate(bad_path)
    loader = _loader(split, train=False, num_workers=num_workers, fraction=0.5, shuffle=False)
    with pytest.raises(DatasetError, match="never substitutes") as caught:
        list(loader)
    assert str(bad_path) in str(caught.value)


def test_decoder_fallbacks_and_verify_images(tmp_path):
    source = _sample_files()[0]
    with PIL.Image.open(source) as image:
        image.convert("CMYK").save(tmp_path / "cmyk.JPEG", "JPEG")
        image.save(tmp_path / "png_named.JPEG", "PNG")  # ImageNet holds a PNG named .JPEG
        width, height = image.size
    shutil.copyfile(source, tmp_path / "truncated.JPEG")
    _truncate(tmp_path / "truncated.JPEG")
    (tmp_path / "text.JPEG").write_text("not an image")
    for name in ("cmyk.JPEG", "png_named.JPEG"):
        decoded = decode_image_file(tmp_path / name)
        assert decoded.shape == (3, height, width) and decoded.dtype == torch.uint8
    grey = decode_image_file(next(p for p in sorted(SAMPLES.glob("*.JPEG")) if p.name in GREYSCALE_SAMPLES))
    assert grey.shape[0] == 3

    # A 16-bit greyscale PNG is scaled to 8 bits, not clipped to white.
    values = (np.arange(32 * 64).reshape(32, 64) * 31).astype(np.uint16)
    PIL.Image.fromarray(values).save(tmp_path / "grey16.png")
    decoded = decode_image_file(tmp_path / "grey16.png")
    assert decoded.shape == (3, 32, 64)
    assert torch.equal(decoded[0], torch.from_numpy((values >> 8).astype(np.uint8))) and torch.equal(decoded[0], decoded[2])
    # What PIL cannot identify is named by its first bytes, not by PIL's in-memory buffer.
    with pytest.raises(PIL.UnidentifiedImageError, match="not an image format PIL knows .first bytes b'not an i'"):
        decode_image_file(tmp_path / "text.JPEG")

    names = ["cmyk.JPEG", "png_named.JPEG", "truncated.JPEG", "text.JPEG", "missing.JPEG"]
    split = FileSplit(name="verify", targets=np.zeros(len(names), dtype=np.int64), num_classes=1, root=tmp_path, paths=names)
    assert verify_images(split, num_workers=0) == sorted(str(tmp_path / n) for n in names[2:])


def _oversized_split(root: Path) -> FileSplit:
    """Two classes, each an image of 200 x 150 (30,000 pixels: over the limit tests set) and a
    32 x 32 mate; class 0 JPEG, class 1 PNG. Generated: needs no sample files."""
    rng = np.random.default_rng(0)
    names = ["big.JPEG", "mate0.JPEG", "big.png", "mate1.png"]
    for name, size in zip(names, [(150, 200), (32, 32)] * 2):
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    return FileSplit(name="oversized", targets=np.array([0, 0, 1, 1]), num_classes=2, root=root, paths=names)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_image_over_the_decompression_bomb_limit_is_a_bad_file(tmp_path, monkeypatch, num_workers):
    """libjpeg (through torchvision) does not apply PIL's limit; the JPEG path applies it from the
    frame header, before decoding, so one oversized file is replaced like a corrupt one."""
    split = _oversized_split(tmp_path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)  # refused: over 20,000 pixels
    assert jpeg_frame_size(np.fromfile(tmp_path / "big.JPEG", dtype=np.uint8)) == (150, 200)
    with pytest.raises(PIL.Image.DecompressionBombError,
                       match=r"a 200 x 150 image \(30000 pixels\) is over the decompression-bomb limit of 20000"):
        decode_image_file(tmp_path / "big.JPEG")
    with pytest.raises(PIL.Image.DecompressionBombError):  # PIL's own check
        decode_image_file(tmp_path / "big.png")
    assert decode_image_file(tmp_path / "mate0.JPEG").shape == (3, 32, 32)
    loader = _loader(split, train=True, num_workers=num_workers, fraction=0.5, shuffle=False)
    assert torch.cat([b["index"] for b in loader]).tolist() == [1, 1, 3, 3]
    assert loader.bad_files == sorted(str(tmp_path / name) for name in ("big.JPEG", "big.png"))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # PIL's switch for no limit
    assert decode_image_file(tmp_path / "big.JPEG").shape == (3, 150, 200)


def test_splits_must_not_share_images(tmp_path):
    """A test image that is also a training image turns the test accuracy into a training one."""
    config = _make_tree(tmp_path / "tree")
    root = Path(config.root)
    train = (root / "ImageNet_LT_train.txt").read_text().splitlines()
    test = (root / "ImageNet_LT_test.txt").read_text().splitlines()
    (root / "ImageNet_LT_test.txt").write_text("\n".join(test[:-1] + ["./" + train[3]]) + "\n")  # written another way
    with pytest.raises(DatasetError, match=r"1 image\(s\) of .*ImageNet_LT_test.txt .* are also in .*ImageNet_LT_train.txt"
                                           r".*must not share images"):
        build_image_list_dataset(config)


@pytest.mark.parametrize("file_name,problem", [
    ("/etc/passwd", r"which is absolute"),
    ("../outside/0.jpg", r"which leaves the image root through '\.\.'"),
    ("train_val2018/Plantae/0/1.jpg", r"entries 1 and 2 of 'images' both have file_name"),  # entry 1's, written again
])
def test_inat_json_file_names_stay_inside_the_root_and_appear_once(tmp_path, file_name, problem):
    data = _coco([0, 0, 1])
    data["images"][1]["file_name"] = "train_val2018/Plantae/0/1.jpg"
    data["images"][2]["file_name"] = file_name
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}: entr.*2 of 'images'.*{problem}|"
                                           rf"{re.escape(str(path))}: {problem}"):
        read_inat_annotations(path)


def test_a_training_sample_seeds_only_the_cpu_generator_and_gives_it_back(monkeypatch):
    """With num_workers=0 the augmentation runs in the training process: seeding it must not touch
    the GPUs' generators (torch.manual_seed would, and fork_rng(devices=[]) restores only the CPU's)."""
    import torch

    from ltscale.data.loaders import files

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    before = torch.random.get_rng_state()
    with files._seeded(123):
        first = torch.rand(3)
    with files._seeded(123):
        second = torch.rand(3)
    assert torch.equal(first, second) and reseeded == []
    assert torch.equal(torch.random.get_rng_state(), before)


def _private_dirty_kib() -> int:
    from pathlib import Path as _Path

    rollup = _Path("/proc/self/smaps_rollup").read_text()
    return sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Private_Dirty:"))


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's smaps_rollup")
def test_forked_workers_read_paths_without_copying_them(tmp_path):
    """A DataLoader worker reading a list of Python strings copies the pages holding them (each
    read writes a reference count): ~100 MiB per worker for iNat18's 437k paths. The dataset
    packs them into one bytes array that reading does not touch."""
    import os

    from ltscale.data.base import FileSplit
    from ltscale.data.loaders import files

    paths = [f"train_val2018/Plantae/{i % 8142}/{i:032x}.jpg" for i in range(200_000)]
    split = FileSplit(name="train", targets=np.arange(len(paths)) % 8142, num_classes=8142, root=tmp_path, paths=paths)
    dataset = files._FileDataset(split, transform=None, image_size=8, substitute=False)
    assert [dataset.paths[i] for i in (0, 199_999)] == [paths[0], paths[199_999]]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a forked worker: read every path, report the private memory it gained
        try:
            before = _private_dirty_kib()
            total = sum(len(dataset.paths[i]) for i in range(len(dataset)))
            os.write(write, f"{_private_dirty_kib() - before} {total}".encode())
        finally:
            os._exit(0)
    os.close(write)
    grown, total = (int(v) for v in os.read(read, 100).split())
    os.waitpid(child, 0)
    assert total == sum(len(p) for p in paths)
    assert grown < 4096, f"a worker reading the paths gained {grown} KiB of private memory"


# ---------------------------------------------------------------- what each dataset's recipe fixes


def test_dataset_specs_carry_the_standard_statistics_and_colour_jitter():
    """ImageNet-pretrained backbones (Places-LT's ResNet-152) expect exactly torchvision's ImageNet
    statistics; the ImageNet-LT / Places-LT recipes jitter colour at 0.4, the iNat ones not at all."""
    assert IMAGENET_NORMALIZATION.mean == (0.485, 0.456, 0.406) and IMAGENET_NORMALIZATION.std == (0.229, 0.224, 0.225)
    for name in ("imagenet_lt", "places_lt"):
        assert DATASET_SPECS[name].normalization == IMAGENET_NORMALIZATION
        assert DATASET_SPECS[name].train_color_jitter == 0.4
    assert DATASET_SPECS["inat2018"].normalization != IMAGENET_NORMALIZATION
    assert DATASET_SPECS["inat2018"].train_color_jitter == 0.0
    assert {name: spec.num_classes for name, spec in DATASET_SPECS.items()} == {"imagenet_lt": 1000, "places_lt": 365, "inat2018": 8142}


def test_eval_transform_resizes_the_short_side_to_256_over_224_then_centre_crops():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, size=(3, 300, 400), dtype=np.uint8))
    import torchvision.transforms.v2.functional as TF

    for size, resized in ((224, 256), (112, 128)):
        expected = TF.center_crop(TF.resize(image, [resized], antialias=True), [size])
        got = build_transform(False, size)(image)
        assert got.shape == (3, size, size) and torch.equal(got, expected)


def test_train_transform_is_random_resized_crop_of_the_imagenet_recipe_and_a_fair_flip():
    import torchvision.transforms.v2 as transforms

    steps = build_transform(True, 32).transforms
    crop = next(step for step in steps if isinstance(step, transforms.RandomResizedCrop))
    # torchvision's defaults, which the ImageNet-LT / Places-LT / iNat recipes use
    assert list(crop.size) == [32, 32] and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    # A left-to-right ramp stays increasing under any crop and resize, and decreases when flipped.
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(3, 64, 64).contiguous()
    flipped = 0
    for draw in range(400):
        torch.manual_seed(draw)
        row = build_transform(True, 32)(ramp)[0, 16].int()
        flipped += int(row[0] > row[-1])
    assert abs(flipped / 400 - 0.5) < 0.1  # sd 0.025


def test_training_crops_change_with_the_epoch(tree):
    """Each sample's crop and flip is seeded from (seed, epoch, rank): the same sample gets a new
    augmentation in a new epoch, and the same one when that epoch is replayed."""
    _, bundle = tree
    split = FileSplit(name="few", targets=bundle.train.targets[:4], num_classes=1000, root=bundle.train.root,
                      paths=bundle.train.paths[:4])

    def epoch(number: int) -> torch.Tensor:
        loader = FileLoader(split, train=True, batch_size=4, sampler=InstanceBalancedSampler(4, seed=0, shuffle=False),
                            image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION, num_workers=0,
                            max_bad_image_fraction=0.0, drop_last=False, device="cpu", color_jitter=0.0)
        loader.set_epoch(number)
        (batch,) = list(loader)
        assert batch["index"].tolist() == [0, 1, 2, 3]
        return batch["image"]

    first = epoch(1)
    assert torch.equal(first, epoch(1))
    assert not torch.equal(first, epoch(2))


def test_drop_last_delivers_only_full_batches(tree):
    _, bundle = tree
    loader = FileLoader(bundle.train, train=True, batch_size=4, sampler=InstanceBalancedSampler(10, seed=0),
                        image_size=IMAGE_SIZE, normalization=IMAGENET_NORMALIZATION, num_workers=0,
                        max_bad_image_fraction=0.0, drop_last=True, device="cpu", color_jitter=0.4)
    batches = list(loader)
    assert len(loader) == 2 and [len(b["index"]) for b in batches] == [4, 4]


def test_the_pixel_limit_is_twice_pils(monkeypatch):
    """PIL warns above MAX_IMAGE_PIXELS and refuses above twice it; the JPEG path refuses where PIL does."""
    from ltscale.data.loaders.files import check_pixel_limit

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)
    check_pixel_limit(100, 200)  # exactly twice the limit: allowed
    with pytest.raises(PIL.Image.DecompressionBombError, match="over the decompression-bomb limit of 20000"):
        check_pixel_limit(100, 201)


def test_a_run_of_corrupt_images_is_replaced_by_the_next_readable_image_of_the_class(tmp_path):
    split = build_image_list_dataset(_make_tree(tmp_path)).train
    for index in (2, 3):  # class 0 holds indices 0-5
        _truncate(split.root / split.paths[index])
    loader = _loader(split, train=True, fraction=0.2, shuffle=False)  # 2 allowed
    indices = torch.cat([b["index"] for b in loader]).tolist()
    assert indices == [0, 1, 4, 4, 4, 5, 6, 7, 8, 9]
    assert loader.bad_files == sorted(str(split.root / split.paths[i]) for i in (2, 3))


def test_same_class_candidates_follow_list_order_in_a_large_split():
    """'The next images of its class' in list order: numpy's default sort is not stable on
    large arrays, which would make the substitute depend on the sort algorithm."""
    from ltscale.data.loaders.bad_images import MAX_SUBSTITUTES, SameClassCandidates

    targets = np.random.default_rng(0).integers(0, 3, size=3000)
    candidates = SameClassCandidates(targets, 3)
    for index in (0, 17, 1500, 2999):
        members = np.flatnonzero(targets == targets[index]).tolist()
        position = members.index(index)
        expected = (members[position + 1 :] + members[:position])[:MAX_SUBSTITUTES]
        assert candidates(index) == expected


def test_ledger_replacement_skips_known_bad_images(tmp_path):
    """What the DALI and FFCV backends serve for a bad image: the first same-class candidate not
    itself known bad; nothing in evaluation."""
    from ltscale.data.loaders.bad_images import BadImageLedger

    split = FileSplit(name="toy/train", targets=np.array([0, 1, 0, 0, 1, 0]), num_classes=2, root=tmp_path,
                      paths=[f"{i}.jpg" for i in range(6)])
    ledger = BadImageLedger(split, substitute=True, max_bad_image_fraction=0.9)  # 5 allowed
    ledger.record([(2, "broken"), (3, "broken")])
    assert [ledger.replacement(i) for i in range(6)] == [0, 1, 5, 5, 4, 5]
    ledger.record([(5, "broken")])
    assert ledger.replacement(2) == 0
    ledger.record([(0, "broken")])
    with pytest.raises(DatasetError, match="no readable image of its class 0"):
        ledger.replacement(2)
    evaluation = BadImageLedger(split, substitute=False, max_bad_image_fraction=0.5)
    with pytest.raises(DatasetError, match="never substitutes"):
        evaluation.record([(1, "broken")])


def test_the_pixel_limit_holds_when_the_frame_header_is_hard_to_reach(tmp_path, monkeypatch):
    """The limit is checked from the frame header before libjpeg decodes. A stray byte between two
    segments (libjpeg skips it with a warning) hides the header from that walk, and metadata
    segments can put it past any fixed window: neither lets an oversized image through."""
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(tmp_path / "clean.JPEG")
    clean = (tmp_path / "clean.JPEG").read_bytes()
    after_app0 = 4 + ((clean[4] << 8) | clean[5])  # SOI, then the JFIF segment
    (tmp_path / "stray.JPEG").write_bytes(clean[:after_app0] + b"\x00" + clean[after_app0:])
    app9 = b"\xff\xe9" + (65535).to_bytes(2, "big") + bytes(65533)  # a 64 KiB metadata segment
    (tmp_path / "metadata.JPEG").write_bytes(clean[:2] + app9 * 17 + clean[2:])  # frame header past 1 MiB
    assert jpeg_frame_size(np.fromfile(tmp_path / "stray.JPEG", dtype=np.uint8)) is None
    assert jpeg_frame_size(np.fromfile(tmp_path / "metadata.JPEG", dtype=np.uint8)) == (150, 200)
    reference = decode_image_file(tmp_path / "clean.JPEG")
    for name in ("stray.JPEG", "metadata.JPEG"):  # both decode, as libjpeg reads them
        assert (decode_image_file(tmp_path / name).int() - reference.int()).abs().max() <= 1
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)  # refused: over 20,000 pixels
    for name in ("stray.JPEG", "metadata.JPEG"):
        with pytest.raises(PIL.Image.DecompressionBombError):
            decode_image_file(tmp_path / name)

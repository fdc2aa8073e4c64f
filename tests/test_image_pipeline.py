"""A pipeline over real JPEG files: split lists + image root, decoded by the file loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ltscale.data.config import DataConfig, FfcvConfig, LoaderConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig, RebalanceConfig, TeacherConfig
from ltscale.stages.pipeline import run_pipeline

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"


@pytest.fixture()
def image_tree(tmp_path: Path) -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real JPEGs not available ({SAMPLES} is missing; it ships in ../shared/data)")
    jpegs = sorted(SAMPLES.glob("*.JPEG"))[:9]
    root = tmp_path / "imagenet"
    train_lines, test_lines = [], []
    # Three classes with 6 / 3 / 1 distinct training images, a long tail in miniature.
    for label, (start, count) in enumerate(((0, 6), (6, 2), (8, 1))):
        wnid = f"n0000000{label}"
        for i, source in enumerate(jpegs[start : start + count] * (3 if count < 3 else 1)):
            path = f"train/{wnid}/{wnid}_{i}.JPEG"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / path)
            train_lines.append(f"{path} {label}")
        test = f"val/{wnid}/ILSVRC2012_val_{label}.JPEG"
        (root / test).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(jpegs[start], root / test)
        test_lines.append(f"{test} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(test_lines) + "\n")
    return root


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_ce_then_lws_on_jpeg_files(image_tree, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'ltscale[dali]')")
    if backend == "ffcv":
        threads = torch.get_num_threads()
        pytest.importorskip("ffcv", reason="FFCV is not installed (pip install 'ltscale[ffcv]' after its apt packages)")
        torch.set_num_threads(threads)  # importing FFCV sets it to 1 process-wide
    optim = OptimConfig(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0, milestones=(), decay_factors=())
    model = ModelConfig(arch="resnet8", width=4)
    config = PipelineConfig(
        name="tiny-jpeg/lws",
        data=DataConfig(dataset="imagenet_lt", root=str(image_tree), image_size=32, loader=LoaderConfig(
            backend=backend, num_workers=0 if backend == "torch" else 1,
            ffcv=FfcvConfig(cache_dir=str(tmp_path / "ffcv"), write_workers=1))),
        stages={
            "teacher": TeacherConfig(model=model, optim=optim),
            "lws": RebalanceConfig(source="teacher", method="lws", optim=optim),
        },
        output_dir=str(tmp_path / "runs"), progress=False, device="cpu",
    )
    result = run_pipeline(config)
    assert result.executed == ["teacher", "lws"]
    metrics = result.metrics("lws")
    # 1000 ImageNet-LT classes, 3 present in this tree: accuracy is over the 3 test images only.
    assert min(abs(metrics["test/top1"] - v) for v in (0.0, 100 / 3, 200 / 3, 100.0)) < 1e-3
    assert "test/few" in metrics


def test_corrupt_test_image_stops_the_run_before_any_training(image_tree, tmp_path, monkeypatch):
    """Evaluation cannot substitute images, so a corrupt test JPEG is reported before the first
    stage trains, not after it; a verified split is not decoded again on the next run."""
    from ltscale.data.errors import DatasetError
    from ltscale.stages import teacher

    test_image = next((image_tree / "val").rglob("*.JPEG"))
    good = test_image.read_bytes()
    test_image.write_bytes(good[: len(good) // 3])  # truncated, as an interrupted copy leaves it
    optim = OptimConfig(epochs=1, batch_size=4, lr=0.05, warmup_epochs=0, milestones=(), decay_factors=())
    config = PipelineConfig(
        name="tiny-jpeg/ce", data=DataConfig(dataset="imagenet_lt", root=str(image_tree), image_size=32,
                                             loader=LoaderConfig(backend="torch", num_workers=0)),
        stages={"teacher": TeacherConfig(model=ModelConfig(arch="resnet8", width=4), optim=optim)},
        output_dir=str(tmp_path / "runs"), progress=False, device="cpu",
    )
    trained = []
    real = teacher.train_and_evaluate
    monkeypatch.setattr(teacher, "train_and_evaluate", lambda *a, **k: trained.append(1) or real(*a, **k))
    with pytest.raises(DatasetError, match=rf"1 of the 3 images of imagenet_lt/test cannot be decoded: .*{test_image.name}"):
        run_pipeline(config)
    assert not trained and not (tmp_path / "runs" / "store").exists()

    test_image.write_bytes(good)
    run_pipeline(config)
    markers = list((tmp_path / "runs" / "verified").glob("imagenet_lt-test-*.json"))
    assert len(markers) == 1
    import ltscale.data.loaders.files as files

    monkeypatch.setattr(files, "verify_images", lambda *a, **k: pytest.fail("a verified split was decoded again"))
    assert run_pipeline(config).cached == ["teacher"]


def test_replaced_training_images_are_recorded_with_the_stage(image_tree, tmp_path):
    """A corrupt training JPEG is replaced by one of its class; the stage's manifest (so a reused
    stage still shows it) and its MLflow run record which file it was."""
    import json

    import mlflow

    broken = sorted((image_tree / "train" / "n00000000").glob("*.JPEG"))[0]
    broken.write_bytes(b"not a jpeg")
    optim = OptimConfig(epochs=1, batch_size=4, lr=0.05, warmup_epochs=0, milestones=(), decay_factors=())
    config = PipelineConfig(
        name="tiny-jpeg/ce", data=DataConfig(dataset="imagenet_lt", root=str(image_tree), image_size=32,
                                             loader=LoaderConfig(backend="torch", num_workers=0, max_bad_image_fraction=0.2)),
        stages={"teacher": TeacherConfig(model=ModelConfig(arch="resnet8", width=4), optim=optim)},
        output_dir=str(tmp_path / "runs"), progress=False, device="cpu",
    )
    result = run_pipeline(config)
    assert result.outputs["teacher"].manifest["metrics"]["data/unreadable_train_images"] == 1.0
    run_id = result.outputs["teacher"].run_id
    client = mlflow.MlflowClient(result.tracking_uri)
    assert client.get_run(run_id).data.metrics["data/unreadable_train_images"] == 1.0
    listed = json.loads(Path(client.download_artifacts(run_id, "unreadable_train_images.json", str(tmp_path))).read_text())
    assert listed == {"replaced_by_same_class_images": [str(broken)]}
    again = run_pipeline(config)  # reused: the parent's record still carries it
    assert again.cached == ["teacher"] and again.metrics("teacher")["data/unreadable_train_images"] == 1.0


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
@pytest.mark.parametrize("method", ["ssd", "dive"])
def test_distillation_passes_over_a_training_split_with_a_replaced_image(image_tree, tmp_path, backend, method):
    """The teacher trains past a corrupt training JPEG (replaced by one of its class); the passes
    over the training split after it (SSD's soft labels, DiVE's virtual examples) substitute the
    same way rather than stop the pipeline after the teacher, and the student trains."""
    import dataclasses

    from configs.methods import METHODS, Recipe
    from ltscale.losses import LossConfig

    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'ltscale[dali]')")
    if backend == "ffcv":
        threads = torch.get_num_threads()
        pytest.importorskip("ffcv", reason="FFCV is not installed (pip install 'ltscale[ffcv]' after its apt packages)")
        torch.set_num_threads(threads)
    broken = sorted((image_tree / "train" / "n00000000").glob("*.JPEG"))[0]
    broken.write_bytes(broken.read_bytes()[:300])  # truncated mid-scan
    optim = OptimConfig(epochs=1, batch_size=4, lr=0.05, warmup_epochs=0, milestones=(), decay_factors=())
    recipe = Recipe(model=ModelConfig(arch="resnet8", width=4), optim=optim, rebalance_optim=optim)
    stages = METHODS[method](recipe)
    if method == "ssd":  # stage IV re-balances again; the chain up to the student is what this is about
        stages.pop("student_lws")
    else:  # balanced softmax needs all 1000 ImageNet-LT classes present; this tree has 3
        stages["teacher"] = dataclasses.replace(stages["teacher"], loss=LossConfig(kind="ce"))
    config = PipelineConfig(
        name=f"tiny-jpeg/{method}",
        data=DataConfig(dataset="imagenet_lt", root=str(image_tree), image_size=32, loader=LoaderConfig(
            backend=backend, num_workers=0 if backend == "torch" else 1, max_bad_image_fraction=0.2,
            ffcv=FfcvConfig(cache_dir=str(tmp_path / "ffcv"), write_workers=1))),
        stages=stages, output_dir=str(tmp_path / "runs"), progress=False, device="cpu",
    )
    result = run_pipeline(config)
    assert result.executed[-1] == "student"
    assert "test/top1" in result.metrics("student")
    assert result.outputs["teacher"].manifest["metrics"]["data/unreadable_train_images"] == 1.0


def test_jpeg_loader_benchmark_names_a_backend_that_is_not_installed_before_timing(tmp_path, capsys, monkeypatch, load_tool):
    """Otherwise the other variants are timed first and their numbers lost when that one fails."""
    bench = load_tool("bench/jpeg_loader.py")
    assert bench._installed("json") and not bench._installed("no_such_parent.child")
    monkeypatch.setattr(bench, "_installed", lambda module: module != "ffcv")
    with pytest.raises(SystemExit) as refused:
        bench.main(["--images", str(tmp_path), "--variants", "usual,ltscale-ffcv", "--device", "cpu"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "not installed here: ltscale-ffcv (pip install 'ltscale[ffcv]')" in err
    with pytest.raises(SystemExit) as refused:
        bench.main(["--images", str(tmp_path), "--variants", "usual", "--device", "cpu", "--count", "0"])
    assert refused.value.code == 2 and "--count, --batch-size and --epochs must be >= 1" in capsys.readouterr().err

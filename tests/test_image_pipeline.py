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

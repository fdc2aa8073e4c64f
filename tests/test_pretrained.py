"""Starting networks from pretrained weights (``model.init_from``): files, torchvision's cache, pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ltscale.config import apply_overrides
from ltscale.engine.progress import Progress
from ltscale.models import pretrained
from ltscale.models.heads import HeadSpec
from ltscale.models.network import ModelConfig, Network
from ltscale.models.pretrained import PretrainedWeightsError
from ltscale.stages.pipeline import run_pipeline
from tests.test_pipeline import TINY, tiny

SMALL = ModelConfig(arch="resnet8", width=8)


def _backbone(config: ModelConfig = SMALL, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Network(config, {"cls": HeadSpec("linear", 3)}, "cls").backbone


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_ddp_checkpoint_with_classifier_loads_into_the_backbone(tmp_path):
    source = _backbone(seed=1)
    payload = {"state_dict": {**{f"module.{k}": v for k, v in source.state_dict().items()},
                              "module.fc.weight": torch.zeros(10, 32), "module.fc.bias": torch.zeros(10)},
               "epoch": 90}
    torch.save(payload, tmp_path / "ckpt.pth")
    weights = pretrained.resolve(str(tmp_path / "ckpt.pth"))
    assert weights.identity.startswith("sha256/") and len(weights.identity) == len("sha256/") + 64
    target = _backbone(seed=2)
    assert not _same(source, target)
    pretrained.load_backbone(target, weights)
    assert _same(source, target)  # every tensor, BN running statistics included


def test_a_checkpoint_with_the_weights_under_model_loads(tmp_path):
    """DeiT / timm-style training checkpoints keep the network under 'model', beside the optimiser."""
    source = _backbone(seed=1)
    torch.save({"model": source.state_dict(), "epoch": 300, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    target = _backbone(seed=2)
    pretrained.load_backbone(target, pretrained.resolve(str(tmp_path / "ckpt.pth")))
    assert _same(source, target)


def test_a_checkpoint_without_batch_norm_step_counters_loads(tmp_path):
    """The layout before PyTorch 0.4.1 (many published ImageNet checkpoints):
    no num_batches_tracked buffers. torch's strict load takes it; so must ours, every other
    tensor copied. A missing weight is still refused."""
    source = _backbone(seed=1)
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(source.state_dict())
    torch.save(old, tmp_path / "old.pth")
    target = _backbone(seed=2)
    pretrained.load_backbone(target, pretrained.resolve(str(tmp_path / "old.pth")))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in old.items())
    del old["bn1.running_var"]
    torch.save(old, tmp_path / "older.pth")
    with pytest.raises(PretrainedWeightsError, match=r"1 missing \(e\.g\. bn1\.running_var\)"):
        pretrained.load_backbone(_backbone(seed=2), pretrained.resolve(str(tmp_path / "older.pth")))

def test_mismatched_unreadable_and_missing_checkpoints_are_clear_errors(tmp_path):
    torch.save(_backbone(ModelConfig(arch="resnet20", width=8)).state_dict(), tmp_path / "resnet20.pth")
    with pytest.raises(PretrainedWeightsError, match=r"resnet20\.pth.*does not fit this backbone: .*unexpected \(e\.g\. layer"):
        pretrained.load_backbone(_backbone(), pretrained.resolve(str(tmp_path / "resnet20.pth")))
    torch.save(_backbone(ModelConfig(arch="resnet8", width=16)).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(PretrainedWeightsError, match=r"of another shape \(e\.g\. conv1\.weight \(16, 3, 3, 3\) \(expected \(8, 3, 3, 3\)\)"):
        pretrained.load_backbone(_backbone(), pretrained.resolve(str(tmp_path / "wide.pth")))
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "wide.pth").read_bytes()[:500])
    with pytest.raises(PretrainedWeightsError, match=r"truncated\.pth .*cannot be read"):
        pretrained.load_backbone(_backbone(), pretrained.resolve(str(tmp_path / "truncated.pth")))
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(PretrainedWeightsError, match="expected a state dict of tensors"):
        pretrained.load_backbone(_backbone(), pretrained.resolve(str(tmp_path / "odd.pth")))
    with pytest.raises(PretrainedWeightsError, match=r"model.init_from='.*nope\.pth': no such file"):
        pretrained.resolve(str(tmp_path / "nope.pth"))
    with pytest.raises(PretrainedWeightsError, match="torchvision has no weights 'ResNet152_Weights.NOPE'"):
        pretrained.resolve("torchvision:ResNet152_Weights.NOPE")


def test_torchvision_weights_come_from_the_hub_cache_or_a_clear_download_error(tmp_path, monkeypatch):
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = "torchvision:ResNet50_Weights.IMAGENET1K_V1"
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"

    def offline(url, dst, hash_prefix=None, progress=True):
        assert hash_prefix == "0676ba61" and url.endswith("/resnet50-0676ba61.pth")
        Path(dst).write_bytes(b"partial")  # a failed download must not leave a file that looks cached
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsError, match=rf"could not download .*Network is unreachable.*put it at {cached}"):
        pretrained.resolve(spec)
    assert not cached.exists()

    # Placed in the cache by hand (the offline route), it is used without a download.
    torch.manual_seed(3)
    reference = tvm.resnet50(weights=None)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), cached)
    weights = pretrained.resolve(spec)
    assert weights.path == cached and weights.identity == "torchvision/resnet50-0676ba61.pth"
    network = Network(ModelConfig(arch="resnet50"), {"cls": HeadSpec("linear", 5)}, "cls")
    pretrained.load_backbone(network.backbone, weights)
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(network.backbone.state_dict()[k], v) for k, v in expected.items())


def test_pipeline_starts_from_the_weights_and_keys_stages_by_their_content(tmp_path):
    from ltscale.stages.context import StageContext

    weights_file = tmp_path / "init.pth"
    torch.save(_backbone(TINY.model, seed=5).state_dict(), weights_file)
    config = apply_overrides(tiny("ce", tmp_path / "out"), [f"stages.teacher.model.init_from={weights_file}"])

    # What the teacher starts from: the file's backbone, a fresh classifier.
    weights = pretrained.resolve(str(weights_file))
    ctx = StageContext(name="teacher", bundle=None, device=torch.device("cpu"), precision="fp32", seed=0,  # type: ignore[arg-type]
                       loader_config=None, directory=tmp_path, run=None, progress=Progress(enabled=False),  # type: ignore[arg-type]
                       init_weights=weights)
    network = ctx.new_network(config.stages["teacher"].model, {"cls": HeadSpec("linear", 6)}, "cls")
    assert _same(network.backbone, _backbone(TINY.model, seed=5))

    first = run_pipeline(config)
    import mlflow

    client = mlflow.MlflowClient(first.tracking_uri)
    teacher_run = client.get_run(first.outputs["teacher"].run_id)
    assert teacher_run.data.tags["ltscale.init_weights"] == weights.identity
    assert teacher_run.data.params["model.init_from"] == str(weights_file)
    assert run_pipeline(config).cached == ["teacher"]  # same weights: reused
    # Other weights at the same path: a new key, so the stage trains again.
    torch.save(_backbone(TINY.model, seed=6).state_dict(), weights_file)
    again = run_pipeline(config)
    assert again.executed == ["teacher"] and again.outputs["teacher"].key != first.outputs["teacher"].key


def test_a_missing_student_checkpoint_fails_before_the_teacher_trains(tmp_path):
    config = apply_overrides(tiny("dive", tmp_path / "out"), [f"stages.student.model.init_from={tmp_path / 'missing.pth'}"])
    with pytest.raises(PretrainedWeightsError, match=r"stage student: model.init_from='.*missing\.pth': no such file"):
        run_pipeline(config)
    assert not list((tmp_path / "out").glob("store/teacher-*"))


# ---- the CIFAR backbone the papers' tables use ---------------------------------------------------


def _reference_resnet(state: dict[str, torch.Tensor], images: torch.Tensor, blocks: int) -> torch.Tensor:
    """ResNet-(6n+2) of He et al. 2016 (sec. 4.2) as the LDAM-DRW code writes it, in eval mode:
    3x3 stem, three stages of n basic blocks at 16/32/64 channels, stride 2 in the first block
    of stages 2 and 3, option-A shortcuts (subsample by 2, zero channels padded on both sides),
    global average pooling. Reads the weights by their names in ``state``."""
    import torch.nn.functional as F

    def bn(x, name):
        return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)

    out = F.relu(bn(F.conv2d(images, state["conv1.weight"], padding=1), "bn1"))
    layer, in_planes = 0, 16
    for stage, planes in enumerate((16, 32, 64)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layers.{layer}"
            y = F.relu(bn(F.conv2d(out, state[f"{name}.conv1.weight"], stride=stride, padding=1), f"{name}.bn1"))
            y = bn(F.conv2d(y, state[f"{name}.conv2.weight"], padding=1), f"{name}.bn2")
            shortcut = out
            if stride != 1 or in_planes != planes:  # LDAM-DRW's LambdaLayer
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            out = F.relu(y + shortcut)
            layer, in_planes = layer + 1, planes
    return out.mean(dim=(2, 3))


def test_resnet32_is_the_papers_network():
    """Depth, widths, strides and option-A shortcuts, against an independent implementation with
    the same weights (BN statistics made non-trivial so every layer matters), and the published
    parameter count (0.46M with a 10-way classifier: 464,154)."""
    backbone = _backbone(ModelConfig(arch="resnet32", width=16), seed=3).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
    assert sum(p.numel() for p in backbone.parameters()) + 64 * 10 + 10 == 464_154
    assert sum(isinstance(m, torch.nn.Conv2d) for m in backbone.modules()) == 31  # + the classifier: 32 layers
    assert backbone.feature_dim == 64
    images = torch.randn(4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), _reference_resnet(backbone.state_dict(), images, blocks=5),
                                   rtol=1e-4, atol=1e-5)

"""LWS / cRT / tau-norm: what each re-balancing head computes and what stays frozen."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltscale.engine.schedule import OptimConfig
from ltscale.models.heads import HeadSpec, LinearHead, LWSHead, TauNormHead, rebalanced_head
from ltscale.stages.config import PipelineConfig, RebalanceConfig, TeacherConfig
from ltscale.stages.context import load_model
from ltscale.data.errors import DatasetError
from ltscale.stages.pipeline import plan_pipeline, run_pipeline
from ltscale.stages.tasks import RebalanceTask
from ltscale.models.network import ModelConfig, Network, replace_head
from tests.test_pipeline import TINY, TINY_DATA


def _trained_linear(features: int = 5, classes: int = 4) -> LinearHead:
    torch.manual_seed(0)
    head = LinearHead(features, classes)
    with torch.no_grad():
        head.weight.mul_(torch.arange(1, classes + 1, dtype=torch.float32)[:, None])  # unequal class norms
        head.bias.uniform_(-1, 1)
    return head


def test_lws_starts_as_the_source_classifier_and_trains_only_scales():
    source = _trained_linear()
    lws = rebalanced_head(source, HeadSpec("lws", 4), 5)
    assert isinstance(lws, LWSHead)
    features = torch.randn(7, 5)
    torch.testing.assert_close(lws(features), source(features))
    assert [name for name, p in lws.named_parameters() if p.requires_grad] == ["scales"]
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 1.0, 0.5, 3.0]))
    torch.testing.assert_close(lws(features), source(features) * lws.scales)


def test_tau_norm_equalises_weight_norms_and_drops_the_bias():
    source = _trained_linear()
    features = torch.randn(3, 5)
    zero = rebalanced_head(source, HeadSpec("tau_norm", 4, tau=0.0), 5)
    torch.testing.assert_close(zero(features), features @ source.weight.t())  # tau = 0: bias-free linear
    one = rebalanced_head(source, HeadSpec("tau_norm", 4, tau=1.0), 5)
    assert isinstance(one, TauNormHead)
    normalised = source.weight / source.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(one(features), features @ normalised.t())
    half = rebalanced_head(source, HeadSpec("tau_norm", 4, tau=0.5), 5)
    expected = features @ (source.weight / source.weight.norm(dim=1, keepdim=True).sqrt()).t()
    torch.testing.assert_close(half(features), expected)


def test_crt_reinitialises_the_classifier():
    source = _trained_linear()
    crt = rebalanced_head(source, HeadSpec("linear", 4), 5)
    assert not torch.equal(crt.weight, source.weight)
    assert torch.count_nonzero(crt.bias) == 0
    assert all(p.requires_grad for p in crt.parameters())


def test_lws_and_tau_norm_refuse_a_cosine_head():
    from ltscale.models.heads import CosineHead

    with pytest.raises(ValueError, match="linear classifier"):
        rebalanced_head(CosineHead(5, 4), HeadSpec("lws", 4), 5)


def test_cosine_head_gives_the_cosine_of_feature_and_class_weight():
    """LDAM's NormedLinear: logits are cosines (in [-1, 1]), whatever the norms of the features
    and of each class's weight vector."""
    from ltscale.models.heads import CosineHead

    torch.manual_seed(0)
    head = CosineHead(5, 4)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([0.1, 1.0, 3.0, 10.0])[:, None])  # unequal class norms
    features = torch.randn(6, 5) * 7
    expected = F.cosine_similarity(features[:, None, :], head.weight[None, :, :], dim=2)
    logits = head(features)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= 1 + 1e-6


def test_rebalance_task_keeps_backbone_and_batch_norm_frozen():
    network = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", 3)}, "cls")
    spec = HeadSpec("lws", 3)
    replace_head(network, "cls", rebalanced_head(network.heads["cls"], spec, network.feature_dim), spec)
    task = RebalanceTask(network, "cls")
    before = {k: v.clone() for k, v in network.backbone.state_dict().items()}
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.5)
    task.train()
    assert not network.backbone.training, "batch-norm statistics must not move while re-balancing"
    for _ in range(3):
        batch = {"image": torch.randn(8, 3, 8, 8), "target": torch.randint(0, 3, (8,))}
        out = task(batch)
        with torch.no_grad():  # plain cross-entropy of the head on the eval-mode backbone's features
            expected = F.cross_entropy(network.heads["cls"](network.backbone(batch["image"])), batch["target"])
        torch.testing.assert_close(out["loss"], expected)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    for key, value in network.backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed during re-balancing"
    assert not torch.equal(network.heads["cls"].scales, torch.ones(3))
    assert [p.shape for p in task.trainable_parameters()] == [torch.Size([3])]


def test_rebalance_task_with_train_bn_refits_only_batch_norm_statistics():
    """backbone_bn="train": the features use each batch's statistics and the running statistics
    move towards the re-balanced batches'; every weight stays frozen; eval mode uses the new stats."""
    torch.manual_seed(0)
    network = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", 3)}, "cls")
    spec = HeadSpec("lws", 3)
    replace_head(network, "cls", rebalanced_head(network.heads["cls"], spec, network.feature_dim), spec)
    task = RebalanceTask(network, "cls", backbone_bn="train")
    before = {k: v.clone() for k, v in network.backbone.state_dict().items()}
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.5)
    task.train()
    assert network.backbone.training
    images = torch.randn(8, 3, 8, 8) * 3 + 2  # statistics far from the initial running ones (0, 1)
    for _ in range(3):
        out = task({"image": images, "target": torch.randint(0, 3, (8,))})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = {k: v.clone() for k, v in network.backbone.state_dict().items()}
    # The head sees batch-normalised features (this batch's statistics), not the running ones.
    with torch.no_grad():
        logits = task({"image": images, "target": torch.zeros(8, dtype=torch.long)})["logits"]
        torch.testing.assert_close(logits, network.heads["cls"](network.backbone(images)))
        network.backbone.eval()
        assert not torch.allclose(logits, network.heads["cls"](network.backbone(images)))
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved), moved
    assert all(not p.requires_grad for p in network.backbone.parameters())
    task.eval()
    assert not network.backbone.training
    with pytest.raises(ValueError, match="backbone_bn must be 'eval' or 'train'"):
        RebalanceTask(network, "cls", backbone_bn="frozen")


def test_tau_norm_refuses_train_mode_batch_norm():
    with pytest.raises(ValueError, match="backbone_bn='train' needs a trained re-balancing"):
        RebalanceConfig(method="tau_norm", backbone_bn="train")
    assert RebalanceConfig(method="lws", backbone_bn="train").backbone_bn == "train"


def test_rebalance_stage_with_train_bn_saves_the_refitted_statistics(tmp_path):
    stages = {
        "teacher": TeacherConfig(model=TINY.model, optim=TINY.optim),
        "lws": RebalanceConfig(source="teacher", method="lws", optim=TINY.rebalance_optim, backbone_bn="train"),
    }
    config = PipelineConfig(name="tiny/lws-bn", data=TINY_DATA, stages=stages, output_dir=str(tmp_path), progress=False, device="cpu")
    result = run_pipeline(config)
    teacher = load_model(result.outputs["teacher"].file("model"), torch.device("cpu"))
    rebalanced = load_model(result.outputs["lws"].file("model"), torch.device("cpu"))
    teacher_state, rebalanced_state = teacher.backbone.state_dict(), rebalanced.backbone.state_dict()
    moved = {k for k in teacher_state if not torch.equal(teacher_state[k], rebalanced_state[k])}
    assert any(k.endswith("running_mean") for k in moved)
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved), moved
    assert np.isfinite(result.metrics("lws")["test/top1"])


@pytest.mark.parametrize("method", ["lws", "crt", "tau_norm"])
def test_rebalance_stage_changes_only_the_classifier(tmp_path, method):
    stages = {
        "teacher": TeacherConfig(model=TINY.model, optim=TINY.optim),
        "rebalanced": RebalanceConfig(source="teacher", method=method, optim=TINY.rebalance_optim, tau=0.7),
    }
    config = PipelineConfig(name=f"tiny/{method}", data=TINY_DATA, stages=stages, output_dir=str(tmp_path), progress=False, device="cpu")
    result = run_pipeline(config)
    teacher = load_model(result.outputs["teacher"].file("model"), torch.device("cpu"))
    rebalanced = load_model(result.outputs["rebalanced"].file("model"), torch.device("cpu"))
    for (name, a), (_, b) in zip(teacher.backbone.state_dict().items(), rebalanced.backbone.state_dict().items()):
        assert torch.equal(a, b), f"backbone tensor {name} changed"
    assert rebalanced.head_specs["cls"].kind == {"lws": "lws", "crt": "linear", "tau_norm": "tau_norm"}[method]
    if method == "tau_norm":
        assert rebalanced.head_specs["cls"].tau == pytest.approx(0.7)
    if method != "crt":  # LWS / tau-norm keep the teacher's classifier weights underneath
        torch.testing.assert_close(rebalanced.heads["cls"].linear.weight, teacher.heads["cls"].weight)
    assert np.isfinite(result.metrics("rebalanced")["test/few"])


def test_tau_search_without_validation_split_is_a_clear_error(tmp_path):
    stages = {
        "teacher": TeacherConfig(model=TINY.model, optim=OptimConfig(epochs=1, batch_size=64, warmup_epochs=0)),
        "tau": RebalanceConfig(source="teacher", method="tau_norm", tau_search=True),
    }
    config = PipelineConfig(name="tiny/tau", data=TINY_DATA, stages=stages, output_dir=str(tmp_path), progress=False, device="cpu")
    # Refused before the teacher trains (not after hours of it), by --plan too, naming the fix that applies.
    fixes = r"stages\.tau\.tau_search is true.*has none: --set stages\.tau\.tau_search=false"  # in memory: no val list to set
    with pytest.raises(DatasetError, match=fixes):
        plan_pipeline(config)
    with pytest.raises(DatasetError, match=fixes):
        run_pipeline(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stage directory, no MLflow run
    # LWS ignores tau_search (as it does tau, out of its key too): nothing to refuse, nor to name tau-norm for.
    lws = dataclasses.replace(config, stages={**stages, "tau": RebalanceConfig(source="teacher", method="lws", tau_search=True)})
    assert [plan.name for plan in plan_pipeline(lws)] == ["teacher", "tau"]


class _Recorder:
    """A stage's run handle that keeps what is logged."""

    run_id = "recorder"

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))


def test_tau_search_runs_the_backbone_once_and_picks_the_brute_force_tau(tmp_path):
    import dataclasses

    from ltscale.data import LoaderConfig, build_dataset
    from ltscale.engine.evaluate import evaluate
    from ltscale.engine.progress import Progress
    from ltscale.stages.context import StageContext
    from ltscale.stages.rebalance import TAU_GRID, _choose_tau

    bundle = build_dataset(TINY_DATA)
    bundle = dataclasses.replace(bundle, val=bundle.test)  # the synthetic set has no validation split of its own
    torch.manual_seed(0)
    network = Network(TINY.model, {"cls": HeadSpec("linear", bundle.num_classes)}, "cls")
    with torch.no_grad():  # unequal class norms, so tau matters
        network.heads["cls"].weight.mul_(torch.linspace(0.2, 3.0, bundle.num_classes)[:, None])
    run = _Recorder()
    ctx = StageContext(name="tau", bundle=bundle, device=torch.device("cpu"), precision="fp32", seed=0,
                       loader_config=LoaderConfig(), directory=tmp_path, run=run, progress=Progress(enabled=False))
    passes = []
    network.backbone.register_forward_hook(lambda module, args, output: passes.append(len(output)))

    assert TAU_GRID == tuple(step / 10 for step in range(21))  # 0, 0.1, ..., 2.0: both ends searched
    best = _choose_tau(RebalanceConfig(source="teacher", method="tau_norm", tau_search=True), ctx, network)
    assert sum(passes) == len(bundle.val)  # one pass over the validation images for the whole grid
    source = network.heads["cls"]
    assert network.heads["cls"] is source  # the search leaves the network's head alone

    # The same numbers as evaluating the whole network once per tau (in the run once the stage is stored).
    assert run.metrics == []
    ctx.record.send()
    searched = {step: metrics["rebalance/val_top1"] for metrics, step in run.metrics}
    brute = {}
    for tau in TAU_GRID:
        spec = HeadSpec(kind="tau_norm", num_outputs=bundle.num_classes, tau=float(tau))
        network.heads["cls"] = rebalanced_head(source, spec, network.feature_dim)
        brute[int(round(tau * 10))] = 100 * evaluate(network, ctx.eval_loader(bundle.val), ctx.class_counts, ["cls"],
                                                     ctx.device)["cls"].top1
    network.heads["cls"] = source
    assert searched == pytest.approx(brute)
    first_best = max(brute, key=lambda step: (brute[step], -step))
    assert best == pytest.approx(first_best / 10)
    assert len(set(brute.values())) > 1, "the test network should make tau matter"

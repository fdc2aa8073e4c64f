"""The fast step (channels_last on a GPU, autocast, CUDA graphs) against the trainer's plain eager step.

On a CPU the fast step runs without graphs, so these tests check its hand-written SGD update,
its gradient handling (persistent, zeroed in the step; parameters without a gradient skipped),
the rotation labels drawn outside the step, metric accumulation and resume. The GPU test checks
that replaying captured graphs gives what the same step gives eagerly.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltscale.data import LoaderConfig, build_loader
from ltscale.data.config import SyntheticConfig
from ltscale.data.synthetic import make_synthetic
from ltscale.engine.fast_step import FastStep, resolve_step
from ltscale.engine.schedule import OptimConfig
from ltscale.engine.trainer import Trainer
from ltscale.losses.modules import ClassificationLoss, LossConfig, distillation_losses
from ltscale.models.heads import HeadSpec, rebalanced_head
from ltscale.models.network import ModelConfig, Network, replace_head
from ltscale.stages.tasks import DiVEDistillTask, RebalanceTask, SSDDistillTask, SupervisedTask, rotate_batch

REPO = Path(__file__).resolve().parents[1]
CLASSES = 6
TASKS = ("ce", "ce_unused_head", "rotation", "rotation_split", "ldam_drw", "ssd", "dive", "lws")


@pytest.fixture(scope="module")
def bundle():
    return make_synthetic(SyntheticConfig(num_classes=CLASSES, max_per_class=60, imbalance_factor=4, test_per_class=2, image_size=16))


def make_task(kind: str, bundle, device: torch.device, seed: int = 0):
    """A freshly initialised task of ``kind``; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    counts = bundle.train.class_counts()
    model = ModelConfig(arch="resnet8", width=8)
    cls = {"cls": HeadSpec("linear", CLASSES)}
    if kind in ("ce", "ce_unused_head", "rotation", "rotation_split"):
        heads = cls if kind == "ce" else {**cls, "rotation": HeadSpec("rotation", 4, classifier=False)}
        network = Network(model, heads, "cls").to(device)
        loss = ClassificationLoss(LossConfig("ce"), counts, device)
        rotation = 1.0 if kind.startswith("rotation") else 0.0
        return SupervisedTask(network, loss, rotation, seed=3, rotation_batch_norm="split" if kind == "rotation_split" else "joint")
    if kind == "ldam_drw":
        network = Network(ModelConfig(arch="resnet8", width=8, classifier="cosine"), {"cls": HeadSpec("cosine", CLASSES)}, "cls").to(device)
        loss = ClassificationLoss(LossConfig("ldam", drw_epoch=1), counts, device)
        return SupervisedTask(network, loss, 0.0, seed=3)
    # "ssd_fused": the Triton kernels where they can run (what a CUDA run uses), else the reference
    losses = distillation_losses("auto" if kind.endswith("_fused") else "torch", device)
    kind = kind.removesuffix("_fused")
    if kind == "ssd":
        network = Network(model, {"hard": HeadSpec("linear", CLASSES), "soft": HeadSpec("linear", CLASSES)}, "hard").to(device)
        soft = torch.randn(len(bundle.train), CLASSES, generator=torch.Generator().manual_seed(1)).to(device)
        return SSDDistillTask(network, soft, losses, temperature=2.0, hard_weight=1.0, soft_weight=1.0)
    if kind == "dive":
        teacher = Network(model, cls, "cls").to(device)
        network = Network(model, cls, "cls").to(device)
        return DiVEDistillTask(network, teacher, torch.as_tensor(counts, device=device), losses, 3.0, 0.5, 0.5)
    if kind == "lws":
        network = Network(model, cls, "cls").to(device)
        spec = HeadSpec("lws", CLASSES)
        replace_head(network, "cls", rebalanced_head(network.heads["cls"], spec, network.feature_dim), spec)
        return RebalanceTask(network, "cls")
    raise ValueError(kind)


class ListLoader:
    """Fixed batches (the loader interface the trainer uses)."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def batches_of(bundle, device, batch_size: int, epoch: int = 0):
    loader = build_loader(bundle.train, bundle, train=True, batch_size=batch_size, loader=LoaderConfig(), device=device, seed=0)
    loader.set_epoch(epoch)
    return list(loader)


def train(task, loader, step: str, path: Path, epochs: int = 1, precision: str = "fp32", lr: float = 0.1, device="cpu"):
    """Fit ``task`` with the trainer; returns the per-epoch metrics."""
    metrics = []
    optim = OptimConfig(epochs=epochs, batch_size=32, lr=lr, warmup_epochs=0, milestones=(), decay_factors=())
    trainer = Trainer(task, loader, optim, torch.device(device), precision, path, "test", on_epoch_end=metrics.append, step=step)
    trainer.fit()
    return metrics, trainer


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, rtol: float, atol: float) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_resolve_step():
    assert resolve_step("auto", torch.device("cpu")) == "eager"
    assert resolve_step("auto", torch.device("cuda")) == "fast"
    assert resolve_step("fast", torch.device("cpu")) == "fast"
    with pytest.raises(ValueError, match="step must be"):
        resolve_step("graph", torch.device("cpu"))
    # DeepSpeed's gradient reduction runs outside any graph: the trainer (and the SSD student's
    # soft-label placement, which asks the same question) take the eager step.
    assert resolve_step("auto", torch.device("cuda"), zero=True) == "eager"
    with pytest.raises(ValueError, match="deepspeed.enabled cannot be combined"):
        resolve_step("fast", torch.device("cuda"), zero=True)


@pytest.mark.parametrize("kind", TASKS)
def test_one_step_same_loss_and_update(kind, bundle, tmp_path):
    """From the same weights, one step of each path gives the same loss and the same update."""
    batch = batches_of(bundle, torch.device("cpu"), 32)[:1]
    eager, fast = make_task(kind, bundle, torch.device("cpu")), make_task(kind, bundle, torch.device("cpu"))
    before = {k: v.clone() for k, v in eager.network.state_dict().items()}
    (eager_metrics,), _ = train(eager, ListLoader(batch), "eager", tmp_path / "eager.pt")
    (fast_metrics,), trainer = train(fast, ListLoader(batch), "fast", tmp_path / "fast.pt")
    assert trainer.fast_step is not None and not trainer.fast_step.graphs
    # channels_last is for GPUs; on a CPU with one thread it makes conv gradients inexact (fast_step.py)
    assert trainer.fast_step.layout == torch.contiguous_format
    assert fast_metrics.loss == pytest.approx(eager_metrics.loss, rel=1e-5)
    assert fast_metrics.top1 == eager_metrics.top1
    assert_same_state(eager.network, fast.network, rtol=1e-5, atol=1e-6)
    changed = [k for k, v in fast.network.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the step changed nothing"
    if kind == "ce_unused_head":  # SGD skips parameters without a gradient: no weight decay on them
        for name in ("heads.rotation.weight", "heads.rotation.bias"):
            assert torch.equal(fast.network.state_dict()[name], before[name])
    if kind == "lws":  # only the scales train; the frozen backbone and linear layer stay put
        assert changed == ["heads.cls.scales"]


@pytest.mark.parametrize("kind", ("rotation", "rotation_split", "ldam_drw", "ssd"))
def test_several_epochs_same_losses(kind, bundle, tmp_path):
    """Two epochs (a partial last batch, momentum, LDAM's switch to DRW weights in epoch 1):
    the epoch losses agree. Parameters are not compared after several steps: on this tiny
    network a BN channel of near-zero variance amplifies fp32 rounding differences."""
    batches = batches_of(bundle, torch.device("cpu"), 48)
    assert batches[-1]["image"].shape[0] < 48
    eager, fast = make_task(kind, bundle, torch.device("cpu")), make_task(kind, bundle, torch.device("cpu"))
    eager_metrics, _ = train(eager, ListLoader(batches), "eager", tmp_path / "eager.pt", epochs=2, lr=0.02)
    fast_metrics, _ = train(fast, ListLoader(batches), "fast", tmp_path / "fast.pt", epochs=2, lr=0.02)
    for e, f in zip(eager_metrics, fast_metrics, strict=True):
        assert f.loss == pytest.approx(e.loss, rel=2e-3)
        assert abs(f.top1 - e.top1) <= 100.0 / sum(len(b["target"]) for b in batches) + 1e-9


def test_rotation_batch_norm_split_and_joint(bundle):
    """``split``: the upright and the rotated half are normalised with their own statistics and only
    the upright half moves the running statistics; ``joint``: one forward of both, so the running
    statistics are the mixture's. Checked against separate plain forwards of copies of the network."""
    batch = batches_of(bundle, torch.device("cpu"), 32)[0]
    turns = torch.tensor([1, 2, 3, 0] * 8)
    batch = {**batch, "rotation_turns": turns}
    images, targets = batch["image"], batch["target"]
    rotated = rotate_batch(images, turns)

    split = make_task("rotation_split", bundle, torch.device("cpu")).train()
    upright_only = copy.deepcopy(split.network).train()  # sees the upright half alone
    rotated_only = copy.deepcopy(split.network).train()  # sees the rotated half alone
    out = split(batch)
    upright_features = upright_only.backbone(images)
    expected = F.cross_entropy(upright_only.heads["cls"](upright_features), targets) + F.cross_entropy(
        rotated_only.heads["rotation"](rotated_only.backbone(rotated)), turns)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert_same_state(split.network.backbone, upright_only.backbone, rtol=0, atol=0)  # running stats: upright only
    norms = [m for m in split.network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats and int(m.num_batches_tracked) == 1 for m in norms)

    joint = make_task("rotation", bundle, torch.device("cpu")).train()
    both = copy.deepcopy(joint.network).train()
    out = joint(batch)
    features = both.backbone(torch.cat([images, rotated]))
    expected = F.cross_entropy(both.heads["cls"](features[:32]), targets) + F.cross_entropy(
        both.heads["rotation"](features[32:]), turns)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert_same_state(joint.network.backbone, both.backbone, rtol=0, atol=0)
    # The two modes differ where they should: the running statistics (the upright half's vs the mixture's).
    assert not torch.allclose(norms[-1].running_var, [m for m in joint.network.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1].running_var)
    with pytest.raises(ValueError, match="rotation_batch_norm must be 'joint' or 'split', got 'halves'"):
        SupervisedTask(split.network, split.loss, 1.0, seed=0, rotation_batch_norm="halves")


def test_rotation_labels_match_eager(bundle):
    """The fast step draws the rotation labels outside the step from the task's generator, in
    the same sequence as the eager forward draws them."""
    task = make_task("rotation", bundle, torch.device("cpu"))
    task.set_epoch(4)
    drawn = [task.step_randomness(32, torch.device("cpu"))["rotation_turns"] for _ in range(3)]
    task.set_epoch(4)
    generator = torch.Generator().manual_seed(3 * 100_003 + 4)
    expected = [torch.randint(0, 4, (32,), generator=generator) for _ in range(3)]
    for a, b in zip(drawn, expected):
        assert torch.equal(a, b)
    assert make_task("ce", bundle, torch.device("cpu")).step_randomness(8, torch.device("cpu")) == {}


def test_bf16_autocast_same_loss(bundle, tmp_path):
    batch = batches_of(bundle, torch.device("cpu"), 32)[:1]
    eager, fast = make_task("ssd", bundle, torch.device("cpu")), make_task("ssd", bundle, torch.device("cpu"))
    (e,), _ = train(eager, ListLoader(batch), "eager", tmp_path / "eager.pt", precision="bf16")
    (f,), _ = train(fast, ListLoader(batch), "fast", tmp_path / "fast.pt", precision="bf16")
    assert f.loss == pytest.approx(e.loss, rel=2e-2)


def test_resume_adopts_momentum_buffers(bundle, tmp_path):
    """Fast 2 epochs == fast 1 epoch, then a new trainer resuming from the progress checkpoint;
    and a fast checkpoint resumes under the eager step (same optimiser state layout)."""
    batches = batches_of(bundle, torch.device("cpu"), 48)
    straight = make_task("rotation", bundle, torch.device("cpu"))
    train(straight, ListLoader(batches), "fast", tmp_path / "straight.pt", epochs=2)
    resumed = make_task("rotation", bundle, torch.device("cpu"))
    train(resumed, ListLoader(batches), "fast", tmp_path / "resumed.pt", epochs=1)
    again = make_task("rotation", bundle, torch.device("cpu"), seed=5)  # other weights: the checkpoint must win
    train(again, ListLoader(batches), "fast", tmp_path / "resumed.pt", epochs=2)
    assert_same_state(straight.network, again.network, rtol=0, atol=0)

    state = torch.load(tmp_path / "straight.pt", weights_only=False)
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert buffers and all(b is not None for b in buffers)
    eager = make_task("rotation", bundle, torch.device("cpu"), seed=5)
    metrics, _ = train(eager, ListLoader(batches), "eager", tmp_path / "straight.pt", epochs=3)
    assert len(metrics) == 1 and np.isfinite(metrics[0].loss)


def test_fast_step_rejects_dampening(bundle):
    task = make_task("ce", bundle, torch.device("cpu"))
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="dampening"):
        FastStep(task, optimizer, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        FastStep(task, torch.optim.SGD(task.trainable_parameters(), lr=0.1), torch.device("cpu"), None, graphs=True)


def test_nesterov_update_and_recorded_lr_match_sgd(bundle, tmp_path):
    """``optim.nesterov`` (the BBN recipes): the hand-written update takes SGD's Nesterov step
    (g + m * buf), and the learning rate of the step is left in the optimiser's param groups,
    where progress checkpoints record it, as the eager step does."""
    batch = batches_of(bundle, torch.device("cpu"), 32)[:1]
    optim = OptimConfig(epochs=1, batch_size=32, lr=0.1, warmup_epochs=0, milestones=(), decay_factors=(), nesterov=True)
    trainers = {}
    for step in ("eager", "fast"):
        task = make_task("ce", bundle, torch.device("cpu"))
        trainers[step] = Trainer(task, ListLoader(batch + batch), optim, torch.device("cpu"), "fp32", tmp_path / f"{step}.pt",
                                 "test", step=step)
        trainers[step].fit()
    assert trainers["fast"].fast_step is not None
    assert_same_state(trainers["eager"].task.network, trainers["fast"].task.network, rtol=1e-5, atol=1e-6)

    task = make_task("ce", bundle, torch.device("cpu"))
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.1, momentum=0.9, nesterov=True)
    FastStep(task, optimizer, torch.device("cpu"), None)(batch[0], 0.03)
    assert [group["lr"] for group in optimizer.param_groups] == [0.03] * len(optimizer.param_groups)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ("rotation", "rotation_split", "ldam_drw", "ssd", "ssd_fused", "dive"))
def test_graph_replay_equals_eager_on_gpu(kind, bundle):
    """Captured graphs (full batches and the partial last one; LDAM re-captured when DRW starts)
    replay the same step as running it eagerly: same epoch losses, same weights, fp32."""
    device = torch.device("cuda")
    batches = batches_of(bundle, device, 16)
    assert batches[-1]["image"].shape[0] < 16
    tasks = [make_task(kind, bundle, device) for _ in range(2)]
    steps = []
    for task, graphs in zip(tasks, (False, True)):
        optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        steps.append(FastStep(task, optimizer, device, None, graphs=graphs, cudnn_benchmark=False))
    try:
        train_side_by_side(tasks, steps, batches)
        assert steps[1]._captured, "no graph was captured"
        shapes = {dict((name, shape) for name, shape, _ in key[1])["image"][0] for key in steps[1]._captured}
        assert len(shapes) == 2, f"expected graphs for the full and the partial batch, got {shapes}"
        assert_same_state(tasks[0].network, tasks[1].network, rtol=1e-3, atol=1e-4)
    finally:
        for step in steps:
            step.close()


def train_side_by_side(tasks: list, steps: list, batches: list[dict[str, torch.Tensor]], epochs: int = 5) -> None:
    """Two tasks through the same epochs of ``batches``, each with its own step (eager, then graph
    replay), cuDNN deterministic; their epoch losses must agree. Five epochs: a partial batch's
    shape is captured after 3 eager warm-up steps."""
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for epoch in range(epochs):
            losses = []
            for task, step in zip(tasks, steps):
                task.set_epoch(epoch)
                task.train()
                totals = step.begin_epoch()
                for index, batch in enumerate(batches):
                    step(batch, 0.01 * (1 + index) / len(batches))
                losses.append(totals.tolist())
            np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    finally:
        torch.backends.cudnn.deterministic = previous


def fake_packed_cifar100(path: Path) -> Path:
    """A tiny packed CIFAR-100-LT file (random images) in the format tools/pack_cifar_npz.py writes."""
    from ltscale.data.cifar import long_tailed_counts
    from ltscale.data.cifar_npz import pack_arrays, write_npz

    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(100), long_tailed_counts(100, 100, 100.0))  # the fewest IF 100 allows: 1 in the rarest
    test_targets = np.repeat(np.arange(100), 2)
    images = rng.integers(0, 256, size=(len(targets), 32, 32, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(len(test_targets), 32, 32, 3), dtype=np.uint8)
    write_npz(path, pack_arrays("cifar100_lt", 100.0, 100, np.arange(len(targets)), images, targets, test_images,
                                test_targets, [f"class{c}" for c in range(100)]))
    return path


def test_benchmark_cpu_smoke(tmp_path):
    """tools/bench/cifar_train.py end to end on a CPU: both pipelines, the SSD pipeline timing, the report."""
    data = fake_packed_cifar100(tmp_path / "cifar100_lt.npz")
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "tools" / "bench" / "cifar_train.py"), "--data", str(data), "--device", "cpu",
               "--limit", "256", "--epochs", "1", "--warmup-epochs", "0", "--workers", "2", "--out", str(out),
               "--ssd-pipeline", "--ssd-recipe", "demo/ssd", "--ssd-epochs", "1",
               "--ssd-set", "data.synthetic.max_per_class=100", "--ssd-set", "data.synthetic.test_per_class=4"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    for variant in ("usual", "ltscale"):
        summary = report["variants"][variant]
        assert summary["images_per_epoch"] == 256 and summary["images_per_second"] > 0 and summary["seconds_per_epoch"] > 0
    assert report["variants"]["ltscale"]["step"] == "fast" and not report["variants"]["ltscale"]["cuda_graphs"]
    assert report["ratio"] > 0 and report["environment"]["code_version"]
    ssd = report["ssd_pipeline"]
    assert ssd["executed"] == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    assert not ssd["full_schedule"] and ssd["seconds"] > 0 and len(ssd["run_id"]) == 32
    assert "| usual |" in done.stdout and "| ltscale |" in done.stdout
    # The pipeline reports stage by stage as it goes (a call cut by its time limit shows how far it got).
    assert "teacher: epoch 1/1" in done.stderr and "student_lws: finished in" in done.stderr


def test_benchmark_refuses_what_would_fail_after_timing(tmp_path):
    """A --out that is a folder and a bad SSD override would otherwise fail after the variants were
    timed, losing their numbers: refused first, in one line."""
    data = fake_packed_cifar100(tmp_path / "cifar100_lt.npz")
    (tmp_path / "folder").mkdir()
    base = [sys.executable, str(REPO / "tools" / "bench" / "cifar_train.py"), "--data", str(data), "--device", "cpu",
            "--limit", "64", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--variants", "usual"]
    for extra, message in [(["--out", str(tmp_path / "folder")], "is a directory; name the JSON file to write"),
                           (["--ssd-pipeline", "--ssd-set", "stages.teacher.foo=1"], "unknown key 'stages.teacher.foo'")]:
        done = subprocess.run([*base, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "img/s" not in done.stdout  # nothing was timed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_benchmark_without_cuda_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench" / "cifar_train.py"), "--data", "unused.npz"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "CUDA is not available" in done.stderr and "--device cpu" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_fast_step_on_gpu(bundle, tmp_path):
    """The trainer's default on CUDA is the fast step with graphs; its epoch losses track the eager
    step's (bf16 off, so only rounding separates them)."""
    device = torch.device("cuda")
    batches = batches_of(bundle, device, 16)
    eager, fast = make_task("rotation", bundle, device), make_task("rotation", bundle, device)
    eager_metrics, _ = train(eager, ListLoader(batches), "eager", tmp_path / "eager.pt", epochs=5, lr=0.01, device="cuda")
    fast_metrics, trainer = train(fast, ListLoader(batches), "auto", tmp_path / "fast.pt", epochs=5, lr=0.01, device="cuda")
    assert trainer.step == "fast" and trainer.fast_step is not None and trainer.fast_step.graphs
    for e, f in zip(eager_metrics, fast_metrics, strict=True):
        assert f.loss == pytest.approx(e.loss, rel=1e-2)

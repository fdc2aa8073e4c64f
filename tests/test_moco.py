"""MoCo v2 as SSD's self-supervised task on large datasets (ltscale/models/moco.py), on CPU.

Queue and pointer buffers with wrap-around, the exact EMA update, no gradient into the key
encoder, InfoNCE against a hand-written reference (with same-class masking), sub-batch shuffled BN
against hand-computed per-sub-batch statistics, two-view loaders, a tiny SSD pipeline with a MoCo
teacher that resumes with its queue, and 2-rank gloo tests of the all-gather and DDP shuffle-BN.

Run:  python -m pytest tests/test_moco.py -q
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ltscale.engine.trainer as trainer_module
from configs.methods import METHODS
from ltscale.config import apply_overrides
from ltscale.data.base import ArraySplit, FileSplit, Normalization
from ltscale.data.loaders import files as files_module
from ltscale.data.loaders.files import FileLoader, build_key_transform
from ltscale.data.loaders.tensor import TensorLoader
from ltscale.data.samplers import InstanceBalancedSampler
from ltscale.dist.gather import all_gather_no_grad
from ltscale.dist.ports import free_port
from ltscale.engine.checkpoint import load_checkpoint
from ltscale.losses.modules import LossConfig, build_classification_loss
from ltscale.models.heads import HeadSpec
from ltscale.models.moco import MoCo, MoCoConfig, info_nce_logits, info_nce_loss
from ltscale.models.network import ModelConfig, Network
from ltscale.stages.config import PipelineConfig, TeacherConfig
from ltscale.stages.context import load_model
from ltscale.stages.pipeline import run_pipeline
from ltscale.stages.tasks import MoCoTask
from ltscale.tracking import TrackingConfig
from tests.test_pipeline import TINY, TINY_DATA

CPU = torch.device("cpu")
NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class _TinyBackbone(nn.Module):
    """conv -> BN -> ReLU -> global pool: (B, 3, H, W) -> (B, 4)."""

    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def _moco(queue_size: int = 10, **kwargs) -> MoCo:
    torch.manual_seed(0)
    config = MoCoConfig(queue_size=queue_size, projection_dim=5, hidden_dim=6, **kwargs)
    return MoCo(config, _TinyBackbone(), _TinyBackbone.feature_dim)


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---- queue -------------------------------------------------------------------------------------


def test_queue_labels_and_pointer_are_buffers_and_the_enqueue_wraps():
    moco = _moco(queue_size=10)
    buffers = dict(moco.named_buffers())
    assert {"queue", "queue_labels", "queue_pointer"} <= set(buffers)
    assert {"queue", "queue_labels", "queue_pointer"} <= set(moco.state_dict())
    assert moco.queue.shape == (10, 5) and torch.allclose(moco.queue.norm(dim=1), torch.ones(10))
    assert (moco.queue_labels == -1).all() and int(moco.queue_pointer) == 0

    batches = [(_unit(4, 5, seed), torch.arange(4) + 10 * seed) for seed in (1, 2, 3)]
    for keys, labels in batches:
        moco.enqueue(keys, labels)
    # 10 slots, batches of 4 (10 is not a multiple of 4): the third batch fills 8, 9 and wraps to 0, 1.
    assert int(moco.queue_pointer) == 2
    slots = {}  # slot -> (key, label) by the rule "write at the pointer, modulo K"
    pointer = 0
    for keys, labels in batches:
        for row in range(4):
            slots[(pointer + row) % 10] = (keys[row], labels[row])
        pointer = (pointer + 4) % 10
    expected = torch.stack([slots[s][0] for s in range(10)])
    expected_labels = torch.stack([slots[s][1] for s in range(10)])
    assert torch.equal(moco.queue, expected) and torch.equal(moco.queue_labels, expected_labels)
    assert torch.equal(moco.queue[8], batches[2][0][0]) and torch.equal(moco.queue[1], batches[2][0][3])

    # A partial batch (3 keys) is written too and moves the pointer by 3.
    partial = _unit(3, 5, 9)
    moco.enqueue(partial, torch.tensor([7, 7, 7]))
    assert int(moco.queue_pointer) == 5 and torch.equal(moco.queue[2:5], partial)
    # More keys than slots: the newest K fill the whole queue.
    many = _unit(13, 5, 4)
    moco.enqueue(many, torch.arange(13))
    assert int(moco.queue_pointer) == 5
    assert set(moco.queue_labels.tolist()) == set(range(3, 13))


# ---- momentum update ---------------------------------------------------------------------------


def test_momentum_update_is_the_exact_ema_of_the_parameters_only():
    moco = _moco(momentum=0.75)
    query_backbone = _TinyBackbone()
    # Dyadic values make the arithmetic exact: 0.75 * 1 + 0.25 * 3 = 1.5.
    with torch.no_grad():
        for p in [*query_backbone.parameters(), *moco.query_projection.parameters()]:
            p.fill_(3.0)
        for p in [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]:
            p.fill_(1.0)
    running_before = moco.key_encoder.bn.running_mean.clone()
    query_backbone.bn.running_mean.fill_(5.0)
    moco.momentum_update(query_backbone)
    for p in [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]:
        assert torch.equal(p, torch.full_like(p, 1.5))
    assert torch.equal(moco.key_encoder.bn.running_mean, running_before), "buffers are not averaged"

    # Random values: m * k + (1 - m) * q, to float32 rounding.
    moco = _moco(momentum=0.999)
    torch.manual_seed(3)
    query_backbone = _TinyBackbone()
    with torch.no_grad():
        for p in moco.query_projection.parameters():
            p.add_(torch.randn_like(p))
    query = [p.detach().clone() for p in [*query_backbone.parameters(), *moco.query_projection.parameters()]]
    key = [p.detach().clone() for p in [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]]
    moco.momentum_update(query_backbone)
    after = [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]
    for new, k, q in zip(after, key, query):
        torch.testing.assert_close(new, 0.999 * k + (1 - 0.999) * q, rtol=1e-6, atol=1e-7)


# ---- task: gradients, trainable parameters, once-per-step update -------------------------------------


def _tiny_task(queue_size: int = 16, device: torch.device = CPU, **moco_kwargs) -> tuple[MoCoTask, Network]:
    torch.manual_seed(0)
    network = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec(kind="linear", num_outputs=3)}, "cls")
    moco = MoCo(MoCoConfig(queue_size=queue_size, projection_dim=8, **moco_kwargs), network.backbone, network.feature_dim)
    loss = build_classification_loss(LossConfig(kind="ce"), np.array([10, 5, 2]), device)
    task = MoCoTask(network.to(device), moco.to(device), loss, moco_weight=1.0, seed=0)
    task.set_epoch(0)
    return task, network


def _views(batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch, 3, 8, 8, generator=generator),
        "image_key": torch.randn(batch, 3, 8, 8, generator=generator),
        "target": torch.randint(0, 3, (batch,), generator=generator),
    }


def test_key_encoder_gets_no_gradient_is_not_trainable_and_is_updated_once_per_step():
    task, network = _tiny_task()
    task.train()
    moco = task.moco
    key_params = [*moco.key_encoder.parameters(), *moco.key_projection.parameters()]
    trainable = {id(p) for p in task.trainable_parameters()}
    assert all(not p.requires_grad for p in key_params)
    assert not trainable & {id(p) for p in key_params}
    assert {id(p) for p in [*network.parameters(), *moco.query_projection.parameters()]} == trainable
    # The trainer's optimiser sees exactly these.
    trainer = trainer_module.Trainer(task, [None], TINY.optim, CPU, "fp32", Path("/nonexistent/progress.pt"), "t")
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == trainable

    with torch.no_grad():  # make query != key so the EMA is visible
        for p in network.backbone.parameters():
            p.add_(0.5)
    query = [p.detach().clone() for p in [*network.backbone.parameters(), *moco.query_projection.parameters()]]
    key = [p.detach().clone() for p in key_params]
    out = task(_views())
    m = moco.config.momentum
    for new, k, q in zip(key_params, key, query):
        torch.testing.assert_close(new, m * k + (1 - m) * q, rtol=1e-6, atol=1e-7)  # exactly one update
    out["loss"].backward()
    assert all(p.grad is None for p in key_params)
    assert all(p.grad is not None for p in moco.query_projection.parameters())
    assert all(p.grad is not None for p in network.backbone.parameters())
    assert {"loss", "logits", "target", "moco_loss"} <= set(out) and out["logits"].shape == (8, 3)


def test_queries_and_keys_are_normalised_in_float32_under_bf16_autocast():
    task, network = _tiny_task()
    task.train()
    batch = _views()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        queries = task.moco.project_queries(network.backbone(batch["image"]))
        keys = task.moco._encode(batch["image_key"])
    for vectors in (queries, keys):
        assert vectors.dtype == torch.float32
        torch.testing.assert_close(vectors.norm(dim=1), torch.ones(8), rtol=0, atol=1e-6)


def test_moco_task_classifies_the_query_view_and_enqueues_keys_of_the_updated_key_encoder():
    """SSD (4.2.1): the stronger MoCo v2 augmentation is for the momentum encoder's input only, so
    the classification loss and the queries see ``image``; the keys (positives, then enqueued) come
    from the key encoder after this step's momentum update."""
    task, network = _tiny_task(shuffle_bn="none")  # no shuffle: keys are the plain key-encoder output
    task.train()
    moco = task.moco
    with torch.no_grad():  # query != key so that the order of update and keys is visible
        for p in network.backbone.parameters():
            p.add_(0.5)
    batch = _views()
    out = task(batch)
    with torch.no_grad():
        expected_logits = network.heads["cls"](network.backbone(batch["image"]))
        expected_keys = moco._encode(batch["image_key"])  # the encoder as updated by the step
    torch.testing.assert_close(out["logits"], expected_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moco.queue[:8], expected_keys, rtol=1e-5, atol=1e-6)
    assert moco.queue_labels[:8].tolist() == batch["target"].tolist()


class _ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_fast_step_trains_the_moco_task_as_the_eager_step_does(tmp_path):
    """The fast step (CPU: no graphs) draws the shuffle permutation outside the step from the same
    generator as the eager forward, so both paths end with the same weights, queue and pointer."""
    batches = [_views(seed=seed) for seed in range(3)]
    optim = dataclasses.replace(TINY.optim, epochs=1, warmup_epochs=0, milestones=(), decay_factors=())
    states = []
    for step in ("eager", "fast"):
        task, _ = _tiny_task()
        trainer = trainer_module.Trainer(task, _ListLoader(batches), optim, CPU, "fp32", tmp_path / f"{step}.pt", step, step=step)
        trainer.fit()
        states.append(task.network.state_dict())
    assert int(states[0]["moco.queue_pointer"]) == 24 % 16
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moco_graph_replay_equals_eager_on_gpu():
    """Under CUDA graphs the queue copy and write, the device-side pointer, the momentum update and
    the shuffle indexing replay as the eager step runs them (full and partial batches, fp32)."""
    from ltscale.engine.fast_step import FastStep
    from tests.test_fast_step import train_side_by_side

    device = torch.device("cuda")
    batches = [{k: v.to(device) for k, v in _views(batch=8, seed=seed).items()} for seed in range(3)]
    batches.append({k: v.to(device) for k, v in _views(batch=6, seed=3).items()})  # the partial last batch
    tasks, steps = [], []
    for graphs in (False, True):
        task, _ = _tiny_task(queue_size=20, device=device)  # 20: the enqueue wraps mid-batch
        optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        tasks.append(task)
        steps.append(FastStep(task, optimizer, device, None, graphs=graphs, cudnn_benchmark=False))
    try:
        train_side_by_side(tasks, steps, batches)
        assert steps[1]._captured, "no graph was captured"
        states = [task.network.state_dict() for task in tasks]
        assert int(states[1]["moco.queue_pointer"]) == int(states[0]["moco.queue_pointer"]) == (5 * 30) % 20
        assert torch.equal(states[1]["moco.queue_labels"], states[0]["moco.queue_labels"])
        for name, value in states[0].items():
            torch.testing.assert_close(states[1][name], value, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    finally:
        for step in steps:
            step.close()


# ---- InfoNCE -----------------------------------------------------------------------------------


def _reference_info_nce(query, keys, queue, temperature, query_labels=None, queue_labels=None):
    """Per sample, by hand: -log softmax over [q.k+, q.negatives], negatives of other classes only."""
    losses = []
    for i in range(query.shape[0]):
        scores = [float(query[i] @ keys[i]) / temperature]
        for j in range(queue.shape[0]):
            if query_labels is not None and int(queue_labels[j]) == int(query_labels[i]):
                continue
            scores.append(float(query[i] @ queue[j]) / temperature)
        scores_t = torch.tensor(scores, dtype=torch.float64)
        losses.append(-(scores_t[0] - torch.logsumexp(scores_t, 0)))
    return torch.stack(losses).mean()


def test_info_nce_matches_a_hand_written_reference_and_masks_exactly_same_class_negatives():
    query, keys, queue = _unit(6, 5, 1), _unit(6, 5, 2), _unit(11, 5, 3)
    logits = info_nce_logits(query, keys, queue, 0.2)
    assert logits.shape == (6, 12)
    torch.testing.assert_close(logits[:, 0], (query * keys).sum(1) / 0.2)  # the positive at index 0
    torch.testing.assert_close(logits[:, 1:], query @ queue.t() / 0.2)
    torch.testing.assert_close(info_nce_loss(logits).double(), _reference_info_nce(query, keys, queue, 0.2), rtol=1e-5, atol=1e-6)

    query_labels = torch.tensor([0, 1, 2, 0, 1, 5])
    queue_labels = torch.tensor([0, 0, 1, 2, -1, 3, 1, 0, 2, 4, 1])
    masked = info_nce_logits(query, keys, queue, 0.2, query_labels, queue_labels)
    same = query_labels[:, None] == queue_labels[None, :]
    assert torch.isneginf(masked[:, 1:][same]).all()
    assert torch.equal(masked[:, 1:][~same], logits[:, 1:][~same]) and torch.equal(masked[:, 0], logits[:, 0])
    torch.testing.assert_close(
        info_nce_loss(masked).double(), _reference_info_nce(query, keys, queue, 0.2, query_labels, queue_labels), rtol=1e-5, atol=1e-6
    )


def test_moco_forward_uses_the_queue_before_its_enqueue_and_the_positive_key():
    moco = _moco(queue_size=12, shuffle_bn="none")
    moco.train()
    torch.manual_seed(1)
    features = torch.randn(4, 4, requires_grad=True)
    key_images = torch.randn(4, 3, 6, 6)
    labels = torch.tensor([0, 1, 1, 2])
    moco.queue_labels[:6] = torch.tensor([1, 1, 0, 3, 2, 2])
    queue_before, labels_before = moco.queue.clone(), moco.queue_labels.clone()
    out = moco(features, key_images, labels)
    query = moco.project_queries(features)
    keys = moco.encode_keys(key_images)
    expected = _reference_info_nce(query.detach(), keys, queue_before, 0.2, labels, labels_before)
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(moco.queue[:4], keys) and torch.equal(moco.queue_labels[:4], labels)
    out["loss"].backward()  # the in-place enqueue must not break backward
    assert features.grad is not None


# ---- shuffled BN on one process ----------------------------------------------------------------


def _keys_by_hand(moco: MoCo, chunk: torch.Tensor) -> torch.Tensor:
    """The key encoder on ``chunk`` with its own batch statistics, written out."""
    conv = moco.key_encoder.conv(chunk)
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    bn = moco.key_encoder.bn
    normed = (conv - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return F.normalize(moco.key_projection(F.relu(normed).mean(dim=(2, 3))), dim=1)


def test_sub_batch_bn_normalises_each_key_with_its_sub_batch_statistics():
    moco = _moco(sub_batches=2)
    moco.train()
    images = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    permutation = torch.tensor([3, 0, 6, 1, 7, 4, 2, 5])

    keys = moco.encode_keys(images, permutation)
    expected = torch.empty_like(keys)
    expected[permutation[:4]] = _keys_by_hand(moco, images[permutation[:4]])  # the shuffled batch's first half
    expected[permutation[4:]] = _keys_by_hand(moco, images[permutation[4:]])
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)
    full_batch = _keys_by_hand(moco, images)
    assert (keys - full_batch).abs().max() > 1e-3, "sub-batch statistics must differ from full-batch ones"
    # shuffle_bn=none is plain full-batch BN.
    moco_none = _moco(shuffle_bn="none")
    moco_none.load_state_dict(moco.state_dict())
    torch.testing.assert_close(moco_none.encode_keys(images), full_batch, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="more than one rank"):
        _moco(shuffle_bn="ddp").encode_keys(images)


@pytest.mark.parametrize(
    "sub_batches, batch, sizes",
    [
        (4, 5, [3, 2]),  # 4 sub-batches asked, 5 images: 2 sub-batches, none of one image
        (4, 3, [3]),  # one sub-batch of 3 rather than 2 + 1
        (2, 4, [2, 2]),
        (8, 8, [2, 2, 2, 2]),
    ],
)
def test_shuffled_bn_sub_batches_keep_at_least_two_images(sub_batches, batch, sizes):
    """A sub-batch of one image would be normalised by its own statistics alone (instance norm,
    not batch norm; and BN on a 1x1 map raises). The count drops until every sub-batch has two
    images or more, split as ``tensor_split`` does."""
    moco = _moco(sub_batches=sub_batches)
    moco.train()
    images = torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    permutation = torch.randperm(batch, generator=torch.Generator().manual_seed(2))
    keys = moco.encode_keys(images, permutation)
    expected = torch.empty_like(keys)
    start = 0
    for size in sizes:
        rows = permutation[start : start + size]
        expected[rows] = _keys_by_hand(moco, images[rows])
        start += size
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)


# ---- two-view loaders --------------------------------------------------------------------------


def test_tensor_loader_second_view_is_another_crop_flip_of_the_same_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    split = ArraySplit(name="toy", targets=rng.integers(0, 3, 20), num_classes=3, images=images)

    def loader(views: int, padding: int) -> TensorLoader:
        return TensorLoader(split, sampler=InstanceBalancedSampler(20, seed=0), batch_size=8, normalization=NORMALIZATION,
                            device=CPU, augment=True, seed=0, padding=padding, views=views)

    one, two = list(loader(1, 4)), list(loader(2, 4))
    assert "image_key" not in one[0] and len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])  # view 1 unchanged
        assert torch.equal(a["target"], b["target"]) and b["image_key"].shape == b["image"].shape
        assert not torch.equal(b["image"], b["image_key"])
    # Without padding a view is the image or its mirror: both views show the same source image.
    mirrored = 0
    for batch in loader(2, 0):
        source = torch.from_numpy(images[batch["index"].numpy()]).permute(0, 3, 1, 2).float()
        source = (source - 127.5) / 63.75
        for view in (batch["image"], batch["image_key"]):
            same = torch.isclose(view, source, atol=1e-4).flatten(1).all(1)
            flipped = torch.isclose(view, source.flip(3), atol=1e-4).flatten(1).all(1)
            assert (same | flipped).all()
        mirrored += int((~torch.isclose(batch["image"], batch["image_key"], atol=1e-4).flatten(1).all(1)).sum())
    assert mirrored > 0, "the two views draw their flips independently"
    with pytest.raises(ValueError, match="augment"):
        TensorLoader(split, sampler=InstanceBalancedSampler(20, seed=0), batch_size=8, normalization=NORMALIZATION,
                     device=CPU, augment=False, views=2)


def _image_files(tmp_path, count: int = 6) -> FileSplit:
    rng = np.random.default_rng(1)
    names = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        name = f"img{i}.png"
        PIL.Image.fromarray(pixels).save(tmp_path / name)
        names.append(name)
    return FileSplit(name="files", targets=np.arange(count) % 3, num_classes=3, root=tmp_path, paths=names)


def _file_loader(split: FileSplit, views: int) -> FileLoader:
    return FileLoader(split, train=True, batch_size=3, sampler=InstanceBalancedSampler(len(split), seed=0), image_size=32,
                      normalization=NORMALIZATION, num_workers=0, max_bad_image_fraction=0.0, drop_last=False,
                      device="cpu", color_jitter=0.0, views=views)


def test_file_loader_second_view_is_the_moco_v2_augmentation_of_the_same_images(tmp_path, monkeypatch):
    split = _image_files(tmp_path)
    torch.manual_seed(0)
    batches = list(_file_loader(split, views=2))
    assert len(batches) == 2
    for batch in batches:
        assert batch["image_key"].shape == batch["image"].shape == (3, 3, 32, 32)
        assert batch["image_key"].dtype == torch.float32
        assert not torch.allclose(batch["image"], batch["image_key"])
    torch.manual_seed(0)
    assert "image_key" not in next(iter(_file_loader(split, views=1)))

    # The MoCo v2 recipe: crop scale 0.2-1, jitter 0.4 (p 0.8), greyscale p 0.2, blur p 0.5, flip.
    steps = build_key_transform(224).transforms
    crop, jitter, grey, blur, flip = steps
    assert crop.scale == (0.2, 1.0) and jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4)
    assert grey.p == 0.2 and blur.p == 0.5 and blur.transforms[0].sigma == [0.1, 2.0] and flip.p == 0.5

    # Same image in both views: with a deterministic key transform the key view is the source image.
    import torchvision.transforms.v2 as transforms

    monkeypatch.setattr(files_module, "build_key_transform", lambda size: transforms.Resize((size, size), antialias=True))
    for batch in _file_loader(split, views=2):
        for row, index in enumerate(batch["index"].tolist()):
            source = files_module.decode_image_file(tmp_path / split.paths[index])
            expected = transforms.functional.resize(source, [32, 32], antialias=True).float()
            expected = (expected - 127.5) / 63.75
            torch.testing.assert_close(batch["image_key"][row], expected, rtol=0, atol=1e-4)
            assert int(batch["target"][row]) == int(split.targets[index])


# ---- config ------------------------------------------------------------------------------------


def test_teacher_config_keeps_rotation_and_refuses_both_tasks():
    assert TeacherConfig(rotation_weight=1.0).self_supervision == "rotation"
    assert TeacherConfig(moco_weight=1.0).self_supervision == "moco"
    assert TeacherConfig().self_supervision == "none"
    with pytest.raises(ValueError, match="set the other to 0"):
        TeacherConfig(rotation_weight=1.0, moco_weight=1.0)
    from configs.imagenet_lt import imagenet_lt
    from configs.inat18 import inat18

    for config in (imagenet_lt("ssd"), inat18("ssd")):
        teacher = config.stages["teacher"]
        assert teacher.moco_weight == 1.0 and teacher.rotation_weight == 0.0 and teacher.moco.queue_size == 65536
    assert imagenet_lt("ce").stages["teacher"].moco_weight == 0.0


# ---- pipeline ----------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def test_tiny_ssd_pipeline_with_moco_teacher_runs_and_resumes_with_its_queue(tmp_path, monkeypatch):
    recipe = dataclasses.replace(TINY, ssd_moco_weight=1.0, ssd_self_supervision=0.0)
    config = PipelineConfig(name="tiny/ssd-moco", data=TINY_DATA, stages=METHODS["ssd"](recipe), output_dir=str(tmp_path),
                            tracking=TrackingConfig(), progress=False, device="cpu")
    config = apply_overrides(config, ["stages.teacher.moco.queue_size=64", "stages.teacher.moco.projection_dim=16"])
    assert config.stages["teacher"].self_supervision == "moco"

    original_epoch = trainer_module.Trainer._epoch
    original_resume = trainer_module.Trainer._resume
    restored: list[torch.Tensor] = []

    def crash_in_epoch_two(self, epoch, steps, advance):
        if epoch == 2:
            raise _Interrupt("simulated preemption")
        return original_epoch(self, epoch, steps, advance)

    monkeypatch.setattr(trainer_module.Trainer, "_epoch", crash_in_epoch_two)
    with pytest.raises(_Interrupt):
        run_pipeline(config)
    (teacher_dir,) = list((tmp_path / "store").glob("teacher-*"))
    progress = load_checkpoint(teacher_dir / "progress.pt")
    saved_queue = progress["network"]["moco.queue"]
    assert int(progress["epoch"]) == 2 and saved_queue.shape == (64, 16)
    assert (progress["network"]["moco.queue_labels"] >= 0).all(), "two epochs fill the 64-key queue with real keys"

    def resume_and_record(self):
        epoch = original_resume(self)
        if isinstance(self.task, MoCoTask):
            restored.append(self.task.moco.queue.clone())
        return epoch

    monkeypatch.setattr(trainer_module.Trainer, "_epoch", original_epoch)
    monkeypatch.setattr(trainer_module.Trainer, "_resume", resume_and_record)
    result = run_pipeline(config)
    assert result.executed == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    assert len(restored) == 1 and torch.equal(restored[0], saved_queue), "the resumed teacher continues with its queue"
    assert 0 <= result.metrics("teacher")["test/top1"] <= 100
    # The saved teacher is the classifier network alone: load_model rebuilds it strictly.
    teacher = load_model(result.outputs["teacher"].file("model"), CPU)
    assert set(teacher.heads) == {"cls"} and not any(k.startswith("moco") for k in teacher.state_dict())


# ---- two ranks (gloo) --------------------------------------------------------------------------


def _two_rank_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    from ltscale.dist import runtime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        # all_gather_no_grad: rank order, no gradient.
        local = torch.full((2, 3), float(rank), requires_grad=True) * 1.0
        gathered = all_gather_no_grad(local)
        assert gathered.shape == (4, 3) and not gathered.requires_grad
        assert gathered[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]

        # DDP shuffle-BN: each rank encodes its slice of rank 0's permutation of the global batch.
        moco = _moco(queue_size=12, sub_batches=2)  # same seed on both ranks: identical encoders
        moco.train()
        assert moco.shuffle_mode() == "ddp"
        images = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(10 + rank)) * 2
        own_permutation = torch.randperm(8, generator=torch.Generator().manual_seed(1 + rank))  # only rank 0's counts
        keys = moco.encode_keys(images, own_permutation)
        everything = all_gather_no_grad(images)
        permutation = torch.randperm(8, generator=torch.Generator().manual_seed(1))
        reference = torch.empty(8, 5)
        for slice_rank in range(world_size):
            chosen = permutation[4 * slice_rank : 4 * slice_rank + 4]
            reference[chosen] = moco._encode(everything[chosen])
        torch.testing.assert_close(keys, reference[4 * rank : 4 * rank + 4], rtol=1e-5, atol=1e-6)
        assert (keys - moco._encode(images)).abs().max() > 1e-4, "shuffled BN differs from local BN"

        # Enqueue gathers every rank's keys: the queues stay identical across ranks.
        labels = torch.tensor([0, 1, 2, 3]) + 4 * rank
        moco.enqueue(keys, labels)
        assert int(moco.queue_pointer) == 8
        assert moco.queue_labels[:8].tolist() == list(range(8))
        queues = all_gather_no_grad(moco.queue[None])
        assert torch.equal(queues[0], queues[1])
        torch.testing.assert_close(moco.queue[4 * rank : 4 * rank + 4], keys, rtol=0, atol=0)

        # shuffle_bn=sub_batch on several ranks: each rank shuffles its own batch (the task's
        # permutation has the local batch's size, not the global one's).
        task, _ = _tiny_task(shuffle_bn="sub_batch", sub_batches=2)
        task.train()
        assert task.step_randomness(4, CPU)["key_permutation"].shape == (4,)
        out = task(_views(batch=4, seed=rank))
        assert torch.isfinite(out["loss"]) and int(task.moco.queue_pointer) == 8
    finally:
        runtime.leave_process_group()  # drains gloo's threads first: a bare destroy aborted now and then


def test_two_rank_all_gather_no_grad_and_ddp_shuffle_bn():
    torch.multiprocessing.spawn(_two_rank_worker, args=(2, free_port()), nprocs=2, join=True)


def test_all_gather_no_grad_is_the_identity_on_one_process():
    tensor = torch.randn(3, 2)
    assert all_gather_no_grad(tensor) is tensor

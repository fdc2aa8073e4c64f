"""Tasks: what one training step computes for each kind of stage.

Each task's ``forward(batch)`` returns ``{"loss", "logits", "target", <named parts>}``;
``trainable_parameters()`` says what the optimiser updates, and ``network`` is the module whose
state the trainer checkpoints. Frozen modules (a teacher, a frozen backbone) live inside the task
but stay in eval mode and outside the optimiser.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltscale.dist.gather import rank_and_world_size
from ltscale.losses.modules import ClassificationLoss, DistillationLosses
from ltscale.models.moco import MoCo
from ltscale.models.network import Network


def rotate_batch(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``turns[i]`` * 90 degrees counter-clockwise, batched.

    images: (B, C, H, W) with H == W; turns: (B,) int64 in 0..3. All four rotations are computed
    and the right one gathered per sample, so there is no data-dependent control flow (no host sync).
    """
    candidates = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4, B, C, H, W)
    return candidates[turns, torch.arange(images.shape[0], device=images.device)]


class _Task(nn.Module):
    network: Network

    def set_epoch(self, epoch: int) -> None:
        pass

    def capture_key(self) -> object:
        """Python-level state that a captured CUDA graph bakes in (``ltscale/engine/fast_step.py``);
        when it changes between epochs the fast step captures a new graph."""
        return None


@contextlib.contextmanager
def running_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Batch norm inside ``module`` still normalises with each batch's statistics (in train mode)
    but leaves its running statistics and batch count alone, as if that forward had not happened."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False  # train mode then passes no running buffers to F.batch_norm
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


class SupervisedTask(_Task):
    """CE / BSCE / LDAM(-DRW) on the ``cls`` head, plus SSD's rotation task when its weight > 0.

    ``rotation_batch_norm="joint"``: the original and the rotated batch go through the network
    together (one forward of 2B images, as in the paper's "sent simultaneously"), so batch norm
    normalises the mixture and its running statistics (used at test time, by LWS and for the soft
    labels) are the mixture's. ``"split"``: two forwards; each half is normalised with its own
    statistics and only the upright one updates the running statistics, so the network is
    evaluated with the statistics of the images its CE head was trained on.
    """

    def __init__(self, network: Network, loss: ClassificationLoss, rotation_weight: float, seed: int,
                 rotation_batch_norm: str = "joint") -> None:
        super().__init__()
        if rotation_batch_norm not in ("joint", "split"):
            raise ValueError(f"rotation_batch_norm must be 'joint' or 'split', got {rotation_batch_norm!r}")
        self.network = network
        self.loss = loss
        self.rotation_weight = rotation_weight
        self.rotation_batch_norm = rotation_batch_norm
        self.seed = seed
        self.generator: torch.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)
        device = next(self.network.parameters()).device
        # Re-seeded per epoch so a resumed stage draws the same rotations as an uninterrupted one;
        # each rank rotates its own images its own way (rank 0's draws are a single process's).
        rank, _ = rank_and_world_size()
        self.generator = torch.Generator(device=device).manual_seed(self.seed * 100_003 + epoch + rank * 7_919)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def capture_key(self) -> object:
        return self.loss.weights is not None  # LDAM-DRW's re-weighted phase changes the step

    def step_randomness(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """This step's rotation labels from the task's generator. The fast step draws them outside
        its CUDA graph (a graph cannot capture draws from an unregistered generator) and passes
        them in the batch; the eager step draws the same ones in ``forward``."""
        if self.rotation_weight <= 0:
            return {}
        return {"rotation_turns": torch.randint(0, 4, (batch_size,), device=device, generator=self.generator)}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = batch["image"], batch["target"]
        if self.rotation_weight <= 0:
            logits = self.network(images, heads=("cls",))["cls"]
            return {"loss": self.loss(logits, targets), "logits": logits, "target": targets}
        turns = batch.get("rotation_turns")
        if turns is None:
            turns = self.step_randomness(images.shape[0], images.device)["rotation_turns"]
        if self.rotation_batch_norm == "joint":
            original, rotated = self.network.backbone(torch.cat([images, rotate_batch(images, turns)])).chunk(2)
        else:
            original = self.network.backbone(images)
            with running_statistics_frozen(self.network.backbone):
                rotated = self.network.backbone(rotate_batch(images, turns))
        logits = self.network.heads["cls"](original)
        rotation_logits = self.network.heads["rotation"](rotated)
        supervised = self.loss(logits, targets)
        rotation = F.cross_entropy(rotation_logits.float(), turns)
        return {
            "loss": supervised + self.rotation_weight * rotation,
            "logits": logits,
            "target": targets,
            "rotation_loss": rotation.detach(),
        }


class MoCoTask(_Task):
    """SSD's large-dataset teacher: CE (BSCE, ...) on the query view's ``cls`` logits
    + ``moco_weight`` * MoCo v2 InfoNCE between the query and key views (``image`` / ``image_key``).

    The trainer checkpoints ``self.network``, which here is ``{"classifier": Network, "moco": MoCo}``:
    the key encoder, the projection heads and the key queue travel in progress checkpoints, so a
    resumed stage continues with the same queue. The stage saves only ``classifier`` as its model.
    The key encoder is EMA-updated (requires_grad False) and so is not a trainable parameter.
    """

    def __init__(self, network: Network, moco: MoCo, loss: ClassificationLoss, moco_weight: float, seed: int) -> None:
        super().__init__()
        self.network = nn.ModuleDict({"classifier": network, "moco": moco})  # type: ignore[assignment]
        self.loss = loss
        self.moco_weight = moco_weight
        self.seed = seed
        self.generator: torch.Generator | None = None

    @property
    def classifier(self) -> Network:
        return self.network["classifier"]  # type: ignore[return-value]

    @property
    def moco(self) -> MoCo:
        return self.network["moco"]  # type: ignore[return-value]

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)
        device = next(self.classifier.parameters()).device
        # Re-seeded per epoch (as the rotation task) so a resumed stage draws the same shuffles. The
        # same seed on every rank: the key permutation is one global shuffle all ranks must agree on.
        self.generator = torch.Generator(device=device).manual_seed(self.seed * 100_003 + epoch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]  # the key encoder is not

    def capture_key(self) -> object:
        return self.loss.weights is not None

    def step_randomness(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The shuffled-BN permutation of this step's key batch (the global one under DDP; each
        rank's own under ``sub_batch``), drawn from the task's generator outside a CUDA graph, as
        the rotation labels are."""
        mode = self.moco.shuffle_mode()
        if mode == "none":
            return {}
        keys = batch_size * rank_and_world_size()[1] if mode == "ddp" else batch_size
        return {"key_permutation": torch.randperm(keys, device=device, generator=self.generator)}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = batch["image"], batch["target"]
        if "image_key" not in batch:
            raise KeyError("the MoCo task needs two views per image: build the train loader with views=2")
        permutation = batch.get("key_permutation")
        if permutation is None:
            permutation = self.step_randomness(images.shape[0], images.device).get("key_permutation")
        self.moco.momentum_update(self.classifier.backbone)  # once per step, before the keys
        features = self.classifier.backbone(images)  # (N, D)
        logits = self.classifier.heads["cls"](features)
        supervised = self.loss(logits, targets)
        contrastive = self.moco(features, batch["image_key"], targets, permutation)["loss"]
        return {
            "loss": supervised + self.moco_weight * contrastive,
            "logits": logits,
            "target": targets,
            "moco_loss": contrastive.detach(),
        }


class RebalanceTask(_Task):
    """CE on one head over frozen features (LWS scales or a cRT linear layer are trainable).

    The backbone's weights never change (no_grad, requires_grad off). Its batch norm stays in eval
    mode unless ``backbone_bn="train"``: then, while the task trains, it normalises with the
    re-balanced batch's statistics and re-estimates its running statistics on them (see
    ``RebalanceConfig.backbone_bn``); evaluation always uses the running statistics.
    """

    def __init__(self, network: Network, head: str, backbone_bn: str = "eval") -> None:
        super().__init__()
        if backbone_bn not in ("eval", "train"):
            raise ValueError(f"backbone_bn must be 'eval' or 'train', got {backbone_bn!r}")
        self.network = network
        self.head = head
        self.backbone_bn = backbone_bn
        network.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "RebalanceTask":
        super().train(mode)
        self.network.backbone.train(mode and self.backbone_bn == "train")
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.heads[self.head].parameters() if p.requires_grad]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = self.network.backbone(batch["image"])
        logits = self.network.heads[self.head](features.float())
        return {"loss": F.cross_entropy(logits.float(), batch["target"]), "logits": logits, "target": batch["target"]}


def _frozen_teacher_logits(teacher: Network, images: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's predicting head on ``images``: float32, no gradient. The task keeps the
    teacher in eval mode (its batch-norm statistics are the trained ones, never this batch's)."""
    with torch.no_grad():
        return teacher(images, heads=(teacher.predict_head,))[teacher.predict_head].float()


class SSDDistillTask(_Task):
    """SSD stage III: CE on the ``hard`` head + KD_T on the ``soft`` head against the teacher's logits.

    ``soft_targets`` is either the stored soft labels, an (N_train, C) table of the teacher's logits
    on the unaugmented training images (the paper's stage II output), looked up by the batch's
    dataset indices, or a frozen teacher network run in eval mode on the student's augmented batch
    (as SSD-LT's public code does). The table sits on the batch's device, or in host memory when it
    is too large for the GPU (see ``soft_label_device``); it is a plain attribute, not a buffer:
    DDP would broadcast a buffer from rank 0 when it wraps the task, and every rank already has it.
    """

    def __init__(self, network: Network, soft_targets: torch.Tensor | Network, losses: DistillationLosses,
                 temperature: float, hard_weight: float, soft_weight: float) -> None:
        super().__init__()
        self.network = network
        if isinstance(soft_targets, Network):
            self.teacher: Network | None = soft_targets.requires_grad_(False)
            self.soft_label_logits: torch.Tensor | None = None
        else:
            self.teacher, self.soft_label_logits = None, soft_targets
        self.losses = losses
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.soft_weight = soft_weight

    def train(self, mode: bool = True) -> "SSDDistillTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def _soft_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher is not None:
            return _frozen_teacher_logits(self.teacher, batch["image"])
        index = batch["index"]
        if self.soft_label_logits.device == index.device:
            return self.soft_label_logits[index].float()
        # A host-resident table (eager step only): the rows cross over, not the table.
        return self.soft_label_logits[index.cpu()].to(index.device, non_blocking=True).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.network(batch["image"], heads=("hard", "soft"))
        loss = self.losses.ssd_hybrid(
            out["hard"], out["soft"], batch["target"], self._soft_targets(batch), self.temperature, self.hard_weight,
            self.soft_weight,
        )
        return {"loss": loss, "logits": out["hard"], "target": batch["target"]}


class DiVEDistillTask(_Task):
    """DiVE: alpha * KD_{T,p}(student, teacher) + (1 - alpha) * BSCE(student, y).

    The teacher (a BSCE model) runs in eval mode on the same augmented batch, without gradient.
    """

    def __init__(self, network: Network, teacher: Network, class_counts: torch.Tensor, losses: DistillationLosses,
                 temperature: float, power: float, alpha: float) -> None:
        super().__init__()
        self.network = network
        self.teacher = teacher.requires_grad_(False)
        self.register_buffer("class_counts", class_counts, persistent=False)
        self.losses = losses
        self.temperature = temperature
        self.power = power
        self.alpha = alpha

    def train(self, mode: bool = True) -> "DiVEDistillTask":
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        teacher_logits = _frozen_teacher_logits(self.teacher, batch["image"])
        logits = self.network(batch["image"], heads=("cls",))["cls"]
        loss = self.losses.dive(
            logits, teacher_logits, batch["target"], self.class_counts, self.temperature, self.power, self.alpha
        )
        return {"loss": loss, "logits": logits, "target": batch["target"]}

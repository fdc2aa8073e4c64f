"""Tasks: what one training step computes for each kind of stage.

Each task's ``forward(batch)`` returns ``{"loss", "logits", "target", <named parts>}``;
``trainable_parameters()`` says what the optimiser updates, and ``network`` is the module whose
state the trainer checkpoints. Frozen modules (a teacher, a frozen backbone) live inside the task
but stay in eval mode and outside the optimiser.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltscale.losses.modules import ClassificationLoss, DistillationLosses
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


class SupervisedTask(_Task):
    """CE / BSCE / LDAM(-DRW) on the ``cls`` head, plus SSD's rotation task when its weight > 0.

    With rotation, the original and the rotated batch go through the network together (one
    forward of 2B images, so batch norm sees both, as in the paper's "sent simultaneously").
    """

    def __init__(self, network: Network, loss: ClassificationLoss, rotation_weight: float, seed: int) -> None:
        super().__init__()
        self.network = network
        self.loss = loss
        self.rotation_weight = rotation_weight
        self.seed = seed
        self.generator: torch.Generator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.loss.set_epoch(epoch)
        device = next(self.network.parameters()).device
        # Re-seeded per epoch so a resumed stage draws the same rotations as an uninterrupted one.
        self.generator = torch.Generator(device=device).manual_seed(self.seed * 100_003 + epoch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = batch["image"], batch["target"]
        if self.rotation_weight <= 0:
            logits = self.network(images, heads=("cls",))["cls"]
            return {"loss": self.loss(logits, targets), "logits": logits, "target": targets}
        turns = torch.randint(0, 4, (images.shape[0],), device=images.device, generator=self.generator)
        both = torch.cat([images, rotate_batch(images, turns)])
        features = self.network.backbone(both)
        original, rotated = features.chunk(2)
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


class RebalanceTask(_Task):
    """CE on one head over frozen features (LWS scales or a cRT linear layer are trainable).

    The backbone runs in eval mode under no_grad: its batch-norm statistics must not drift while
    the classifier is re-balanced.
    """

    def __init__(self, network: Network, head: str) -> None:
        super().__init__()
        self.network = network
        self.head = head
        network.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "RebalanceTask":
        super().train(mode)
        self.network.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.heads[self.head].parameters() if p.requires_grad]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = self.network.backbone(batch["image"])
        logits = self.network.heads[self.head](features.float())
        return {"loss": F.cross_entropy(logits.float(), batch["target"]), "logits": logits, "target": batch["target"]}


class SSDDistillTask(_Task):
    """SSD stage III: CE on the ``hard`` head + KD_T on the ``soft`` head against stored soft labels.

    ``soft_label_logits`` is (N_train, C) on the device, looked up by the batch's dataset indices.
    """

    def __init__(self, network: Network, soft_label_logits: torch.Tensor, losses: DistillationLosses,
                 temperature: float, hard_weight: float, soft_weight: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("soft_label_logits", soft_label_logits, persistent=False)
        self.losses = losses
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.soft_weight = soft_weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.network(batch["image"], heads=("hard", "soft"))
        teacher = self.soft_label_logits[batch["index"]].float()
        loss = self.losses.ssd_hybrid(
            out["hard"], out["soft"], batch["target"], teacher, self.temperature, self.hard_weight, self.soft_weight
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
        with torch.no_grad():
            teacher_logits = self.teacher(batch["image"], heads=(self.teacher.predict_head,))[self.teacher.predict_head]
        logits = self.network(batch["image"], heads=("cls",))["cls"]
        loss = self.losses.dive(
            logits, teacher_logits.float(), batch["target"], self.class_counts, self.temperature, self.power, self.alpha
        )
        return {"loss": loss, "logits": logits, "target": batch["target"]}

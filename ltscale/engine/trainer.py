"""The one training loop. Stages supply a task (what to compute), the loop does the rest.

A task is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss", "logits", "target", ...}``
and whose ``trainable_parameters()`` names what the optimiser updates; frozen parts (a teacher,
a frozen backbone) stay inside the task but outside the optimiser. The loop keeps its metrics on
the device and synchronises with the host once per epoch; progress is checkpointed atomically
after every epoch, and a restarted stage resumes from the last completed epoch.

In a multi-process run (``ltscale.dist.runtime``) the task is wrapped in DistributedDataParallel
over its trainable parameters: each rank computes its share of the global batch, DDP averages the
gradients while the backward runs, and every rank applies the same update. Batch-norm statistics
stay per rank during the epoch (as DDP without SyncBN does) and rank 0's are broadcast at its end,
so the evaluated and saved network is the same on every rank. Only rank 0 writes checkpoints.

With ``deepspeed`` enabled the task runs under a DeepSpeed ZeRO engine instead of DDP (single or
multi-process; ``ltscale/engine/zero.py``): same loop, same update, the optimiser state (and at
stage 2 the gradients) partitioned over the ranks, each rank saving its part of the progress.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ltscale.dist.gather import all_reduce_sum, broadcast_from_rank0, is_main_process, rank_and_world_size
from ltscale.engine.checkpoint import PROGRESS_KIND, CheckpointError, atomic_save, load_checkpoint, load_state_strict
from ltscale.engine.fast_step import FastStep, resolve_step
from ltscale.engine.progress import Progress
from ltscale.engine.schedule import OptimConfig, lr_schedule
from ltscale.engine.zero import POINTER, PROGRESS_DIR, DeepSpeedConfig, ZeroEngine

logger = logging.getLogger(__name__)


class Task(Protocol):
    network: nn.Module

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def trainable_parameters(self) -> list[nn.Parameter]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def train(self, mode: bool = True) -> nn.Module: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    top1: float
    lr: float
    images_per_second: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {
            "train/loss": self.loss,
            "train/top1": self.top1,
            "train/lr": self.lr,
            "train/images_per_s": self.images_per_second,
            "train/epoch_seconds": self.seconds,
        }


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA under ``auto``; fp32 on CPU, where bf16 convolutions are slow."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Trainer:
    """Runs ``task`` over ``loader`` for ``optim.epochs`` epochs with SGD."""

    def __init__(
        self,
        task: nn.Module,
        loader,
        optim: OptimConfig,
        device: torch.device,
        precision: str,
        progress_path: Path,
        name: str,
        on_epoch_end: Callable[[EpochMetrics], None] | None = None,
        progress: Progress | None = None,
        on_resume: Callable[[int, EpochMetrics | None], None] | None = None,
        step: str = "auto",
        deepspeed: DeepSpeedConfig | None = None,
    ) -> None:
        self.task = task
        self.loader = loader
        self.optim = optim
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        self.progress_path = Path(progress_path)
        self.name = name
        self.on_epoch_end = on_epoch_end
        # Called once when a stage resumes, with the number of epochs its progress holds and the
        # metrics of the last of them (None in progress saved without them): a stop between saving
        # an epoch and logging it must not lose that epoch's point.
        self.on_resume = on_resume
        self.progress = progress or Progress(enabled=False)
        _, self.world_size = rank_and_world_size()
        # Every process count that trained some of the stage's epochs (a resume may change it).
        self.world_sizes: tuple[int, ...] = (self.world_size,)
        use_zero = deepspeed is not None and deepspeed.enabled
        self.step = resolve_step(step, device, self.world_size, zero=use_zero)  # "fast": fast_step.py
        self.fast_step: FastStep | None = None
        parameters = list(task.trainable_parameters())  # type: ignore[operator]
        if not parameters:
            raise ValueError(f"stage {name}: the task has no trainable parameters")
        self.optimizer = torch.optim.SGD(
            parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov
        )
        self.lrs = lr_schedule(optim, len(loader))
        late = [m for m in optim.milestones if m >= optim.epochs] if optim.schedule == "step" else []
        if late and is_main_process():  # not refused: shortened smoke runs keep the recipe's milestones on purpose
            logger.warning("stage %s: optim.milestones %s are not before optim.epochs=%d, so the lr never decays there; "
                           "shortening a schedule for a real run, move the milestones too", name, late, optim.epochs)
        # What the step calls: the task, the task under DDP in a multi-process run, or a ZeRO engine.
        self.zero: ZeroEngine | None = None
        if use_zero:
            assert deepspeed is not None
            self.zero = ZeroEngine(task, self.optimizer, parameters, loader.batch_size, deepspeed, device)
            self.model = self.zero  # type: ignore[assignment]
        else:
            self.model = task if self.world_size == 1 else _distributed(task, parameters, device)

    @property
    def _zero_progress(self) -> Path:
        return self.progress_path.parent / PROGRESS_DIR

    def _resume(self) -> tuple[int, dict | None]:
        """(the epoch to start from, the saved metrics of the epoch before it or None)."""
        self._refuse_other_format()
        if self.zero is not None:
            return self.zero.load(self._zero_progress)
        if not self.progress_path.exists():
            return 0, None
        state = load_checkpoint(self.progress_path, kind=PROGRESS_KIND, required=("network", "optimizer", "epoch"))
        load_state_strict(self.task.network, state["network"], self.progress_path)
        self.optimizer.load_state_dict(state["optimizer"])
        saved_world = state.get("world_size")
        earlier = state.get("world_sizes") or ([int(saved_world)] if saved_world is not None else [])
        self.world_sizes = tuple(sorted({*map(int, earlier), self.world_size}))
        if saved_world is not None and int(saved_world) != self.world_size and is_main_process():
            # Valid (the state is an epoch boundary and the samplers deal the epoch over the new
            # ranks), but the result will match neither an unbroken run with the old number of
            # processes nor one with the new: say so rather than let it pass unnoticed.
            logger.warning("stage %s: resuming epoch %d with %d process(es); %s was saved by %d. Training continues; "
                           "the result will differ from an unbroken run with either number", self.name,
                           int(state["epoch"]), self.world_size, self.progress_path, int(saved_world))
        return int(state["epoch"]), state.get("metrics")

    def _refuse_other_format(self) -> None:
        """A stage's directory is shared by runs with and without DeepSpeed (the key leaves it out:
        the finished result is the same), but their progress is not interchangeable (ZeRO's is
        partitioned per rank). Starting over beside the other's progress would silently discard it."""
        saved = saved_progress(self.progress_path)
        wanted = "deepspeed" if self.zero is not None else "plain"
        if not saved or wanted in saved:
            return
        where = self._zero_progress / POINTER if self.zero is None else self.progress_path
        raise CheckpointError(
            f"stage {self.name}: {where} holds this stage's progress saved {'with' if self.zero is None else 'without'} "
            f"DeepSpeed, and this run has deepspeed.enabled={str(self.zero is not None).lower()}. A stage resumes in "
            f"the format it was saved in: rerun with --set deepspeed.enabled={str(self.zero is None).lower()} to resume "
            f"it, or delete {where if self.zero is not None else where.parent} to train the stage from epoch 0."
        )

    def _save_progress(self, next_epoch: int, metrics: EpochMetrics) -> None:
        if self.zero is not None:
            self.zero.save(self._zero_progress, next_epoch, dataclasses.asdict(metrics))  # every rank writes its partition
            return
        if not is_main_process():
            return  # every rank holds the same state; one writer
        atomic_save(
            {
                "kind": PROGRESS_KIND,
                "network": self.task.network.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": next_epoch,
                "metrics": dataclasses.asdict(metrics),  # the epoch just finished, for on_resume
                "world_size": self.world_size,
                "world_sizes": list(self.world_sizes),
            },
            self.progress_path,
        )

    def fit(self) -> int:
        """Train to the last epoch; returns the epoch it started from (> 0 when resumed)."""
        start_epoch, saved_metrics = self._resume()
        if start_epoch and self.on_resume is not None:
            self.on_resume(start_epoch, EpochMetrics(**saved_metrics) if saved_metrics is not None else None)
        if self.step == "fast":  # built after the resume: it adopts the restored momentum buffers
            self.fast_step = FastStep(self.task, self.optimizer, self.device, self.dtype)
        steps = len(self.loader)
        with self.progress.task(self.name, total=(self.optim.epochs - start_epoch) * steps) as advance:
            for epoch in range(start_epoch, self.optim.epochs):
                metrics = self._epoch(epoch, steps, advance)
                if self.world_size > 1:
                    for buffer in self.task.network.buffers():
                        broadcast_from_rank0(buffer)
                if not math.isfinite(metrics.loss):
                    raise TrainingDiverged(
                        f"stage {self.name}: the training loss is {metrics.loss} in epoch {epoch}; lower optim.lr "
                        "or check the data. The last good epoch's progress checkpoint is kept for inspection."
                    )
                self._save_progress(epoch + 1, metrics)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(metrics)
        if self.fast_step is not None:
            self.fast_step.close()
        return start_epoch

    def _epoch(self, epoch: int, steps: int, advance) -> EpochMetrics:
        self.loader.set_epoch(epoch)
        self.task.set_epoch(epoch)  # type: ignore[operator]
        self.model.train()
        totals = torch.zeros(3, device=self.device)  # loss sum, correct, samples
        if self.fast_step is not None:
            totals = self.fast_step.begin_epoch()  # the fast step accumulates into its own buffer
        started = time.perf_counter()
        for step, batch in enumerate(self.loader):
            lr = float(self.lrs[epoch * steps + step])
            if self.fast_step is not None:
                self.fast_step(batch, lr)
                advance(1)
                continue
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.zero is not None:
                self.zero.set_lr(lr)
            else:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                out = self.model(batch)
            loss = out["loss"]
            if self.zero is not None:
                self.zero.step(loss)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                count = out["target"].numel()
                correct = (out["logits"].argmax(dim=1) == out["target"]).sum()
                totals[:2] += torch.stack([loss.detach().float() * count, correct.float()])
                totals[2] += count  # a scalar kernel argument: no host-to-device copy per step
            advance(1)
        # Host sync: once per epoch. Summed over ranks first, so every rank reports (and checks for
        # divergence) the same global numbers.
        loss_sum, correct, samples = all_reduce_sum(totals.clone()).tolist()
        seconds = time.perf_counter() - started
        return EpochMetrics(
            epoch=epoch,
            loss=loss_sum / max(samples, 1),
            top1=100.0 * correct / max(samples, 1),
            lr=float(self.lrs[min((epoch + 1) * steps, len(self.lrs)) - 1]),
            images_per_second=samples / max(seconds, 1e-9),
            seconds=seconds,
        )


def saved_progress(progress_path: Path) -> set[str]:
    """Which trainers left progress for the stage whose plain progress file is ``progress_path``:
    ``"plain"`` (``progress.pt``) and / or ``"deepspeed"`` (``deepspeed-progress/progress.json``)."""
    kinds = set()
    if Path(progress_path).is_file():
        kinds.add("plain")
    if (Path(progress_path).parent / PROGRESS_DIR / POINTER).is_file():
        kinds.add("deepspeed")
    return kinds


def _distributed(task: nn.Module, trainable: list[nn.Parameter], device: torch.device) -> nn.Module:
    """``task`` under DistributedDataParallel, averaging the gradients of ``trainable`` only.

    DDP reduces every parameter that requires grad when it is built; a task's other parameters
    (a classifier head the stage does not train, say) would make it wait for gradients that never
    come. So they are marked frozen while DDP is built and restored after. ``static_graph``: the
    set of parameters a step uses never changes within a stage, which lets DDP skip searching the
    autograd graph for unused ones each step. Buffers are not broadcast every forward (MoCo's key
    queue would be sent each step); the trainer syncs them once per epoch instead.
    """
    from torch.nn.parallel import DistributedDataParallel

    chosen = {id(p) for p in trainable}
    others = [p for p in task.parameters() if p.requires_grad and id(p) not in chosen]
    for parameter in others:
        parameter.requires_grad_(False)
    # torch >= 2.13 names "no buffer sync in forward" forward_sync_buffers (and warns on the old
    # name); it still syncs them once at construction, which is what rank 0's broadcast does anyway.
    no_forward_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    try:
        return DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True, **no_forward_sync,
        )
    finally:
        for parameter in others:
            parameter.requires_grad_(True)

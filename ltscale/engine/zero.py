"""DeepSpeed ZeRO under the one training loop (``PipelineConfig.deepspeed``).

The trainer keeps its loop, schedule, autocast and metrics; DeepSpeed's engine takes over what
data parallelism does with the gradients and the optimiser state:

- ZeRO stage 0: DeepSpeed's own gradient all-reduce (the same update as DDP);
- stage 1: the SGD momentum buffers are partitioned over the ranks (each keeps 1/W);
- stage 2: the gradients are reduce-scattered as well, each rank reducing only its partition.

Stage 3 (parameters partitioned too) is refused: every stage here needs whole networks between
training steps (evaluation, soft labels, virtual examples, the next stage's frozen backbone), and
the networks of the papers (ResNet-32 / 50, ResNeXt-50) fit on one GPU many times over.

Precision stays the loop's: fp32 weights under ``torch.autocast`` (bf16 on a GPU under
``precision=auto``), so a ZeRO run computes what a DDP run computes. DeepSpeed's defaults that
would change the recipe are set explicitly (it clips gradients at 1.0 unless told otherwise).

Progress checkpoints: with ZeRO the optimiser state is spread over the ranks, so each rank writes
its part (``engine.save_checkpoint``) into ``<stage>/deepspeed-progress/epoch-NNNN/``; when all
ranks are done, rank 0 atomically rewrites ``deepspeed-progress/progress.json`` to name that
epoch and removes older ones. A crash mid-save leaves the pointer on the last complete epoch. A
resume needs the same number of ranks (the partitions are per rank) and says so otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ltscale.dist.gather import barrier, is_main_process, rank_and_world_size
from ltscale.dist.runtime import detect
from ltscale.engine.checkpoint import CheckpointError, atomic_write_json

POINTER = "progress.json"
PROGRESS_DIR = "deepspeed-progress"
"""Beside a stage's ``progress.pt``: each rank's ZeRO partitions per epoch and the ``POINTER`` file."""


@dataclass(frozen=True)
class DeepSpeedConfig:
    """``enabled``: train every stage under a DeepSpeed engine. ``zero_stage``: 0, 1 or 2 (above)."""

    enabled: bool = False
    zero_stage: int = 1

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            raise ValueError(
                "deepspeed.zero_stage=3 partitions the parameters themselves, but ltscale's stages need whole "
                "networks between steps (evaluation, soft labels, the next stage's backbone); use 0, 1 or 2"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def engine_config(per_rank_batch: int, zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one stage."""
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the recipes never clip
        "zero_optimization": {"stage": zero_stage},
        # ZeRO vets only DeepSpeed's own optimisers; torch's SGD with momentum is what the papers use.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},  # precision is the loop's autocast over fp32 weights
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device: torch.device):
    # DeepSpeed picks its accelerator once, at import; say which instead of letting it probe.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError(
            "deepspeed.enabled=true needs DeepSpeed, which is not installed: pip install 'ltscale[deepspeed]'"
        ) from None
    return deepspeed


class ZeroEngine:
    """A task under a DeepSpeed engine: the trainer's step calls :meth:`step`, its progress
    checkpoints :meth:`save` and :meth:`load`."""

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter],
                 per_rank_batch: int, config: DeepSpeedConfig, device: torch.device) -> None:
        deepspeed = _import_deepspeed(device)
        # DeepSpeed insists on LOCAL_RANK, which torchrun sets but a single process or a bare
        # srun step (SLURM_LOCALID) does not.
        os.environ.setdefault("LOCAL_RANK", str(detect().local_rank))
        if not dist.is_initialized():
            # DeepSpeed always talks through a process group; a single process gets one of its own,
            # rendezvousing through an in-process store: no port that another program could take.
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                rank=0, world_size=1, device_id=device if device.type == "cuda" else None,
            )
        self.config = config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=task, optimizer=optimizer, model_parameters=parameters,
            config=engine_config(per_rank_batch, config.zero_stage), dist_init_required=False,
        )

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine(batch)

    def train(self, mode: bool = True) -> "ZeroEngine":
        self.engine.train(mode)
        return self

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, loss: torch.Tensor) -> None:
        """Backward and update; the engine reduces (stage 0-1) or reduce-scatters (stage 2) the
        gradients and zeroes them after the step."""
        self.engine.backward(loss)
        self.engine.step()

    def save(self, directory: Path, next_epoch: int, metrics: dict | None = None) -> None:
        """Every rank writes its part for ``next_epoch``; the pointer moves once all are written.
        ``metrics``: the finished epoch's, kept in the pointer for :meth:`load`."""
        directory = Path(directory)
        tag = f"epoch-{next_epoch:04d}"
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"epoch": next_epoch}, save_latest=False)
        barrier()
        if is_main_process():
            _, world_size = rank_and_world_size()
            atomic_write_json({"kind": "ltscale.deepspeed_progress", "tag": tag, "epoch": next_epoch,
                               "world_size": world_size, "zero_stage": self.config.zero_stage, "metrics": metrics},
                              directory / POINTER)
            for old in directory.glob("epoch-*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, directory: Path) -> tuple[int, dict | None]:
        """Restore the last complete epoch's state from ``directory``; (the epoch to start from, 0
        when there is none; the metrics :meth:`save` was given, or None)."""
        pointer = Path(directory) / POINTER
        if not pointer.is_file():
            return 0, None
        try:
            state = json.loads(pointer.read_text())
            tag, epoch, saved_world, saved_stage = state["tag"], int(state["epoch"]), int(state["world_size"]), int(state["zero_stage"])
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{pointer} cannot be read ({type(error).__name__}: {error}); delete the stage directory to restart it") from None
        _, world_size = rank_and_world_size()
        if (saved_world, saved_stage) != (world_size, self.config.zero_stage):
            raise CheckpointError(
                f"{pointer}: the progress was saved by {saved_world} rank(s) under ZeRO stage {saved_stage}, this run has "
                f"{world_size} under stage {self.config.zero_stage}; ZeRO's optimiser partitions are per rank, so resume "
                "with the same layout (or delete the stage directory to restart the stage)"
            )
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{Path(directory) / tag}: DeepSpeed found no checkpoint there although {pointer} names it")
        return epoch, state.get("metrics")

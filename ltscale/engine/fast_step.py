"""The fast training step: channels_last, bf16 autocast, and the whole step as one CUDA graph.

ResNet-32 at the recipes' batch of 128 is launch-bound on an H100: eager PyTorch (8.6-10k img/s,
~14 ms a step) spends the step issuing hundreds of small kernels (forward, backward, optimiser)
rather than running them. Captured once as a CUDA graph, the whole step (forward, loss, backward,
SGD update, metric accumulation) replays with one launch; a whole-step graph of ResNet-32 was seen
at ~34k img/s on that machine (``../shared/ENVIRONMENT.md``; this module's own number comes from
``tools/bench/cifar_train.py``). What makes the step capturable:

- static input buffers: each batch is copied into the graph's own ``image`` / ``target`` /
  ``index`` tensors (``index`` addresses SSD's soft labels) before the replay;
- the learning rate is a device tensor that the step reads, filled in place each iteration, so
  the schedule changes per step without re-capture. ``torch.optim.SGD`` turns a tensor lr into a
  Python number (``.item()``, a host sync that capture forbids), so the update is written here
  with ``torch._foreach_*`` ops, step for step the same as SGD's multi-tensor path, on the SGD
  optimiser's own ``momentum_buffer`` state (progress checkpoints and resume are unchanged);
- gradients live in persistent tensors zeroed inside the step (backward accumulates into them);
- the per-step randomness of a task (SSD's rotation labels) is drawn outside the graph, from the
  task's own generator, by ``task.step_randomness(batch_size, device)`` and fed in as an input:
  draws from an unregistered generator cannot be captured, and drawing them outside keeps the
  sequence identical to the eager path's;
- Python-level state that a graph would bake in (LDAM-DRW switching to class weights at epoch
  160) is summarised by ``task.capture_key()``; a new key gets a new graph;
- a new batch shape (the partial last batch of an epoch) gets its own graph;
- a task whose step keeps Python-level state that changes every step (a queue pointer held as a
  Python int, say) cannot be replayed from a graph: it sets ``graph_capturable = False`` and the
  fast step runs it eagerly (still channels_last and autocast);
- each (shape, key) first runs ``WARMUP_STEPS`` real steps eagerly on a side stream (cuDNN
  algorithm choice, cuBLAS workspaces and lazy kernel loading happen there, not during capture);
  those steps are ordinary training steps, not extra ones, so the fast and eager paths take the
  same number of updates on the same batches.

On a CPU (or with ``graphs=False``) the same step runs eagerly, so tests can compare it with the
trainer's plain step on CPU; there it keeps the default memory layout (see ``layout``). Metrics (loss sum, correct count, samples) accumulate on the device.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn as nn

StepMode = Literal["auto", "eager", "fast"]
WARMUP_STEPS = 3


def resolve_step(step: str, device: torch.device, world_size: int = 1, zero: bool = False) -> str:
    """``auto`` -> ``fast`` on CUDA, ``eager`` elsewhere (bf16 convolutions and graphs do not pay on a CPU).

    A multi-process run takes the eager step: the captured graph would have to hold DDP's gradient
    all-reduce as well, which this step does not capture (yet). So does a DeepSpeed (``zero``) run.
    """
    if step not in ("auto", "eager", "fast"):
        raise ValueError(f"step must be 'auto', 'eager' or 'fast', got {step!r}")
    if zero:
        if step == "fast":
            raise ValueError(
                "step=fast (the step as one CUDA graph) and deepspeed.enabled cannot be combined: DeepSpeed's "
                "gradient reduction runs outside any graph. Use step=auto or step=eager with DeepSpeed."
            )
        return "eager"
    if world_size > 1:
        if step == "fast":
            raise ValueError(f"step=fast runs one process; this run has {world_size}: use step=auto or eager")
        return "eager"
    if step == "auto":
        return "fast" if device.type == "cuda" else "eager"
    return step


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning while warming up and capturing only: the chosen algorithms are baked into
    the graph, and the global flag is left as the caller set it."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]  # the static buffers each batch is copied into


@dataclass
class _Group:
    """One optimiser param group reduced to what the update needs."""

    params: list[nn.Parameter]
    grads: list[torch.Tensor]
    buffers: list[torch.Tensor]  # momentum buffers (empty without momentum)
    momentum: float
    weight_decay: float
    nesterov: bool


class FastStep:
    """Runs training steps of ``task`` with ``optimizer``'s parameters and hyper-parameters.

    ``optimizer`` is the trainer's ``torch.optim.SGD``: its param groups give momentum, weight
    decay and nesterov, and its state holds the momentum buffers, but its ``step()`` is not used.
    ``dtype``: the autocast dtype (None: fp32). ``graphs``: capture CUDA graphs (default: on CUDA).
    Call :meth:`begin_epoch` before an epoch's steps and read :attr:`totals` after them.
    """

    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        dtype: torch.dtype | None,
        graphs: bool | None = None,
        cudnn_benchmark: bool = True,
    ) -> None:
        self.task = task
        self.optimizer = optimizer
        self.device = device
        self.dtype = dtype
        if graphs is None:
            graphs = device.type == "cuda" and getattr(task, "graph_capturable", True)
        self.graphs = graphs
        if self.graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the step runs on {device}; use graphs=False")
        self.cudnn_benchmark = cudnn_benchmark and device.type == "cuda"
        for group in optimizer.param_groups:
            if group.get("dampening", 0) or group.get("maximize", False):
                raise ValueError("the fast step implements SGD without dampening or maximize; use step=eager")
        # Parameters keep their identity (``param.data`` is replaced), so the optimiser's state
        # and the trainer's checkpoints still refer to them.
        # channels_last only where it pays, on a GPU. On a CPU it buys nothing, and with one
        # intra-op thread torch 2.14's channels_last convolution weight gradient is measurably
        # inexact (ResNet-8 conv1: 4e-4 off an fp64 reference, ~2.5 % of the gradient, against
        # 1e-6 for the default layout or for two threads).
        self.layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        task.to(memory_format=self.layout)
        self.lr = torch.zeros((), device=device)
        self.totals = torch.zeros(3, device=device)  # loss sum, correct, samples
        self._groups: list[_Group] | None = None
        self._captured: dict[tuple, _Captured] = {}
        self._eager_steps: Counter[tuple] = Counter()
        self._side_stream = torch.cuda.Stream(device) if self.graphs else None

    def begin_epoch(self) -> torch.Tensor:
        """Zero the metric accumulators (in place: graphs hold their address) and return them."""
        self.totals.zero_()
        return self.totals

    def __call__(self, batch: dict[str, torch.Tensor], lr: float) -> None:
        """One training step on ``batch`` at learning rate ``lr``; no host synchronisation."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # what a progress checkpoint records, as in the eager path
        batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
        draw = getattr(self.task, "step_randomness", None)
        if draw is not None:
            batch.update(draw(batch["target"].shape[0], self.device))
        if not self.graphs:
            self.lr.fill_(lr)
            self._step(batch)
            return
        key = self._key(batch)
        captured = self._captured.get(key)
        if captured is None and self._eager_steps[key] < WARMUP_STEPS:
            self._eager_steps[key] += 1
            self._warmup_step(batch, lr)
            return
        if captured is None:
            captured = self._capture(key, batch)
        for name, static in captured.inputs.items():
            static.copy_(batch[name])
        self.lr.fill_(lr)
        captured.graph.replay()

    def close(self) -> None:
        """Release the graphs and their memory pools."""
        if self.graphs and self._captured:
            torch.cuda.synchronize(self.device)
        self._captured.clear()

    def _key(self, batch: dict[str, torch.Tensor]) -> tuple:
        capture_key = getattr(self.task, "capture_key", None)
        shapes = tuple((name, tuple(value.shape), value.dtype) for name, value in sorted(batch.items()))
        return (capture_key() if capture_key is not None else None, shapes)

    def _warmup_step(self, batch: dict[str, torch.Tensor], lr: float) -> None:
        assert self._side_stream is not None
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream), _cudnn_benchmark(self.cudnn_benchmark):
            self.lr.fill_(lr)
            self._step(batch)
        torch.cuda.current_stream(self.device).wait_stream(self._side_stream)

    def _capture(self, key: tuple, batch: dict[str, torch.Tensor]) -> _Captured:
        if any(old[0] != key[0] for old in self._captured):
            # Graphs of an earlier task state (LDAM before its DRW phase) will not run again.
            torch.cuda.synchronize(self.device)
            self._captured.clear()
        inputs = {name: torch.empty_like(value, memory_format=_memory_format(value, self.layout)) for name, value in batch.items()}
        for name, static in inputs.items():
            static.copy_(batch[name])
        graph = torch.cuda.CUDAGraph()
        with _cudnn_benchmark(self.cudnn_benchmark):
            # thread_local: a progress-bar or tracking thread must not invalidate the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step(inputs)
        captured = _Captured(graph, inputs)
        self._captured[key] = captured
        return captured

    def _step(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward, loss, backward, SGD update and metric accumulation: what a graph captures."""
        batch = {name: value.contiguous(memory_format=_memory_format(value, self.layout)) for name, value in batch.items()}
        first = self._groups is None
        if first:  # find out which parameters receive a gradient (SGD skips the others)
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        else:
            torch._foreach_zero_([grad for group in self._groups for grad in group.grads])  # type: ignore[union-attr]
        # No autocast weight cache: a graph must not hold casts made outside it.
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=False):
            out = self.task(batch)
        loss = out["loss"]
        loss.backward()
        if first:
            self._groups = self._build_groups()
        self._sgd_update()
        with torch.no_grad():
            count = out["target"].numel()
            self.totals[0] += loss.detach().float() * count
            self.totals[1] += (out["logits"].argmax(dim=1) == out["target"]).sum()
            self.totals[2] += count

    def _build_groups(self) -> list[_Group]:
        groups = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            buffers = []
            if group["momentum"]:
                for param in params:
                    state = self.optimizer.state[param]
                    # Zero buffers make the first update buf = grad, as SGD's first step does;
                    # a resumed buffer is copied into the parameter's layout (channels_last on a GPU).
                    buffer = torch.zeros_like(param)
                    if state.get("momentum_buffer") is not None:
                        buffer.copy_(state["momentum_buffer"])
                    state["momentum_buffer"] = buffer
                    buffers.append(buffer)
            groups.append(_Group(params, [p.grad for p in params], buffers, group["momentum"],  # type: ignore[misc]
                                 group["weight_decay"], group["nesterov"]))
        return groups

    @torch.no_grad()
    def _sgd_update(self) -> None:
        """``torch.optim.SGD`` (dampening 0), multi-tensor, with the lr read from ``self.lr``."""
        assert self._groups is not None
        for group in self._groups:
            if not group.params:
                continue
            grads = group.grads
            if group.weight_decay:
                grads = torch._foreach_add(grads, group.params, alpha=group.weight_decay)
            if group.momentum:
                torch._foreach_mul_(group.buffers, group.momentum)
                torch._foreach_add_(group.buffers, grads)
                grads = torch._foreach_add(grads, group.buffers, alpha=group.momentum) if group.nesterov else group.buffers
            torch._foreach_sub_(group.params, torch._foreach_mul(grads, self.lr))


def _memory_format(tensor: torch.Tensor, layout: torch.memory_format) -> torch.memory_format:
    """``layout`` for image batches (matching the converted convolution weights)."""
    if tensor.dim() == 4 and tensor.is_floating_point():
        return layout
    return torch.contiguous_format

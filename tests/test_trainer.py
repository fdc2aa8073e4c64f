"""The one training loop's bookkeeping: the lr each step trains with, the epoch handed to the
loader and the task (samplers reshuffle by it, DRW switches on by it), the progress bar's length,
and all three after a resume. The losses and updates themselves: test_fast_step.py, test_distributed.py."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltscale.engine.progress import Progress
from ltscale.engine.schedule import OptimConfig, lr_schedule
from ltscale.engine.trainer import Trainer

STEPS = 3
OPTIM = OptimConfig(epochs=4, batch_size=4, lr=0.3, warmup_epochs=2, milestones=(3,), decay_factors=(0.1,))


class RecordingLoader:
    """``STEPS`` fixed batches an epoch; records the epochs it is set to."""

    batch_size = 4

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [{"image": torch.randn(4, 6, generator=generator), "target": torch.tensor([0, 1, 2, 1])}
                        for _ in range(STEPS)]
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class RecordingTask(nn.Module):
    """A linear classifier that records the lr its optimizer holds at each step and its epochs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.network = nn.Linear(6, 3)
        self.optimizer: torch.optim.Optimizer | None = None
        self.lrs: list[float] = []
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def trainable_parameters(self):
        return list(self.network.parameters())

    def forward(self, batch):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        logits = self.network(batch["image"])
        return {"loss": F.cross_entropy(logits, batch["target"]), "logits": logits, "target": batch["target"]}


class CountingProgress(Progress):
    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.totals: list[int] = []
        self.advanced = 0

    @contextmanager
    def task(self, name, total, unit="it"):
        self.totals.append(total)

        def advance(n=1):
            self.advanced += n
        yield advance


class Stop(Exception):
    pass


def _fit(progress_path: Path, optim: OptimConfig, stop_after: int | None = None):
    task, loader, progress = RecordingTask(), RecordingLoader(), CountingProgress()
    ended = []

    def on_epoch_end(metrics):  # called after the epoch's progress is saved, as a kill there would find it
        ended.append(metrics)
        if len(ended) == stop_after:
            raise Stop
    trainer = Trainer(task, loader, optim, torch.device("cpu"), "fp32", progress_path, "toy", progress=progress,
                      on_epoch_end=on_epoch_end, step="eager")
    task.optimizer = trainer.optimizer
    start = trainer.fit()
    return start, task, loader, progress


def test_each_step_trains_at_its_own_point_of_the_schedule(tmp_path):
    start, task, loader, progress = _fit(tmp_path / "progress.pt", OPTIM)
    expected = lr_schedule(OPTIM, STEPS)
    assert start == 0 and len(expected) == OPTIM.epochs * STEPS
    # Per step, not per epoch: the warm-up rises within an epoch and epochs differ.
    assert len(set(expected[:STEPS])) == STEPS and expected[STEPS] != expected[0]
    np.testing.assert_allclose(task.lrs, expected, rtol=0, atol=0)
    assert loader.epochs == task.epochs == [0, 1, 2, 3]  # samplers reshuffle by it, DRW switches by it
    assert progress.totals == [OPTIM.epochs * STEPS] and progress.advanced == OPTIM.epochs * STEPS


def test_a_resumed_stage_continues_the_schedule_and_the_epochs_where_it_stopped(tmp_path):
    path = tmp_path / "progress.pt"
    with pytest.raises(Stop):
        _fit(path, OPTIM, stop_after=2)
    start, task, loader, progress = _fit(path, OPTIM)
    assert start == 2
    np.testing.assert_allclose(task.lrs, lr_schedule(OPTIM, STEPS)[2 * STEPS:], rtol=0, atol=0)
    assert loader.epochs == task.epochs == [2, 3]
    assert progress.totals == [2 * STEPS] and progress.advanced == 2 * STEPS  # the bar counts what is left


def test_epoch_lines_go_to_logs_but_not_over_the_bars_of_a_terminal():
    """On a terminal the bar already shows an epoch's progress: printing each epoch's line there
    would push the bars down the screen. Milestones (a stage started, finished) print in both."""
    import io

    from rich.console import Console

    screen = io.StringIO()
    terminal = Progress(console=Console(file=screen, force_terminal=True, width=120))
    assert terminal.enabled and not terminal.lines
    terminal.note("teacher: epoch 3/200", epoch=True)
    terminal.note("teacher: done")
    assert "teacher: done" in screen.getvalue() and "epoch 3/200" not in screen.getvalue()

    log = io.StringIO()
    pipe = Progress(console=Console(file=io.StringIO(), force_terminal=False), stream=log)
    assert pipe.lines and not pipe.enabled
    pipe.note("teacher: epoch 3/200", epoch=True)
    pipe.note("teacher: done")
    lines = log.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["teacher: epoch 3/200", "teacher: done"]  # after the timestamp

    silent = io.StringIO()
    off = Progress(enabled=False, console=Console(file=io.StringIO(), force_terminal=False), stream=silent)
    off.note("teacher: epoch 3/200", epoch=True)
    off.note("teacher: done")
    assert silent.getvalue() == ""


def test_a_log_file_gets_epoch_lines_whatever_the_environment_says(tmp_path, monkeypatch):
    """sbatch passes the submitter's environment on: FORCE_COLOR / TTY_COMPATIBLE made rich take a
    job's stderr log for a terminal, which then got bar redraws and no epoch lines. Only a real tty
    gets bars; progress=false silences either."""
    import os

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.setenv(name, "1")
    with open(tmp_path / "job.err", "w") as log:
        monkeypatch.setattr("sys.stderr", log)
        progress = Progress()
        assert progress.lines and not progress.enabled
        progress.note("teacher: epoch 3/200", epoch=True)
        assert not Progress(enabled=False).lines
    assert (tmp_path / "job.err").read_text().split(" ", 2)[2] == "teacher: epoch 3/200\n"

    leader, follower = os.openpty()
    with open(leader, "rb", buffering=0), open(follower, "w") as tty:
        monkeypatch.setattr("sys.stderr", tty)
        assert Progress().enabled and not Progress().lines
        off = Progress(enabled=False)
        assert not off.enabled and not off.lines
        monkeypatch.setenv("TTY_COMPATIBLE", "0")  # a terminal that asks for no bars still gets lines
        assert Progress().lines

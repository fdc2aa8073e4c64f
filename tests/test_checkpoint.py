"""The checkpoint primitives on their own: a write that fails leaves the old file and no
temporary; a written file gets the mode the umask gives; a loaded checkpoint missing a key, or a
state with keys the model lacks (or lacks keys the model has), is refused by name. (Kills and
resumes end to end: test_pipeline.py.)"""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
import torch.nn as nn

from ltscale.engine import checkpoint
from ltscale.engine.checkpoint import CheckpointError, atomic_save, atomic_write_json, load_checkpoint, load_state_strict


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"kind": "k", "value": 1}, path)
    with pytest.raises(RuntimeError, match="cannot be saved"):
        atomic_save({"kind": "k", "value": Unpicklable()}, path)
    assert load_checkpoint(path, kind="k")["value"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


class _InterruptedStream:
    """A file that is interrupted (Ctrl-C, or SIGTERM's SystemExit) on its ``after``-th write, as a
    signal arriving inside torch.save would be."""

    def __init__(self, stream, after: int, interrupt: type[BaseException]) -> None:
        self.stream, self.writes, self.after, self.interrupt = stream, 0, after, interrupt

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == self.after:
            raise self.interrupt(143) if self.interrupt is SystemExit else self.interrupt()
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_torch_save_stays_an_interrupt(tmp_path, interrupt):
    """Interrupted mid-record, torch's zip writer fails in its cleanup ("unexpected pos"); that
    error must not stand for the interrupt (the CLI's exit 130 / 143 and a KILLED run)."""
    path = tmp_path / "progress.pt"
    atomic_save({"epoch": 1}, path)
    payload = {"a": torch.randn(1000), "b": torch.randn(1000)}
    with pytest.raises(interrupt) as caught:
        checkpoint._atomic_write(path, lambda stream: torch.save(payload, _InterruptedStream(stream, 3, interrupt)))
    assert caught.value.__suppress_context__  # the zip writer's error is not shown as the story
    assert torch.load(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.pt"]
    # Other errors propagate as they are.
    with pytest.raises(OSError, match="disk full"):
        checkpoint._atomic_write(path, lambda stream: (_ for _ in ()).throw(OSError("disk full")))


@pytest.mark.parametrize("proc", [True, False])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, monkeypatch, proc):
    """As torch.save's: mkstemp's 0600 made every model and manifest of a shared store readable by
    its writer alone."""
    if not proc:  # no /proc/self/status (macOS, Linux before 4.7): the umask is read by setting it
        real_open = open

        def no_proc(file, *args, **kwargs):
            if str(file).startswith("/proc/"):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "open", no_proc, raising=False)
    previous = os.umask(0o022)
    try:
        for mask in (0o022, 0o027):
            os.umask(mask)
            directory = tmp_path / f"{mask:o}"
            atomic_save({"kind": "k"}, directory / "model.pt")
            atomic_write_json({"kind": "k"}, directory / "manifest.json")
            torch.save({"kind": "k"}, directory / "plain.pt")
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()}
            assert modes == dict.fromkeys(["model.pt", "manifest.json", "plain.pt"], 0o666 & ~mask)
            assert os.umask(mask) == mask  # read, and left as it was
    finally:
        os.umask(previous)


def test_a_checkpoint_without_a_required_key_is_refused_by_name(tmp_path):
    path = tmp_path / "progress.pt"
    atomic_save({"kind": "k", "network": {}}, path)
    with pytest.raises(CheckpointError, match=r"lacks the keys \['epoch'\]"):
        load_checkpoint(path, kind="k", required=("network", "epoch"))


def test_a_state_that_does_not_match_the_model_is_refused_with_its_keys():
    model = nn.Linear(2, 2)
    state = model.state_dict()
    with pytest.raises(CheckpointError, match=r"model\.pt does not match the model: unexpected keys \['extra'\]"):
        load_state_strict(model, {**state, "extra": torch.zeros(1)}, "model.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\]"):
        load_state_strict(model, {"weight": state["weight"]}, "model.pt")


def test_a_checkpoint_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"kind": "ltscale.model", "state": {}}, path)
    with pytest.raises(CheckpointError, match=r"is of kind 'ltscale\.model', expected 'ltscale\.soft_labels'"):
        load_checkpoint(path, kind="ltscale.soft_labels")

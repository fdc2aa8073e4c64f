"""Atomic checkpoint writes and strict loads.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the target, so a crash mid-write never leaves a truncated file under the final name. Loads
are strict: a missing or unexpected key is an error naming the file and the keys, never silently
filtered.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and what was expected."""


_TEMPORARY_SUFFIX = ".tmp"
"""_atomic_write's temporary is ``.<name>.<random><suffix>`` beside its target."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX)
    try:
        _give_default_mode(handle)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        interrupt = None if isinstance(error, (KeyboardInterrupt, SystemExit)) else _interrupt_behind(error)
        if interrupt is not None:
            # Ctrl-C or SIGTERM (SystemExit) inside torch.save: its zip writer's cleanup then fails
            # ("unexpected pos"), and that error would stand for the interrupt: exit 1 and a FAILED
            # run instead of 130 / 143 and KILLED.
            raise interrupt from None
        raise


def _interrupt_behind(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit that ``error`` was raised while handling, if any."""
    seen = set()
    cause: BaseException | None = error.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def _give_default_mode(descriptor: int) -> None:
    """Give the file open as ``descriptor`` the mode ``open`` would have (0666 less the umask).
    mkstemp makes 0600 whatever the umask, which the rename keeps: on a shared store nobody but
    the writer could read the models and manifests that torch.save alone leaves readable."""
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())
    except OSError:  # (a file system without modes, such as SMB or FAT: its mount decides them)
        pass


def _umask() -> int:
    """This process's umask, from /proc where shown (Linux 4.7 on): os.umask only reads it by setting
    it, for a moment in which every thread's new files get the mode set."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # the narrowest for that moment: another thread's file is never left wider open
    os.umask(mask)
    return mask


def remove_interrupted_writes(directory: Path) -> list[Path]:
    """Delete, under ``directory``, the temporary files of atomic writes whose process was killed
    mid-write (one that raises removes its own); returns them. Each could be as large as the file it
    was replacing (6.6 GiB of soft labels) and nothing else ever removes it. Only for a directory no
    live process writes into: a stage's, under its lock."""
    removed = []
    for path in Path(directory).rglob(f".*{_TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``. It writes straight into the
    temporary file: serialising into memory first would hold a second copy of a large payload
    (iNat18's soft labels: 6.6 GiB)."""
    _atomic_write(Path(path), lambda stream: torch.save(obj, stream))


def atomic_write_json(obj: Any, path: Path) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    _atomic_write(Path(path), lambda stream: stream.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    data = text.encode()
    _atomic_write(Path(path), lambda stream: stream.write(data))


PROGRESS_KIND = "ltscale.progress"
"""``kind`` of a training stage's ``progress.pt`` (the trainer's resumable state)."""


def load_checkpoint(path: Path, kind: str | None = None, required: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """Load a checkpoint dict; ``kind`` and ``required`` keys are checked with clear errors.

    ``mmap``: the tensors are mapped from the file rather than read into private memory, so the
    processes of a node that load one large file share its pages.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(f"checkpoint {path} is a directory, not a file"
                              + (f"; it holds {', '.join(inside[:5])}" if inside else ""))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as stream:
        zip_file = stream.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for truncated/corrupt zips
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        if kind == PROGRESS_KIND:  # a stage's own file, not one the user passed: say how to go on
            raise CheckpointError(
                f"the progress checkpoint {path} cannot be read ({reason}): delete it and run again; that stage then "
                "trains from its first epoch (finished stages are kept)") from None
        if not zip_file:  # not a torch checkpoint at all: say so, and do not suggest deleting it
            # (torch's own message then talks about weights_only, which is beside the point)
            raise CheckpointError(f"{path} is not a torch checkpoint (it does not start as a torch.save file does); pass "
                                  "a model.pt of a stage directory (<output_dir>/store/<stage>-<key>/model.pt)") from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({reason}). It is damaged; if it is in a stage directory, delete it "
            "and re-run the stage that produced it."
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} is of kind {payload.get('kind')!r}, expected {kind!r}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the keys {missing} (has {sorted(payload)})")
    return payload


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the mismatched keys."""
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:8]}{' ...' if len(result.missing_keys) > 8 else ''}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {result.unexpected_keys[:8]}{' ...' if len(result.unexpected_keys) > 8 else ''}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model: {'; '.join(problems)}")


def file_checksum(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (stage outputs, pretrained weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

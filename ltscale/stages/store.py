"""Where stage outputs live, keyed by what produced them.

An output directory is ``<output_dir>/store/<kind>-<key>/`` where ``key`` hashes the stage
config, the keys of the outputs it consumed, the training data's fingerprint, the seed and the
precision. Identical stages in different pipelines therefore share one output (the LWS baseline
reuses the CE baseline's teacher). ``manifest.json`` is written last and atomically: an output
without a manifest is unfinished and never trusted; its ``progress.pt`` lets the stage resume.

The manifest holds each file's sha256 and its size and modification time. Reusing an output
compares the size and time; only a file whose size or time changed is hashed again (and, if it
still matches, its new size and time are remembered in ``verified.json``). Hashing every reuse
cost every pipeline of a sweep ~10-25 s per iNat18 soft-label file (6.6 GiB) while the other
ranks waited. An edit that keeps both a file's size and its time to the nanosecond goes unseen.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltscale.engine.checkpoint import atomic_write_json, file_checksum

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress.pt"
VERIFIED = "verified.json"


def _stat(path: Path) -> list[int]:
    """What tells a file changed without reading it: [size, modification time in ns]."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


@dataclass
class StageOutput:
    """A finished stage output: its directory and manifest."""

    name: str
    kind: str
    key: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id", "")

    def file(self, role: str) -> Path:
        files = self.manifest.get("files", {})
        if role not in files:
            raise KeyError(f"stage output {self.directory} has no {role!r} file (it has {sorted(files)})")
        return self.directory / files[role]


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "store"

    def directory(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def finished(self, name: str, kind: str, key: str, warn: bool = True) -> StageOutput | None:
        """The output if it is complete and every file it lists exists, else None. ``warn``: say
        why a damaged output is recomputed (off for a second look that would say it again)."""
        directory = self.directory(kind, key)
        path = directory / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = read_manifest(path)
        except ManifestError as error:
            if warn:
                log.warning("stage output %s: %s; recomputing", directory, error)
            return None  # recompute rather than trust it
        if manifest.get("key") != key:
            return None
        recorded = manifest["checksums"]
        known = {**manifest.get("stats", {}), **_read_verified(directory)}
        rehashed = {}
        for role, filename in manifest["files"].items():
            problem, stat = _check_file(directory / filename, recorded.get(role), known.get(role))
            if problem:
                # Recompute instead of handing a corrupt checkpoint to the next stage.
                if warn:
                    log.warning("stage output %s: %s %s; recomputing", directory, filename, problem)
                return None
            if stat is not None:
                rehashed[role] = stat  # touched or copied, same bytes
        if rehashed:
            try:
                atomic_write_json({**_read_verified(directory), **rehashed}, directory / VERIFIED)
            except OSError:  # a read-only store is still usable; it is only hashed again next time
                pass
        return StageOutput(name, kind, key, directory, manifest)

    def verify(self) -> list[tuple[Path, str]]:
        """Every stage directory and what a full check of it finds: ``ok``, ``unfinished`` (no
        manifest: a stage that will resume or restart), or the files that are missing or whose
        bytes no longer match their sha256. Reads every byte; reuse does not (see the module doc)."""
        found = []
        for directory in sorted(p for p in self.root.glob("*-*") if p.is_dir()):
            if not (directory / MANIFEST).exists():
                found.append((directory, "unfinished"))
                continue
            try:
                manifest = read_manifest(directory / MANIFEST)
            except ManifestError as error:
                found.append((directory, f"unreadable manifest ({error})"))
                continue
            checks = {filename: _check_file(directory / filename, manifest["checksums"][role])[0]
                      for role, filename in manifest["files"].items()}
            found.append((directory, "; ".join(f"{name} {problem}" for name, problem in checks.items() if problem) or "ok"))
        return found

    def finish(self, name: str, kind: str, key: str, manifest: dict[str, Any]) -> StageOutput:
        directory = self.directory(kind, key)
        files = manifest.get("files", {})
        stats = {role: _stat(directory / f) for role, f in files.items()}
        checksums = {role: file_checksum(directory / f) for role, f in files.items()}
        (directory / VERIFIED).unlink(missing_ok=True)  # an earlier output's, in a directory being reused
        manifest = {**manifest, "key": key, "kind": kind, "checksums": checksums, "stats": stats,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(manifest, directory / MANIFEST)
        return StageOutput(name, kind, key, directory, manifest)


class ManifestError(ValueError):
    """A ``manifest.json`` that cannot be read or does not have a manifest's shape."""


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, checked to have the shape ``Store.finish`` writes: ``files`` and
    ``checksums`` map the same roles to file names and sha256 strings, ``stats`` (if present) maps
    roles to [size, mtime]. Anything else (a truncated or hand-edited file) is a ``ManifestError``."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path.name} is not readable JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path.name} holds a {type(manifest).__name__}, not an object")
    files, checksums, stats = manifest.get("files"), manifest.get("checksums"), manifest.get("stats", {})
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in files.items())):
        raise ManifestError(f"{path.name}: 'files' is not a mapping of roles to file names")
    if not (isinstance(checksums, dict) and set(checksums) == set(files) and all(isinstance(v, str) for v in checksums.values())):
        raise ManifestError(f"{path.name}: 'checksums' does not give a sha256 for each of the files {sorted(files)}")
    if not (isinstance(stats, dict) and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
                                            for v in stats.values())):
        raise ManifestError(f"{path.name}: 'stats' is not a mapping of roles to [size, modification time]")
    if not isinstance(manifest.get("key", ""), str):
        raise ManifestError(f"{path.name}: 'key' is not a string")
    return manifest


def _check_file(path: Path, checksum: str | None, known_stat: list[int] | None = None) -> tuple[str | None, list[int] | None]:
    """``(problem, stat)``: ``problem`` is None when the file is there with its recorded bytes,
    which are not read when its size and time equal ``known_stat``; ``stat`` is returned when the
    file was hashed and matched (to remember), else None."""
    if not path.is_file():
        return "is missing", None
    stat = _stat(path)
    if known_stat == stat:
        return None, None
    if checksum != file_checksum(path):
        return "does not match its checksum", None
    return None, stat


def _read_verified(directory: Path) -> dict[str, list[int]]:
    try:
        verified = json.loads((directory / VERIFIED).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return verified if isinstance(verified, dict) else {}

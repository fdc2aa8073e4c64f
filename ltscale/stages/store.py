"""Where stage outputs live, keyed by what produced them.

An output directory is ``<output_dir>/store/<kind>-<key>/`` where ``key`` hashes the stage
config, the keys of the outputs it consumed, the training data's fingerprint, the seed and the
precision. Identical stages in different pipelines therefore share one output (the LWS baseline
reuses the CE baseline's teacher). ``manifest.json`` is written last and atomically: an output
without a manifest is unfinished and never trusted; its ``progress.pt`` lets the stage resume.
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

    def finished(self, name: str, kind: str, key: str) -> StageOutput | None:
        """The output if it is complete and every file it lists exists, else None."""
        directory = self.directory(kind, key)
        path = directory / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable manifest: recompute rather than trust it
        if manifest.get("key") != key:
            return None
        recorded = manifest.get("checksums", {})
        for role, filename in manifest.get("files", {}).items():
            path = directory / filename
            if not path.is_file() or recorded.get(role) != file_checksum(path):
                # A file changed or vanished after the stage finished: recompute instead of
                # handing a corrupt checkpoint to the next stage.
                log.warning("stage output %s: %s is missing or does not match its checksum; recomputing", directory, filename)
                return None
        return StageOutput(name, kind, key, directory, manifest)

    def finish(self, name: str, kind: str, key: str, manifest: dict[str, Any]) -> StageOutput:
        directory = self.directory(kind, key)
        checksums = {role: file_checksum(directory / f) for role, f in manifest.get("files", {}).items()}
        manifest = {**manifest, "key": key, "kind": kind, "checksums": checksums, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(manifest, directory / MANIFEST)
        return StageOutput(name, kind, key, directory, manifest)

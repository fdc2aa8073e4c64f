"""Which code produced a result: the git commit of the ltscale checkout, or the package version."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

_GIT_TIMEOUT_S = 10.0


def _git(source_dir: Path, *args: str) -> str | None:
    """stdout of ``git -C source_dir args``, or None if git is missing or the command fails."""
    try:
        result = subprocess.run(
            ["git", "-C", str(source_dir), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _git_version(source_dir: Path, marker: Path) -> str | None:
    """``<commit>`` or ``<commit>-dirty`` when ``marker`` is a tracked file of a git checkout."""
    # An installed copy can sit inside some unrelated repository (a venv under a project dir):
    # only trust git if it actually tracks this very file.
    if _git(source_dir, "ls-files", "--error-unmatch", str(marker)) is None:
        return None
    commit = _git(source_dir, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(source_dir, "status", "--porcelain")
    if status is None:
        return None
    # Untracked (not ignored) files count as dirty: a new module changes what runs.
    return f"{commit}-dirty" if status else commit


def code_version(source_dir: Path | None = None) -> str:
    """The git commit (``-dirty`` if the tree has changes) of the ltscale source checkout.

    Falls back to the installed ``ltscale`` package version, then to ``"unknown"``; never raises.
    ``source_dir`` (a directory inside a checkout) is for tests; by default the checkout holding
    this file is used.
    """
    try:
        if source_dir is None:
            marker = Path(__file__).resolve()
            source_dir = marker.parent
        else:
            source_dir = Path(source_dir).resolve()
            marker = source_dir
        version = _git_version(source_dir, marker)
        if version:
            return version
    except Exception:  # noqa: BLE001 - provenance must never break a run
        pass
    try:
        return importlib.metadata.version("ltscale")
    except Exception:  # noqa: BLE001
        return "unknown"

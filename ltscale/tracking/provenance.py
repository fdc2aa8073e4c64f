"""Which code produced a result: the git commit of the ltscale checkout, or the package version."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import subprocess
from pathlib import Path

_GIT_TIMEOUT_S = 10.0
logger = logging.getLogger(__name__)

# Checkouts git refused to read because another user owns them (a container running as root on a
# bind-mounted tree, a group-shared clone): their version is not the installed package's.
_REFUSED: dict[str, str] = {}


def _git(source_dir: Path | str, *args: str, ok_codes: tuple[int, ...] = (0,), strip: bool = True) -> str | None:
    """stdout of ``git -C source_dir args``, or None if git is missing or exits outside ``ok_codes``
    (a refusal over the checkout's ownership is remembered in ``_REFUSED``)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(source_dir), *args],
            capture_output=True,
            text=True,
            errors="replace",  # a non-UTF-8 file in a patch must not lose the rest of it
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode not in ok_codes:
        if "dubious ownership" in result.stderr:
            _REFUSED[str(source_dir)] = result.stderr.strip().splitlines()[0]
        return None
    return result.stdout.strip() if strip else result.stdout


def _git_version(source_dir: Path, marker: Path) -> str | None:
    """``<commit>`` or ``<commit>-dirty`` when ``marker`` is a tracked file of a git checkout."""
    # An installed copy can sit inside some unrelated repository (a venv under a project dir):
    # only trust git if it actually tracks this very file.
    if _git(source_dir, "ls-files", "--error-unmatch", str(marker)) is None:
        return None
    commit = _git(source_dir, "rev-parse", "HEAD")
    root = _git(source_dir, "rev-parse", "--show-toplevel")
    if not commit or not root:
        return None
    # Only code counts, as in a CODE_VERSION_FILE's digest: a table or log a reproduction writes
    # into the checkout (results/, RESULTS.md) does not make the jobs after it "-dirty". Untracked
    # (not ignored) code does: a new module changes what runs.
    changed = _git(root, "diff", "HEAD", "--name-only", "-z", strip=False)
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z", strip=False)
    if changed is None or untracked is None:
        return None
    names = filter(None, (changed + untracked).split("\0"))
    return f"{commit}-dirty" if any(map(_is_code, names)) else commit


# A run from a dirty tree records what differed from its commit; past this size (a checkpoint
# committed by mistake, a generated file) the patch is cut and says so rather than bloat the store.
MAX_PATCH_BYTES = 4 << 20


def _source(source_dir: Path | None) -> tuple[Path, Path]:
    """(directory to run git in, file whose tracking proves it is ltscale's own checkout)."""
    if source_dir is None:
        marker = Path(__file__).resolve()
        return marker.parent, marker
    source_dir = Path(source_dir).resolve()
    return source_dir, source_dir


def uncommitted_changes(source_dir: Path | None = None, max_bytes: int = MAX_PATCH_BYTES) -> str | None:
    """The patch from the checkout's commit to its working tree, new (untracked, not ignored) files
    included, so a ``-dirty`` code version can be reproduced; None when the version is not dirty
    (changes outside the code alone do not make it so), for an installed package or when git
    fails. Cut at ``max_bytes`` with a line saying so. Never raises."""
    try:
        directory, marker = _source(source_dir)
        version = _git_version(directory, marker)
        if version is None or not version.endswith("-dirty"):
            return None
        root = _git(directory, "rev-parse", "--show-toplevel")
        if not root:
            return None
        parts = [_git(root, "diff", "HEAD", "--binary", strip=False) or ""]
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z", strip=False) or ""
        for name in filter(None, untracked.split("\0")):
            # --no-index exits 1 when the files differ, which they always do against /dev/null.
            parts.append(_git(root, "diff", "--binary", "--no-index", "--", "/dev/null", name, ok_codes=(0, 1), strip=False) or "")
        patch = "".join(parts)
        data = patch.encode("utf-8", errors="replace")
        if len(data) > max_bytes:
            cut = data[:max_bytes].decode("utf-8", errors="ignore")
            return f"{cut}\n# ltscale: patch cut at {max_bytes} of {len(data)} bytes\n"
        return patch
    except Exception:  # noqa: BLE001 - provenance must never break a run
        return None


CODE_VERSION_FILE = ".code-version"
"""Ignored by git; carried with a copy of the tree that has no .git, it names the code's commit."""

STALE_SUFFIX = "-stale"
"""Marks a version read from a ``CODE_VERSION_FILE`` whose files have changed since it was written."""

_DIGEST_PREFIX = "sha256 "


def _tree_digest(top: Path, names: list[str]) -> str | None:
    """sha256 over the named files' paths and contents; None if one is missing or unreadable."""
    digest = hashlib.sha256()
    for name in sorted(names):
        try:
            content = (top / name).read_bytes()
        except OSError:
            return None
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def _is_code(name: str) -> bool:
    """Whether a file (its path from the checkout's top) is code, whose changes make a version
    ``-dirty`` or ``-stale``. Recipes are Python; docs, results and data are not code."""
    return name.endswith(".py") or name == "pyproject.toml"


def code_version_record(source_dir: Path | None = None) -> str:
    """What ``CODE_VERSION_FILE`` holds: the code version, then a digest of the code a copy of the
    tree carries (its Python files and pyproject.toml, tracked or untracked but not ignored) and
    their names, so that a copy whose code changed after the record was written is not credited to
    that commit. Results and docs the tools rewrite in the copy do not count. Without git, the
    version line alone."""
    version = code_version(source_dir)
    directory, marker = _source(source_dir)
    root = _git(directory, "rev-parse", "--show-toplevel") if _git_version(directory, marker) else None
    listing = _git(root, "ls-files", "--cached", "--others", "--exclude-standard", "-z", strip=False) if root else None
    if not listing:
        return version + "\n"
    names = sorted({n for n in listing.split("\0") if _is_code(n) and (Path(root) / n).is_file()})
    digest = _tree_digest(Path(root), names)
    if digest is None:
        return version + "\n"
    if version.endswith("-dirty"):
        # The copy has no git to record the patch from: the digest at least tells dirty states apart.
        version += "+" + digest[:12]
    return "\n".join([version, f"# {len(names)} files; where git is absent a changed digest marks the version {STALE_SUFFIX}",
                       _DIGEST_PREFIX + digest, *map(_name_line, names)]) + "\n"


def _name_line(name: str) -> str:
    """A file name as one line of the record: JSON-quoted when it would not read back as itself
    (a line break inside it, surrounding blanks, a leading quote), as is otherwise."""
    return json.dumps(name) if name.splitlines() != [name] or name != name.strip() or name.startswith('"') else name


def _line_name(line: str) -> str:
    return json.loads(line) if line.startswith('"') else line


def _recorded_version(top: Path) -> str | None:
    """The version in ``top/CODE_VERSION_FILE``, with ``STALE_SUFFIX`` when its files changed since."""
    lines = (top / CODE_VERSION_FILE).read_text().splitlines()
    if not lines or not lines[0].strip():
        return None
    version = lines[0].strip()
    at = next((i for i, line in enumerate(lines) if line.startswith(_DIGEST_PREFIX)), None)
    if at is None:  # a record of the version alone: nothing to check it against
        return version
    recorded = lines[at][len(_DIGEST_PREFIX):].strip()
    names = [_line_name(line) for line in lines[at + 1:] if line]
    # A file added to the copy after the record is not seen, but code only runs once something
    # listed (an import, a recipe registry) changes to use it.
    return version if _tree_digest(top, names) == recorded else version + STALE_SUFFIX


def code_version(source_dir: Path | None = None) -> str:
    """The git commit (``-dirty`` if its code has uncommitted changes) of the ltscale source checkout.

    Without git (a copy of the tree, as a lent GPU machine gets), the version recorded in
    ``CODE_VERSION_FILE`` at the tree's top, written where git was (``python -m
    ltscale.tracking.provenance > .code-version``), with ``-stale`` appended when the files it
    lists no longer have the contents they had then; then, for a checkout git refuses to read
    (owned by another user), ``"unknown"`` with a warning; then the installed ``ltscale`` package
    version, then ``"unknown"``. Never raises. ``source_dir`` (a directory inside a checkout) is
    for tests; by default the checkout holding this file is used.
    """
    try:
        version = _git_version(*_source(source_dir))
        if version:
            return version
    except Exception:  # noqa: BLE001 - provenance must never break a run
        pass
    try:
        top = Path(source_dir).resolve() if source_dir is not None else Path(__file__).resolve().parents[2]
        recorded = _recorded_version(top)
        if recorded:
            return recorded
    except Exception:  # noqa: BLE001
        pass
    directory = str(_source(source_dir)[0])
    if directory in _REFUSED:
        # Git could not say which commit this is: "unknown" rather than the package version, which
        # would credit any checkout's code to a release. Not -c safe.directory: the refusal guards
        # against running another user's git config and hooks.
        logger.warning("the code version is recorded as unknown: git refuses to read the checkout at %s (%s); "
                       "if it is yours to trust, `git config --global --add safe.directory <its top>`",
                       directory, _REFUSED[directory])
        return "unknown"
    try:
        return importlib.metadata.version("ltscale")
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":  # python -m ltscale.tracking.provenance > .code-version
    print(code_version_record(), end="")

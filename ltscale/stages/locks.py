"""One producer per stage output, across pipelines that share a store.

Identical stages in different pipelines share one output directory (the LWS baseline reuses the
CE baseline's teacher). When such pipelines run at the same time (a sweep submitted to a cluster,
two terminals on a laptop), both would train that stage into the same directory, overwriting each
other's progress checkpoints. Instead the first takes ``<stage dir>/.lock`` and the others wait for
its manifest, then reuse the output.

The lock file is created exclusively (``O_CREAT | O_EXCL``, atomic on local file systems and NFS)
and holds its owner (:mod:`ltscale.tracking.attempts`: machine, PID, SLURM job). Its holder
refreshes the file's modification time every ``HEARTBEAT_S`` seconds. A lock is taken over when its
owner is certainly gone (an exited process of this machine, an earlier attempt of this SLURM job)
or, for owners elsewhere, when its heartbeat is older than ``STALE_S`` (a killed job, a lost node).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from ltscale.tracking.attempts import Attempt

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # 20 missed heartbeats: a live holder on a loaded file server is not taken over


class StageLock:
    """The right to produce the output in ``directory``; :meth:`try_acquire` makes one."""

    def __init__(self, path: Path, token: str, heartbeat_s: float) -> None:
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="ltscale-stage-lock", daemon=True)
        self._thread.start()

    @classmethod
    def try_acquire(cls, directory: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> StageLock | None:
        """The lock if this process now holds it; None while a live owner holds it (see :func:`holder`)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK
        token = uuid.uuid4().hex
        owner = {"token": token, "since": time.time(), **Attempt.current().tags()}
        for _ in range(2):  # a second try after taking over a dead owner's lock
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = _read(path)
                reason = _gone(path, current, stale_s)
                if reason is None:
                    return None
                # Move that exact file aside (if it is still the one judged dead), then race for a new one.
                if _read(path) == current:
                    log.warning("taking over %s: %s", path, reason)
                    try:
                        os.replace(path, path.with_name(f"{LOCK}.stale-{token}"))
                        path.with_name(f"{LOCK}.stale-{token}").unlink(missing_ok=True)
                    except FileNotFoundError:
                        pass
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(owner, handle)
            return cls(path, token, heartbeat_s)
        return None

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                os.utime(self.path)
            except OSError:  # removed under us (taken over after a long stall): nothing left to refresh
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this holder's."""
        self._stop.set()
        self._thread.join()
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def holder(directory: Path) -> str:
    """Who holds ``directory``'s lock, for messages ("" if nobody)."""
    owner = _read(directory / LOCK)
    if not owner:
        return ""
    host = owner.get("ltscale.attempt.machine", "?").split("/", 1)[0]
    job = owner.get("ltscale.attempt.slurm_job", "")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"process {owner.get('ltscale.attempt.pid', '?')} on {host}" + (f" (SLURM job {job})" if job else "") + f" since {since}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}  # being written right now, or damaged: judged by its age alone


def _gone(path: Path, owner: dict | None, stale_s: float) -> str | None:
    """Why the lock at ``path`` no longer protects anything, or None if its owner may be working."""
    if owner is None:
        return "it was released"
    reason = Attempt.current().owner_gone({k: str(v) for k, v in owner.items()}) if owner else None
    if reason:
        return reason
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was released"
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (owner {owner.get('ltscale.attempt.pid', '?')} on " \
               f"{str(owner.get('ltscale.attempt.machine', '?')).split('/', 1)[0]})"
    return None

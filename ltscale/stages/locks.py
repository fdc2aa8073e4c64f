"""One producer per stage output, across pipelines that share a store.

Identical stages in different pipelines share one output directory (the LWS baseline reuses the
CE baseline's teacher). When such pipelines run at the same time (a sweep submitted to a cluster,
two terminals on a laptop), both would train that stage into the same directory, overwriting each
other's progress checkpoints. Instead the first takes ``<stage dir>/.lock`` and the others wait for
its manifest, then reuse the output.

The lock file holds its owner (:mod:`ltscale.tracking.attempts`: machine, PID, SLURM job) from the
moment it exists: the owner is written to a temporary file beside it (``.lock.new-<random>``), which
is then hard-linked under the lock's name (``link`` fails if the name exists: atomic on local file
systems and NFS). A lock created empty and written afterwards was left empty by a write that failed
(disk full) or a process killed in between, and with no owner to ask it blocked the stage for
``STALE_S``. Only on a file system without hard links is the lock created exclusively
(``O_CREAT | O_EXCL``) and written in place. Its holder refreshes the file's modification time every
``HEARTBEAT_S`` seconds. A lock is taken over when its owner is certainly gone (an exited process of
this machine, an earlier attempt of this SLURM job) or, for owners elsewhere, when its heartbeat is
older than ``STALE_S`` (a killed job, a lost node).

Taking a lock over must never remove a live one. Waiting pipelines poll, so several of them judge a
lock dead at about the same moment; had each moved ``.lock`` aside and created its own, a slow one
would move aside the fresh lock of the first and both would train the stage. Only operations that
are atomic on NFS as well are used (exclusive create, hard link, rename within the directory; no
``flock``):

1. The right to remove the lock judged dead is itself taken by exclusive create of
   ``.lock.takeover-<its token>``: of all processes that judged that very lock dead, one wins; the
   others wait (poll again). A claim whose maker died is judged like a lock (owner gone, or older
   than ``stale_s``) and taken over through ``.lock.takeover-<token>+`` (and so on): claims are
   removed only once ``.lock`` is no longer the lock they name.
2. The winner checks again that ``.lock`` is still the lock judged dead (same token) and still dead:
   any other taker of that lock would need the claim, and nobody creates ``.lock`` while it exists,
   so nothing can have replaced it. It then renames it aside to a unique name, checks that the moved
   file is that lock, deletes it and races for a new one by exclusive create (against pipelines
   that find no lock at all: exactly one of them wins). Then it removes its claims; a late taker of
   the old lock that wins the claim afterwards finds another lock there and leaves it alone.
3. Should the moved file not be the lock judged dead after all (its owner, judged dead by a stale
   heartbeat, was only stalled, released it, and another pipeline's fresh lock took its place), it is
   put back under ``.lock`` with ``link`` (which does not replace an existing file), so its owner keeps
   it, and the caller does not acquire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
        _remove_dead_temporaries(directory, stale_s)
        token = uuid.uuid4().hex
        owner = {"token": token, "since": time.time(), **Attempt.current().tags()}
        for _ in range(3):  # again after a dead owner's lock was moved away (or released meanwhile)
            if _create(path, owner):
                return cls(path, token, heartbeat_s)
            if not _take_over(path, token, owner, stale_s):
                return None
        return None

    def _beat(self, period: float) -> None:
        failing = False
        while not self._stop.wait(period):
            if (_read(self.path) or {}).get("token", self.token) != self.token:
                log.warning("%s was taken over while this process was stalled", self.path)
                return  # another holder's lock now: not ours to keep fresh
            try:
                os.utime(self.path)
            except FileNotFoundError:  # removed under us (taken over after a long stall): nothing left to refresh
                return
            except OSError as error:
                # A passing error (ESTALE or EIO while an NFS server fails over) must not end the
                # heartbeat: the lock would go stale while this process works on, and another
                # pipeline would take it over and train the same stage into the same directory.
                if not failing:
                    log.warning("cannot refresh %s (%s); trying again at every heartbeat", self.path, error)
                failing = True
                continue
            if failing:
                log.info("%s is refreshed again", self.path)
                failing = False

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this holder's."""
        self._stop.set()
        self._thread.join()
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def holder(directory: Path) -> str:
    """Who holds ``directory``'s lock, for messages ("" if nobody)."""
    return _describe(_read(directory / LOCK))


def live_holder(directory: Path, stale_s: float = STALE_S) -> str:
    """Who holds ``directory``'s lock while that owner may still be working: like :func:`holder`, but
    "" also for a lock that :meth:`StageLock.try_acquire` would take over (its owner has exited, or
    its heartbeat is older than ``stale_s``). For plans ("busy" or not) rather than messages."""
    path = directory / LOCK
    owner = _read(path)
    if owner is None or _gone(path, owner, stale_s) is not None:
        return ""
    return _describe(owner) or "another process (its lock is being written)"


def _describe(owner: dict | None) -> str:
    if not owner:
        return ""
    host = str(owner.get("ltscale.attempt.machine", "?")).split("/", 1)[0]
    job = owner.get("ltscale.attempt.slurm_job", "")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"process {owner.get('ltscale.attempt.pid', '?')} on {host}" + (f" (SLURM job {job})" if job else "") + f" since {since}"


def _take_over(path: Path, token: str, owner: dict, stale_s: float) -> bool:
    """Remove the lock at ``path`` if its owner is gone (see the module's notes); True if the caller
    should try to create the lock again, False while a live owner, or another taker, has it."""
    current = _read(path)
    identity = _identity(path, current)
    if identity is None:
        return True  # released meanwhile
    reason = _gone(path, current, stale_s)
    if reason is None:
        return False
    claims = _claim(path, identity, owner, stale_s)
    if claims is None:
        return False  # another process is taking it over right now
    try:
        # With the claim, nobody else may move this lock: check that it is still there and still dead.
        now = _read(path)
        if _identity(path, now) != identity:
            return True  # released, or already replaced by a successor: look again
        reason = _gone(path, now, stale_s)
        if reason is None:
            return False  # its heartbeat resumed
        log.warning("taking over %s: %s", path, reason)
        aside = path.with_name(f"{LOCK}.stale-{token}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return True
        if _identity(aside, _read(aside)) == identity:
            aside.unlink(missing_ok=True)
            return True
        _put_back(aside, path)
        return False
    finally:
        for claim in reversed(claims):
            claim.unlink(missing_ok=True)


TAKEOVER_LEVELS = 8
"""How many dead claims in a row (takers that died while taking one lock over) are taken over."""


def _claim(path: Path, identity: str, owner: dict, stale_s: float) -> list[Path] | None:
    """The exclusive right to remove the lock ``identity`` at ``path``: the claim files to remove once
    done (this process's and the dead ones it took over), or None while another process has it."""
    name, dead = f"{LOCK}.takeover-{identity}", []
    for _ in range(TAKEOVER_LEVELS):
        claim = path.with_name(name)
        if _create(claim, owner):
            return dead + [claim]
        other = _read(claim)
        if other is None or _gone(claim, other, stale_s) is None:
            return None  # being taken over (or just taken over) by another process
        dead.append(claim)
        name += "+"  # the right to succeed that dead taker
    return None


NEW = f"{LOCK}.new-"
"""Prefix of the temporary file a lock or claim is written to before it is linked under its name."""


def _create(path: Path, owner: dict) -> bool:
    """Create ``path`` holding ``owner`` unless a file of that name exists; True if this call created it."""
    if os.path.lexists(path):
        return False  # most calls are polls of a held lock: no temporary written for them
    temp = path.with_name(f"{NEW}{uuid.uuid4().hex}")
    try:
        _write_new(temp, owner)
        try:
            os.link(temp, path)
        except FileExistsError:  # (over NFS a retried link reports EEXIST although it worked)
            return _same_file(temp, path)
        except OSError:  # no hard links on this file system (or the temporary was removed meanwhile)
            return _create_in_place(path, owner)
        return True
    finally:
        temp.unlink(missing_ok=True)


def _create_in_place(path: Path, owner: dict) -> bool:
    """:func:`_create` without hard links: the lock exists empty until written (judged by its age
    alone meanwhile), and is left so only by a process killed in between."""
    try:
        _write_new(path, owner)
    except FileExistsError:
        return False
    return True


def _write_new(path: Path, owner: dict) -> None:
    """Create ``path`` (exclusively) holding ``owner``; a file whose write failed is removed."""
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(owner, handle)
    except BaseException:
        path.unlink(missing_ok=True)  # just created by this call: nobody else's yet
        raise


def _remove_dead_temporaries(directory: Path, stale_s: float) -> None:
    """Delete the temporaries of :func:`_create` left by processes killed before they removed them.
    Removing one still in use would be harmless too: its link then fails and its maker creates in place."""
    for temp in directory.glob(f"{NEW}*"):
        if _gone(temp, _read(temp), stale_s) is not None:
            temp.unlink(missing_ok=True)


def _identity(path: Path, owner: dict | None) -> str | None:
    """What tells the lock file at ``path`` (read as ``owner``) from any other: its token; for a file
    without one (damaged), its inode. None if there is no file."""
    if owner is None:
        return None
    token = str(owner.get("token") or "")
    if token:  # also names the claim file: kept to safe characters
        return token if re.fullmatch(r"[0-9A-Za-z_-]{1,64}", token) else hashlib.sha256(token.encode()).hexdigest()[:32]
    try:
        return f"inode-{path.stat().st_ino}"
    except FileNotFoundError:
        return None


def _put_back(aside: Path, path: Path) -> None:
    """Return a live lock moved aside by mistake to ``path``, without replacing a lock created there since."""
    try:
        os.link(aside, path)
    except FileExistsError:
        if not _same_file(aside, path):  # (over NFS a retried link reports EEXIST although it worked)
            log.error("a live lock moved aside from %s could not be put back: %s was created meanwhile", path, _describe(_read(path)))
    except OSError:  # no hard links on this file system: rename back unless a lock was created meanwhile
        if not path.exists():
            os.replace(aside, path)
            return
        log.error("a live lock moved aside from %s could not be put back: %s was created meanwhile", path, _describe(_read(path)))
    aside.unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        # Being written right now (in place, without hard links; or by an older ltscale that wrote
        # every lock so, still running in another pipeline), or damaged: judged by its age alone.
        return {}


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

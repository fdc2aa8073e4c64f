"""Stage locks: one producer per stage output when pipelines share a store."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltscale.stages import locks
from ltscale.stages.locks import StageLock
from ltscale.tracking.attempts import Attempt

ROOT = Path(__file__).resolve().parents[1]


def _lock_file(directory: Path, **tags: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / locks.LOCK
    path.write_text(json.dumps({"token": "theirs", "since": time.time(), **Attempt.current().tags(), **tags}))
    return path


def test_one_holder_at_a_time_and_release_frees_it(tmp_path):
    first = StageLock.try_acquire(tmp_path / "stage")
    assert first is not None and (tmp_path / "stage" / locks.LOCK).is_file()
    assert StageLock.try_acquire(tmp_path / "stage") is None  # a live holder, even this very process
    assert "process " in locks.holder(tmp_path / "stage") and str(os.getpid()) in locks.holder(tmp_path / "stage")
    first.release()
    assert not (tmp_path / "stage" / locks.LOCK).exists() and locks.holder(tmp_path / "stage") == ""
    second = StageLock.try_acquire(tmp_path / "stage")
    assert second is not None
    second.release()


def test_a_dead_or_silent_owner_is_taken_over_a_live_one_is_not(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    child.kill()
    child.wait()
    _lock_file(tmp_path / "dead", **{"ltscale.attempt.pid": str(child.pid), "ltscale.attempt.process_start": "1"})
    taken = StageLock.try_acquire(tmp_path / "dead")
    assert taken is not None and json.loads((tmp_path / "dead" / locks.LOCK).read_text())["token"] == taken.token
    taken.release()

    # Another machine's owner: alive while its heartbeat is fresh, taken over once it is stale.
    foreign = _lock_file(tmp_path / "foreign", **{"ltscale.attempt.machine": "node9/boot/pid:[1]"})
    assert StageLock.try_acquire(tmp_path / "foreign", stale_s=60) is None
    old = time.time() - 120
    os.utime(foreign, (old, old))
    taken = StageLock.try_acquire(tmp_path / "foreign", stale_s=60)
    assert taken is not None and list((tmp_path / "foreign").iterdir()) == [foreign]  # the stale one is gone
    taken.release()


def test_the_holder_keeps_its_lock_fresh_and_never_removes_a_successors(tmp_path):
    lock = StageLock.try_acquire(tmp_path / "s", heartbeat_s=0.05)
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5  # refreshed by the heartbeat
    # Taken over while it was stalled: releasing must not remove the new holder's lock.
    lock.path.write_text(json.dumps({"token": "successor"}))
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "successor"


def test_a_stalled_holder_does_not_keep_a_successors_lock_fresh(tmp_path):
    """After a takeover the old holder's heartbeat must leave the new lock alone: kept fresh by a
    live process that does not own it, a dead successor's lock would never go stale."""
    lock = StageLock.try_acquire(tmp_path / "s", heartbeat_s=3600)
    running = lock._stop

    class OneBeat:  # one round of the heartbeat loop, run here instead of waiting for its thread
        calls = 0

        def wait(self, period):
            self.calls += 1
            return self.calls > 1

    def beat_once() -> None:
        lock._stop = OneBeat()
        lock._beat(0)
        lock._stop = running

    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    beat_once()
    assert time.time() - lock.path.stat().st_mtime < 60  # its own lock: refreshed
    lock.path.write_text(json.dumps({"token": "successor"}))
    os.utime(lock.path, (old, old))
    beat_once()
    assert time.time() - lock.path.stat().st_mtime > 900  # a successor's: untouched
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "successor"


def test_a_passing_error_does_not_stop_the_heartbeat(tmp_path, monkeypatch, caplog):
    """A refresh that fails now and then (ESTALE while an NFS server fails over) must not end the
    heartbeat: the lock would go stale while its holder works on, and a second pipeline would take it
    over and train the same stage into the same directory. Warned once, not at every beat."""
    real, failures = os.utime, []

    def flaky_utime(path, *args, **kwargs):
        if Path(path).name == locks.LOCK and len(failures) < 3:
            failures.append(path)
            raise OSError(errno.ESTALE, "Stale file handle")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(locks.os, "utime", flaky_utime)
    caplog.set_level(logging.WARNING, logger=locks.__name__)
    lock = StageLock.try_acquire(tmp_path / "s", heartbeat_s=0.02)
    old = time.time() - 1000
    real(lock.path, (old, old))
    deadline = time.monotonic() + 4
    while time.time() - lock.path.stat().st_mtime > 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(failures) == 3 and time.time() - lock.path.stat().st_mtime < 60  # refreshed after the errors
    assert lock._thread.is_alive()
    assert [r.getMessage().startswith(f"cannot refresh {lock.path}") for r in caplog.records].count(True) == 1
    lock.release()


def test_a_lock_whose_heartbeat_resumes_before_the_takeover_is_kept(tmp_path, monkeypatch):
    """Judged dead by a stale heartbeat, then touched by its owner (only stalled) before the taker
    holds the claim: the taker looks again and leaves the lock alone."""
    directory = tmp_path / "stage"
    stalled = _lock_file(directory, **{"ltscale.attempt.machine": "node9/boot/pid:[1]"})
    old = time.time() - 120
    os.utime(stalled, (old, old))
    real = locks._claim

    def claim_after_a_beat(path, identity, owner, stale_s):
        os.utime(path)  # the owner's heartbeat, between the judgement and the claim
        return real(path, identity, owner, stale_s)

    monkeypatch.setattr(locks, "_claim", claim_after_a_beat)
    assert StageLock.try_acquire(directory, stale_s=60) is None
    assert json.loads(stalled.read_text())["token"] == "theirs" and list(directory.iterdir()) == [stalled]


def test_a_damaged_lock_is_judged_by_its_age(tmp_path):
    """A lock file cut short (being written, or its writer died mid-write) has no owner to ask: it
    is busy while fresh and taken over once older than stale_s."""
    directory = tmp_path / "stage"
    directory.mkdir()
    path = directory / locks.LOCK
    path.write_text('{"token": "ab')
    assert StageLock.try_acquire(directory, stale_s=60) is None
    assert locks.live_holder(directory, stale_s=60) == "another process (its lock is being written)"
    old = time.time() - 90  # past stale_s, not twice it
    os.utime(path, (old, old))
    assert locks.live_holder(directory, stale_s=60) == ""
    lock = StageLock.try_acquire(directory, stale_s=60)
    assert lock is not None and json.loads(path.read_text())["token"] == lock.token
    lock.release()


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_lock_whose_owner_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch, hard_links):
    """Disk full (or over quota) while the owner is written: nothing is left to block the stage. An
    empty lock, with no owner to ask, kept every later run waiting for STALE_S."""
    directory = tmp_path / "stage"
    if not hard_links:  # (SMB and some FUSE mounts): the lock is written in place
        monkeypatch.setattr(locks.os, "link", _fail_with(errno.EPERM))
    dump, write_new, written = json.dump, locks._write_new, []

    def write_new_naming_its_file(path, owner):
        written.append(path.name)
        return write_new(path, owner)

    def dump_without_space(obj, handle, *args, **kwargs):
        # Without hard links the write that fails is the lock's own, in place (its temporary, which
        # is written first and cannot be linked, is let through); with them, the temporary's.
        if hard_links or written[-1] == locks.LOCK:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return dump(obj, handle, *args, **kwargs)

    monkeypatch.setattr(locks, "_write_new", write_new_naming_its_file)
    monkeypatch.setattr(locks.json, "dump", dump_without_space)
    with pytest.raises(OSError, match="No space left"):
        StageLock.try_acquire(directory)
    assert written[0].startswith(locks.NEW) and written[1:] == ([] if hard_links else [locks.LOCK])
    assert list(directory.iterdir()) == [] and locks.live_holder(directory) == ""
    monkeypatch.setattr(locks.json, "dump", dump)
    lock = StageLock.try_acquire(directory)  # space freed: the next run takes it at once
    assert lock is not None and list(directory.iterdir()) == [lock.path]
    lock.release()


def _die_in(module, name: str, directory: Path) -> None:
    """Take ``directory``'s lock, SIGKILLed (nothing cleaned up) when calling ``module.name``."""
    setattr(module, name, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
    StageLock.try_acquire(directory)


def test_a_process_killed_while_taking_the_lock_leaves_none(tmp_path):
    """Killed while writing its owner, or before removing the temporary it wrote it to, a process
    leaves no lock. The next taker removes its temporary: at once when it names a dead owner, once
    older than stale_s when it is empty."""
    directory = tmp_path / "stage"
    context = multiprocessing.get_context("fork")
    for module, name in ((json, "dump"), (os, "link")):
        child = context.Process(target=_die_in, args=(module, name, directory))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == -signal.SIGKILL
        assert not (directory / locks.LOCK).exists() and locks.live_holder(directory) == ""
    empty, written = sorted(directory.iterdir(), key=lambda path: path.stat().st_size)
    assert empty.stat().st_size == 0 and json.loads(written.read_text())["token"]
    lock = StageLock.try_acquire(directory, stale_s=60)
    assert lock is not None and sorted(directory.iterdir()) == sorted([lock.path, empty])
    old = time.time() - 90
    os.utime(empty, (old, old))
    assert StageLock.try_acquire(directory, stale_s=60) is None and list(directory.iterdir()) == [lock.path]
    lock.release()


def test_a_lock_linked_although_the_link_reported_it_existed_is_held(tmp_path, monkeypatch):
    """Over NFS a LINK retried after its reply was lost reports EEXIST although it worked."""
    real = os.link

    def reply_lost(source, target, **kwargs):
        real(source, target, **kwargs)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))

    monkeypatch.setattr(locks.os, "link", reply_lost)
    lock = StageLock.try_acquire(tmp_path / "stage")
    assert lock is not None and json.loads(lock.path.read_text())["token"] == lock.token
    assert list(lock.path.parent.iterdir()) == [lock.path]
    lock.release()


def test_an_output_finished_just_before_the_lock_was_taken_is_reused(tmp_path, monkeypatch):
    """Another pipeline may finish the stage between this one's look and its lock: it looks again
    once it holds the lock, reuses the output, and lets the lock go, rather than training it again."""
    from ltscale.stages import pipeline
    from ltscale.stages.store import Store

    store = Store(tmp_path)
    directory = store.directory("teacher", "k1")
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(b"m" * 100)
    store.finish("teacher", "teacher", "k1", {"files": {"model": "model.pt"}})
    real, looks = store.finished, []

    def finished_after_the_first_look(*args, **kwargs):
        looks.append(args)
        return None if len(looks) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(store, "finished", finished_after_the_first_look)
    output, lock = pipeline._finished_or_claimed(store, "teacher", "teacher", "k1")
    assert output is not None and output.key == "k1" and lock is None and len(looks) == 2
    assert not (directory / locks.LOCK).exists()


def test_two_pipelines_sharing_a_stage_train_it_once(tmp_path):
    """CE and LWS at the same time in one store: LWS waits for CE's teacher, then reuses it."""
    # The first pipeline holds its teacher (and so the stage's lock) after training until a gate file
    # appears, and the test opens the gate only once the second has said it is waiting: a race
    # decided by timing (a teacher made slow enough to outlast the second's start-up) passes or
    # fails with the machine's speed.
    script = ("import sys, json, time\nfrom pathlib import Path\nfrom tests.test_pipeline import tiny\n"
              "from ltscale.config import apply_overrides\nfrom ltscale.stages.pipeline import run_pipeline\n"
              "from ltscale.engine.trainer import Trainer\n"
              "gate, fit = Path(sys.argv[3]), Trainer.fit\n"
              "def held(self):\n"
              "    epoch = fit(self)\n"
              "    deadline = time.monotonic() + 300\n"
              "    while not gate.exists() and time.monotonic() < deadline:\n"
              "        time.sleep(0.05)\n"
              "    return epoch\n"
              "Trainer.fit = held\n"
              "result = run_pipeline(tiny(sys.argv[1], Path(sys.argv[2])))\n"
              "print(json.dumps({'executed': result.executed, 'cached': result.cached, 'teacher': result.outputs['teacher'].key}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out, gate = tmp_path / "shared", tmp_path / "gate"

    def start(method: str, stderr) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, method, str(out), str(gate)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)

    first = start("ce", subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not list(out.glob(f"store/teacher-*/{locks.LOCK}")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first pipeline never started its teacher"
        time.sleep(0.2)
    second_log = tmp_path / "second.err"
    with second_log.open("w") as err:
        second = start("lws", err)
    deadline = time.monotonic() + 180
    while "waiting to reuse it" not in second_log.read_text():
        assert second.poll() is None, second_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the second pipeline never waited for the teacher"
        time.sleep(0.2)
    assert first.poll() is None  # still holding the teacher: the second waited on a live producer
    gate.touch()
    first_out, first_err = first.communicate(timeout=600)
    second_out, _ = second.communicate(timeout=600)
    second_err = second_log.read_text()
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second_err[-3000:]
    a, b = json.loads(first_out.splitlines()[-1]), json.loads(second_out.splitlines()[-1])
    assert a["executed"] == ["teacher"] and b["cached"] == ["teacher"] and b["executed"] == ["lws"]
    assert a["teacher"] == b["teacher"]
    assert "is being produced by process" in second_err
    assert not list(out.glob(f"store/*/{locks.LOCK}"))  # every lock released


def _dead_pid() -> str:
    child = subprocess.Popen(["sleep", "30"])
    child.kill()
    child.wait()
    return str(child.pid)


def _dead_lock(directory: Path, token: str = "theirs") -> Path:
    path = _lock_file(directory, **{"ltscale.attempt.pid": _dead_pid(), "ltscale.attempt.process_start": "1"})
    path.write_text(json.dumps({**json.loads(path.read_text()), "token": token}))
    return path


def _hook_replace(monkeypatch, before=None, after=None) -> None:
    """Run ``before``/``after`` around the first move of a ``.lock`` file aside (the window of the race)."""
    real, done = os.replace, []

    def replace(src, dst, **kwargs):
        if Path(src).name != locks.LOCK or done:
            return real(src, dst, **kwargs)
        done.append(1)
        if before:
            before()
        real(src, dst, **kwargs)
        if after:
            after()

    monkeypatch.setattr(locks.os, "replace", replace)


def test_takers_of_one_dead_lock_never_both_acquire(tmp_path, monkeypatch):
    """Two pipelines judge the same dead lock dead; one is slow between its check and moving the lock
    aside; meanwhile the other takes over (and a third finds no lock at all). Exactly one holds it."""
    directory = tmp_path / "stage"
    _dead_lock(directory)
    others: list = []
    _hook_replace(monkeypatch, before=lambda: others.append(StageLock.try_acquire(directory)),
                  after=lambda: others.append(StageLock.try_acquire(directory)))
    slow = StageLock.try_acquire(directory)
    holders = [lock for lock in [slow, *others] if lock is not None]
    assert len(others) == 2 and len(holders) == 1, f"{len(holders)} processes acquired the lock"
    assert json.loads((directory / locks.LOCK).read_text())["token"] == holders[0].token
    holders[0].release()
    assert not list(directory.iterdir())  # no claim or stale file left


def test_a_live_lock_moved_aside_by_mistake_is_put_back(tmp_path, monkeypatch):
    """A silent owner's lock is judged dead, but before it is moved aside its owner (only stalled)
    releases it and another pipeline's fresh lock takes its place: that one must survive."""
    directory = tmp_path / "stage"
    stalled = _lock_file(directory, **{"ltscale.attempt.machine": "node9/boot/pid:[1]"})
    old = time.time() - 120
    os.utime(stalled, (old, old))
    fresh = {"token": "fresh", "since": time.time(), "ltscale.attempt.machine": "node8/boot/pid:[1]", "ltscale.attempt.pid": "7"}

    def release_and_recreate():
        stalled.unlink()
        stalled.write_text(json.dumps(fresh))

    _hook_replace(monkeypatch, before=release_and_recreate)
    assert StageLock.try_acquire(directory, stale_s=60) is None
    assert json.loads(stalled.read_text()) == fresh and list(directory.iterdir()) == [stalled]
    monkeypatch.undo()
    inode = stalled.stat().st_ino
    assert StageLock.try_acquire(directory, stale_s=60) is None and stalled.stat().st_ino == inode


def test_a_taker_that_died_while_taking_over_does_not_block_the_stage(tmp_path):
    directory = tmp_path / "stage"
    path = _dead_lock(directory, token="deadbeef")
    claim = directory / f"{locks.LOCK}.takeover-deadbeef"
    # A claim of a live taker (another machine, fresh): it is taking the lock over, others wait.
    claim.write_text(json.dumps({"token": "taker", "ltscale.attempt.machine": "node9/boot/pid:[1]"}))
    assert StageLock.try_acquire(directory) is None and json.loads(path.read_text())["token"] == "deadbeef"
    # A claim whose maker died: its right to take over passes on, and no file is left behind.
    claim.write_text(json.dumps({"token": "taker", **Attempt.current().tags(), "ltscale.attempt.pid": _dead_pid(),
                                 "ltscale.attempt.process_start": "1"}))
    lock = StageLock.try_acquire(directory)
    assert lock is not None and json.loads(path.read_text())["token"] == lock.token
    assert sorted(directory.iterdir()) == [path]
    lock.release()


def test_live_holder_ignores_a_lock_that_would_be_taken_over(tmp_path):
    _dead_lock(tmp_path / "dead")
    assert locks.holder(tmp_path / "dead") and locks.live_holder(tmp_path / "dead") == ""
    live = StageLock.try_acquire(tmp_path / "live")
    assert locks.live_holder(tmp_path / "live") == locks.holder(tmp_path / "live") != ""
    live.release()
    assert locks.live_holder(tmp_path / "live") == ""
    foreign = _lock_file(tmp_path / "foreign", **{"ltscale.attempt.machine": "node9/boot/pid:[1]"})
    assert "node9" in locks.live_holder(tmp_path / "foreign", stale_s=60)
    os.utime(foreign, (time.time() - 120, time.time() - 120))
    assert locks.live_holder(tmp_path / "foreign", stale_s=60) == "" and "node9" in locks.holder(tmp_path / "foreign")


def _contend(barrier, queue, directories: list[Path]) -> None:
    """One of several processes that all find each directory's dead lock at the same moment."""
    real = os.replace

    def slow_replace(src, dst, **kwargs):  # widen the window between judging a lock dead and moving it
        time.sleep(random.uniform(0, 0.02))
        return real(src, dst, **kwargs)

    os.replace = slow_replace
    held = []
    for directory in directories:
        barrier.wait()
        time.sleep(random.uniform(0, 0.01))
        lock = StageLock.try_acquire(directory)
        queue.put((str(directory), os.getpid(), lock.token if lock else None))
        held.append(lock)
    barrier.wait()  # every lock kept until all have tried


def test_many_processes_racing_for_dead_locks_acquire_each_once(tmp_path):
    directories = [tmp_path / f"stage{i}" for i in range(12)]
    for directory in directories:
        _dead_lock(directory)
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_contend, args=(barrier, queue, directories)) for _ in range(4)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in range(len(directories) * len(workers))]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    for directory in directories:
        tokens = [token for where, _, token in results if where == str(directory) and token]
        assert len(tokens) == 1, f"{directory.name}: {len(tokens)} processes acquired the lock"
        assert json.loads((directory / locks.LOCK).read_text())["token"] == tokens[0]
        assert [p.name for p in directory.iterdir()] == [locks.LOCK]

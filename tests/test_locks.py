"""Stage locks: one producer per stage output when pipelines share a store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def test_two_pipelines_sharing_a_stage_train_it_once(tmp_path):
    """CE and LWS at the same time in one store: LWS waits for CE's teacher, then reuses it."""
    script = ("import sys, json\nfrom pathlib import Path\nfrom tests.test_pipeline import tiny\n"
              "from ltscale.config import apply_overrides\nfrom ltscale.stages.pipeline import run_pipeline\n"
              "config = apply_overrides(tiny(sys.argv[1], Path(sys.argv[2])), ['stages.teacher.optim.epochs=150'])\n"
              "result = run_pipeline(config)\n"
              "print(json.dumps({'executed': result.executed, 'cached': result.cached, 'teacher': result.outputs['teacher'].key}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "shared"

    def start(method: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, method, str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("ce")
    deadline = time.monotonic() + 180
    while not list(out.glob(f"store/teacher-*/{locks.LOCK}")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first pipeline never started its teacher"
        time.sleep(0.2)
    second = start("lws")
    first_out, first_err = first.communicate(timeout=600)
    second_out, second_err = second.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second_err[-3000:]
    a, b = json.loads(first_out.splitlines()[-1]), json.loads(second_out.splitlines()[-1])
    assert a["executed"] == ["teacher"] and b["cached"] == ["teacher"] and b["executed"] == ["lws"]
    assert a["teacher"] == b["teacher"]
    assert "is being produced by process" in second_err and "waiting to reuse it" in second_err
    assert not list(out.glob(f"store/*/{locks.LOCK}"))  # every lock released

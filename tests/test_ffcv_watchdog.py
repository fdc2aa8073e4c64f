"""The FFCV write's watchdog (ltscale.data.loaders.ffcv_write) on its own, without FFCV: each case runs
in a process of its own session, since giving up kills the whole process group."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from ltscale.data.loaders.ffcv_write import FAILURE_PREFIX

# A stand-in for a write: the watchdog, one forked worker that exits with ``code`` after ``work`` s,
# and the write's own wait of ``wait`` s before it returns.
SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from ltscale.data.loaders import ffcv_write

    ffcv_write.STRANDED_S = {stranded}

    def work():
        time.sleep({work})
        sys.exit({code})

    if __name__ == "__main__":
        multiprocessing.set_start_method("fork")
        multiprocessing.Process(target=work).start()  # first: the watchdog must find it
        watchdog = ffcv_write._Watchdog({caller})
        watchdog.start()
        time.sleep({wait})
        watchdog.finished.set()
        print("the write returned", flush=True)
""")


def _watch(*, code: int = 0, work: float = 0.0, wait: float, stranded: float = 60.0, caller: str = "os.getppid()"):
    script = SCRIPT.format(code=code, work=work, wait=wait, stranded=stranded, caller=caller)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    return done.returncode, done.stdout, time.monotonic() - started


def test_a_worker_that_raised_ends_the_write_naming_its_exit_code():
    returncode, report, _ = _watch(code=1, wait=60)
    assert returncode == -9 and "the write returned" not in report
    assert report.startswith(FAILURE_PREFIX) and "exited with code 1 before every image was stored" in report


def test_a_write_left_waiting_by_workers_that_all_exited_ends_after_the_stranded_time():
    """A worker that died between two of the watchdog's looks, reaped unseen (its exit code 0 here):
    once no worker is left, the write may wait STRANDED_S for its page table, not forever."""
    returncode, report, seconds = _watch(wait=60, stranded=1.0)
    assert returncode == -9 and "every FFCV writer worker has exited and the write still waits after 1 s" in report
    assert seconds < 30


def test_workers_that_finished_before_the_write_returns_are_no_failure():
    returncode, report, _ = _watch(work=0.2, wait=1.0, stranded=5.0)
    assert returncode == 0 and report == "the write returned\n"


def test_a_caller_that_is_gone_ends_the_write_and_its_workers():
    """The caller gone, the write ends with its worker (still working here): giving up kills the
    process group. subprocess.run returns only once the pipes are closed, which a live worker holds."""
    returncode, report, seconds = _watch(work=60, wait=60, caller="os.getppid() + 100000")
    assert returncode == -9 and "the process that asked for this write" in report and "is gone" in report
    assert seconds < 30

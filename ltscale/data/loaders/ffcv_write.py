"""The process that writes one ``.beton``: started by :func:`ltscale.data.loaders.ffcv_backend.write_beton`
as ``python -m ltscale.data.loaders.ffcv_write``, with its job (a pickled :class:`WriteJob`) on stdin.

Why a fresh process: FFCV's writer forks its worker processes from the process that calls it. A
training process has run torch's OpenMP pool and OpenCV's thread pool (FFCV's own reading resizes
with OpenCV); a forked child inherits those pools without their threads, and its first parallel
region waits for them forever. Seen here: writing a split with a PNG after an FFCV loader had read
another split hung in ``gomp_team_barrier_wait_end`` (the PNG's decode makes a tensor contiguous,
a parallel copy). Forked from this process, which has run neither, the workers start clean.

Why a watchdog: FFCV's writer waits until its workers have stored every sample and never looks at
the workers themselves, so one that dies (an exception in an encoder, the OOM killer) leaves it
waiting forever. Here a dead worker ends the write at once, with a reason; the caller raises it.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from ltscale.data.base import FileSplit
from ltscale.data.config import FfcvConfig

FAILURE_PREFIX = "ltscale-ffcv-write-failed: "
"""Starts the line in which a failed write gives its reason on stdout (stderr has the details)."""

POLL_S = 0.1
"""How often the watchdog looks at the workers and at the process that asked for the write."""

SEGMENT_PREFIX = "ltscale-ffcv-write-segment: "
"""Starts the line in which the writer names the shared-memory segment FFCV keeps the samples'
metadata in while writing. Killing the write's process group kills the resource tracker that would
remove it after a failure, so whoever kills the group removes it (:func:`remove_segment`)."""

STRANDED_S = 60.0
"""How long the write may go on once no worker is left (FFCV then only writes its page table, a
second's work): a worker that died unseen between two looks left samples nobody will store."""


@dataclass(frozen=True)
class WriteJob:
    """One write: ``split`` into the file ``partial`` (renamed by the caller when complete)."""

    partial: str
    split: FileSplit
    config: FfcvConfig
    substitute: bool
    workers: int
    caller_pid: int


_report = sys.stdout
"""Where the reason goes: the caller reads it from this process's stdout (see :func:`main`)."""

_segment: str | None = None
"""The name of FFCV's shared-memory segment, once it has made it."""


def remove_segment(name: str) -> None:
    """Remove the POSIX shared-memory segment ``name`` (``SharedMemory.name``) if it is still there.

    By its file: attaching a ``SharedMemory`` to unlink it would start a resource tracker here. FFCV
    runs on Linux, where the segments are the files of /dev/shm."""
    try:
        os.unlink(os.path.join("/dev/shm", name.lstrip("/")))
    except FileNotFoundError:
        pass


def _announce(line: str) -> None:
    _report.write(line + "\n")
    _report.flush()


def _give_up(reason: str) -> None:
    """Report ``reason`` to the caller and end this process with every worker it started.

    The write runs in a session of its own (the caller starts it so), so the process group is this
    process and its workers: killing it leaves nothing blocked on the work queue."""
    if _segment is not None:  # the resource tracker that would remove it dies with the group
        remove_segment(_segment)
    try:
        _announce(FAILURE_PREFIX + " ".join(reason.split()))
        sys.stderr.flush()
    except OSError:  # the caller is gone (a broken pipe): nobody to tell, the workers still to stop
        pass
    os.killpg(os.getpgid(0), signal.SIGKILL)


class _Watchdog(threading.Thread):
    """Ends the write when a worker dies, when every worker is gone and the write still waits, or
    when the caller is gone (nothing would read the file)."""

    def __init__(self, caller_pid: int) -> None:
        super().__init__(name="ltscale-ffcv-watchdog", daemon=True)
        self.caller_pid = caller_pid
        self.finished = threading.Event()

    def run(self) -> None:
        seen: dict[int, multiprocessing.process.BaseProcess] = {}
        alone_for = 0.0
        while not self.finished.wait(POLL_S):
            if os.getppid() != self.caller_pid:
                _give_up(f"the process that asked for this write (pid {self.caller_pid}) is gone")
            # The children not yet reaped, the dead among them included (active_children() reaps
            # those and lists only the living). A worker that dies while FFCV is still starting the
            # others can be reaped there unseen: the stranded rule below catches that one.
            seen.update((p.pid, p) for p in list(multiprocessing.process._children))
            alive = multiprocessing.active_children()
            for process in seen.values():
                if process.exitcode not in (None, 0):
                    how = f"was killed by signal {-process.exitcode}" if process.exitcode < 0 else \
                          f"exited with code {process.exitcode}"
                    _give_up(f"FFCV writer worker {process.pid} {how} before every image was stored "
                             "(its error, if it raised one, is printed above; a SIGKILL is often the OOM killer: "
                             "fewer data.loader.ffcv.write_workers need less memory)")
            alone_for = alone_for + POLL_S if seen and not alive else 0.0
            if alone_for > STRANDED_S:
                _give_up(f"every FFCV writer worker has exited and the write still waits after {STRANDED_S:.0f} s: "
                         "a worker died without being seen, and the images it held will not be stored")


def write(job: WriteJob) -> None:
    """Write ``job.split`` to ``job.partial`` with FFCV's writer and ``job.workers`` worker processes."""
    import cv2
    import torch
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from ltscale.data.loaders.ffcv_backend import _WriterDataset

    # Each worker encodes one image at a time; the workers are the parallelism. Thread pools
    # inside each of them would only oversubscribe the CPUs (and are what a fork must not inherit).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    class Writer(DatasetWriter):
        def prepare(self) -> None:  # FFCV's: the file's header and the metadata segment
            global _segment
            super().prepare()
            _segment = self.metadata_sm.name
            _announce(SEGMENT_PREFIX + _segment)  # before any worker starts: the caller may have to remove it

    writer = Writer(
        job.partial,
        {
            "image": RGBImageField(write_mode="jpg", max_resolution=job.config.max_resolution,
                                   jpeg_quality=job.config.jpeg_quality),
            "label": IntField(),
            "served": IntField(),
        },
        num_workers=job.workers,
    )
    watchdog = _Watchdog(job.caller_pid)
    watchdog.start()
    writer.from_indexed_dataset(_WriterDataset(job.split, job.substitute))
    watchdog.finished.set()


def main() -> None:
    global _report
    # stdout carries only the reason of a failure: whatever else writes to it (FFCV, numba, C
    # libraries) goes to stderr with the progress bar.
    _report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    job = pickle.load(sys.stdin.buffer)
    if not isinstance(job, WriteJob):
        raise TypeError(f"expected a WriteJob on stdin, got {type(job).__name__}")
    try:
        write(job)
    except BaseException as error:  # noqa: BLE001 - reported to the caller, which raises it
        traceback.print_exc()
        _give_up(f"{type(error).__name__}: {error}")
    if not Path(job.partial).is_file():
        _give_up(f"FFCV's writer returned without writing {job.partial}")
    # Done, the file closed: leave without the interpreter's teardown, where numba's TBB pool (FFCV
    # starts it on import) sometimes waited forever for threads its fork handler had ended.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    # Through the module's own name: the job on stdin was pickled with this module's classes, not __main__'s.
    from ltscale.data.loaders.ffcv_write import main as main_of_the_module

    main_of_the_module()

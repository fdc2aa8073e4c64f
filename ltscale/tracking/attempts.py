"""Which process owns a run, and whether that process is provably gone.

A run is ended (FINISHED, FAILED or KILLED) when its pipeline unwinds. A process that never unwinds
(SIGKILLed by the OOM killer, by SLURM when a preempted job outlives ``KillWait``, or lost with its
node) leaves its runs RUNNING for ever, and the MLflow UI then shows a pipeline "running" that died
days ago. Every run therefore records the attempt that owns it; when a pipeline starts, it marks the
RUNNING runs whose owner is certainly gone as KILLED, saying why.

"Certainly" is the point: a run is only ever ended by this when

- it belongs to an earlier attempt of this very SLURM job (Slurm requeued the job, so every process
  of that attempt has been killed), or
- it belongs to a SLURM job of this machine's cluster, run on another machine, that the scheduler
  says has ended or has been requeued since (``scontrol show job``). This is how a cancelled job's
  runs end: at ``scancel`` submitit ignores SIGTERM (it waits for the USR2 of a preemption) and
  SLURM's SIGKILL leaves no process to end them. Or
- it was started on this machine (same host name, boot and PID namespace, so PIDs are comparable)
  by a process that no longer exists: the PID is free, or it now belongs to a process that started
  at another time (PID reuse).

Runs of other machines, of live processes, and runs without these tags (not ltscale's) are left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

TAG_MACHINE = "ltscale.attempt.machine"
"""``<host name>/<boot id>/<pid namespace>`` of the process that created the run."""
TAG_PID = "ltscale.attempt.pid"
"""PID of the process that created the run."""
TAG_PROCESS_START = "ltscale.attempt.process_start"
"""That process's start time in clock ticks after boot (``/proc/<pid>/stat``); "" where unknown."""
TAG_SLURM_JOB = "ltscale.attempt.slurm_job"
"""``SLURM_JOB_ID`` of the job that created the run ("" outside SLURM)."""
TAG_SLURM_RESTART = "ltscale.attempt.slurm_restart"
"""``SLURM_RESTART_COUNT`` of that job when it created the run: 0 for the first attempt."""
TAG_SLURM_CLUSTER = "ltscale.attempt.slurm_cluster"
"""``SLURM_CLUSTER_NAME`` of that job ("" outside SLURM): job ids mean something only within their cluster."""

# Job states after which none of a job's processes runs (a requeued job goes back to PENDING).
_ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                           "PREEMPTED", "TIMEOUT"})


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """Start time of process ``pid`` in clock ticks after boot, "" if it does not exist (or no ``/proc``)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    # The command name (field 2) is in parentheses and may itself contain spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""  # field 22 of the whole line


def machine_identity() -> str:
    """Host name, boot and PID namespace: two processes with this identity share one PID space."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{namespace}"


def _scontrol(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_cluster() -> str:
    """The SLURM cluster this machine belongs to: ``SLURM_CLUSTER_NAME`` inside a job, else
    scontrol's ClusterName; "" without SLURM."""
    name = os.environ.get("SLURM_CLUSTER_NAME", "")
    if name:
        return name
    done = _scontrol("show", "config")
    match = re.search(r"^ClusterName\s*=\s*(\S+)", done.stdout, re.M) if done is not None and not done.returncode else None
    return match.group(1) if match else ""


def slurm_attempt_over(job: str, restart: int) -> str | None:
    """Why attempt ``restart`` of SLURM job ``job`` (of this machine's cluster) is certainly over,
    or None when it may still run or the scheduler cannot be asked."""
    done = _scontrol("-o", "show", "job", job)
    if done is None:
        return None
    if done.returncode:  # purged from the controller's memory (MinJobAge) long after it ended
        return f"SLURM job {job} has ended (the cluster no longer knows it)" if "Invalid job id" in done.stderr else None
    # An array's job id lists every task of the array, one line each: only the line of this very job id counts.
    lines = [line for line in done.stdout.splitlines() if re.search(rf"(?:^|\s)JobId={re.escape(job)}(?:\s|$)", line)]
    if len(lines) != 1:
        return None
    state = re.search(r"(?:^|\s)JobState=(\S+)", lines[0])
    restarts = re.search(r"(?:^|\s)Restarts=(\d+)", lines[0])
    if state and state.group(1) in _ENDED_STATES:
        return f"SLURM job {job} has ended ({state.group(1)})"
    if restarts and int(restarts.group(1)) > restart:
        return f"SLURM job {job} was requeued since attempt {restart} (now attempt {restarts.group(1)})"
    return None


@dataclasses.dataclass(frozen=True)
class Attempt:
    """The process running a pipeline, as recorded on each of its runs."""

    machine: str
    pid: int
    process_start: str
    slurm_job: str
    slurm_restart: int
    slurm_cluster: str = ""

    @classmethod
    def current(cls) -> Attempt:
        pid = os.getpid()
        restart = os.environ.get("SLURM_RESTART_COUNT", "") or "0"
        job = os.environ.get("SLURM_JOB_ID", "")
        return cls(machine=machine_identity(), pid=pid, process_start=process_start(pid), slurm_job=job,
                   slurm_restart=int(restart) if restart.isdigit() else 0,
                   slurm_cluster=os.environ.get("SLURM_CLUSTER_NAME", "") if job else "")

    def tags(self) -> dict[str, str]:
        return {TAG_MACHINE: self.machine, TAG_PID: str(self.pid), TAG_PROCESS_START: self.process_start,
                TAG_SLURM_JOB: self.slurm_job, TAG_SLURM_RESTART: str(self.slurm_restart),
                TAG_SLURM_CLUSTER: self.slurm_cluster}

    def owner_gone(self, tags: dict[str, str]) -> str | None:
        """Why the attempt that wrote ``tags`` is certainly over, or None if it may still be running."""
        job, restart = tags.get(TAG_SLURM_JOB, ""), tags.get(TAG_SLURM_RESTART, "")
        cluster = tags.get(TAG_SLURM_CLUSTER, "")
        # A job id names a job within its cluster only: job 4242 of another cluster sharing the
        # tracking server is another job, whatever its restart count.
        if (job and job == self.slurm_job and cluster == self.slurm_cluster and restart.isdigit()
                and int(restart) < self.slurm_restart):
            return (f"attempt {restart} of SLURM job {job} was requeued "
                    f"(this is attempt {self.slurm_restart}) without ending the run")
        pid = tags.get(TAG_PID, "")
        if (tags.get(TAG_MACHINE) != self.machine and job and restart.isdigit() and cluster
                and (job, int(restart)) != (self.slurm_job, self.slurm_restart) and cluster == slurm_cluster()):
            # Another machine's SLURM job: its processes cannot be inspected from here, but the scheduler knows.
            over = slurm_attempt_over(job, int(restart))
            return f"{over} without ending the run" if over else None
        if not pid.isdigit() or tags.get(TAG_MACHINE) != self.machine:
            return None  # another machine (or not an ltscale run): its processes cannot be inspected from here
        started = tags.get(TAG_PROCESS_START, "")
        if int(pid) == self.pid and started == self.process_start:
            return None  # this very process
        now = process_start(int(pid))
        host = self.machine.split("/", 1)[0]
        if not now and not _proc_available():
            # Without /proc only "no such process" is conclusive.
            return None if pid_exists(int(pid)) else f"process {pid} on {host} has exited without ending the run"
        if not now:
            return f"process {pid} on {host} has exited without ending the run"
        if started and now != started:
            return f"process {pid} on {host} has exited without ending the run (its PID now belongs to another process)"
        return None


def _proc_available() -> bool:
    return Path("/proc/self/stat").is_file()


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (anyone's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True

"""A real one-node SLURM cluster on 127.0.0.1, for tests of the SLURM launch path.

``start_slurm_cluster(root)`` runs Debian's Slurm daemons in the foreground under this process:
``munged -F`` with its own key and socket, ``slurmctld -D`` and ``slurmd -D -N localhost``, with
every state, spool, pid and log path under ``root``, ports picked free for this run and job ids
from a random first one (two test sessions on one machine get two clusters, whose jobs' rendezvous
ports do not meet). No accounting daemon: submitit learns that a job died
without a result by polling ``sacct``, so a small stand-in answering
``sacct -o JobID,State,NodeList --parsable2 -j ID`` from ``scontrol -o show job`` goes on PATH.

Clients (sbatch, scontrol, submitit, the jobs themselves) need ``cluster.env`` (``SLURM_CONF`` and
that PATH). On exit every job is cancelled, the daemons are terminated, and anything still running
with this cluster's ``SLURM_CONF`` in its environment (a step daemon or a job a failed test left
behind) is killed.

The pytest fixtures ``slurm_cluster`` (session: the daemons) and ``slurm`` (per test: the client
environment) skip with the missing program named when Slurm or munge is not installed (and when not
root: the daemons run as root); CI installs them with
``apt-get install -y slurmctld slurmd slurm-client munge``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ltscale.dist.ports import free_port

# Programs the cluster needs; daemons live in /usr/sbin, which a non-root PATH may lack.
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
PARTITION = "debug"
NODE = "localhost"

# Answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]` from slurmctld's
# own view of the job (kept for MinJobAge seconds after it ends).
SACCT_STAND_IN = '''#!{python}
"""sacct stand-in for a cluster without accounting: asks slurmctld through scontrol."""
import re, subprocess, sys

def field(line, name):
    match = re.search(r"(?:^|\\s)" + name + r"=(\\S*)", line)
    return match.group(1) if match else ""

ids = []
for i, arg in enumerate(sys.argv[1:], start=1):
    if arg == "-j" and i + 1 < len(sys.argv):
        ids += sys.argv[i + 1].split(",")
    elif arg.startswith("--jobs="):
        ids += arg.split("=", 1)[1].split(",")
print("JobID|State|NodeList")
for job_id in ids:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    for line in out.splitlines():
        shown = field(line, "JobId")
        if field(line, "ArrayJobId") and field(line, "ArrayTaskId"):
            shown = field(line, "ArrayJobId") + "_" + field(line, "ArrayTaskId")
        print("|".join([shown, field(line, "JobState"), field(line, "NodeList")]))
'''


def missing_programs() -> list[str]:
    """Names of the Slurm / munge programs that are not installed."""
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SEARCH_PATH) is None]


@dataclass
class SlurmCluster:
    """A running cluster: its config, the environment clients need, and its logs."""

    root: Path
    conf: Path
    env: dict[str, str]
    partition: str = PARTITION
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True) -> str:
        """Run a Slurm client command (``scontrol``, ``squeue``...) against this cluster; its stdout."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n{self.logs()}")
        return done.stdout

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").iterdir()):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def _node_resources(slurmd: str) -> tuple[int, int]:
    """(CPUs, RealMemory MB) as slurmd itself detects them; configuring more would drain the node."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
    memory = int(re.search(r"RealMemory=(\d+)", out).group(1))
    return cpus, memory


def _write_config(root: Path, munge_socket: Path, cpus: int, memory_mb: int) -> Path:
    ctld_port, slurmd_port = free_port(), free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=ltscale-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
# Job ids of their own: a two-task job's rendezvous port follows from its id (ltscale.dist.runtime's
# slurm_port), and two clusters numbering from 1 would give two such jobs the same port.
FirstJobId={random.randrange(1000, 1_000_000)}
# Keep finished jobs visible to scontrol (hence to the sacct stand-in) for the whole session.
MinJobAge=3600
# Slurm's default: a signalled job step gets 30 s to exit before SIGKILL. A preempted pipeline
# uses it to unwind and mark its MLflow runs KILLED; with 5 s a loaded 2-core CI machine
# sometimes lost that race (the runs stayed RUNNING).
KillWait=30
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _wait(condition, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}\n{cluster.logs()}")
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"SLURM test cluster: no {what} after {timeout:.0f} s\n{cluster.logs()}")


def _processes_with_env(entry: bytes) -> list[int]:
    """Ids of processes (other than this one) whose environment contains ``entry`` (``KEY=VALUE``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if entry in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def _stop(cluster: SlurmCluster) -> None:
    """Cancel every job, terminate the daemons, then kill whatever this cluster started that is left."""
    if cluster.processes.get("slurmctld") and cluster.processes["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--partition", cluster.partition, check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and cluster.run("squeue", "-h", "-o", "%i", check=False).strip():
                time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # Step daemons and job processes inherit SLURM_CONF from slurmd / sbatch: that names them exactly.
    entry = f"SLURM_CONF={cluster.conf}".encode()
    leftovers = _processes_with_env(entry)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start_slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd with everything under ``root``; stop them all on exit."""
    missing = missing_programs()
    if missing:
        raise FileNotFoundError(f"not installed: {', '.join(missing)}")
    which = {name: shutil.which(name, path=SEARCH_PATH) for name in (*DAEMONS, *CLIENTS)}
    cpus, memory_mb = _node_resources(which["slurmd"])
    root = Path(root).resolve()
    for sub in ("state", "spool", "run", "log", "bin"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_dir = root / "munge"
    munge_dir.mkdir(exist_ok=True)
    # munged wants its socket's directory writable by its owner only, and every directory above it
    # searchable by all (pytest's temp dirs are 0700): the socket gets its own directory in /tmp.
    socket_dir = Path(tempfile.mkdtemp(prefix="ltscale-munge-"))
    socket_dir.chmod(0o711)
    munge_socket = socket_dir / "munge.socket"
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = _write_config(root, munge_socket, cpus, memory_mb)
    sacct = root / "bin" / "sacct"
    sacct.write_text(SACCT_STAND_IN.format(python=sys.executable))
    sacct.chmod(0o755)
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=os.pathsep.join([str(root / "bin"), SEARCH_PATH]))
    cluster = SlurmCluster(root=root, conf=conf, env=env)

    def spawn(name: str, *args: str) -> None:
        log = open(root / "log" / f"{name}.out", "ab")
        cluster.processes[name] = subprocess.Popen([which[name], *args], env=env, stdin=subprocess.DEVNULL,
                                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()

    try:
        spawn("munged", "-F", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={root / 'run' / 'munged.pid'}",
              f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}")
        _wait(munge_socket.exists, 20, "munge socket", cluster)
        spawn("slurmctld", "-D", "-i", "-f", str(conf))
        _wait(lambda: "UP" in cluster.run("scontrol", "ping", check=False), 30, "slurmctld answering ping", cluster)
        spawn("slurmd", "-D", "-N", NODE, "-f", str(conf))
        _wait(lambda: re.search(r"State=IDLE", cluster.run("scontrol", "-o", "show", "node", NODE, check=False)) is not None,
              30, f"node {NODE} idle", cluster)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster for the session; skips when Slurm or munge is not installed."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM tests need Slurm and munge ({', '.join(missing)} not found); "
                    "install with: apt-get install -y slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests start slurmd, which runs jobs only as root here (SlurmUser=root); run them as root (CI does)")
    with start_slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The session cluster, with ``SLURM_CONF`` and the sacct stand-in set for this test's clients."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    return slurm_cluster

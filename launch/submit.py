"""Submit an ltscale pipeline through submitit: on SLURM, as a local subprocess, or in this process.

    python -m launch.submit RECIPE [RECIPE ...] [--set key=value ...] [--seeds 0,1,2]
        --executor {local,slurm,debug} [--partition P] [--nodes N] [--tasks-per-node N]
        [--gpus-per-node N] [--cpus-per-task N] [--mem-gb N] [--timeout-min N] [--folder DIR]
        [--array-parallelism N] [--wait] [--dry-run]

The recipe and its overrides are resolved here, before anything is submitted, so a misspelt key or
a wrong type fails on the login node instead of after hours in the queue. The job is a pickled
``PipelineJob`` holding the resolved ``PipelineConfig``; it calls ``run_pipeline``, which skips
finished stages and resumes an unfinished training stage from its last completed epoch. That is
what makes preemption cheap: on SLURM's preemption / time-limit signal (USR2), submitit calls
``PipelineJob.checkpoint``, which hands back the same job for resubmission, and requeues it; the
requeued job runs the same config and picks up where the store says it stopped (at most the
epoch in flight is lost).

Several processes: ``--tasks-per-node`` (one per GPU, say 8) and ``--nodes`` start
``nodes x tasks-per-node`` copies of the job (srun on SLURM, subprocesses on the local executor);
each learns its rank from submitit's job environment and the pipeline trains data-parallel over
all of them (``ltscale/dist/runtime.py``), rank 0 writing the outputs and the MLflow record. The
recipes' batch sizes are global, so each must split evenly over the processes; that is checked
here, before submitting.

Several recipes, or ``--seeds``, make a sweep: one job per recipe and seed, submitted together
(one SLURM job array), sharing the output directory, so a stage two of them need is trained once.

Executors: ``slurm`` (sbatch), ``local`` (subprocesses on this machine, with the same
signal/requeue handling), ``debug`` (runs in this process when waited on, so always waits; an
exception opens pdb). Logs (``<job id>_0_log.out`` / ``.err``) and the pickled job go to
``--folder`` (default ``<output_dir>/submitit``).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import difflib
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import types
import typing
import zlib
from pathlib import Path
from typing import Any, Sequence

import submitit

from ltscale.config import ConfigError, apply_overrides, get_recipe, override_key
from ltscale.dist.runtime import SLURM_PORT_RANGE
from ltscale.stages.config import PipelineConfig
from ltscale.tracking import redact_uri
from ltscale.tracking.mlflow_tracker import sqlite_file

EXECUTORS = ("slurm", "local", "debug")
DEFAULT_TIMEOUT_MIN = 24 * 60
# submitit requeues on a time-limit signal at most this many times (preemptions do not count).
DEFAULT_MAX_TIMEOUTS = 3


class PipelineJob:
    """A whole pipeline as a submitit job: picklable, resumable, requeued on preemption.

    ``config`` is resolved on the submitting machine. Its ``progress`` stays as configured: the
    job's output goes to log files, where a run writes a timestamped line per stage and epoch
    instead of bars (``--set progress=false`` silences them).
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def __call__(self) -> dict[str, Any]:
        import torch

        from ltscale.stages.pipeline import run_pipeline

        # Where SLURM does not bind tasks to their CPUs, PyTorch sizes its thread pool to the whole
        # node, and threads spinning on cores other jobs use made epochs up to 50x slower in tests.
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(int(cpus))
        export_rank_environment(submitit.JobEnvironment())
        result = run_pipeline(self.config)
        return {
            "pipeline": result.name,
            "run_id": result.run_id,
            "tracking_uri": redact_uri(result.tracking_uri),  # printed, and kept in submitit's folder
            "output_dir": self.config.output_dir,
            "result_stage": result.result_stage,
            "metrics": result.metrics(),
            "executed": list(result.executed),
            "cached": list(result.cached),
            "stage_runs": {name: output.run_id for name, output in result.outputs.items()},
            # How often SLURM requeued this job before the attempt that finished (0 elsewhere).
            "requeues": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        }

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out: resubmit this same job.

        Nothing needs saving here: every stage already writes an atomic ``progress.pt`` at the end
        of each epoch, and the rerun resumes from it.

        After this returns, submitit runs ``scontrol requeue`` as a child of this job. Accepting
        the requeue makes Slurm SIGTERM every process of the job, that ``scontrol`` included, and
        when the signal wins the race with the reply, submitit takes the (successful) requeue for
        a failure and writes a failed result. An ignored SIGTERM is inherited across exec, so
        ignoring it here lets ``scontrol`` report back; this process exits right after anyway
        (and Slurm's SIGKILL still ends it after KillWait).
        """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"PipelineJob({self.config.name!r}, output_dir={self.config.output_dir!r})"


def export_rank_environment(job: Any, environ: dict[str, str] | None = None) -> None:
    """Describe this task's place in a multi-task job in torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which ``ltscale.dist.runtime`` reads, from submitit's
    job environment, the same on SLURM and on the local executor. Variables already set win.

    The rendezvous is the job's first host; the port is derived from the job id, so every task
    computes the same one and concurrent jobs on a node rarely share it.
    """
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if job.num_tasks <= 1:
        return
    port = SLURM_PORT_RANGE.start + zlib.crc32(str(job.job_id).encode()) % len(SLURM_PORT_RANGE)
    host = "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]
    for key, value in (("RANK", job.global_rank), ("WORLD_SIZE", job.num_tasks), ("LOCAL_RANK", job.local_rank),
                       ("MASTER_ADDR", host), ("MASTER_PORT", port)):
        environ.setdefault(key, str(value))


def resolve_config(recipe: str, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The recipe with its ``--set`` overrides applied, and ``output_dir`` made absolute.

    An absolute output directory means the job writes where the submitter looked, whatever its
    working directory on the compute node.
    """
    config = apply_overrides(get_recipe(recipe), list(overrides))
    return dataclasses.replace(config, output_dir=str(Path(config.output_dir).expanduser().resolve()))


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the job asks the scheduler for (``None``: the executor's / partition's default)."""

    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = DEFAULT_TIMEOUT_MIN
    max_timeouts: int = DEFAULT_MAX_TIMEOUTS
    slurm_options: tuple[tuple[str, str], ...] = ()
    array_parallelism: int | None = None  # a sweep's job array: at most this many jobs at once


def check_resources(kind: str, resources: Resources, config: PipelineConfig) -> None:
    """Refuse requests the pipeline cannot use, before they reach the queue."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if resources.nodes < 1 or resources.tasks_per_node < 1:
        raise ConfigError(f"--nodes {resources.nodes} --tasks-per-node {resources.tasks_per_node}: both must be at least 1")
    if resources.gpus_per_node is not None and resources.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node {resources.gpus_per_node}: must be 0 or more")
    if resources.cpus_per_task is not None and resources.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {resources.cpus_per_task}: must be at least 1")
    if resources.mem_gb is not None and not (math.isfinite(resources.mem_gb) and resources.mem_gb > 0):
        raise ConfigError(f"--mem-gb {resources.mem_gb}: must be a finite number of GB > 0")
    if resources.max_timeouts < 0:
        raise ConfigError(f"--max-timeouts {resources.max_timeouts}: must be 0 or more (requeues after the time limit)")
    # submitit parameters this tool sets itself: a --slurm-option for one would silently win over
    # (or lose to) the option that names it
    named = {"partition": ("--partition", resources.partition), "nodes": ("--nodes", resources.nodes),
             "ntasks_per_node": ("--tasks-per-node", resources.tasks_per_node),
             "gpus_per_node": ("--gpus-per-node", resources.gpus_per_node),
             "cpus_per_task": ("--cpus-per-task", resources.cpus_per_task), "mem": ("--mem-gb", resources.mem_gb),
             "time": ("--timeout-min", resources.timeout_min),
             "array_parallelism": ("--array-parallelism", resources.array_parallelism), "job_name": ("the job name", "")}
    for key, _ in resources.slurm_options:
        if key in named and named[key][1] is not None:
            raise ConfigError(f"--slurm-option {key}=...: this tool sets it from {named[key][0]}; use that option instead")
    processes = resources.nodes * resources.tasks_per_node
    if kind == "local" and resources.nodes != 1:
        raise ConfigError(f"--nodes {resources.nodes}: the local executor runs on this one machine; use --nodes 1")
    if kind == "debug" and processes != 1:
        raise ConfigError("the debug executor runs the pipeline in this process: use one node and one task")
    problem = config.batch_split_problem(processes)
    if problem:
        raise ConfigError(f"{problem} ({resources.nodes} node(s) x {resources.tasks_per_node} task(s))")
    # device=auto trains on the node's GPUs when it has any, so it is held to this too.
    if (kind == "slurm" and config.device != "cpu" and resources.gpus_per_node is not None
            and 0 < resources.gpus_per_node < resources.tasks_per_node):
        raise ConfigError(f"--tasks-per-node {resources.tasks_per_node} with --gpus-per-node {resources.gpus_per_node}: "
                          "each process trains on its own GPU")
    if resources.timeout_min <= 10:
        # submitit treats every signal as a time-out when the limit is this short, so a preempted
        # job would burn its time-out requeues.
        raise ConfigError(f"--timeout-min {resources.timeout_min}: use more than 10 minutes")
    if kind == "slurm" and config.device.startswith("cuda") and resources.gpus_per_node == 0:
        raise ConfigError(f"device={config.device} but --gpus-per-node 0: request a GPU or set device=cpu / auto")
    # A GPU index counts among the GPUs the job is given on its node (SLURM and the local executor
    # show it only those; the debug executor runs here and sees them all), and it names one GPU for
    # every process of the node.
    index = int(config.device.partition(":")[2]) if config.device.startswith("cuda:") and kind != "debug" else None
    if index is not None and resources.tasks_per_node > 1:
        raise ConfigError(f"device={config.device} with --tasks-per-node {resources.tasks_per_node}: every process of a node "
                          "would train on that one GPU; use device=cuda, which gives each process its own (its local rank's)")
    other_gpu_requests = {"gres", "gpus", "gpus_per_task"} & {key for key, _ in resources.slurm_options}
    if (index is not None and resources.gpus_per_node is not None and not other_gpu_requests
            and index >= resources.gpus_per_node):
        raise ConfigError(f"device={config.device} but the job is given {resources.gpus_per_node} GPU(s) per node "
                          f"(--gpus-per-node), numbered from 0 there: use device=cuda, or --gpus-per-node {index + 1}")


def build_executor(kind: str, folder: str | Path, resources: Resources, name: str) -> submitit.Executor:
    """A submitit executor of ``kind`` (slurm / local / debug) with ``resources`` applied."""
    executor = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=resources.max_timeouts,
                                     local_max_num_timeout=resources.max_timeouts)
    parameters: dict[str, Any] = {"name": name, "timeout_min": resources.timeout_min, "nodes": resources.nodes,
                                  "tasks_per_node": resources.tasks_per_node}
    if resources.gpus_per_node is not None:
        parameters["gpus_per_node"] = resources.gpus_per_node
    if resources.cpus_per_task is not None:
        parameters["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb is not None:
        parameters["mem_gb"] = resources.mem_gb
    if resources.partition:
        parameters["slurm_partition"] = resources.partition
    if resources.array_parallelism is not None:
        parameters["slurm_array_parallelism"] = resources.array_parallelism
    parameters.update({f"slurm_{key}": value for key, value in slurm_parameters(resources.slurm_options).items()})
    executor.update_parameters(**parameters)
    return executor


# List parameters whose items are lines of the batch script (``setup=module load cuda`` is one
# command), not words; every other list (srun_args) is split as a shell splits it.
SLURM_LINE_LISTS = frozenset({"setup", "teardown"})
_TRUE, _FALSE = frozenset({"true", "yes", "1"}), frozenset({"false", "no", "0"})
# Integer parameters for which 0 means something (no GPU, no warning signal); every other one
# counts things a job needs at least one of.
SLURM_COUNTS_FROM_ZERO = frozenset({"num_gpus", "gpus_per_node", "gpus_per_task", "signal_delay_s"})


def slurm_parameter_types() -> dict[str, Any]:
    """The type submitit's SlurmExecutor annotates each parameter it accepts with (the keyword
    arguments of the function that writes the batch script), read from the installed submitit."""
    from submitit.slurm import slurm

    hints = typing.get_type_hints(slurm._make_sbatch_string)
    return {key: hints.get(key, str) for key in slurm._get_default_parameters()}


def slurm_parameters(options: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``--slurm-option`` values (text) as the types submitit expects: a string reaching a list
    parameter was split into characters (srun_args) or crashed the submission (setup), and
    ``use_srun=false`` counted as true. A list parameter given several times collects the items."""
    expected = slurm_parameter_types()
    parameters: dict[str, Any] = {}
    for key, text in options:
        if key not in expected:
            close = difflib.get_close_matches(key, expected, n=3)
            raise ConfigError(f"--slurm-option {key}=...: submitit has no SLURM parameter {key!r}"
                              + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        value = _slurm_value(key, text, expected[key])
        if isinstance(value, list):
            parameters[key] = parameters.get(key, []) + value
        else:
            parameters[key] = value
    return parameters


def _slurm_value(key: str, text: str, kind: Any) -> Any:
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    # exclusive is bool or str: "true" is the flag, "user" its value
    alternatives = [member for member in typing.get_args(kind) if member is not type(None)] if union else [kind]
    expected = []
    for alternative in alternatives:
        base = typing.get_origin(alternative) or alternative
        if base is str:
            return text
        if base is bool:
            if text.strip().lower() in _TRUE | _FALSE:
                return text.strip().lower() in _TRUE
            expected.append("true or false (or yes / no, 1 / 0)")
        elif base is int:
            try:
                number = int(text)
            except ValueError:
                expected.append("an integer")
                continue
            # Every integer parameter is a count; sbatch would refuse a bad one only once queued
            # (array_parallelism=0 writes the malformed "--array=0-N%0").
            least = 0 if key in SLURM_COUNTS_FROM_ZERO else 1
            if number < least:
                raise ConfigError(f"--slurm-option {key}={text}: must be at least {least}")
            return number
        elif base in (list, collections.abc.Iterable, collections.abc.Sequence):
            if key in SLURM_LINE_LISTS:
                return [text]
            try:
                return shlex.split(text)
            except ValueError as error:
                expected.append(f"arguments as a shell splits them ({error})")
        elif base is dict:
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
            expected.append('a JSON object, e.g. {"reservation": "r1"}')
        else:
            expected.append(f"a {alternative} (not settable from the command line)")
    raise ConfigError(f"--slurm-option {key}={text}: submitit expects {' or '.join(expected)}")


def default_gpus(kind: str, tasks_per_node: int = 1, device: str = "auto") -> int | None:
    """A GPU per task on SLURM; on the local executor a GPU per task if this machine has GPUs (it
    hides the GPUs it is not given); the debug executor runs in this process and requests nothing.
    No GPU (0) for a pipeline that runs on the CPU (``device=cpu``): a CPU-only partition refuses a
    request for GPUs ("Invalid generic resource specification")."""
    if device == "cpu" and kind != "debug":
        return 0
    if kind == "slurm":
        return tasks_per_node
    if kind == "local":
        import torch

        return tasks_per_node if torch.cuda.is_available() else 0
    return None


NETWORK_FILE_SYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "panfs",
                                   "wekafs", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.beegfs"})


def file_system_type(path: str | Path) -> str:
    """The type of the file system holding ``path`` (or its nearest existing parent), as
    /proc/mounts names it; "" where that cannot be told."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        path = Path(path).expanduser().absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        where = str(path.resolve())
    except OSError:
        return ""
    best, kind = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (where == mount or where.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def shared_sqlite_warning(configs: Sequence[PipelineConfig]) -> str | None:
    """A sweep's jobs all write one MLflow store, from several nodes at once. SQLite's locking is
    not dependable on network file systems (its own documentation says so), and a sweep on a
    cluster usually keeps output_dir on one: say so, with the remedy, before submitting."""
    if len(configs) < 2:
        return None
    stores = set()
    for config in configs:
        uri = config.tracking.tracking_uri
        if not uri:
            stores.add(Path(config.output_dir).expanduser() / "mlflow.db")
        elif (store := sqlite_file(uri)) is not None:
            stores.add(store)
    shared = sorted((str(store), kind) for store in stores if (kind := file_system_type(store.parent)) in NETWORK_FILE_SYSTEMS)
    if not shared:
        return None
    named = ", ".join(f"{store} ({kind})" for store, kind in shared)
    return (f"the {len(configs)} jobs of this sweep record into the SQLite MLflow store {named} on a network file system, "
            "where SQLite's locking is not dependable with writers on several nodes. Run an MLflow server "
            "(mlflow server --backend-store-uri sqlite:////<local disk>/mlflow.db --host 0.0.0.0) and pass "
            "--set tracking.tracking_uri=http://<host>:5000")


def job_name(config: PipelineConfig) -> str:
    return "ltscale-" + config.name.replace("/", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", metavar="recipe",
                        help="recipe names (`ltscale recipes` lists them), e.g. cifar100-lt-if100/ssd; several make a sweep")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="typed override of the recipe config, as for `ltscale run` (repeatable)")
    parser.add_argument("--seeds", type=_seeds, default=None, metavar="S1,S2,...",
                        help="run each recipe once per seed (a sweep); default: the recipe's seed")
    parser.add_argument("--array-parallelism", type=int, default=None,
                        help="a sweep on SLURM is one job array; at most this many of its jobs run at once (default: submitit's)")
    parser.add_argument("--executor", choices=EXECUTORS, required=True,
                        help="slurm: sbatch; local: a subprocess here; debug: in this process (always waits)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (SLURM only; default 1)")
    parser.add_argument("--tasks-per-node", type=int, default=1,
                        help="processes per node, one per GPU (default 1); the pipeline trains data-parallel over all of them")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs to request (default: one per task on slurm; on local one per task if this machine has GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPUs per process (default: data.loader.num_workers + 1, the loader's workers and the trainer)")
    parser.add_argument("--mem-gb", type=float, default=None, help="memory to request (default: the partition's)")
    parser.add_argument("--timeout-min", type=int, default=DEFAULT_TIMEOUT_MIN,
                        help=f"time limit per attempt in minutes (default {DEFAULT_TIMEOUT_MIN}); "
                             "on reaching it the job is requeued and resumes")
    parser.add_argument("--max-timeouts", type=int, default=DEFAULT_MAX_TIMEOUTS,
                        help=f"requeues after hitting the time limit before giving up (default {DEFAULT_MAX_TIMEOUTS}; "
                             "preemptions are not counted)")
    parser.add_argument("--slurm-option", dest="slurm_options", action="append", default=[], metavar="KEY=VALUE",
                        help="any other submitit SLURM parameter, e.g. account=proj1, qos=high, constraint=a100, "
                             "use_srun=false, srun_args='--cpu-bind=none' (split like a shell), setup='module load cuda' "
                             "(one batch-script line; repeat for more) (repeatable)")
    parser.add_argument("--folder", default=None,
                        help="submitit logs and pickles, named by job id; %%j in the path becomes the job id (default: <output_dir>/submitit)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its summary as JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and executor parameters; submit nothing")
    return parser


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def sweep_configs(recipes: Sequence[str], overrides: Sequence[str], seeds: Sequence[int] | None) -> list[PipelineConfig]:
    """One resolved config per recipe and seed, all checked before anything is submitted.

    The jobs of a sweep share the output directory (and its MLflow store): a stage two of them
    need (the CE teacher of the CE and LWS baselines) is trained once and reused, the other job
    waiting for it (``ltscale/stages/locks.py``).
    """
    if seeds and "seed" in map(override_key, overrides):
        raise ConfigError("--set seed=... and --seeds both set the seed: give one (--seeds runs one job per seed)")
    return [resolve_config(recipe, [*overrides, *([f"seed={seed}"] if seed is not None else [])])
            for recipe in recipes for seed in (seeds or [None])]


def _slurm_options(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    options = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm-option {item!r} is not of the form key=value (for example account=proj1)")
        options.append((key.strip().replace("-", "_"), value))
    return tuple(options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        repeated = sorted({recipe for recipe in args.recipes if args.recipes.count(recipe) > 1})
        if repeated:
            raise ConfigError(f"recipe {repeated[0]} is given twice: a sweep runs each recipe once per seed (--seeds)")
        configs = sweep_configs(args.recipes, args.overrides, args.seeds)
        first = configs[0]
        gpus = args.gpus_per_node if args.gpus_per_node is not None else default_gpus(args.executor, args.tasks_per_node, first.device)
        cpus = args.cpus_per_task if args.cpus_per_task is not None else first.data.loader.num_workers + 1
        if args.array_parallelism is not None and args.array_parallelism < 1:
            raise ConfigError(f"--array-parallelism {args.array_parallelism}: must be at least 1")
        resources = Resources(partition=args.partition, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                              gpus_per_node=gpus, cpus_per_task=cpus,
                              mem_gb=args.mem_gb, timeout_min=args.timeout_min, max_timeouts=args.max_timeouts,
                              slurm_options=_slurm_options(args.slurm_options), array_parallelism=args.array_parallelism)
        for config in configs:
            check_resources(args.executor, resources, config)
        warning = shared_sqlite_warning(configs) if args.executor == "slurm" else None
        if warning:
            print(f"launch.submit: warning: {warning}", file=sys.stderr)
        name = job_name(first) if len(configs) == 1 else f"ltscale-sweep-{len(configs)}"
        folder = Path(args.folder or Path(first.output_dir) / "submitit").expanduser().absolute()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--folder {folder}: is a file; submitit's logs need a directory there")
        # Build once in a scratch folder: submitit validates the parameters (and creates its folder)
        # when the executor is built, and a dry run or a refused request should leave no trace.
        with tempfile.TemporaryDirectory() as scratch:
            parameters = build_executor(args.executor, scratch, resources, name).parameters
        if args.dry_run:
            described = [{"pipeline": c.name, "seed": c.seed, "stages": list(c.stages), "output_dir": c.output_dir,
                          "device": c.device, "tracking_uri": redact_uri(c.tracking.tracking_uri) or "(local store in output_dir)"}
                         for c in configs]
            print(json.dumps({"executor": args.executor, "folder": str(folder), "parameters": parameters,
                              **(described[0] if len(described) == 1 else {"jobs": described})}, indent=2, default=str))
            return 0
        executor = build_executor(args.executor, folder, resources, name)
    except (ConfigError, ValueError, NameError) as error:  # NameError: submitit's unknown-parameter error
        print(f"launch.submit: error: {error}", file=sys.stderr)
        return 2

    try:
        if len(configs) == 1:
            jobs = [executor.submit(PipelineJob(first))]
        else:
            with executor.batch():  # one SLURM job array
                jobs = [executor.submit(PipelineJob(config)) for config in configs]
    except submitit.core.utils.FailedJobError as error:  # sbatch refused it (unknown partition, limits...)
        print(f"launch.submit: submission failed: {error}", file=sys.stderr)
        return 1
    for job, config in zip(jobs, configs):
        print(f"submitted {config.name}" + (f" (seed {config.seed})" if args.seeds else "") + f" as {args.executor} job {job.job_id}")
    print(f"logs: {jobs[0].paths.folder}")
    if not (args.wait or args.executor == "debug"):
        return 0
    summaries, failed = [], False
    try:
        for job in jobs:
            try:
                summaries.append(job.results()[0])  # one result per task; rank 0's holds the run (they all report it)
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
                print(f"launch.submit: job {job.job_id} failed: {error}", file=sys.stderr)
                failed = True
    except KeyboardInterrupt:
        if args.executor == "slurm":
            ids = " ".join(str(job.job_id) for job in jobs)
            print(f"\nstopped waiting; the jobs keep running (scancel {ids} to stop them)", file=sys.stderr)
        return 130
    print(json.dumps(summaries[0] if len(jobs) == 1 and summaries else summaries, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    # Run as `launch.submit`, not `__main__`: the job is then pickled as a reference to
    # launch.submit.PipelineJob, the same class as when submitted from Python (cloudpickle would
    # otherwise copy a `__main__` class by value into every job pickle).
    from launch.submit import main as _main

    sys.exit(_main())

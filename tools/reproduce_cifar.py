#!/usr/bin/env python
"""Reproduce the CIFAR-100-LT table (ResNet-32): CE, BSCE, LWS, LDAM-DRW, DiVE and SSD at IF 100,
50 and 10 over several seeds, beside the published numbers, with the command and MLflow run of
every cell. One command:

    python tools/reproduce_cifar.py --data .data/cifar100_lt_if10.npz --concurrency 3

Each (method, IF, seed) is one ``ltscale run <recipe> --set seed=N`` process. Processes are grouped
into lanes that share an output directory, so the stage cache reuses a teacher where two methods
train the same one (LWS re-balances the CE teacher; DiVE distils the BSCE teacher); lanes run
``--concurrency`` at a time (several seeds of one recipe together on one GPU). Each finished job
writes ``<output-dir>/jobs/<name>.json`` (command, parent MLflow run id, the stage run ids, every
stage's metrics read from its manifest, wall time); a re-run skips finished jobs, and an
interrupted stage resumes from its progress checkpoint, so the table can be built over several
invocations (``--stop-after-minutes`` keeps one inside a time limit; a SIGTERM, SIGHUP or Ctrl-C
stops the running jobs with the tool, see ``Children``). From all job files present
the tool writes ``results/cifar100_lt.json``, ``.csv`` and ``.md`` (mean ± std over seeds; the
markdown is ready for RESULTS.md).

``--epochs N`` overrides every stage's epochs (a smoke run, marked as such in the table);
``--recipe-prefix demo`` runs the ``demo/<method>`` recipes on the generated dataset (tests).
``--dry-run`` prints the commands and exits.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("ce", "bsce", "lws", "ldam-drw", "dive", "ssd")
# Not in the papers' tables (no published number): SSD's teacher with DiVE's targets, "past the papers".
EXTRA_METHODS = ("ssd-dive",)
IMBALANCE_FACTORS = (100.0, 50.0, 10.0)
DEFAULT_PREFIX = "cifar100-lt-if{if}"
OWN_KEYS = {
    "seed": "--seeds sets seed", "data.root": "--data sets data.root", "data.dataset": "--recipe-prefix sets data.dataset",
    "data.imbalance_factor": "--imbalance-factors picks each job's recipe, and with it data.imbalance_factor,", "output_dir": "--output-dir sets output_dir",
    "device": "--device sets device", "tracking.tracking_uri": "--tracking-uri / --tracking-store set tracking.tracking_uri",
    "progress": "every job's log gets a line per stage and epoch (progress on, off a terminal)",
}
"""Settings the tool gives every job itself. The job files and the table are labelled by them, so a
``--set`` of one would train a run other than its row says (``progress=false``: a log without a
line per stage and epoch, the only way to follow a job)."""

# Methods in one lane share an output directory and run in this order, so the later one reuses
# the earlier one's teacher from the stage cache.
LANE_OF = {"ce": "ce", "lws": "ce", "bsce": "bsce", "dive": "bsce", "ldam-drw": "ldam-drw", "ssd": "ssd", "ssd-dive": "ssd"}

# Published top-1 (%) on CIFAR-100-LT, ResNet-32 (../shared/METHODS.md; LDAM-DRW from the DiVE and
# SSD papers' tables, ../shared/papers; CE and BSCE as DiVE's Table 1 prints them, which METHODS.md
# rounds to one decimal). SSD's 46.0 / 50.5 / 62.3 is the full pipeline (after stage IV).
PUBLISHED: dict[str, dict[float, float]] = {
    "ce": {100.0: 38.35, 50.0: 42.41, 10.0: 56.51},
    "bsce": {100.0: 42.39, 50.0: 47.60, 10.0: 58.38},
    "lws": {100.0: 42.3, 50.0: 46.0, 10.0: 58.1},
    "ldam-drw": {100.0: 42.04, 50.0: 46.62, 10.0: 58.71},
    "dive": {100.0: 45.35, 50.0: 51.13, 10.0: 62.0},
    "ssd (after stage IV)": {100.0: 46.0, 50.0: 50.5, 10.0: 62.3},
}
# SSD's Table 2 re-ran CE in BBN's setting ("CE*"): the published CE beside a BBN-schedule run.
PUBLISHED_BBN: dict[str, dict[float, float]] = {"ce": {100.0: 39.1, 50.0: 44.0, 10.0: 55.8}}
PUBLISHED_SOURCES = (
    "CE, BSCE, DiVE: DiVE (ICCV 2021) Table 1; LWS, SSD: SSD (ICCV 2021) Table 2; LDAM-DRW: as reported in both "
    "(DiVE Table 1: 42.04 / 46.62 / 58.71). The papers publish no separate numbers for SSD's hard and soft heads."
)
PUBLISHED_BBN_SOURCES = " With BBN's schedule, CE is SSD's Table 2 re-run in that setting (CE*: 39.1 / 44.0 / 55.8)."


def published(label: str, imbalance_factor: float, recipe_prefix: str) -> float | None:
    """The published top-1 a row is compared with (BBN-schedule recipes: SSD's re-run CE)."""
    if recipe_prefix.endswith("-bbn") and label in PUBLISHED_BBN:
        return PUBLISHED_BBN[label].get(imbalance_factor)
    return PUBLISHED.get(label, {}).get(imbalance_factor)


def published_sources(recipe_prefix: str) -> str:
    return PUBLISHED_SOURCES + (PUBLISHED_BBN_SOURCES if recipe_prefix.endswith("-bbn") else "")


@dataclass(frozen=True)
class RowSpec:
    """One table row: ``method``'s pipeline, the ``stage`` whose manifest metrics it reports under ``prefix``."""

    label: str
    method: str
    stage: str  # "" = the pipeline's result stage
    prefix: str = "test"


def row_specs(methods: list[str]) -> list[RowSpec]:
    rows = []
    for method in methods:
        if method == "ssd":
            rows += [RowSpec("ssd (hard head)", "ssd", "student", "test/hard"),
                     RowSpec("ssd (soft head)", "ssd", "student", "test/soft"),
                     RowSpec("ssd (after stage IV)", "ssd", "student_lws", "test")]
        else:
            rows.append(RowSpec(method, method, ""))
    return rows


@dataclass
class Job:
    method: str
    imbalance_factor: float
    seed: int
    recipe: str
    lane: str
    argv: list[str]  # what runs: python -m ltscale run ...
    command: str  # the same as the user-facing ``ltscale run ...``, without a tracking URI's password
    pipeline_name: str
    result_stage: str
    record: Path
    signature: dict[str, Any]  # what makes a job file this job's, independent of paths and machine

    @property
    def name(self) -> str:
        return f"if{self.imbalance_factor:g}-{self.method}-seed{self.seed}"


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    lanes: dict[str, list[Job]] = field(default_factory=dict)
    datasets: set[tuple[str, float]] = field(default_factory=set)  # (dataset, imbalance factor) the jobs read


def epoch_overrides(config: Any, epochs: int) -> list[str]:
    """``--set`` overrides giving every training stage of ``config`` ``epochs`` epochs (smoke runs).

    Warm-up and LDAM's DRW start are moved first (both must stay below the epochs, and each override
    is validated as it is applied); a one-epoch smoke run has no DRW."""
    overrides = []
    for name, stage in config.stages.items():
        optim = getattr(stage, "optim", None)
        if optim is None:
            continue
        if optim.warmup_epochs >= epochs:
            overrides.append(f"stages.{name}.optim.warmup_epochs={max(0, epochs - 1)}")
        drw_epoch = getattr(getattr(stage, "loss", None), "drw_epoch", 0)
        if drw_epoch >= epochs:
            overrides.append(f"stages.{name}.loss.drw_epoch={max(0, epochs - 1)}")
        overrides.append(f"stages.{name}.optim.epochs={epochs}")
    return overrides


def recipe_name(prefix: str, imbalance_factor: float, method: str) -> str:
    return f"{prefix.replace('{if}', f'{imbalance_factor:g}')}/{method}"


def build_plan(args: argparse.Namespace) -> Plan:
    from ltscale.config import apply_overrides, get_recipe
    from ltscale.tracking import redact_uri

    output_dir = Path(args.output_dir).resolve()
    plan = Plan()
    # A variant (--set) shares its lanes' output directories, so it reuses their teachers, but
    # writes job files of its own: it must not replace the plain run's record, nor be taken for it.
    variant = variant_suffix(args.overrides, args.epochs, args.recipe_prefix)
    for imbalance_factor in args.imbalance_factors:
        for method in args.methods:
            recipe = recipe_name(args.recipe_prefix, imbalance_factor, method)
            config = get_recipe(recipe)
            reads_cifar = config.data.dataset in ("cifar100_lt", "cifar10_lt")
            if reads_cifar and not args.data and not args.collect_only:
                raise ValueError(f"recipe {recipe} reads CIFAR; pass --data (the archive or a packed .npz)")
            if args.data and not reads_cifar:
                raise ValueError(f"--data names CIFAR data, but recipe {recipe} trains on "
                                 f"{config.data.dataset}; leave --data out")
            for seed in args.seeds:
                lane = f"if{imbalance_factor:g}-{LANE_OF.get(method, method)}-seed{seed}"
                overrides = [f"seed={seed}"]
                if args.data:
                    overrides.append(f"data.root={Path(args.data).resolve()}")
                if args.epochs:
                    overrides += epoch_overrides(config, args.epochs)
                overrides += args.overrides
                resolved = apply_overrides(config, overrides)  # fail here, not in the child process
                if resolved.tracking.experiment != args.experiment:  # its runs could not be found after training
                    raise ValueError(f"--experiment {args.experiment!r}, but recipe {recipe} records into the MLflow "
                                     f"experiment {resolved.tracking.experiment!r}")
                trained = trained_imbalance_factor(resolved)
                if trained is not None and trained != imbalance_factor:  # a --recipe-prefix without {if}
                    raise ValueError(f"recipe {recipe} trains at imbalance factor {trained:g}, but its jobs and table "
                                     f"column would say {imbalance_factor:g} (--imbalance-factors): "
                                     + (f"pass --imbalance-factors {trained:g}" if "{if}" not in args.recipe_prefix else
                                        "the recipes named by --recipe-prefix do not train at the factor they are named by"))
                if resolved.data.dataset in ("cifar100_lt", "cifar10_lt"):
                    plan.datasets.add((resolved.data.dataset, resolved.data.imbalance_factor))
                # No --no-progress: a job writes into its log file, not a terminal, so progress
                # is a line per stage and epoch there (--no-progress silenced those too).
                tail = [recipe, "--output-dir", str(output_dir / "runs" / lane)]
                for item in overrides:
                    tail += ["--set", item]
                if args.tracking_uri or args.tracking_store == "file":
                    tail += ["--tracking-uri", _tracking_uri(args, lane)]
                if args.device:
                    tail += ["--device", args.device]
                job = Job(method, imbalance_factor, seed, recipe, lane, [sys.executable, "-m", "ltscale", "run", *tail],
                          redact_uri(shlex.join(["ltscale", "run", *tail])), resolved.name, resolved.result,
                          output_dir / "jobs" / f"if{imbalance_factor:g}-{method}-seed{seed}{variant}.json",
                          {"recipe": recipe, "seed": seed, "epochs": args.epochs, "overrides": list(args.overrides)})
                plan.jobs.append(job)
    order = {m: i for i, m in enumerate(METHODS)}
    for job in sorted(plan.jobs, key=lambda j: (-j.imbalance_factor, order.get(j.method, 99), j.seed)):
        plan.lanes.setdefault(job.lane, []).append(job)
    return plan


def _tracking_uri(args: argparse.Namespace, lane: str) -> str:
    """--tracking-uri, else one store per lane: sqlite (ltscale's default) or an MLflow file store."""
    if args.tracking_uri:
        return args.tracking_uri
    lane_dir = Path(args.output_dir).resolve() / "runs" / lane
    if args.tracking_store == "file":
        return (lane_dir / "mlruns").as_uri()
    from ltscale.tracking import default_tracking_uri

    return default_tracking_uri(lane_dir)


JOB_TAG = "reproduce_cifar.job"
"""MLflow tag on each job's pipeline run, a fresh id per attempt: the run is found by it, not by its
name, seed and start time, which a variant in the same lane or a second invocation may share."""


def collect(args: argparse.Namespace, job: Job, job_tag: str) -> dict[str, Any]:
    """The parent MLflow run of ``job``'s pipeline (the finished one tagged ``job_tag``) and every
    stage's manifest metrics."""
    from mlflow import MlflowClient

    from ltscale.tracking import redact_uri

    uri = _tracking_uri(args, job.lane)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise RuntimeError(f"no MLflow experiment {args.experiment!r} at {redact_uri(uri)}")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_tag}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise RuntimeError(f"no finished pipeline run {job.pipeline_name!r} tagged {JOB_TAG}={job_tag} at {redact_uri(uri)}")
    parent = parents[0]
    with tempfile.TemporaryDirectory() as tmp:
        lineage = json.loads(Path(client.download_artifacts(parent.info.run_id, "lineage.json", tmp)).read_text())
    stages = {}
    for stage, entry in lineage.items():
        manifest = json.loads((Path(entry["directory"]) / "manifest.json").read_text())
        # run_id: the stage run that produced the output (a cached stage points at its producer)
        stages[stage] = {"run_id": entry["run_id"], "key": entry["key"], "metrics": manifest.get("metrics", {}),
                         "code_version": manifest.get("code_version")}
    # The code behind the numbers: each stage's producer (a reused stage may predate this tool's
    # start, and a job started later may run code committed since), not the tool's own version.
    code_versions = sorted({str(s["code_version"]) for s in stages.values()})
    return {"run_id": parent.info.run_id, "tracking_uri": redact_uri(uri), "stages": stages, "code_versions": code_versions}


class Children:
    """The ``ltscale run`` processes the lanes are running, so that a signal to this tool stops them.

    ``kill``, ``timeout`` and a closed terminal (SIGHUP) signal only this process: its jobs would
    train on, orphaned, holding their stages' locks, and the lanes would start their next jobs. A
    SIGTERM or SIGHUP is passed on as one SIGTERM per job (ltscale's handler exits at each SIGTERM,
    so a second would cut its marking the runs KILLED short); Ctrl-C already reached the jobs, which
    share the terminal's process group, so the first SIGINT only stops new jobs from starting and a
    second one passes SIGTERM on. Either way no further job starts, and the tool exits with 128 +
    the signal's number after its table of the finished jobs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self._passed_on = False
        self.stop_signal: int | None = None

    def start(self, argv: list[str], **popen: Any) -> subprocess.Popen | None:
        """Popen ``argv``, or None once a stop signal has come."""
        # Under the lock: a signal's handler either sees the new child or keeps it from starting.
        with self._lock:
            if self.stop_signal is not None:
                return None
            child = subprocess.Popen(argv, **popen)
            self._live.add(child)
            return child

    def wait(self, child: subprocess.Popen) -> int:
        returncode = child.wait()
        with self._lock:
            self._live.discard(child)
        return returncode

    def stop(self, signum: int, frame: Any = None) -> None:
        """The signal handler (it runs in the main thread, which never holds the lock itself)."""
        with self._lock:
            first = self.stop_signal is None
            if first:
                self.stop_signal = signum
            # A first SIGINT came from the terminal to the jobs too; anything else is passed on, once.
            pass_on = not self._passed_on and (signum != signal.SIGINT or not first)
            self._passed_on = self._passed_on or pass_on
            children = list(self._live) if pass_on else []
        if first:
            print(f"reproduce_cifar: {signal.Signals(signum).name}: no further job starts; the running jobs are stopping",
                  file=sys.stderr, flush=True)
        for child in children:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def not_started(self) -> str:
        return f"not started: stopped by {signal.Signals(self.stop_signal).name}"


def run_job(args: argparse.Namespace, job: Job, log_dir: Path, env_record: dict[str, Any],
            children: Children) -> dict[str, Any]:
    from ltscale.tracking import redact_uri

    log = log_dir / f"{job.record.stem}.log"  # a --set variant's log beside, not over, the plain run's
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    threads = job_threads(args)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    job_tag = uuid.uuid4().hex  # not in the printed command: it names this attempt, not the recipe
    with open(log, "w") as stream:
        stream.write(f"$ {job.command}\n")
        stream.flush()
        child = children.start([*job.argv, "--tag", f"{JOB_TAG}={job_tag}"], cwd=ROOT, env=env, stdout=stream,
                               stderr=subprocess.STDOUT)
        if child is None:
            return {"name": job.name, "error": children.not_started()}
        returncode = children.wait(child)
    record: dict[str, Any] = {
        "name": job.name, "method": job.method, "imbalance_factor": job.imbalance_factor, "seed": job.seed,
        "recipe": job.recipe, "pipeline": job.pipeline_name, "result_stage": job.result_stage, "lane": job.lane,
        "command": job.command, "argv": [redact_uri(arg) for arg in job.argv], "returncode": returncode,
        "seconds": round(time.perf_counter() - started, 1), "log": str(log),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "epochs_override": args.epochs, "environment": env_record, "cpu_threads": threads, "signature": job.signature,
        "job_tag": job_tag,
    }
    if returncode == 0:
        try:
            record.update(collect(args, job, job_tag))
        except Exception as error:  # noqa: BLE001 - recorded in the job file and reported
            record["error"] = f"collecting the results failed: {type(error).__name__}: {error}"
    else:
        record["error"] = f"exit status {returncode}; last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-15:])
    if "error" not in record:
        job.record.parent.mkdir(parents=True, exist_ok=True)
        # Written beside jobs/, then renamed in: jobs/ only ever gains whole files, which the
        # archive of another lane may be reading at that moment.
        tmp = job.record.parent.parent / f".{job.record.name}.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(job.record)
    return record


def write_archive(archive: Path, members: list[Path]) -> None:
    """A gzipped tarball of the files under ``members`` (paths relative to the working directory,
    so ``tar xzf`` in the checkout puts them back), replaced atomically: on a machine whose files
    are lost when a call ends (the lent GPU machine), the archive under $OUT is what comes back.
    Checkpoints (``*.pt``: models, soft labels, progress) and temporary files are left out; a file
    that disappears while the archive is written (a lane still running) is skipped, not fatal."""
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    itself = archive.resolve()  # an archive inside the output directory must not grow by holding itself
    with tarfile.open(tmp, "w:gz") as tar:
        for member in members:
            files = sorted(p for p in member.rglob("*") if p.is_file()) if member.is_dir() else [member]
            for path in files:
                if path.suffix in (".pt", ".tmp") or path.name.endswith(".lock") or path.resolve() == itself:
                    continue
                try:
                    tar.add(_relative(path), recursive=False)
                except OSError:  # gone (a lane still running) or not a file: the rest still comes back
                    continue
    tmp.replace(archive)


def _relative(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def archive_members(args: argparse.Namespace) -> list[Path]:
    """What the archive holds: the output directory (job files, logs, each lane's MLflow store and
    stage manifests; checkpoints are left out) and the table files once written."""
    return [Path(args.output_dir), *results_paths(args)]


def results_paths(args: argparse.Namespace) -> list[Path]:
    """<results-dir>/<name>.json, .csv, .md (the suffix is appended: a name may hold a dot, 'dive_t1.5')."""
    return [Path(args.results_dir) / f"{args.results_name}{suffix}" for suffix in (".json", ".csv", ".md")]


def finished(job: Job) -> bool:
    """A job file of this job exists: same recipe, seed, epochs and extra overrides (a smoke run's
    file does not count for a full run), wherever it ran (paths may differ: --collect-only at home)."""
    try:
        return json.loads(job.record.read_text())["signature"] == job.signature
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_plan(args: argparse.Namespace, plan: Plan, children: Children) -> list[dict[str, Any]]:
    output_dir = Path(args.output_dir).resolve()
    log_dir = output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.stop_after_minutes if args.stop_after_minutes else None
    lock = threading.Lock()
    outcomes: list[dict[str, Any]] = []
    env_record = environment(args)

    def lane(jobs: list[Job]) -> None:
        for job in jobs:
            if finished(job) and not args.force:
                continue
            if deadline is not None and time.monotonic() > deadline:
                with lock:
                    outcomes.append({"name": job.name, "error": "not started: --stop-after-minutes reached"})
                continue
            if children.stop_signal is not None:
                with lock:
                    outcomes.append({"name": job.name, "error": children.not_started()})
                continue
            with lock:
                print(f"[start] {job.name}: {job.command}", flush=True)
            record = run_job(args, job, log_dir, env_record, children)
            with lock:
                outcomes.append(record)
                status = "ok" if "error" not in record else "FAILED"
                print(f"[{status}] {job.name} in {record.get('seconds', 0)} s" + (f": {record['error']}" if status != "ok" else ""),
                      flush=True)
                if args.archive:  # after every job: a call killed by its time limit still returns what finished
                    write_archive(Path(args.archive), archive_members(args))

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        list(pool.map(lane, plan.lanes.values()))
    return outcomes


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1). The mean is taken in decimal: top-1 on 10,000
    test images is exact to two places, and a binary mean of 42.07 and 41.44 (41.754999...)
    printed 41.75 where the mean is 41.755."""
    exact = sum(Decimal(repr(v)) for v in values) / len(values) if values else Decimal(0)
    return {"mean": float(exact), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _two_places(value: float) -> str:
    """``value`` to two decimal places, halves rounded up, from its shortest decimal form."""
    return str(Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def aggregate(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Rows of mean ± std over the seeds whose job files exist."""
    records = {}
    for job in plan.jobs:
        if finished(job):
            record = json.loads(job.record.read_text())
            if isinstance(record.get("stages"), dict):  # else reported by unreadable_job_files
                records[job.name] = record
    table, per_run = [], []
    for spec in row_specs(args.methods):
        row: dict[str, Any] = {"row": spec.label, "cells": {}}
        for imbalance_factor in args.imbalance_factors:
            values, runs = [], []
            for job in plan.jobs:
                if job.method != spec.method or job.imbalance_factor != imbalance_factor or job.name not in records:
                    continue
                record = records[job.name]
                stage = spec.stage or record["result_stage"]
                metrics = record["stages"][stage]["metrics"]
                top1 = metrics.get(f"{spec.prefix}/top1")
                if top1 is None:
                    continue
                values.append(top1)
                entry = {"row": spec.label, "imbalance_factor": imbalance_factor, "seed": job.seed, "top1": top1,
                         **{group: metrics.get(f"{spec.prefix}/{group}") for group in ("many", "medium", "few")},
                         "stage": stage, "stage_run_id": record["stages"][stage]["run_id"], "run_id": record["run_id"],
                         "tracking_uri": record["tracking_uri"], "command": record["command"], "seconds": record["seconds"]}
                runs.append(entry)
                per_run.append(entry)
            cell = _stats(values) if values else {"mean": None, "std": None, "n": 0}
            cell["published"] = published(spec.label, imbalance_factor, args.recipe_prefix)
            cell["runs"] = runs
            row["cells"][f"{imbalance_factor:g}"] = cell
        table.append(row)
    return {"table": table, "runs": per_run, "jobs": list(records.values())}


def trained_imbalance_factor(config: Any) -> float | None:
    """The imbalance factor a job's config trains at (None for a fixed split list's dataset)."""
    if config.data.dataset in ("cifar100_lt", "cifar10_lt"):
        return float(config.data.imbalance_factor)
    if config.data.dataset == "synthetic":
        return float(config.data.synthetic.imbalance_factor)
    return None


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Where the tool ran (each job's own process also tags its MLflow runs ``ltscale.env.*``)."""
    from ltscale.stages.pipeline import resolve_device
    from ltscale.tracking import runtime_environment

    device = str(resolve_device(args.device or "auto"))  # as each job resolves it
    return {**runtime_environment(device), "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def job_threads(args: argparse.Namespace) -> int | None:
    """CPU threads each job's torch may use: the usable CPUs split between the concurrent lanes.

    Several processes each running torch's default of one thread per CPU oversubscribe the cores,
    and their OpenMP threads wait on each other: two `ltscale run demo/ce` at once on a 2-core
    machine took 54 s with the default threads and 23 s with one thread each (one alone: 17 s).
    None (torch's default) for one lane, or where the caller set OMP_NUM_THREADS itself.
    """
    if args.concurrency <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    from ltscale.dist.runtime import usable_cpus

    return max(1, usable_cpus() // args.concurrency)


def markdown(args: argparse.Namespace, result: dict[str, Any], env: dict[str, Any]) -> str:
    factors = [f"{f:g}" for f in args.imbalance_factors]
    title = "CIFAR-100-LT, ResNet-32" if args.recipe_prefix.startswith("cifar100") else f"recipes {args.recipe_prefix}/*"
    if args.recipe_prefix.endswith("-bbn"):
        title += ", BBN's lr schedule (x0.01 after epochs 120 and 160)"
    if args.overrides:
        title += ", with " + ", ".join(f"`{item}`" for item in args.overrides)
    lines = [f"### {title}: top-1 (%) on the balanced test set, mean ± std over seeds", ""]
    if args.epochs:
        lines += [f"**Smoke run: every stage trained {args.epochs} epoch(s) instead of the recipe's; not comparable "
                  "to the published numbers.**", ""]
    # Where the runs ran (from the job files; the table may be assembled elsewhere with --collect-only).
    ran = [job.get("environment", {}) for job in result["jobs"]]
    gpus = sorted({str(e.get("gpu") or "none (CPU)") for e in ran})
    versions = sorted({f"torch {e.get('torch')} (CUDA {e.get('cuda')})" for e in ran})
    # Job files written before jobs recorded their stages' code name the tool's version instead.
    codes = sorted({str(code) for job in result["jobs"]
                    for code in job.get("code_versions") or [job.get("environment", {}).get("code_version")]})
    lines += [f"Ran on: {', '.join(gpus) or '—'}; {', '.join(versions) or '—'}; code {', '.join(codes) or '—'}. "
              f"Table written {env['written']}.", ""]
    header = "| method |" + "".join(f" IF {f} | published |" for f in factors)
    lines += [header, "|---|" + "---:|---:|" * len(factors)]
    for row in result["table"]:
        cells = []
        for f in factors:
            cell = row["cells"][f]
            value = f"{_two_places(cell['mean'])} ± {_two_places(cell['std'])} (n={cell['n']})" if cell["n"] else "—"
            published = f"{cell['published']:g}" if cell["published"] is not None else "—"
            cells.append(f" {value} | {published} |")
        lines.append(f"| {row['row']} |" + "".join(cells))
    lines += ["", f"Published: {published_sources(args.recipe_prefix)}", "", "#### Runs", "",
              "| method | IF | seed | top-1 | many | medium | few | command | MLflow parent run (stage run) |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for run in result["runs"]:
        groups = " | ".join(f"{run[g]:.2f}" if run[g] is not None else "—" for g in ("many", "medium", "few"))
        lines.append(f"| {run['row']} | {run['imbalance_factor']:g} | {run['seed']} | {run['top1']:.2f} | {groups} | "
                     f"`{run['command']}` | `{run['run_id']}` (`{run['stage_run_id']}`) |")
    stores = sorted({run["tracking_uri"] for run in result["runs"]})
    lines += ["", "MLflow stores (one per lane unless --tracking-uri was given): " + ", ".join(f"`{s}`" for s in stores)]
    if any(store.startswith("file:") for store in stores):
        lines += ["", "MLflow 3 opens `file:` stores only with `MLFLOW_ALLOW_FILE_STORE=true` set (for the commands and the UI)."]
    lines.append("")
    return "\n".join(lines)


def write_results(args: argparse.Namespace, result: dict[str, Any], env: dict[str, Any]) -> list[Path]:
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    meta = {**env, "arguments": {k: v for k, v in vars(args).items()}, "published_sources": published_sources(args.recipe_prefix)}
    paths = results_paths(args)
    paths[0].write_text(json.dumps({"meta": meta, **result}, indent=2, default=str))
    with open(paths[1], "w", newline="") as stream:
        columns = ["row", "imbalance_factor", "seed", "top1", "many", "medium", "few", "stage", "run_id", "stage_run_id",
                   "tracking_uri", "command", "seconds"]
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["runs"])
    paths[2].write_text(markdown(args, result, env))
    return paths


def _csv(kind, what: str):
    def parse(text: str) -> list:
        try:
            items = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected at least one of the {what}, got {text!r}")
        if len(set(items)) != len(items):  # one run counted twice would fake a spread over seeds
            raise argparse.ArgumentTypeError(f"{text!r} names an item twice")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=_csv(str, "method names"), default=list(METHODS), help=f"comma-separated (default {','.join(METHODS)}; also {','.join(EXTRA_METHODS)})")
    parser.add_argument("--imbalance-factors", type=_csv(float, "numbers"), default=list(IMBALANCE_FACTORS), help="default 100,50,10")
    parser.add_argument("--seeds", type=_csv(int, "whole numbers"), default=[0, 1, 2], help="default 0,1,2")
    parser.add_argument("--data", default="", help="CIFAR-100 python archive or a .npz from tools/pack_cifar_npz.py")
    parser.add_argument("--epochs", type=int, default=0, help="override every stage's epochs (smoke runs only)")
    parser.add_argument("--output-dir", default="runs/cifar100_lt", help="stage outputs, MLflow stores, job files, logs")
    parser.add_argument("--results-dir", default="results", help="where the table files go")
    parser.add_argument("--results-name", default="",
                        help="<results-dir>/<name>.json/.csv/.md (default cifar100_lt, followed by the variant's "
                             "suffix: another --recipe-prefix, --epochs, --set; e.g. cifar100_lt-set<hash>)")
    parser.add_argument("--recipe-prefix", default=DEFAULT_PREFIX,
                        help="recipes are <prefix>/<method>; {if} is replaced by the imbalance factor (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=1, help="lanes (processes) run at once on the one device")
    parser.add_argument("--device", default="", help="passed to ltscale run (default: its auto)")
    parser.add_argument("--tracking-uri", default="", help="one MLflow store for every job (default: one sqlite store per lane)")
    parser.add_argument("--tracking-store", choices=("sqlite", "file"), default="sqlite",
                        help="per-lane MLflow store: sqlite (default) or an MLflow file store (needs fewer wheels on a "
                             "bare GPU machine; sets MLFLOW_ALLOW_FILE_STORE=true)")
    parser.add_argument("--experiment", default="ltscale", help="the MLflow experiment the recipes log to")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every job (repeatable)")
    parser.add_argument("--stop-after-minutes", type=float, default=0, help="start no new job after this long")
    parser.add_argument("--force", action="store_true", help="re-run jobs that already have a job file")
    parser.add_argument("--archive", default="", metavar="PATH.tgz",
                        help="keep a tarball of the job files, logs and table here, rewritten after every job (e.g. $OUT/table.tgz)")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild the table from the job files present")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    if args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency}: run at least one lane at a time")
    if not args.stop_after_minutes >= 0:
        parser.error(f"--stop-after-minutes {args.stop_after_minutes}: must be >= 0 (0: no limit)")
    if args.epochs < 0:
        parser.error(f"--epochs {args.epochs}: must be >= 1 (or 0: the recipes' own epochs)")
    if args.device and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:<index>")
    from ltscale.config import override_key

    for item in args.overrides:
        if override_key(item) in OWN_KEYS:
            parser.error(f"--set {item!r}: {OWN_KEYS[override_key(item)]} for every job; leave it out of --set")
    if "/" in args.results_name:
        parser.error(f"--results-name {args.results_name!r}: a file name, not a path (the folder is --results-dir)")
    if "{if}" not in args.recipe_prefix and len(args.imbalance_factors) > 1:
        parser.error("--recipe-prefix without {if} names one dataset: pass the one imbalance factor its recipes "
                     "train at as --imbalance-factors")
    # A variant's table must not replace the plain one (the table that goes into RESULTS.md).
    args.results_name = args.results_name or "cifar100_lt" + variant_suffix(args.overrides, args.epochs, args.recipe_prefix)
    return args


def variant_suffix(overrides: list[str], epochs: int = 0, recipe_prefix: str = DEFAULT_PREFIX) -> str:
    """What names a variant's job files and default table apart from the plain run's, so that one
    never replaces the other in a shared --output-dir: the recipe prefix when it is not the default
    (``-cifar100-lt-if-bbn``), ``-<N>ep`` for a smoke run's --epochs, ``-set<hash>`` for --set
    overrides; empty for the plain run."""
    parts = []
    if recipe_prefix != DEFAULT_PREFIX:
        parts.append("-" + (re.sub(r"[^A-Za-z0-9]+", "-", recipe_prefix.replace("{if}", "")).strip("-") or "prefix"))
    if epochs:
        parts.append(f"-{epochs}ep")
    if overrides:
        parts.append(f"-set{hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]}")
    return "".join(parts)


def preflight(args: argparse.Namespace, plan: Plan) -> None:
    """What would make every job fail, or lose the table at the end, found before the first job
    starts: on a lent GPU a call that trains for minutes and then returns nothing costs its budget."""
    from ltscale.tracking.mlflow_tracker import check_uri_form, require_sqlalchemy

    results_dir = Path(args.results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise ValueError(f"--results-dir {results_dir}: is a file, not a directory")
    if args.archive:
        archive = Path(args.archive)
        if archive.is_dir():
            raise ValueError(f"--archive {archive}: is a directory; name the .tgz file to write (e.g. $OUT/table.tgz)")
        parent = archive.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"--archive {archive}: {parent} is a file, so the archive's folder cannot be made")
    if args.collect_only or args.dry_run and not args.data:
        return
    if args.dry_run and not Path(args.data).expanduser().exists():  # planning on a machine without the data
        print(f"reproduce_cifar: note: --data {args.data} is not here; not checked", file=sys.stderr)
        return
    for dataset, imbalance_factor in sorted(plan.datasets):
        _check_data(Path(args.data).expanduser(), dataset, imbalance_factor)
    if args.dry_run:
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    if args.tracking_uri:
        check_uri_form(args.tracking_uri, "--tracking-uri")
    if args.tracking_uri.startswith("sqlite:") or not args.tracking_uri and args.tracking_store == "sqlite":
        require_sqlalchemy()


def _check_data(path: Path, dataset: str, imbalance_factor: float) -> None:
    """--data holds ``dataset`` at ``imbalance_factor``: a packed file from its small members, an
    archive by opening it (the jobs read and check every byte)."""
    from ltscale.data.cifar import _LAYOUT, _Archive
    from ltscale.data.cifar_npz import check_packed_cifar_lt

    if str(path).endswith(".npz"):
        check_packed_cifar_lt(dataset, path, imbalance_factor)
        return
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder (the CIFAR python archive or a packed .npz)")
    top, meta = _LAYOUT[dataset][0], _LAYOUT[dataset][3]
    archive = _Archive(path, top)
    archive.close()
    if archive.tar is None and not (archive.folder / meta).is_file():
        raise ValueError(f"--data {path}: a folder without {top}/{meta} (expected the CIFAR python archive, the folder "
                         "it extracts to, or a packed .npz)")


def unreadable_job_files(plan: Plan) -> list[str]:
    """Job files of this plan that exist but cannot be read: their jobs count as not run."""
    problems = []
    for job in plan.jobs:
        if job.record.is_file():
            try:
                record = json.loads(job.record.read_text())
                record["signature"], record["stages"]  # noqa: B018 - what aggregate and finished read
            except (OSError, ValueError, KeyError, TypeError) as error:
                problems.append(f"{job.record} ({type(error).__name__}: {error})")
    return problems


def main(argv: list[str] | None = None) -> int:
    from ltscale.config import ConfigError
    from ltscale.data.errors import DatasetError

    args = parse_args(argv)
    if args.tracking_store == "file" or args.tracking_uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses its file store otherwise; children inherit it
    try:
        plan = build_plan(args)
        preflight(args, plan)
    except (ConfigError, DatasetError, ValueError) as error:
        print(f"reproduce_cifar: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for lane, jobs in plan.lanes.items():
            for job in jobs:
                print(f"# lane {lane}, job file {job.record.name}\n{job.command}")
        return 0
    for problem in unreadable_job_files(plan):
        print(f"reproduce_cifar: warning: unreadable job file {problem}: its job counts as not run"
              + ("" if args.collect_only else " and runs again"), file=sys.stderr)
    children = Children()
    outcomes = [] if args.collect_only else _run_forwarding_signals(args, plan, children)
    result = aggregate(args, plan)
    if args.collect_only and not result["jobs"]:
        # an empty table must not replace one with numbers (a forgotten --set, another --output-dir)
        present = sorted(p.name for p in (Path(args.output_dir) / "jobs").glob("*.json"))
        print(f"reproduce_cifar: error: none of the {len(plan.jobs)} jobs asked for has a job file in "
              f"{Path(args.output_dir) / 'jobs'} (present: {', '.join(present[:12]) or 'none'}"
              f"{' ...' if len(present) > 12 else ''}); the job file names carry the variant (--recipe-prefix, "
              "--epochs, --set), so pass the same --methods, --seeds, --recipe-prefix, --epochs and --set as the run. "
              "Nothing written.", file=sys.stderr)
        return 1
    paths = write_results(args, result, environment(args))
    if args.archive:
        write_archive(Path(args.archive), archive_members(args))
    failed = [o for o in outcomes if "error" in o]
    print(paths[2].read_text())  # the table itself, so a call's output shows the numbers even without its files
    print(f"{len(result['jobs'])}/{len(plan.jobs)} jobs have results; wrote " + ", ".join(map(str, paths))
          + (f"; archived in {args.archive}" if args.archive else ""))
    for outcome in failed:
        print(f"  {outcome['name']}: {outcome['error']}", file=sys.stderr)
    if children.stop_signal is not None:
        print("reproduce_cifar: stopped; the same command again skips the finished jobs and resumes an interrupted "
              "one from its last completed epoch", file=sys.stderr)
        return 128 + children.stop_signal
    return 1 if failed else 0


def _run_forwarding_signals(args: argparse.Namespace, plan: Plan, children: Children) -> list[dict[str, Any]]:
    """run_plan with SIGTERM, SIGHUP and SIGINT handled by ``children`` (in the main thread only,
    where Python delivers signals; the previous handlers are put back after). A signal the tool
    was started ignoring stays ignored: ``nohup`` (SIGHUP) and a non-interactive shell's ``&``
    (SIGINT) ask for a run that outlives its terminal and the Ctrl-C typed there."""
    if threading.current_thread() is not threading.main_thread():
        return run_plan(args, plan, children)
    stops = [signum for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT) if signal.getsignal(signum) != signal.SIG_IGN]
    previous = {signum: signal.signal(signum, children.stop) for signum in stops}
    try:
        return run_plan(args, plan, children)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())

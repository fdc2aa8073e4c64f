"""Launching pipelines through submitit: the command line resolves and checks the config before
anything is submitted; a job runs end to end on the local executor and on a real SLURM cluster on
127.0.0.1; a preempted SLURM job is requeued and its training stage resumes from its last epoch.

The SLURM tests need Slurm and munge installed (they skip, saying so, when they are not):
``apt-get install -y slurmctld slurmd slurm-client munge``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import submitit

from launch.submit import PipelineJob, Resources, build_executor, main
from ltscale.config import apply_overrides, get_recipe
from tests.slurm_cluster import SlurmCluster, slurm, slurm_cluster  # noqa: F401 (pytest fixtures)
from tests.test_pipeline import TINY_DATA, tiny

REPO = Path(__file__).resolve().parents[1]

# demo/ce shrunk to the tiny test data and network, spelled as command-line overrides.
TINY_RECIPE_OVERRIDES = [
    *(f"data.synthetic.{name}={value}" for name, value in [
        ("num_classes", TINY_DATA.synthetic.num_classes), ("max_per_class", TINY_DATA.synthetic.max_per_class),
        ("imbalance_factor", TINY_DATA.synthetic.imbalance_factor), ("test_per_class", TINY_DATA.synthetic.test_per_class),
        ("image_size", TINY_DATA.synthetic.image_size)]),
    "stages.teacher.model.width=8", "stages.teacher.optim.epochs=3", "stages.teacher.optim.warmup_epochs=1",
    "device=cpu",
]
# One CPU per job: the test cluster has two cores, shared with the test process.
SLURM_RESOURCES = Resources(gpus_per_node=0, cpus_per_task=1, timeout_min=60)


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _summary_from(stdout: str) -> dict:
    """The JSON summary `--wait` prints after the `submitted ...` and `logs: ...` lines."""
    return json.loads(stdout[stdout.index("{"):])


def _result(job: submitit.Job, timeout: float, cluster: SlurmCluster | None = None) -> dict:
    """``job.result()`` with a deadline; on failure the job's logs and the daemons' logs are in the message."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            logs = [path.read_text(errors="replace")[-3000:] for path in (job.paths.stdout, job.paths.stderr) if path.exists()]
            state = cluster.run("scontrol", "show", "job", job.job_id, check=False) if cluster else ""
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout:.0f} s\n{state}\n" + "\n".join(logs)
                        + (f"\n{cluster.logs()}" if cluster else ""))
        time.sleep(0.5)
    return job.result()


def test_submit_checks_the_config_before_submitting(tmp_path, capsys):
    output = tmp_path / "out"
    # A misspelt key fails here, with the close match, and nothing is created.
    code = main(["demo/ce", "--executor", "slurm", "--set", "stages.teacher.optim.lrr=0.1", "--set", f"output_dir={output}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lrr" in err and "'lr'" in err
    assert main(["demo/cee", "--executor", "local"]) == 2
    assert "demo/ce" in capsys.readouterr().err
    # Requests the pipeline cannot use are refused too, as are unknown SLURM parameters.
    assert main(["demo/ce", "--executor", "slurm", "--nodes", "3", "--set", f"output_dir={output}"]) == 2
    assert "stages.teacher.optim.batch_size=128 does not split over 3 processes" in capsys.readouterr().err
    assert main(["demo/ce", "--executor", "local", "--nodes", "2", "--set", f"output_dir={output}"]) == 2
    assert "local executor runs on this one machine" in capsys.readouterr().err
    assert main(["demo/ce", "--executor", "debug", "--tasks-per-node", "2", "--set", f"output_dir={output}"]) == 2
    assert "one node and one task" in capsys.readouterr().err
    assert main(["demo/ce", "--executor", "slurm", "--tasks-per-node", "4", "--gpus-per-node", "2", "--set", "device=cuda",
                 "--set", f"output_dir={output}"]) == 2
    assert "each process trains on its own GPU" in capsys.readouterr().err
    # device=auto (the default) takes the node's GPUs too; on CPUs, tasks need no GPU each.
    assert main(["demo/ce", "--executor", "slurm", "--tasks-per-node", "4", "--gpus-per-node", "1",
                 "--set", f"output_dir={output}", "--dry-run"]) == 2
    assert "--tasks-per-node 4 with --gpus-per-node 1: each process trains on its own GPU" in capsys.readouterr().err
    assert main(["demo/ce", "--executor", "slurm", "--tasks-per-node", "4", "--gpus-per-node", "1", "--set", "device=cpu",
                 "--set", f"output_dir={output}", "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["demo/ce", "--executor", "slurm", "--gpus-per-node", "0", "--set", "device=cuda", "--set", f"output_dir={output}"]) == 2
    assert "--gpus-per-node" in capsys.readouterr().err
    assert main(["demo/ce", "--executor", "slurm", "--slurm-option", "acount=proj1", "--set", f"output_dir={output}"]) == 2
    assert "acount" in capsys.readouterr().err
    # Numbers the scheduler would take or choke on, options given twice, a log folder that is a file.
    (tmp_path / "file").write_text("")
    for extra, message in [
        (["--mem-gb", "-5"], "--mem-gb -5.0: must be a finite number of GB > 0"),
        (["--mem-gb", "inf"], "--mem-gb inf: must be a finite number of GB > 0"),
        (["--mem-gb", "nan"], "--mem-gb nan: must be a finite number of GB > 0"),
        (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be 0 or more"),
        (["--cpus-per-task", "-3"], "--cpus-per-task -3: must be at least 1"),
        (["--max-timeouts", "-1"], "--max-timeouts -1: must be 0 or more"),
        (["--timeout-min", "10"], "--timeout-min 10: use more than 10 minutes"),  # submitit takes every signal for a time-out
        (["--gpus-per-node", "0", "--set", "device=cuda:1"], "device=cuda:1 but --gpus-per-node 0"),
        # A GPU index counts among the node's GPUs given to the job, and names one GPU for all its tasks.
        (["--set", "device=cuda:1"], "device=cuda:1 but the job is given 1 GPU(s) per node"),
        (["--set", "device=cuda:1", "--gpus-per-node", "2"], None),
        (["--set", "device=cuda:0", "--tasks-per-node", "2"],
         "device=cuda:0 with --tasks-per-node 2: every process of a node would train on that one GPU; use device=cuda"),
        (["--set", "device=cuda", "--tasks-per-node", "2"], None),
        (["--set", "device=cuda:1", "--slurm-option", "gres=gpu:2"], None),  # GPUs asked for another way: not counted here
        (["--partition", "cpu", "--slurm-option", "partition=gpu"], "--slurm-option partition=...: this tool sets it from --partition"),
        (["--slurm-option", "time=10"], "--slurm-option time=...: this tool sets it from --timeout-min"),
        (["--folder", str(tmp_path / "file")], f"--folder {tmp_path / 'file'}: is a file"),
        (["--seeds", "0,1"], None),  # (a valid sweep, the next case's control)
        (["--seeds", "0,1", "--set", "seed=7"], "--set seed=... and --seeds both set the seed"),
    ]:
        if message is None:
            assert main(["demo/ce", "--executor", "slurm", "--dry-run", *extra, "--set", f"output_dir={output}"]) == 0
            capsys.readouterr()
            continue
        assert main(["demo/ce", "--executor", "slurm", "--dry-run", *extra, "--set", f"output_dir={output}"]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    # The debug executor runs in this process, which sees every GPU of the machine.
    assert main(["demo/ce", "--executor", "debug", "--dry-run", "--gpus-per-node", "1", "--set", "device=cuda:1",
                 "--set", f"output_dir={output}"]) == 0
    capsys.readouterr()
    assert main(["demo/ce", "demo/ce", "--executor", "slurm", "--dry-run", "--set", f"output_dir={output}"]) == 2
    assert "recipe demo/ce is given twice" in capsys.readouterr().err
    assert main(["demo/ce", "--executor", "slurm", "--dry-run", "--slurm-option", "mem=4G", "--set", f"output_dir={output}"]) == 0
    assert '"mem": "4G"' in capsys.readouterr().out  # not set by --mem-gb: the option may give it
    assert not output.exists()


def test_dry_run_prints_the_resolved_executor_parameters(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["demo/ssd", "--executor", "slurm", "--partition", "gpu", "--gpus-per-node", "2", "--cpus-per-task", "10",
                 "--mem-gb", "64", "--timeout-min", "720", "--slurm-option", "account=proj1", "--dry-run",
                 "--set", "output_dir=relative/out"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == {
        "job_name": "ltscale-demo-ssd", "time": 720, "nodes": 1, "ntasks_per_node": 1, "gpus_per_node": 2,
        "cpus_per_task": 10, "mem": "64GB", "partition": "gpu", "account": "proj1",
    }
    # The output directory is made absolute where it was resolved, and the logs go beside it.
    assert report["output_dir"] == str(tmp_path / "relative" / "out")
    assert report["folder"] == str(tmp_path / "relative" / "out" / "submitit")
    assert report["stages"] == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    assert not (tmp_path / "relative").exists(), "a dry run must not create anything"
    # Defaults: one GPU on SLURM, the loader's workers + 1 CPUs, a day per attempt.
    assert main(["demo/ce", "--executor", "slurm", "--dry-run"]) == 0
    parameters = json.loads(capsys.readouterr().out)["parameters"]
    workers = get_recipe("demo/ce").data.loader.num_workers
    assert parameters["gpus_per_node"] == 1 and parameters["cpus_per_task"] == workers + 1 and parameters["time"] == 24 * 60
    # Data-parallel over 2 nodes x 4 tasks: srun starts 8 processes, each asking for its own GPU.
    assert main(["demo/ce", "--executor", "slurm", "--nodes", "2", "--tasks-per-node", "4", "--dry-run"]) == 0
    parameters = json.loads(capsys.readouterr().out)["parameters"]
    assert (parameters["nodes"], parameters["ntasks_per_node"], parameters["gpus_per_node"]) == (2, 4, 4)
    # A CPU pipeline asks for no GPU (a CPU-only partition refuses a GPU request).
    assert main(["demo/ce", "--executor", "slurm", "--tasks-per-node", "2", "--set", "device=cpu", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["gpus_per_node"] == 0


def test_slurm_options_reach_submitit_as_the_types_it_expects(tmp_path, capsys, monkeypatch):
    """--slurm-option values are text; submitit takes lists, bools and ints. A string srun_args was
    split into characters, use_srun=false counted as true, setup crashed even a dry run, and
    array_parallelism crashed the sweep's submission after the dry run had passed."""
    output = tmp_path / "out"
    base = ["demo/ce", "--executor", "slurm", "--set", "device=cpu", "--set", f"output_dir={output}"]
    code = main([*base, "--dry-run", "--slurm-option", "srun_args=--cpu-bind=none --overlap", "--slurm-option", "use_srun=false",
                 "--slurm-option", "setup=module load cuda", "--slurm-option", "setup=source env/bin/activate",
                 "--slurm-option", "exclusive=true", "--slurm-option", "signal_delay_s=120",
                 "--slurm-option", 'additional_parameters={"reservation": "r1"}'])
    assert code == 0
    parameters = json.loads(capsys.readouterr().out)["parameters"]
    assert parameters["srun_args"] == ["--cpu-bind=none", "--overlap"] and parameters["use_srun"] is False
    assert parameters["setup"] == ["module load cuda", "source env/bin/activate"]  # a line each, not a word each
    assert parameters["exclusive"] is True and parameters["signal_delay_s"] == 120
    assert parameters["additional_parameters"] == {"reservation": "r1"}
    assert main([*base, "--dry-run", "--slurm-option", "exclusive=user"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["exclusive"] == "user"
    # Refused before anything is submitted, naming the option and what it takes.
    for option, message in [("use_srun=maybe", "--slurm-option use_srun=maybe: submitit expects true or false"),
                            ("array_parallelism=two", "--slurm-option array_parallelism=two: submitit expects an integer"),
                            ("srun_args=--comment='x", "--slurm-option srun_args=--comment='x: submitit expects arguments"),
                            ("additional_parameters=r1", "--slurm-option additional_parameters=r1: submitit expects a JSON object"),
                            ("array_parallelism=0", "--slurm-option array_parallelism=0: must be at least 1"),
                            ("cpus_per_gpu=-2", "--slurm-option cpus_per_gpu=-2: must be at least 1"),
                            ("signal_delay_s=-1", "--slurm-option signal_delay_s=-1: must be at least 0"),
                            ("acount=proj1", "submitit has no SLURM parameter 'acount' (did you mean account")]:
        assert main([*base, "--dry-run", "--slurm-option", option]) == 2, option
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (option, err)

    # The batch script a sweep sends to sbatch (a stand-in that keeps it).
    bin_dir, script = tmp_path / "bin", tmp_path / "sent.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor a in "$@"; do f="$a"; done\ncp "$f" {script}\necho "Submitted batch job 4242"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main([*base, "--seeds", "0,1", "--slurm-option", "array_parallelism=1", "--slurm-option", "srun_args=--cpu-bind=none",
                 "--slurm-option", "setup=module load cuda"]) == 0
    lines = script.read_text().splitlines()
    assert "#SBATCH --array=0-1%1" in lines and "module load cuda" in lines
    assert " --cpu-bind=none " in next(line for line in lines if line.startswith("srun "))


def test_pipeline_job_pickles_and_checkpoints_to_itself(tmp_path):
    import pickle

    job = PipelineJob(dataclasses.replace(tiny("ce", tmp_path), progress=True))
    assert job.config.progress is True  # off a terminal (a job's log file) that is a line per stage and epoch
    again = pickle.loads(pickle.dumps(job))
    assert type(again) is PipelineJob and again.config == job.config
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        delayed = job.checkpoint()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # so scontrol's reply is not lost (see checkpoint)
    finally:
        signal.signal(signal.SIGTERM, before)  # an ignored SIGTERM would be inherited by later tests' subprocesses
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job


def test_submit_command_runs_a_recipe_on_the_local_executor(tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "launch.submit", "demo/ce", "--executor", "local", "--wait",
               *_set_args([*TINY_RECIPE_OVERRIDES, f"output_dir={output}"])]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted demo/ce as local job ")
    job_id = lines[0].rsplit(" ", 1)[1]
    assert lines[1] == f"logs: {output / 'submitit'}"
    assert (output / "submitit" / f"{job_id}_0_result.pkl").exists()
    summary = _summary_from(done.stdout)
    assert summary["pipeline"] == "demo/ce" and summary["executed"] == ["teacher"] and summary["cached"] == []
    assert {"test/top1", "test/many", "test/medium", "test/few"} <= set(summary["metrics"])
    assert summary["output_dir"] == str(output) and summary["requeues"] == 0
    run = mlflow.MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/top1"] == pytest.approx(summary["metrics"]["test/top1"])
    # The job's log says how it went, stage by stage and epoch by epoch.
    log = (output / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "teacher: teacher stage started" in log and "teacher: epoch 1/" in log and "teacher: finished in" in log, log


@pytest.mark.timeout(240)
def test_submit_command_runs_a_recipe_on_slurm(slurm, tmp_path, capsys):
    output = tmp_path / "out"
    # What only the scheduler can check is reported as the scheduler says it.
    assert main(["demo/ce", "--executor", "slurm", "--partition", "nosuch", "--gpus-per-node", "0", "--cpus-per-task", "1",
                 "--set", f"output_dir={output}"]) == 1
    assert "Invalid partition name" in capsys.readouterr().err

    code = main(["demo/ce", "--executor", "slurm", "--partition", slurm.partition, "--gpus-per-node", "0",
                 "--cpus-per-task", "1", "--timeout-min", "60", "--wait",
                 *_set_args([*TINY_RECIPE_OVERRIDES, f"output_dir={output}"])])
    out = capsys.readouterr().out
    assert code == 0, out + slurm.logs()
    job_id = out.splitlines()[0].rsplit(" ", 1)[1]
    summary = _summary_from(out)
    assert summary["executed"] == ["teacher"] and summary["requeues"] == 0
    # SLURM ran it as asked, and the sacct stand-in reports it finished.
    job = slurm.run("scontrol", "-o", "show", "job", job_id)
    assert "JobName=ltscale-demo-ce" in job and f"StdOut={output / 'submitit' / f'{job_id}_0_log.out'}" in job
    assert "NumCPUs=1" in job
    # The result is written just before the process exits: give SLURM a moment to see it end.
    watcher = submitit.SlurmJob(output / "submitit", job_id).watcher
    deadline = time.monotonic() + 30
    while watcher.get_state(job_id, mode="force") in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert watcher.get_state(job_id, mode="cache") == "COMPLETED"


def _training_on_slurm(cluster: SlurmCluster, tmp_path: Path, epochs: int, name: str):
    """(config, job) of the tiny CE pipeline submitted to ``cluster``, once its first epoch is saved."""
    output = tmp_path / "out"
    config = apply_overrides(tiny("ce", output), [f"stages.teacher.optim.epochs={epochs}"])
    job = build_executor("slurm", tmp_path / "submitit", SLURM_RESOURCES, name).submit(PipelineJob(config))
    deadline = time.monotonic() + 120
    while not list(output.glob("store/teacher-*/progress.pt")):
        assert not job.done(), f"the job ended before training started:\n{job.stderr() or ''}{cluster.logs()}"
        assert time.monotonic() < deadline, f"no progress.pt after 120 s\n{job.stdout() or ''}{cluster.logs()}"
        time.sleep(0.1)
    return config, job


@pytest.mark.timeout(300)
def test_preempted_slurm_job_is_requeued_and_resumes_training(slurm, tmp_path):
    config, job = _training_on_slurm(slurm, tmp_path, 60, "ltscale-preempt")
    job._interrupt()  # once the first epoch is saved: SIGTERM, then the USR2 submitit requeues on

    summary = _result(job, 200, slurm)
    assert summary["requeues"] == 1, "the job should have finished in its second attempt"
    assert summary["executed"] == ["teacher"]
    log = job.stdout() or ""
    assert "this job is preempted" in log and "Requeued job" in log, log
    client = mlflow.MlflowClient(summary["tracking_uri"])
    teacher = client.get_run(summary["stage_runs"]["teacher"])
    resumed_from = int(teacher.data.tags["ltscale.resumed_from_epoch"])
    assert 1 <= resumed_from < 60
    # Only the epochs after the resume point were trained by the second attempt; it logs them and,
    # first, the epoch it resumed after (kept with the progress, so no point is lost in between).
    epochs = sorted(m.step for m in client.get_metric_history(teacher.info.run_id, "train/loss"))
    assert epochs == list(range(resumed_from - 1, 60))
    # The interrupted attempt is on record, not silently dropped.
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    runs = client.search_runs([experiment])
    statuses = sorted(r.info.status for r in runs)
    assert statuses.count("FINISHED") == 2 and statuses.count("KILLED") == 2  # the preempted attempt: pipeline + stage
    # Each run names its SLURM attempt: had the preempted one been SIGKILLed before unwinding, the
    # requeued attempt would have found its runs RUNNING and marked them KILLED by these tags.
    attempts = {(r.info.status, r.data.tags["ltscale.attempt.slurm_job"], r.data.tags["ltscale.attempt.slurm_restart"]) for r in runs}
    assert attempts == {("KILLED", str(job.job_id), "0"), ("FINISHED", str(job.job_id), "1")}
    assert {r.data.tags["ltscale.error"] for r in runs if r.info.status == "KILLED"} == {
        "SystemExit: -1 (preempted or timed out; submitit requeued the job)"}


def test_rank_environment_comes_from_the_submitit_job():
    from launch.submit import export_rank_environment

    class Job:  # what submitit.JobEnvironment() answers in task 3 of a 2-node x 2-task job
        job_id, num_tasks, num_nodes, global_rank, local_rank, hostnames = "4711", 4, 2, 3, 1, ["gpu07", "gpu08"]

    environ: dict[str, str] = {}
    export_rank_environment(Job(), environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    other_task: dict[str, str] = {}
    export_rank_environment(type("Job0", (Job,), {"global_rank": 0, "local_rank": 0})(), other_task)
    assert other_task["MASTER_PORT"] == environ["MASTER_PORT"], "every task must derive the same port"
    # In the range SLURM steps derive theirs from, which ports picked for local servers avoid.
    from ltscale.dist.runtime import SLURM_PORT_RANGE
    assert int(environ["MASTER_PORT"]) in SLURM_PORT_RANGE
    single: dict[str, str] = {}
    export_rank_environment(type("One", (Job,), {"num_tasks": 1})(), single)
    assert single == {}, "a one-task job stays a single process"
    # One node: the rendezvous is this machine's loopback, whatever its host name resolves to.
    one_node: dict[str, str] = {}
    export_rank_environment(type("OneNode", (Job,), {"num_tasks": 2, "num_nodes": 1, "hostnames": ["gpu07"]})(), one_node)
    assert one_node["MASTER_ADDR"] == "127.0.0.1" and one_node["WORLD_SIZE"] == "2"
    # Variables a launcher already set win over submitit's view.
    preset = {"MASTER_PORT": "29999", "MASTER_ADDR": "10.0.0.5"}
    export_rank_environment(Job(), preset)
    assert (preset["MASTER_PORT"], preset["MASTER_ADDR"], preset["RANK"]) == ("29999", "10.0.0.5", "3")


def test_the_executor_requeues_after_as_many_time_outs_as_asked(tmp_path):
    """--max-timeouts reaches submitit on every executor (its own default would apply silently)."""
    for kind in ("slurm", "local"):
        executor = build_executor(kind, tmp_path / kind, Resources(max_timeouts=7), "ltscale-test")
        assert executor._executor.max_num_timeout == 7, kind


def test_a_job_keeps_the_callers_thread_count_and_otherwise_takes_slurms(tmp_path, monkeypatch):
    """Where SLURM does not bind tasks to CPUs, the job sizes torch's pool to SLURM_CPUS_PER_TASK;
    an OMP_NUM_THREADS the caller set wins."""
    import torch

    import ltscale.stages.pipeline as pipeline_module
    from ltscale.stages.pipeline import PipelineResult

    seen: list[int] = []

    def fake_run(config):
        seen.append(torch.get_num_threads())
        return PipelineResult(config.name, "run", "uri", "teacher", outputs={
            "teacher": pipeline_module.StageOutput("teacher", "teacher", "k", tmp_path, {"metrics": {"test/top1": 1.0}})})

    class OneTask:
        job_id, num_tasks, num_nodes, global_rank, local_rank, hostnames = "1", 1, 1, 0, 0, ["localhost"]

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run)
    monkeypatch.setattr(submitit, "JobEnvironment", OneTask)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        summary = PipelineJob(tiny("ce", tmp_path))()
        monkeypatch.delenv("OMP_NUM_THREADS")
        PipelineJob(tiny("ce", tmp_path))()
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 3]
    assert summary["metrics"] == {"test/top1": 1.0} and summary["requeues"] == 0


def _check_two_task_summary(summary: dict, output: Path, job_id: str) -> None:
    assert summary["executed"] == ["teacher"] and summary["requeues"] == 0
    # Both tasks ran and finished (submitit keeps a result per task); rank 0 alone tracked the run.
    assert (output / "submitit" / f"{job_id}_0_result.pkl").exists() and (output / "submitit" / f"{job_id}_1_result.pkl").exists()
    client = mlflow.MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("ltscale").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # one pipeline run + one stage run
    assert client.get_run(summary["run_id"]).data.metrics["test/top1"] == pytest.approx(summary["metrics"]["test/top1"])


def test_two_tasks_train_data_parallel_on_the_local_executor(tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "launch.submit", "demo/ce", "--executor", "local", "--tasks-per-node", "2", "--wait",
               *_set_args([*TINY_RECIPE_OVERRIDES, f"output_dir={output}"])]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0].rsplit(" ", 1)[1]
    _check_two_task_summary(_summary_from(done.stdout), output, job_id)


@pytest.mark.timeout(300)
def test_two_tasks_train_data_parallel_on_slurm(slurm, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(["demo/ce", "--executor", "slurm", "--partition", slurm.partition, "--tasks-per-node", "2",
                 "--gpus-per-node", "0", "--cpus-per-task", "1", "--timeout-min", "60", "--wait",
                 *_set_args([*TINY_RECIPE_OVERRIDES, f"output_dir={output}"])])
    out = capsys.readouterr().out
    assert code == 0, out + slurm.logs()
    job_id = out.splitlines()[0].rsplit(" ", 1)[1]
    _check_two_task_summary(_summary_from(out), output, job_id)
    assert "NumTasks=2" in slurm.run("scontrol", "-o", "show", "job", job_id)


def test_a_sweep_is_resolved_and_checked_job_by_job_before_submitting(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["demo/ce", "demo/lws", "--seeds", "0,1", "--executor", "slurm", "--array-parallelism", "2", "--dry-run",
                 "--set", f"output_dir={output}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["job_name"] == "ltscale-sweep-4" and report["parameters"]["array_parallelism"] == 2
    assert [(job["pipeline"], job["seed"]) for job in report["jobs"]] == [
        ("demo/ce", 0), ("demo/ce", 1), ("demo/lws", 0), ("demo/lws", 1)]
    assert {job["output_dir"] for job in report["jobs"]} == {str(output)}  # one store: shared stages are shared
    # Each job is held to the request, not only the first: demo/ce's batch of 128 does not split over
    # 32 x 8 processes, though imagenet-lt/ce's 256 does.
    assert main(["imagenet-lt/ce", "demo/ce", "--executor", "slurm", "--nodes", "32", "--tasks-per-node", "8", "--dry-run",
                 "--set", f"output_dir={output}"]) == 2
    assert "stages.teacher.optim.batch_size=128 does not split over 256 processes" in capsys.readouterr().err
    # One bad job stops the whole sweep before anything is submitted.
    assert main(["demo/ce", "demo/lwss", "--executor", "slurm", "--set", f"output_dir={output}"]) == 2
    assert "demo/lws" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo/ce", "--seeds", "1,1", "--executor", "slurm"])
    assert "expected distinct integers" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.timeout(420)
def test_a_sweep_runs_as_one_slurm_array_and_trains_a_shared_stage_once(slurm, tmp_path, capsys):
    """CE and LWS share their CE teacher: submitted together, the teacher is trained by one job and
    reused by the other (stage lock), and both record into one new local MLflow store."""
    output = tmp_path / "out"
    code = main(["demo/ce", "demo/lws", "--executor", "slurm", "--partition", slurm.partition, "--gpus-per-node", "0",
                 "--cpus-per-task", "1", "--timeout-min", "60", "--wait",
                 *_set_args([*TINY_RECIPE_OVERRIDES, f"output_dir={output}"])])
    out = capsys.readouterr().out
    assert code == 0, out + slurm.logs()
    submitted = [line for line in out.splitlines() if line.startswith("submitted ")]
    assert [line.split(" as ")[0] for line in submitted] == ["submitted demo/ce", "submitted demo/lws"]
    ids = [line.rsplit(" ", 1)[1] for line in submitted]
    assert len({job_id.split("_")[0] for job_id in ids}) == 1 and all("_" in job_id for job_id in ids)  # one array
    summaries = json.loads(out[out.index("["):])
    ce, lws = summaries
    assert lws["executed"][-1] == "lws"
    trained = [s for s in summaries if "teacher" in s["executed"]]
    assert len(trained) == 1 and "teacher" in (ce["cached"] + lws["cached"])  # one trained it, the other reused it
    client = mlflow.MlflowClient(ce["tracking_uri"])
    assert ce["tracking_uri"] == lws["tracking_uri"]
    for summary in summaries:
        assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    assert not list(output.glob("store/*/.lock"))


def test_a_sweep_recording_into_sqlite_on_a_network_file_system_is_warned_about(tmp_path, capsys, monkeypatch):
    import launch.submit as submit

    assert submit.file_system_type(tmp_path) and submit.file_system_type(tmp_path / "not" / "yet") == submit.file_system_type(tmp_path)
    sweep = ["demo/ce", "demo/lws", "--executor", "slurm", "--dry-run", "--set", f"output_dir={tmp_path / 'out'}"]
    monkeypatch.setattr(submit, "file_system_type", lambda path: "ext4")
    assert main(sweep) == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(submit, "file_system_type", lambda path: "nfs4")
    assert main(sweep) == 0
    err = capsys.readouterr().err
    assert f"launch.submit: warning: the 2 jobs of this sweep record into the SQLite MLflow store {tmp_path / 'out' / 'mlflow.db'} (nfs4)" in err
    assert "--set tracking.tracking_uri=http://<host>:5000" in err
    # One job writes alone; a server store is not SQLite: nothing to say.
    assert main(["demo/ce", "--executor", "slurm", "--dry-run", "--set", f"output_dir={tmp_path / 'out'}"]) == 0
    assert main([*sweep, "--set", "tracking.tracking_uri=http://127.0.0.1:5000"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_cancelled_slurm_jobs_runs_are_ended_by_the_next_pipeline_or_listing(slurm, tmp_path, monkeypatch):
    """scancel: SLURM sends SIGTERM, which submitit ignores (it waits for a preemption's USR2), then
    SIGKILL, so the job's runs stay RUNNING. The scheduler knows the job has ended: from another
    machine of the cluster, ``ltscale runs`` says so and the next pipeline marks them KILLED."""
    from ltscale.tracking import Tracker
    from ltscale.tracking.attempts import TAG_MACHINE, TAG_SLURM_CLUSTER, Attempt

    # Long enough to outlast KillWait (30 s): the job runs on through the ignored SIGTERM until SIGKILL.
    config, job = _training_on_slurm(slurm, tmp_path, 5000, "ltscale-cancel")
    output = Path(config.output_dir)
    job.cancel()
    deadline = time.monotonic() + 120
    while "JobState=CANCELLED" not in slurm.run("scontrol", "-o", "show", "job", job.job_id, check=False):
        assert time.monotonic() < deadline, slurm.run("scontrol", "-o", "show", "job", job.job_id, check=False)
        time.sleep(0.5)
    client = mlflow.MlflowClient(f"sqlite:///{output}/mlflow.db")
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"RUNNING"}  # what scancel leaves
    assert {r.data.tags[TAG_SLURM_CLUSTER] for r in runs} == {"ltscale-test"}
    # As seen from another machine of the cluster (the job ran on this one, whose PIDs would tell).
    for run in runs:
        client.set_tag(run.info.run_id, TAG_MACHINE, "node7/boot/pid:[1]")
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    tags = client.get_run(runs[0].info.run_id).data.tags
    assert Attempt.current().owner_gone(tags) == f"SLURM job {job.job_id} has ended (CANCELLED) without ending the run"
    assert sorted(Tracker(config.tracking, output).end_abandoned_runs()) == sorted(r.info.run_id for r in runs)
    for run in client.search_runs([experiment]):
        assert run.info.status == "KILLED"
        assert run.data.tags["ltscale.error"] == f"ProcessGone: SLURM job {job.job_id} has ended (CANCELLED) without ending the run"
    # A job of another cluster with the same id says nothing about this one's.
    assert Attempt.current().owner_gone({**tags, TAG_SLURM_CLUSTER: "elsewhere"}) is None
    # A job the controller has forgotten (MinJobAge after its end) has ended too.
    from ltscale.tracking.attempts import slurm_attempt_over

    assert slurm_attempt_over("9876543", 0) == "SLURM job 9876543 has ended (the cluster no longer knows it)"


def test_an_array_tasks_state_is_read_from_its_own_line(slurm, monkeypatch):
    """`scontrol show job <array job id>` lists every task of the array; the array's job id is also
    its last task's. Only the line of that very job id says whether its runs' owner has ended."""
    from ltscale.tracking.attempts import slurm_attempt_over

    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    first = slurm.run("sbatch", "--parsable", "--array=0-1%1", "-p", slurm.partition, "-o", "/dev/null", "--wrap", "sleep $((2 + 20 * SLURM_ARRAY_TASK_ID))")
    array = first.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while "JobState=COMPLETED" not in slurm.run("scontrol", "-o", "show", "job", array, check=False) \
            or "RUNNING" not in slurm.run("scontrol", "-o", "show", "job", array, check=False):
        assert time.monotonic() < deadline, slurm.run("scontrol", "-o", "show", "job", array, check=False)
        time.sleep(0.2)
    # Task 0 (its own job id) has completed while the last task, which holds the array's id, runs.
    listing = slurm.run("scontrol", "-o", "show", "job", array, check=False)
    task0 = next(line for line in listing.splitlines() if "ArrayTaskId=0 " in line).split()[0].removeprefix("JobId=")
    assert slurm_attempt_over(task0, 0) == f"SLURM job {task0} has ended (COMPLETED)"
    assert slurm_attempt_over(array, 0) is None  # running, though the listing for its id holds a COMPLETED line

"""ltscale.tracking against a real MLflow server (session fixture) and the default local store."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.artifacts import download_artifacts

from ltscale.dist.ports import free_port
from ltscale.tracking import (
    TAG_CODE_VERSION,
    TAG_CONFIG_HASH,
    TAG_ERROR,
    TAG_OUTPUT,
    TAG_PARENT_RUNS,
    TAG_PIPELINE,
    TAG_STAGE,
    Tracker,
    TrackingConfig,
    code_version,
    default_tracking_uri,
    join_run_ids,
    split_run_ids,
    start_local_server,
    ui_command,
    uncommitted_changes,
)
from ltscale.tracking.plots import per_class_accuracy_figure, shot_group, virtual_example_figure

COUNTS = [500, 120, 100, 60, 20, 19, 5]
ACCURACY = [0.9, 0.8, 0.75, 0.6, 0.5, 0.3, 0.1]


def _git_in(repo: Path):
    """``git(*args)`` in ``repo`` with a throwaway identity, returning its stripped output."""
    def git(*args: str) -> str:
        command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
    return git


def _experiment() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def _run_two_stages(tracker: Tracker) -> tuple[str, str, str]:
    """A pipeline with a teacher and a distill stage that consumes it; returns the three run ids."""
    with tracker.pipeline_run("cifar100_lt", {"seed": 0, "data": {"imbalance": 100}}, {"owner": "test"}) as pipeline:
        with tracker.stage_run("teacher", {"optim": {"lr": 0.1, "momentum": 0.9}}, {TAG_CONFIG_HASH: "abc"}) as teacher:
            for step in range(3):
                teacher.log_metrics({"train/loss": 2.0 - step, "train/top1": 0.1 * step}, step=step)
            teacher.log_dataset(
                name="cifar100_lt_train",
                digest="0123456789abcdef",
                source="/data/cifar100",
                context="training",
                num_rows=sum(COUNTS),
                extra={"class_counts": np.asarray(COUNTS), "imbalance_ratio": 100.0},
            )
            teacher.log_per_class_accuracy(ACCURACY, COUNTS, prefix="test")
            teacher.log_dict({"epochs": 3}, "config/teacher.yaml")
            teacher.set_tags({TAG_OUTPUT: "/out/teacher.pt"})
        consumed = {TAG_PARENT_RUNS: join_run_ids([teacher.run_id])}
        with tracker.stage_run("distill", {"temperature": 2.0}, consumed) as distill:
            figure = virtual_example_figure({"T=2, p=0.5": np.asarray(COUNTS[::-1], float)}, COUNTS, "virtual")
            distill.log_figure(figure, "rebalance/virtual_examples.png")
            distill.log_metrics({"test/top1": 0.61})
    return pipeline.run_id, teacher.run_id, distill.run_id


def test_pipeline_and_stage_runs_on_server(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment=_experiment()), tmp_path)
    assert tracker.tracking_uri == mlflow_server
    pipeline_id, teacher_id, distill_id = _run_two_stages(tracker)
    client = MlflowClient(mlflow_server)

    pipeline = client.get_run(pipeline_id)
    assert pipeline.info.status == "FINISHED"
    assert pipeline.data.params == {"seed": "0", "data.imbalance": "100"}
    assert pipeline.data.tags["owner"] == "test"
    assert pipeline.data.tags[TAG_CODE_VERSION] == code_version()
    assert "mlflow.parentRunId" not in pipeline.data.tags

    children = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline_id}'"
    )
    assert {run.info.run_id for run in children} == {teacher_id, distill_id}

    teacher = client.get_run(teacher_id)
    assert teacher.info.status == "FINISHED"
    assert teacher.info.run_name == "teacher"
    assert teacher.data.params == {"optim.lr": "0.1", "optim.momentum": "0.9"}
    assert teacher.data.tags[TAG_STAGE] == "teacher"
    assert teacher.data.tags[TAG_PIPELINE] == "cifar100_lt"
    assert teacher.data.tags[TAG_CONFIG_HASH] == "abc"
    assert teacher.data.tags[TAG_OUTPUT] == "/out/teacher.pt"
    history = client.get_metric_history(teacher_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.0), (1, 1.0), (2, 0.0)]

    (dataset_input,) = teacher.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cifar100_lt_train"
    assert dataset_input.dataset.digest == "0123456789abcdef"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert json.loads(dataset_input.dataset.profile)["class_counts"] == COUNTS

    listed = {a.path for a in client.list_artifacts(teacher_id, "test")}
    assert listed == {f"test/per_class_accuracy.{ext}" for ext in ("json", "csv", "png")}
    table_path = download_artifacts(
        run_id=teacher_id,
        artifact_path="test/per_class_accuracy.json",
        dst_path=str(tmp_path),
        tracking_uri=mlflow_server,
    )
    table = json.loads(Path(table_path).read_text())
    assert [row["train_count"] for row in table["classes"]] == COUNTS
    assert [row["group"] for row in table["classes"]] == ["many", "many", "medium", "medium", "medium", "few", "few"]
    assert table["groups"]["few"] == {"classes": 2, "accuracy": pytest.approx(0.2)}
    assert {a.path for a in client.list_artifacts(teacher_id, "config")} == {"config/teacher.yaml"}

    distill = client.get_run(distill_id)
    assert split_run_ids(distill.data.tags[TAG_PARENT_RUNS]) == [teacher_id]
    assert distill.data.metrics["test/top1"] == pytest.approx(0.61)
    assert {a.path for a in client.list_artifacts(distill_id, "rebalance")} == {"rebalance/virtual_examples.png"}


def test_failure_marks_runs_failed_and_propagates(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment=_experiment()), tmp_path)
    handles = {}
    with pytest.raises(RuntimeError, match="loss diverged"):
        with tracker.pipeline_run("pipe", {}, {}) as pipeline:
            handles["pipeline"] = pipeline
            with tracker.stage_run("teacher", {}, {}) as stage:
                handles["stage"] = stage
                raise RuntimeError("loss diverged")
    client = MlflowClient(mlflow_server)
    for handle in handles.values():
        run = client.get_run(handle.run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags[TAG_ERROR] == "RuntimeError: loss diverged"
    assert mlflow.active_run() is None
    # Nothing leaked: the same tracker starts a fresh pipeline afterwards.
    with tracker.pipeline_run("again", {}, {}) as again:
        pass
    assert client.get_run(again.run_id).info.status == "FINISHED"


def test_non_finite_metric_raises_and_logs_nothing(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment=_experiment()), tmp_path)
    with tracker.pipeline_run("pipe", {}, {}) as pipeline:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match="'train/loss'"):
                pipeline.log_metrics({"train/top1": 0.5, "train/loss": bad}, step=1)
        with pytest.raises(TypeError, match="'train/top1'"):
            pipeline.log_metrics({"train/top1": None})  # type: ignore[dict-item]
    run = MlflowClient(mlflow_server).get_run(pipeline.run_id)
    assert run.data.metrics == {}
    assert run.info.status == "FINISHED"


def test_params_flattened_truncated_and_batched(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment=_experiment()), tmp_path)
    params = {"many": {f"key{i:03d}": i for i in range(250)}, "long": "x" * 7000, "empty": {}}
    with tracker.pipeline_run("pipe", params, {}) as pipeline:
        pass
    logged = MlflowClient(mlflow_server).get_run(pipeline.run_id).data.params
    assert len(logged) == 252
    assert logged["many.key249"] == "249"
    assert logged["empty"] == "{}"
    assert len(logged["long"]) == 6000
    assert logged["long"].startswith("xxx") and logged["long"].endswith("...[truncated 7000 chars]")


def test_runs_must_nest_properly(mlflow_server: str, tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment=_experiment()), tmp_path)
    with pytest.raises(RuntimeError, match="needs an active pipeline_run"):
        with tracker.stage_run("teacher", {}, {}):
            pass
    with tracker.pipeline_run("outer", {}, {}):
        with pytest.raises(RuntimeError, match="do not nest"):
            with tracker.pipeline_run("inner", {}, {}):
                pass


def test_default_local_store_and_two_trackers(mlflow_server: str, tmp_path: Path) -> None:
    global_uri = mlflow.get_tracking_uri()
    local = Tracker(TrackingConfig(), tmp_path / "out")
    local.code_version = "f" * 40  # as a clean checkout: no patch artifact whatever state this tree is in
    remote = Tracker(TrackingConfig(tracking_uri=mlflow_server, experiment=_experiment()), tmp_path)
    assert local.tracking_uri == default_tracking_uri(tmp_path / "out")
    assert local.tracking_uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert (tmp_path / "out" / "mlflow.db").exists()

    # Interleaved runs on two stores: each lands in its own.
    with local.pipeline_run("local", {"where": "local"}, {}) as local_pipeline:
        with remote.pipeline_run("remote", {"where": "remote"}, {}) as remote_pipeline:
            with local.stage_run("teacher", {}, {}) as local_stage:
                local_stage.log_metrics({"test/top1": 0.5}, step=3)
                local_stage.log_per_class_accuracy(ACCURACY, COUNTS, prefix="")
                local_stage.log_dataset("d", "e" * 64, "synthetic", "evaluation", 7)
                note = tmp_path / "note.txt"
                note.write_text("hello")
                local_stage.log_artifact(note, "notes")
    assert mlflow.get_tracking_uri() == global_uri

    client = MlflowClient(local.tracking_uri)
    stage = client.get_run(local_stage.run_id)
    assert stage.data.tags["mlflow.parentRunId"] == local_pipeline.run_id
    assert stage.data.metrics == {"test/top1": 0.5}
    (dataset_input,) = stage.inputs.dataset_inputs
    assert dataset_input.dataset.digest == "e" * 36  # MLflow's limit; the whole digest is in the profile
    assert json.loads(dataset_input.dataset.profile)["digest"] == "e" * 64
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "evaluation"
    artifacts = tmp_path / "out" / "mlartifacts"
    assert {p.name for p in artifacts.rglob("*") if p.is_file()} == {
        "per_class_accuracy.json", "per_class_accuracy.csv", "per_class_accuracy.png", "note.txt"
    }  # fmt: skip
    assert client.get_run(local_pipeline.run_id).data.params == {"where": "local"}
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_run(remote_pipeline.run_id)
    assert MlflowClient(mlflow_server).get_run(remote_pipeline.run_id).data.params == {"where": "remote"}

    # A second tracker over the same output dir reuses the store and the experiment.
    assert Tracker(TrackingConfig(), tmp_path / "out").experiment_id == local.experiment_id


def test_server_start_failure_reports_output(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with code"):
        start_local_server("notascheme://nowhere", tmp_path / "artifacts", timeout=30)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP", "SIGINT", "SIGHUP under nohup"])
def test_ui_stopped_by_a_signal_takes_its_server_down_with_it(tmp_path: Path, signum: str) -> None:
    """`kill` or a closed terminal signal only `ltscale ui`; the MLflow UI it started (mlflow and
    its uvicorn child) must not go on serving the store, orphaned. Under nohup, SIGHUP is ignored."""
    import signal
    import urllib.request

    nohup = signum.endswith("under nohup")
    sent = getattr(signal, signum.split()[0])

    def dispositions() -> None:
        # As a shell would start it: xdist's workers ignore SIGINT, which children would inherit.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)

    (tmp_path / "out").mkdir()
    port = free_port()
    ui_process = subprocess.Popen([sys.executable, "-m", "ltscale.cli", "ui", "--output-dir", str(tmp_path / "out"),
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=dispositions)

    def serving() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    server_pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not serving():
            assert ui_process.poll() is None and time.monotonic() < deadline, ui_process.communicate()[1]
            time.sleep(0.5)
        server_pids = _descendants(ui_process.pid)
        assert len(server_pids) >= 2  # mlflow and its uvicorn
        ui_process.send_signal(sent)
        if nohup:
            time.sleep(3)
            assert ui_process.poll() is None and serving()  # it outlives its terminal, as asked
            sent = signal.SIGTERM
            ui_process.send_signal(sent)
        # Ctrl-C is the UI's usual end (exit 0); SIGINT here reaches ltscale alone, as from `kill -INT`.
        assert ui_process.wait(timeout=60) == (0 if sent == signal.SIGINT else 128 + sent)
        assert not serving()
        assert [pid for pid in server_pids if os.path.exists(f"/proc/{pid}")] == []
    finally:
        if ui_process.poll() is None:
            ui_process.kill()
        for pid in server_pids:  # what this test is about, when it fails: do not leave it serving
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _descendants(pid: int) -> list[int]:
    children = [int(child) for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                                       text=True).stdout.split()]
    return [grandchild for child in children for grandchild in [child, *_descendants(child)]]


def test_ui_command_points_at_default_store(tmp_path: Path) -> None:
    argv = ui_command(tmp_path)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == default_tracking_uri(tmp_path)


def test_code_version_without_git_reads_the_carried_file(tmp_path: Path) -> None:
    """A copy of the tree without .git (the lent GPU machine's) names its commit by .code-version,
    written where git was by `python -m ltscale.tracking.provenance`."""
    repo = Path(__file__).resolve().parents[1]
    written = subprocess.run([sys.executable, "-m", "ltscale.tracking.provenance"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout
    assert written.splitlines()[0].split("+")[0] == code_version()  # "+<digest>" follows "-dirty"
    (tmp_path / ".code-version").write_text(f"{'a' * 40}-dirty\n")
    assert code_version(tmp_path) == f"{'a' * 40}-dirty"
    (tmp_path / ".code-version").write_text("\n")  # empty: not a version
    assert code_version(tmp_path) != ""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a checkout to another user needs root")
def test_a_checkout_git_refuses_to_read_is_unknown_not_the_package_version(tmp_path: Path, monkeypatch, caplog) -> None:
    """Git refuses a checkout another user owns (a container's root on a bind mount): its code is
    not the installed release's, so the version says unknown, and a warning says why."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))  # no global safe.directory from this machine's config
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*command, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*command, "add", "."], check=True)
    subprocess.run([*command, "commit", "-q", "-m", "init"], check=True)
    assert re.fullmatch(r"[0-9a-f]{40}", code_version(repo))
    for path in [repo, *repo.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    with caplog.at_level(logging.WARNING, logger="ltscale.tracking.provenance"):
        assert code_version(repo) == "unknown"
    assert f"git refuses to read the checkout at {repo.resolve()}" in caplog.text and "dubious ownership" in caplog.text


def test_code_version_record_marks_a_changed_copy_stale(tmp_path: Path) -> None:
    """The record carried to a machine without git names the commit only while the copy's files
    are the ones it was written for: an edited or missing file makes the version ``-stale``."""
    from ltscale.tracking.provenance import STALE_SUFFIX, code_version_record

    repo = tmp_path / "repo"
    repo.mkdir()

    git = _git_in(repo)
    git("init", "-q")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "b.py").write_text("y = 2\n")
    (repo / ".gitignore").write_text(".data/\n.code-version\n")
    (repo / "RESULTS.md").write_text("no numbers yet\n")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    commit = git("rev-parse", "HEAD")
    (repo / ".data").mkdir()
    (repo / ".data" / "big.npz").write_bytes(b"0" * 100)  # ignored: not part of the code
    record = code_version_record(repo)
    assert record.splitlines()[0] == commit and "pkg/a.py" in record and ".data/big.npz" not in record

    copy = tmp_path / "copy"  # what a device call gets: the files, no .git
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    (copy / ".code-version").write_text(record)
    assert code_version(copy) == commit
    (copy / ".data" / "big.npz").write_bytes(b"1")  # ignored files may change freely
    (copy / "RESULTS.md").write_text("a table written by the run\n")  # so may results and docs
    assert code_version(copy) == commit
    (copy / "pkg" / "a.py").write_text("x = 3\n")
    assert code_version(copy) == commit + STALE_SUFFIX
    (copy / "pkg" / "a.py").write_text("x = 1\n")
    assert code_version(copy) == commit
    (copy / "b.py").unlink()
    assert code_version(copy) == commit + STALE_SUFFIX

    # Names that a line-per-name record would break (a newline, a leading quote or blank) are
    # written quoted and read back whole: the copy is not taken for stale.
    odd = tmp_path / "odd"
    shutil.copytree(repo, odd)
    for name in ("new\nline.py", '"quoted".py', " spaced.py"):
        (odd / name).write_text("z = 0\n")
    subprocess.run(["git", "-C", str(odd), "-c", "user.name=t", "-c", "user.email=t@t", "add", "."], check=True)
    subprocess.run(["git", "-C", str(odd), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "odd"], check=True)
    odd_record = code_version_record(odd)
    odd_copy = tmp_path / "odd_copy"
    shutil.copytree(odd, odd_copy, ignore=shutil.ignore_patterns(".git"))
    (odd_copy / ".code-version").write_text(odd_record)
    assert code_version(odd_copy) == odd_record.splitlines()[0] and not code_version(odd_copy).endswith(STALE_SUFFIX)
    (odd_copy / "new\nline.py").write_text("z = 1\n")
    assert code_version(odd_copy).endswith(STALE_SUFFIX)

    # From a dirty tree: two different dirty states are told apart by the digest in the version.
    (repo / "b.py").write_text("y = 3\n")
    first = code_version_record(repo).splitlines()[0]
    (repo / "b.py").write_text("y = 4\n")
    second = code_version_record(repo).splitlines()[0]
    assert first.startswith(f"{commit}-dirty+") and second.startswith(f"{commit}-dirty+") and first != second


def test_code_version_reads_git(tmp_path: Path) -> None:
    git = _git_in(tmp_path)
    fallback = code_version(tmp_path)  # not a checkout: the package version or "unknown", no error
    assert fallback and "-dirty" not in fallback
    git("init", "-q")
    (tmp_path / "module.py").write_text("x = 1\n")
    git("add", "module.py")
    git("commit", "-q", "-m", "init")
    commit = git("rev-parse", "HEAD")
    assert code_version(tmp_path) == commit
    assert uncommitted_changes(tmp_path) is None  # clean: nothing to record
    # What a reproduction writes into the checkout (a results table, notes) is not code: the jobs
    # after it keep the commit as their version, as a copy's CODE_VERSION_FILE digest does.
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.json").write_text("{}\n")
    (tmp_path / "NOTES.md").write_text("seed 0 done\n")
    assert code_version(tmp_path) == commit and uncommitted_changes(tmp_path) is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pyproject.toml").write_text("[project]\n")  # only the top one is the package's
    assert code_version(tmp_path) == commit
    (tmp_path / "pyproject.toml").write_text("[project]\n")  # a new dependency changes what runs
    assert code_version(tmp_path) == f"{commit}-dirty"
    (tmp_path / "pyproject.toml").unlink()
    (tmp_path / "module.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"{commit}-dirty"
    git("add", "module.py")  # staged: still uncommitted
    assert code_version(tmp_path) == f"{commit}-dirty"
    assert isinstance(code_version(), str) and code_version()

    # The patch rebuilds the dirty tree on a clean checkout of its commit: edits, new files
    # (binary ones too), non-UTF-8 text; ignored files stay out.
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "big.pt").write_bytes(b"x" * 1000)
    (tmp_path / "new.py").write_text("y = 3\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    patch = uncommitted_changes(tmp_path)
    assert patch and "runs/big.pt" not in patch
    clone = tmp_path.parent / f"{tmp_path.name}-clone"
    subprocess.run(["git", "clone", "-q", str(tmp_path), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "apply", "--binary", "-"], input=patch.encode(), check=True)
    for name in ("module.py", "new.py", "blob.bin", ".gitignore"):
        assert (clone / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert (clone / "latin1.txt").exists()
    cut = uncommitted_changes(tmp_path, max_bytes=100)
    assert cut.endswith(f"cut at 100 of {len(patch.encode())} bytes\n")


def test_dirty_tree_pipeline_run_records_its_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ltscale.tracking.mlflow_tracker as mlflow_tracker

    patch = "diff --git a/m.py b/m.py\n--- a/m.py\n+++ b/m.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"
    monkeypatch.setattr(mlflow_tracker, "uncommitted_changes", lambda: patch)
    tracker = Tracker(TrackingConfig(), tmp_path)
    runs = {}
    for version in ("a" * 40 + "-dirty", "a" * 40):
        tracker.code_version = version
        with tracker.pipeline_run(version, {}, {}) as pipeline:
            with tracker.stage_run("teacher", {}, {}) as stage:
                pass
        runs[version] = pipeline.run_id, stage.run_id
    client = MlflowClient(tracker.tracking_uri)
    dirty, clean = runs["a" * 40 + "-dirty"], runs["a" * 40]
    assert [a.path for a in client.list_artifacts(dirty[0], "code")] == [mlflow_tracker.UNCOMMITTED_PATCH]
    assert Path(download_artifacts(run_id=dirty[0], artifact_path=mlflow_tracker.UNCOMMITTED_PATCH,
                                   tracking_uri=tracker.tracking_uri)).read_text() == patch
    assert client.get_run(dirty[0]).data.tags["mlflow.source.git.commit"] == "a" * 40
    assert client.list_artifacts(dirty[1]) == []  # once per pipeline, on its parent run
    assert client.list_artifacts(clean[0]) == []


def test_shot_groups_and_plot_validation() -> None:
    assert [shot_group(c) for c in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    with pytest.raises(ValueError, match="3 entries but class_counts has 7"):
        per_class_accuracy_figure(ACCURACY[:3], COUNTS, "t")
    with pytest.raises(ValueError, match="'bad'"):
        virtual_example_figure({"bad": np.ones(3)}, COUNTS, "t")
    with pytest.raises(ValueError, match="non-negative"):
        per_class_accuracy_figure(ACCURACY, [-1] + COUNTS[1:], "t")


# --- runs left RUNNING by attempts that died without unwinding -------------------------------------


def _exited_process() -> tuple[int, str]:
    """PID and start time of a process that has exited (recorded while it was alive)."""
    from ltscale.tracking.attempts import process_start

    child = subprocess.Popen(["sleep", "30"])
    started = process_start(child.pid)
    child.kill()
    child.wait()
    return child.pid, started


def test_attempt_tells_gone_owners_from_live_and_foreign_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from ltscale.tracking.attempts import Attempt, process_start

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    here = Attempt.current()
    assert here.process_start and here.owner_gone(here.tags()) is None  # a process never ends its own runs

    pid, started = _exited_process()
    dead = {**here.tags(), "ltscale.attempt.pid": str(pid), "ltscale.attempt.process_start": started}
    assert "has exited" in here.owner_gone(dead)

    with subprocess.Popen(["sleep", "30"]) as live:
        try:
            alive = {**here.tags(), "ltscale.attempt.pid": str(live.pid), "ltscale.attempt.process_start": process_start(live.pid)}
            assert here.owner_gone(alive) is None
            # The same PID with another start time is a new process that reused the PID.
            reused = {**alive, "ltscale.attempt.process_start": str(int(alive["ltscale.attempt.process_start"]) - 1)}
            assert "another process" in here.owner_gone(reused)
        finally:
            live.kill()
    # Another machine's processes cannot be inspected: its runs are left alone, dead PID or not.
    assert here.owner_gone({**dead, "ltscale.attempt.machine": "elsewhere/boot/pid:[1]"}) is None
    assert here.owner_gone({}) is None

    # A requeued SLURM job: every run of an earlier attempt of the same job is over, wherever it ran.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    requeued = Attempt.current()
    earlier = {"ltscale.attempt.machine": "node7/boot/pid:[1]", "ltscale.attempt.pid": "99",
               "ltscale.attempt.slurm_job": "4242", "ltscale.attempt.slurm_restart": "1"}
    assert "attempt 1 of SLURM job 4242 was requeued (this is attempt 2)" in requeued.owner_gone(earlier)
    assert requeued.owner_gone({**earlier, "ltscale.attempt.slurm_restart": "2"}) is None
    assert requeued.owner_gone({**earlier, "ltscale.attempt.slurm_job": "4243"}) is None
    # Job ids are per cluster: job 4242 of another cluster sharing the tracking server is another job.
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "cluster-b")
    requeued = Attempt.current()
    assert "was requeued" in requeued.owner_gone({**earlier, "ltscale.attempt.slurm_cluster": "cluster-b"})
    assert requeued.owner_gone({**earlier, "ltscale.attempt.slurm_cluster": "cluster-a"}) is None


def test_end_abandoned_runs_marks_only_certainly_dead_ones_killed(tmp_path: Path) -> None:
    from ltscale.tracking.attempts import Attempt, process_start

    tracker = Tracker(TrackingConfig(experiment="abandoned"), tmp_path)
    client = tracker.client
    here = Attempt.current().tags()
    pid, started = _exited_process()

    def run(tags: dict[str, str]) -> str:
        created = client.create_run(tracker.experiment_id, run_name="r", tags=tags)
        return created.info.run_id

    dead = run({**here, "ltscale.attempt.pid": str(pid), "ltscale.attempt.process_start": started})
    mine = run(here)
    foreign = run({**here, "ltscale.attempt.machine": "elsewhere/boot/pid:[1]", "ltscale.attempt.pid": str(pid)})
    not_ours = run({"some.tag": "x"})
    finished = run({**here, "ltscale.attempt.pid": str(pid), "ltscale.attempt.process_start": started})
    client.set_terminated(finished, "FINISHED")
    with subprocess.Popen(["sleep", "30"]) as live_process:
        try:
            live = run({**here, "ltscale.attempt.pid": str(live_process.pid),
                        "ltscale.attempt.process_start": process_start(live_process.pid)})
            assert tracker.end_abandoned_runs() == [dead]
        finally:
            live_process.kill()
    status = {r: client.get_run(r).info.status for r in (dead, mine, foreign, not_ours, finished, live)}
    assert status == {dead: "KILLED", mine: "RUNNING", foreign: "RUNNING", not_ours: "RUNNING", finished: "FINISHED",
                      live: "RUNNING"}
    assert client.get_run(dead).data.tags[TAG_ERROR].startswith(f"ProcessGone: process {pid} on ")
    assert client.get_run(dead).info.end_time is not None


def test_pipeline_killed_without_unwinding_is_marked_killed_by_the_next_run(tmp_path: Path, capsys) -> None:
    """SIGKILL mid-stage (the OOM killer, SLURM past KillWait): the rerun ends the orphaned runs."""
    import os
    import signal
    import sys

    from ltscale.stages.pipeline import run_pipeline
    from tests.test_pipeline import tiny

    root = Path(__file__).resolve().parents[1]
    script = ("import sys\nfrom pathlib import Path\nfrom tests.test_pipeline import tiny\n"
              "from ltscale.config import apply_overrides\nfrom ltscale.stages.pipeline import run_pipeline\n"
              "run_pipeline(apply_overrides(tiny('ce', Path(sys.argv[1])), ['stages.teacher.optim.epochs=400']))\n")
    victim = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 240
    try:
        while True:  # until the teacher stage is training (its child run exists)
            assert victim.poll() is None, victim.stderr.read().decode()[-3000:] if victim.stderr else ""
            assert time.monotonic() < deadline, "the teacher stage did not start"
            if (tmp_path / "mlflow.db").is_file():
                experiment = client.get_experiment_by_name("ltscale")
                if experiment and client.search_runs([experiment.experiment_id], "tags.`ltscale.stage` = 'teacher'"):
                    break
            time.sleep(0.5)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_at = time.time() * 1000
    orphans = client.search_runs([experiment.experiment_id])
    assert len(orphans) == 2 and {r.info.status for r in orphans} == {"RUNNING"}
    # Before any pipeline cleans up, `ltscale runs` does not show the dead pipeline as running.
    from ltscale.cli import main

    assert main(["runs", "--output-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert " GONE " in listing and " RUNNING " not in listing
    assert f"recorded as RUNNING, but process {victim.pid} on " in listing and "marks it KILLED" in listing

    time.sleep(1.5)
    result = run_pipeline(tiny("ce", tmp_path))  # a shorter teacher: a new stage key, a fresh stage
    for orphan in orphans:
        run = client.get_run(orphan.info.run_id)
        assert run.info.status == "KILLED"
        assert f"process {victim.pid} on " in run.data.tags[TAG_ERROR] and "has exited" in run.data.tags[TAG_ERROR]
        assert run.info.end_time <= killed_at  # when it was last heard of, not when the next run noticed
    ended = {o.info.run_id: client.get_run(o.info.run_id) for o in orphans}
    parent = next(r for r in ended.values() if "ltscale.stage" not in r.data.tags)
    child = next(r for r in ended.values() if "ltscale.stage" in r.data.tags)
    assert parent.info.end_time >= child.info.start_time  # the pipeline lasted at least into its stage
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_pipelines_starting_together_on_a_new_local_store_all_record(tmp_path: Path) -> None:
    """MLflow creates a SQLite store's schema on first use; processes racing to do it all failed
    (alembic errors) before the tracker serialised that first use."""
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    script = ("import sys\nfrom pathlib import Path\nfrom ltscale.tracking import Tracker, TrackingConfig\n"
              "tracker = Tracker(TrackingConfig(), Path(sys.argv[1]))\n"
              "with tracker.pipeline_run(f'p{sys.argv[2]}', {'i': sys.argv[2]}, {}) as run:\n"
              "    with tracker.stage_run('s', {}, {}) as stage:\n"
              "        for step in range(20):\n"
              "            stage.log_metrics({'loss': step / 10}, step=step)\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), str(i)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    client = MlflowClient(default_tracking_uri(tmp_path / "out"))
    runs = client.search_runs([client.get_experiment_by_name("ltscale").experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}


def test_a_run_killed_while_creating_a_new_local_store_leaves_it_usable(tmp_path: Path) -> None:
    """MLflow builds a new SQLite store's schema table by table; killed in that window (a Ctrl-C a
    second after starting), the store was left half-built and every later command failed with
    "table ... already exists". Built aside and renamed, it is absent or whole."""
    import signal
    import sqlite3

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    script = "import sys\nfrom pathlib import Path\nfrom ltscale.tracking import Tracker, TrackingConfig\nTracker(TrackingConfig(), Path(sys.argv[1]))\n"
    worker = subprocess.Popen([sys.executable, "-c", script, str(out)], env={**os.environ, "PYTHONPATH": str(root)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def tables(path: Path) -> int:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05) as db:
                return db.execute("select count(*) from sqlite_master where type = 'table'").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 120
    while worker.poll() is None and time.monotonic() < deadline:
        if any(30 <= tables(p) < 65 for p in [*out.glob("mlflow.db"), *out.glob(".mlflow.db.*")]):  # migrations half done (65 when whole)
            worker.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL, "the worker finished before it could be killed mid-creation"
    tracker = Tracker(TrackingConfig(), out)  # the next run: no leftover of the killed creation in its way
    with tracker.pipeline_run("p", {}, {}):
        pass
    client = MlflowClient(default_tracking_uri(out))
    assert len(client.search_runs([tracker.experiment_id])) == 1
    assert not list(out.glob(".mlflow.db.*"))  # the dead creation's temporary file is gone


class _FlakyClient:
    """An MlflowClient stand-in whose store refuses the first ``failures`` batches."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.logged: list[list[tuple[str, int]]] = []

    def log_batch(self, run_id: str, metrics, synchronous: bool) -> None:
        if self.failures:
            self.failures -= 1
            raise MlflowException("API request to http://127.0.0.1:5917 failed: Connection refused")
        self.logged.append([(m.key, m.step) for m in metrics])


def test_training_metrics_outlive_an_unreachable_store(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Per-epoch metrics go through a sender thread: an outage neither blocks nor stops training,
    and they arrive in order when the store answers again; a run's end waits for them."""
    import logging
    import time

    import ltscale.tracking.mlflow_tracker as tracker_module

    monkeypatch.setattr(tracker_module, "RETRY_S", 0.05)
    client = _FlakyClient(failures=3)
    handle = tracker_module.RunHandle(client, "run-1")  # type: ignore[arg-type]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ltscale.tracking"):
        for epoch in range(5):
            handle.log_metrics({"train/loss": 1.0 / (epoch + 1), "train/top1": 10.0 * epoch}, step=epoch, background=True)
        assert time.monotonic() - started < 0.5  # the training thread never waited for the store
        handle.flush()
    assert client.logged == [[("train/loss", epoch), ("train/top1", epoch)] for epoch in range(5)]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("not taking metrics" in m for m in messages) == 1 and any("answers again" in m for m in messages)

    dead = tracker_module.RunHandle(_FlakyClient(failures=10**9), "run-2")  # type: ignore[arg-type]
    dead.FLUSH_TIMEOUT_S = 0.3
    dead.log_metrics({"train/loss": 1.0}, step=0, background=True)
    with pytest.raises(MlflowException, match="1 batch.es. of training metrics could not be sent in 0 s"):
        dead.flush()


def test_sigterm_ends_the_runs_as_killed_and_releases_the_stage(tmp_path: Path) -> None:
    """``kill`` / ``timeout`` / a scheduler's SIGTERM: the CLI unwinds as for Ctrl-C (exit 143)."""
    import os
    import signal
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    log = tmp_path / "stderr.log"  # a file, not a pipe: an unread pipe fills up and blocks the victim's writes
    with open(log, "wb") as stderr:
        victim = subprocess.Popen([sys.executable, "-m", "ltscale.cli", "run", "demo/ce", "--output-dir", str(out),
                                   "--set", "device=cpu", "--set", "stages.teacher.optim.epochs=400"], cwd=root,
                                  env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.DEVNULL, stderr=stderr,
                                  # as from a shell: an ignored SIGTERM of this process must not be inherited
                                  preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    deadline = time.monotonic() + 240
    try:
        while True:  # until the teacher trains (its progress file exists)
            assert victim.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the teacher stage did not start training"
            if list(out.glob("store/*/progress.pt")):
                break
            time.sleep(0.5)
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if victim.poll() is None:
            victim.kill()
    experiment = client.get_experiment_by_name("ltscale")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags[TAG_ERROR] for r in runs} == {"SystemExit: terminated (SIGTERM)"}
    assert not list(out.glob("store/*/.lock"))  # the stage is free for the rerun
    assert log.read_text().strip().splitlines()[-1].startswith("ltscale: terminated (SIGTERM); finished stages are kept")


def test_an_unreachable_server_is_named_in_seconds(tmp_path: Path, capsys) -> None:
    import socket

    from ltscale.cli import main

    uri = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    started = time.monotonic()
    with pytest.raises(MlflowException, match=rf"the MLflow server at {uri} does not answer \(.*refused"):
        Tracker(TrackingConfig(tracking_uri=uri), tmp_path)
    assert main(["runs", "--tracking-uri", uri]) == 1
    assert f"the MLflow server at {uri} does not answer" in capsys.readouterr().err
    assert time.monotonic() - started < 30  # not MLflow's minutes of retries

    # Something that answers, even where the TLS handshake fails (a certificate only MLflow's own
    # CA settings accept; here a plain-text server behind an https URI), is left to MLflow.
    import threading

    from ltscale.tracking.mlflow_tracker import check_server_answers

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        check_server_answers(f"https://127.0.0.1:{server.getsockname()[1]}")


def test_a_uri_with_credentials_reaches_its_server_and_its_password_is_never_shown(
        mlflow_server: str, tmp_path: Path, capsys, caplog, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow sends a URI's user info as HTTP Basic auth; the reachability probe (urllib) took
    ``alice:secret@127.0.0.1`` for the host and refused a server that answers, printing the password."""
    from ltscale.cli import main

    # Unset for this test, and as it was after it (the tracker sets it for a URI with a password).
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    uri = mlflow_server.replace("http://", "http://alice:secret@")
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment=_experiment()), tmp_path)
    with pytest.raises(RuntimeError), caplog.at_level(logging.WARNING):
        with tracker.pipeline_run("p", {"tracking": {"tracking_uri": uri}}, {}) as pipeline:
            raise RuntimeError(f"the store at {uri} broke")
    run = MlflowClient(mlflow_server).get_run(pipeline.run_id)
    redacted = mlflow_server.replace("http://", "http://alice:***@")
    assert run.data.params["tracking.tracking_uri"] == redacted
    assert run.data.tags[TAG_ERROR] == f"RuntimeError: the store at {redacted} broke"

    dead = f"http://alice:secret@127.0.0.1:{free_port()}"  # a port nobody listens on
    with pytest.raises(MlflowException, match=r"server at http://alice:\*\*\*@127\.0\.0\.1:\d+ does not answer"):
        Tracker(TrackingConfig(tracking_uri=dead), tmp_path)
    assert main(["runs", "--tracking-uri", dead]) == 1
    printed = capsys.readouterr()
    assert "alice:***@" in printed.err
    assert "secret" not in printed.out + printed.err + caplog.text + json.dumps(run.data.tags)


def test_run_tags_go_on_the_pipeline_run_below_the_systems_own(tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(run_tags=("sweep=lr,wd", "owner=user")), tmp_path)
    with tracker.pipeline_run("tagged", {"seed": 0}, {}) as pipeline:
        with tracker.stage_run("teacher", {}, {}) as stage:
            pass
    client = MlflowClient(tracker.tracking_uri)
    tags = client.get_run(pipeline.run_id).data.tags
    assert tags["sweep"] == "lr,wd" and tags["owner"] == "user" and tags[TAG_PIPELINE] == "tagged"
    assert "sweep" not in client.get_run(stage.run_id).data.tags  # the pipeline's mark, found on the parent
    runs = client.search_runs([tracker.experiment_id], filter_string="tags.sweep = 'lr,wd'")
    assert [r.info.run_id for r in runs] == [pipeline.run_id]
    with pytest.raises(ValueError, match="tag 'ltscale.stage' is reserved"):
        TrackingConfig(run_tags=("ltscale.stage=x",))


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory whose local store exists (creating one takes seconds): a test makes its
    own experiment there (``_experiment()``)."""
    out = tmp_path_factory.mktemp("local-store")
    Tracker(TrackingConfig(), out)
    return out


def test_tracking_config_refuses_a_blank_experiment_and_reserved_tags_in_any_case() -> None:
    with pytest.raises(ValueError, match="tracking.experiment is empty"):
        TrackingConfig(experiment="  ")
    for key in ("MLflow.runName", "LTSCALE.stage"):
        with pytest.raises(ValueError, match=f"tag '{re.escape(key)}' is reserved"):
            TrackingConfig(run_tags=(f"{key}=x",))


def test_tracking_config_refuses_tags_mlflow_would_refuse_when_the_run_starts() -> None:
    """They passed the config and failed the pipeline run at its start, after the dataset, image
    checks and weight downloads, leaving a FAILED run behind."""
    for tag, rule in (("owner@lab=me", "may only contain alphanumerics"), ("team/../x=1", "must not resolve to other names"),
                      ("/abs=1", "must not resolve to other names"), ("k" * 251 + "=v", "251 characters; MLflow takes at most 250"),
                      ("note=" + "v" * 8001, "8001 characters; MLflow keeps at most 8000")):
        key = tag.partition("=")[0]
        with pytest.raises(ValueError, match=rf"tracking.run_tags: .*{re.escape(key[:40])}.*{re.escape(rule)}"):
            TrackingConfig(run_tags=(tag,))
    assert TrackingConfig(run_tags=("team/lr: 0.1 sweep-2=a=b", "k" * 250 + "=" + "v" * 8000)).tags()["team/lr: 0.1 sweep-2"] == "a=b"


def test_stage_runs_carry_the_pipeline_tag_and_nest_under_the_innermost_run(local_store: Path) -> None:
    """A stage run is tagged with its pipeline's ``ltscale.pipeline`` (not the pipeline run's
    name, which may add the seed), and a run opened inside a stage run is that stage's child."""
    tracker = Tracker(TrackingConfig(experiment=_experiment()), local_store)
    tracker.code_version = "f" * 40  # as a clean checkout: no patch artifact whatever state this tree is in
    with tracker.pipeline_run("demo/ce seed 3", {}, {TAG_PIPELINE: "demo/ce"}) as pipeline:
        with tracker.stage_run("teacher", {}, {}) as stage:
            with tracker.stage_run("probe", {}, {}) as inner:
                pass
        with tracker.stage_run("student", {}, {}) as after:
            pass
    client = MlflowClient(tracker.tracking_uri)
    runs = {handle: client.get_run(handle.run_id).data.tags for handle in (stage, inner, after)}
    assert {tags[TAG_PIPELINE] for tags in runs.values()} == {"demo/ce"}
    assert runs[stage]["mlflow.parentRunId"] == pipeline.run_id
    assert runs[inner]["mlflow.parentRunId"] == stage.run_id
    assert runs[after]["mlflow.parentRunId"] == pipeline.run_id


def test_per_class_accuracy_leaves_classes_without_test_images_out_of_the_means(local_store: Path, tmp_path: Path) -> None:
    """NaN marks a class with no test image: its accuracy is unknown, not 0, so no mean counts it."""
    tracker = Tracker(TrackingConfig(experiment=_experiment()), local_store)
    tracker.code_version = "f" * 40
    accuracy = [0.9, math.nan, 0.5, 0.3, math.nan]
    with tracker.pipeline_run("pipe", {}, {}) as pipeline:
        pipeline.log_per_class_accuracy(accuracy, [500, 300, 50, 5, 2], prefix="test")
    path = download_artifacts(run_id=pipeline.run_id, artifact_path="test/per_class_accuracy.json", dst_path=str(tmp_path / "dl"),
                              tracking_uri=tracker.tracking_uri)
    table = json.loads(Path(path).read_text())
    assert table["mean_accuracy"] == pytest.approx((0.9 + 0.5 + 0.3) / 3)
    assert table["groups"]["many"] == {"classes": 1, "accuracy": pytest.approx(0.9)}
    assert table["groups"]["few"] == {"classes": 1, "accuracy": pytest.approx(0.3)}
    assert [row["accuracy"] for row in table["classes"]] == [0.9, None, 0.5, 0.3, None]


def test_a_dataset_is_recorded_with_its_source_kind(local_store: Path) -> None:
    tracker = Tracker(TrackingConfig(experiment=_experiment()), local_store)
    tracker.code_version = "f" * 40
    with tracker.pipeline_run("pipe", {}, {}) as pipeline:
        pipeline.log_dataset("remote", "d1", "http://data.example/cifar.tar.gz", "training", 10)
        pipeline.log_dataset("local", "d2", "/data/cifar", "evaluation", 10)
    inputs = MlflowClient(tracker.tracking_uri).get_run(pipeline.run_id).inputs.dataset_inputs
    sources = {i.dataset.name: (i.dataset.source_type, json.loads(i.dataset.source)) for i in inputs}
    assert sources == {"remote": ("http", {"url": "http://data.example/cifar.tar.gz"}), "local": ("local", {"uri": "/data/cifar"})}


def test_an_abandoned_run_ends_when_it_was_last_heard_of(local_store: Path) -> None:
    """Its newest metric, not its start (nor the time the next pipeline noticed): run time is the
    time it trained."""
    from ltscale.tracking.attempts import Attempt

    tracker = Tracker(TrackingConfig(experiment=_experiment()), local_store)
    pid, started = _exited_process()
    tags = {**Attempt.current().tags(), "ltscale.attempt.pid": str(pid), "ltscale.attempt.process_start": started}
    run = tracker.client.create_run(tracker.experiment_id, run_name="r", tags=tags, start_time=1_000_000)
    tracker.client.log_metric(run.info.run_id, "train/loss", 1.0, timestamp=1_500_000, step=0)
    assert tracker.end_abandoned_runs() == [run.info.run_id]
    ended = tracker.client.get_run(run.info.run_id).info
    assert (ended.status, ended.end_time) == ("KILLED", 1_500_000)


def test_a_live_process_whose_start_time_was_not_recorded_keeps_its_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a recorded start time (no /proc where the run began) a live PID is not proof of PID
    reuse: only a process that has exited is certainly gone."""
    from ltscale.tracking.attempts import Attempt

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    here = Attempt.current()
    with subprocess.Popen(["sleep", "30"]) as live:
        try:
            assert here.owner_gone({**here.tags(), "ltscale.attempt.pid": str(live.pid), "ltscale.attempt.process_start": ""}) is None
        finally:
            live.kill()
    pid, _ = _exited_process()
    assert "has exited" in here.owner_gone({**here.tags(), "ltscale.attempt.pid": str(pid), "ltscale.attempt.process_start": ""})


def test_code_version_is_that_of_the_checkout_tracking_the_code(tmp_path: Path) -> None:
    """An untracked directory inside some other repository (an installed copy in a venv under a
    project) is not credited to that repository's commit; and in a tracked subdirectory, new code
    anywhere in the checkout makes the version dirty."""
    git = _git_in(tmp_path)
    git("init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "installed.py").write_text("y = 1\n")
    assert commit not in code_version(tmp_path / "venv")
    (tmp_path / "venv" / "installed.py").unlink()
    assert code_version(tmp_path / "pkg") == commit
    (tmp_path / "new_module.py").write_text("z = 1\n")  # untracked, outside pkg/
    assert code_version(tmp_path / "pkg") == f"{commit}-dirty"


def test_store_uri_checks_take_database_driver_uris_and_an_empty_database_file(tmp_path: Path) -> None:
    from ltscale.tracking.mlflow_tracker import check_sqlite_store, check_uri_form

    for uri in ("postgresql+psycopg2://user@db/mlflow", "mysql+pymysql://user@db/mlflow", "sqlite:///runs/mlflow.db"):
        check_uri_form(uri, "--tracking-uri")
    with pytest.raises(ValueError, match="no tracking store for the scheme 'garbage\\+x'"):
        check_uri_form("garbage+x://host", "--tracking-uri")
    empty = tmp_path / "mlflow.db"
    empty.touch()  # SQLite takes an empty file for a new database
    check_sqlite_store(f"sqlite:///{empty}")
    check_sqlite_store(f"sqlite:///{tmp_path / 'missing.db'}")


def test_sqlite_uris_are_read_as_sqlalchemy_reads_them(tmp_path: Path) -> None:
    """A query (``?timeout=60``, which plain MLflow takes) is not part of the file name, and the
    default store's URI quotes an output directory whose name holds ``%``, ``?``, ``#``, ``@`` or a
    space: both were taken as raw paths, and the store creation failed or wrote another file."""
    import sqlite3

    from ltscale.tracking.mlflow_tracker import sqlite_file

    def runs_in(database: Path) -> int:  # read with sqlite3 itself, not through a URI
        with sqlite3.connect(database) as db:
            return db.execute("select count(*) from runs").fetchone()[0]

    odd = tmp_path / "a %41 q?x=1 #h @b"
    assert sqlite_file(default_tracking_uri(odd)) == odd.resolve() / "mlflow.db"
    tracker = Tracker(TrackingConfig(), odd)
    tracker.code_version = "f" * 40  # as a clean checkout: no patch artifact whatever state this tree is in
    with tracker.pipeline_run("p", {}, {}) as run:
        run.log_text("hi", "note.txt")
    assert sorted(p.name for p in odd.iterdir()) == ["mlartifacts", "mlflow.db", "mlflow.db.init-lock"]
    assert runs_in(odd / "mlflow.db") == 1 and list((odd / "mlartifacts").rglob("note.txt"))

    uri = f"sqlite:///{tmp_path / 'q' / 'mlflow.db'}?timeout=60"
    assert sqlite_file(uri) == tmp_path / "q" / "mlflow.db"
    tracker = Tracker(TrackingConfig(tracking_uri=uri), tmp_path / "q")
    tracker.code_version = "f" * 40
    with tracker.pipeline_run("p", {}, {}):
        pass
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["mlflow.db", "mlflow.db.init-lock"]
    assert runs_in(tmp_path / "q" / "mlflow.db") == 1


def test_consumed_run_ids_are_joined_once_each_and_checked() -> None:
    assert join_run_ids(["a1", "b2", "a1"]) == "a1,b2"
    assert split_run_ids(join_run_ids(["a1", "b2", "a1"])) == ["a1", "b2"] and split_run_ids("") == []
    for bad in ("", "a,b"):
        with pytest.raises(ValueError, match="not a run id"):
            join_run_ids(["a1", bad])


def test_virtual_example_figure_runs_head_to_tail() -> None:
    counts = [5, 500, 50, 20]
    figure = virtual_example_figure({"T=2, p=0.5": np.asarray([40.0, 100.0, 60.0, 45.0])}, counts, "t")
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
    assert lines["input counts"] == [500, 50, 20, 5]
    assert lines["T=2, p=0.5"] == [100.0, 60.0, 45.0, 40.0]

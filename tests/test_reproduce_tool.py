"""tools/reproduce_cifar.py: the command plan, and a real (tiny) run of the table on the demo
recipes: concurrent lanes, the stage cache across methods, run ids and manifest metrics
collected, and the JSON / CSV / markdown results."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "reproduce_cifar.py"


def run_tool(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_full_table_plan(tmp_path):
    done = run_tool("--dry-run", "--data", str(tmp_path / "cifar100_lt_if10.npz"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("ltscale run ")]
    assert len(commands) == 6 * 3 * 3  # methods x imbalance factors x seeds
    for recipe in ("cifar100-lt-if100/ssd", "cifar100-lt-if50/ldam-drw", "cifar100-lt-if10/dive"):
        assert sum(f"ltscale run {recipe} " in c for c in commands) == 3
    assert all("--set seed=" in c and "--set data.root=" in c for c in commands)
    # LWS shares the CE teacher's lane (output directory) so its teacher comes from the stage cache
    lws = next(c for c in commands if "cifar100-lt-if50/lws" in c and "seed=2" in c)
    assert "/runs/if50-ce-seed2 " in lws
    # ... and DiVE the BSCE teacher's (DiVE distils a BSCE teacher)
    dive = next(c for c in commands if "cifar100-lt-if10/dive" in c and "seed=1" in c)
    assert "/runs/if10-bsce-seed1 " in dive


def test_past_the_papers_runs_are_planned_with_their_overrides(tmp_path):
    done = run_tool("--dry-run", "--data", str(tmp_path / "c.npz"), "--methods", "ssd,ssd-dive", "--imbalance-factors", "100",
                    "--seeds", "0", "--set", "data.loader.cutout=16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("ltscale run ")]
    assert [c.split()[2] for c in commands] == ["cifar100-lt-if100/ssd", "cifar100-lt-if100/ssd-dive"]
    # SSD-DiVE shares SSD's lane: its self-supervised teacher and stage II come from the stage cache.
    assert all("/runs/if100-ssd-seed0 " in c and c.endswith("--set data.loader.cutout=16") for c in commands)
    # ... but the variant's job files are its own: the plain SSD run's record is neither replaced
    # by it nor taken for it.
    files = [line.split("job file ")[1] for line in done.stdout.splitlines() if line.startswith("# lane ")]
    plain = run_tool("--dry-run", "--data", str(tmp_path / "c.npz"), "--methods", "ssd", "--imbalance-factors", "100",
                     "--seeds", "0", cwd=tmp_path)
    assert "# lane if100-ssd-seed0, job file if100-ssd-seed0.json\n" in plain.stdout
    assert files[0].startswith("if100-ssd-seed0-set") and files[0].endswith(".json") and files[1].startswith("if100-ssd-dive-seed0-set")
    refused = run_tool("--dry-run", "--data", "x.npz", "--methods", "ssd-dvie", cwd=tmp_path)
    assert refused.returncode != 0 and "choose from ce, bsce, lws, ldam-drw, dive, ssd, ssd-dive" in refused.stderr


def test_cifar_without_data_is_refused(tmp_path):
    done = run_tool("--dry-run", "--methods", "ce", cwd=tmp_path)
    assert done.returncode != 0 and "pass --data" in done.stderr


def test_smoke_run_on_demo_recipes(tmp_path):
    results = tmp_path / "results"
    args = ["--recipe-prefix", "demo", "--methods", "ce,lws", "--imbalance-factors", "80", "--seeds", "0,1",
            "--epochs", "1", "--concurrency", "2", "--device", "cpu", "--output-dir", str(tmp_path / "runs"),
            "--results-dir", str(results), "--results-name", "cifar100_lt",
            "--set", "data.synthetic.max_per_class=100", "--set", "data.synthetic.test_per_class=10",
            "--archive", str(tmp_path / "out" / "table.tgz")]
    done = run_tool(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| ce |" in done.stdout  # the table is printed too: a call's output alone shows the numbers
    # The archive (rewritten after every job) holds the job files, logs and table, relative to the
    # working directory (tar xzf there puts them back), and no checkpoints.
    import tarfile

    with tarfile.open(tmp_path / "out" / "table.tgz") as tar:
        names = tar.getnames()
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from reproduce_cifar import variant_suffix
    finally:
        sys.path.pop(0)
    suffix = variant_suffix(["data.synthetic.max_per_class=100", "data.synthetic.test_per_class=10"], 1, "demo")
    assert suffix.startswith("-demo-1ep-set")
    assert sorted(n for n in names if n.startswith("runs/jobs/") and n.endswith(".json")) == [
        f"runs/jobs/if80-{m}-seed{s}{suffix}.json" for m in ("ce", "lws") for s in (0, 1)]
    assert f"runs/logs/if80-ce-seed0{suffix}.log" in names
    # A job's log follows it: a line per stage and epoch (the log is a file, so lines, not bars).
    log = (tmp_path / "runs" / "logs" / f"if80-ce-seed0{suffix}.log").read_text()
    assert "teacher: epoch 1/1" in log and "teacher: finished in" in log, log
    assert {"results/cifar100_lt.json", "results/cifar100_lt.csv", "results/cifar100_lt.md"} <= set(names)
    assert any(n.startswith("runs/logs/") for n in names) and not any(n.endswith(".pt") for n in names)
    # ...and each lane's MLflow store and stage manifests: the runs the table's ids point to come back too
    assert any(n.endswith("/mlflow.db") for n in names) and any(n.endswith("/manifest.json") for n in names)
    report = json.loads((results / "cifar100_lt.json").read_text())
    assert len(report["jobs"]) == 4 and all(len(job["run_id"]) == 32 for job in report["jobs"])
    by_name = {job["name"]: job for job in report["jobs"]}
    # Each job's pipeline run was found by its attempt's tag, not by recipe, seed and start time
    # (which a variant in the same lane, or another invocation, may share).
    from mlflow import MlflowClient

    from ltscale.dist.runtime import usable_cpus

    # Two lanes at once split the CPUs between them instead of each taking them all.
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, usable_cpus() // 2)
    for job in report["jobs"]:
        run = MlflowClient(job["tracking_uri"]).get_run(job["run_id"])
        assert len(job["job_tag"]) == 32 and run.data.tags["reproduce_cifar.job"] == job["job_tag"]
        assert "--tag" not in job["command"]  # the printed command reproduces the recipe, not the attempt
        assert job["cpu_threads"] == threads
        if threads is not None:
            assert run.data.tags["ltscale.env.torch_threads"] == str(threads)  # the job's torch used that many
    assert report["meta"]["cpu_count"] == usable_cpus()  # where the tool ran, beside each job's record
    # the LWS pipeline reused the CE teacher of its lane: same stage output, same producing run
    for seed in (0, 1):
        ce, lws = by_name[f"if80-ce-seed{seed}"], by_name[f"if80-lws-seed{seed}"]
        assert lws["stages"]["teacher"]["key"] == ce["stages"]["teacher"]["key"]
        assert lws["stages"]["teacher"]["run_id"] == ce["stages"]["teacher"]["run_id"]
        assert lws["run_id"] != ce["run_id"]
    rows = {row["row"]: row["cells"]["80"] for row in report["table"]}
    for method in ("ce", "lws"):
        cell = rows[method]
        values = [run["top1"] for run in cell["runs"]]
        assert cell["n"] == 2 and abs(cell["mean"] - sum(values) / 2) < 1e-9
    with open(results / "cifar100_lt.csv") as stream:
        assert len(list(csv.DictReader(stream))) == 4
    table = (results / "cifar100_lt.md").read_text()
    assert "Smoke run" in table and "| ce |" in table and by_name["if80-ce-seed0"]["run_id"] in table
    # The code behind each job's numbers is its stages' producers', and the table names that.
    for job in report["jobs"]:
        manifests = {stage["code_version"] for stage in job["stages"].values()}
        assert job["code_versions"] == sorted(manifests) and None not in manifests
        assert f"code {', '.join(sorted(manifests))}." in table
    assert "ltscale run demo/lws" in table

    # a second invocation skips the finished jobs and rebuilds the same table
    again = run_tool(*args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "[start]" not in again.stdout
    assert json.loads((results / "cifar100_lt.json").read_text())["table"] == report["table"]


def test_a_variant_names_its_job_files_and_table_apart_from_the_plain_run():
    """A smoke run, another recipe prefix or a --set variant in the same --output-dir must not
    replace the plain run's job files (the only record a lent GPU machine gives back) or table."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import reproduce_cifar as tool
    finally:
        sys.path.pop(0)
    assert tool.variant_suffix([]) == "" and tool.parse_args([]).results_name == "cifar100_lt"
    assert tool.variant_suffix([], 3) == "-3ep"
    assert tool.variant_suffix([], 0, "cifar100-lt-if{if}-bbn") == "-cifar100-lt-if-bbn"
    assert tool.parse_args(["--epochs", "2"]).results_name == "cifar100_lt-2ep"
    plain = tool.build_plan(tool.parse_args(["--methods", "ce", "--imbalance-factors", "100", "--seeds", "0", "--data", "x.npz"]))
    smoke = tool.build_plan(tool.parse_args(["--methods", "ce", "--imbalance-factors", "100", "--seeds", "0", "--data", "x.npz",
                                             "--epochs", "1"]))
    bbn = tool.build_plan(tool.parse_args(["--methods", "ce", "--imbalance-factors", "100", "--seeds", "0", "--data", "x.npz",
                                           "--recipe-prefix", "cifar100-lt-if{if}-bbn"]))
    records = [plan.jobs[0].record.name for plan in (plain, smoke, bbn)]
    assert records == ["if100-ce-seed0.json", "if100-ce-seed0-1ep.json", "if100-ce-seed0-cifar100-lt-if-bbn.json"]


def test_smoke_epochs_move_warm_up_and_drw_below_them(tmp_path):
    """Every recipe of the table accepts the smoke-run overrides (each is validated as applied)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from reproduce_cifar import epoch_overrides
    finally:
        sys.path.pop(0)
    from ltscale.config import apply_overrides, get_recipe

    for epochs in (1, 3):
        for method in ("ce", "bsce", "lws", "ldam-drw", "dive", "ssd", "ssd-dive"):
            recipe = get_recipe(f"cifar100-lt-if100/{method}")
            config = apply_overrides(recipe, epoch_overrides(recipe, epochs))
            for stage in config.stages.values():
                if hasattr(stage, "optim"):
                    assert stage.optim.epochs == epochs
            if method == "ldam-drw":
                assert config.stages["teacher"].loss.drw_epoch == epochs - 1


def test_archive_skips_checkpoints_temporaries_and_files_that_vanish(tmp_path, monkeypatch):
    """Another lane may rename a job file in while the archive is written: a file listed and then
    gone is skipped, not fatal (it killed the lane and the whole table before)."""
    import tarfile

    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import reproduce_cifar as tool

    jobs = tmp_path / "runs" / "jobs"
    jobs.mkdir(parents=True)
    for name in ("a.json", "b.json", ".c.json.tmp", "model.pt", ".lock"):
        (jobs / name).write_text("x")
    real = tarfile.TarFile.add

    def add(self, name, *args, **kwargs):
        if name.endswith("a.json"):
            (jobs / "b.json").unlink()  # gone after the listing, before its turn
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "add", add)
    monkeypatch.chdir(tmp_path)
    tool.write_archive(tmp_path / "out" / "t.tgz", [tmp_path / "runs", tmp_path / "results" / "absent.md"])
    with tarfile.open(tmp_path / "out" / "t.tgz") as tar:
        assert tar.getnames() == ["runs/jobs/a.json"]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_variant_table_names_the_overrides_that_made_it(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import reproduce_cifar as tool

    args = tool.parse_args(["--methods", "dive", "--imbalance-factors", "100", "--set", "stages.student.temperature=2"])
    text = tool.markdown(args, {"table": [], "runs": [], "jobs": []}, {"written": "2026-11-24"})
    assert text.splitlines()[0].startswith("### CIFAR-100-LT, ResNet-32, with `stages.student.temperature=2`: top-1")
    plain = tool.markdown(tool.parse_args(["--methods", "dive"]), {"table": [], "runs": [], "jobs": []}, {"written": "x"})
    assert "with `" not in plain.splitlines()[0]
    # ... and its default table files are its own, not the plain table's.
    assert args.results_name.startswith("cifar100_lt-set") and tool.parse_args([]).results_name == "cifar100_lt"
    assert tool.parse_args(["--set", "stages.student.temperature=3", "--results-name", "mine"]).results_name == "mine"


def test_bbn_schedule_rows_compare_ce_with_ssds_re_run_ce(monkeypatch):
    """SSD's Table 2 re-ran CE in BBN's setting (39.1 / 44.0 / 55.8); DiVE's 38.35 is the LDAM-DRW schedule's."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import reproduce_cifar as tool

    assert tool.published("ce", 100.0, "cifar100-lt-if{if}-bbn") == 39.1
    assert tool.published("ce", 10.0, "cifar100-lt-if{if}") == 56.51  # DiVE Table 1 as printed
    assert tool.published("lws", 50.0, "cifar100-lt-if{if}-bbn") == tool.published("lws", 50.0, "cifar100-lt-if{if}") == 46.0
    assert tool.published("ssd-dive", 100.0, "cifar100-lt-if{if}-bbn") is None
    args = tool.parse_args(["--methods", "ce,lws", "--imbalance-factors", "100", "--recipe-prefix", "cifar100-lt-if{if}-bbn"])
    text = tool.markdown(args, {"table": [], "runs": [], "jobs": []}, {"written": "x"})
    assert "BBN's lr schedule" in text.splitlines()[0] and "CE*: 39.1 / 44.0 / 55.8" in text
    assert "CE*" not in tool.markdown(tool.parse_args(["--methods", "ce"]), {"table": [], "runs": [], "jobs": []}, {"written": "x"})


def test_what_would_fail_every_job_or_lose_the_table_is_refused_before_any_job(tmp_path, capsys, load_tool):
    """On a lent GPU a call that trains and then returns nothing costs its budget: bad arguments,
    data and destinations are found before the first job starts (nothing is created)."""
    import pytest

    tool = load_tool("reproduce_cifar.py")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "garbage.npz").write_text("x")
    (tmp_path / "empty").mkdir()
    demo = ["--recipe-prefix", "demo", "--methods", "ce", "--imbalance-factors", "80", "--seeds", "0", "--epochs", "1",
            "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results")]
    cifar = ["--methods", "ce", "--imbalance-factors", "100", "--seeds", "0", "--device", "cpu",
             "--output-dir", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results")]
    for argv, message in [
        ([*demo, "--archive", str(tmp_path / "adir")], "--archive"),
        ([*demo, "--archive", str(tmp_path / "afile" / "t.tgz")], "is a file, so the archive's folder cannot be made"),
        ([*demo, "--results-dir", str(tmp_path / "afile")], "is a file, not a directory"),
        ([*demo, "--experiment", "ltscal"], "--experiment 'ltscal', but recipe demo/ce records into the MLflow experiment 'ltscale'"),
        ([*demo, "--set", "stages.teacher.optim.foo=1"], "unknown key 'stages.teacher.optim.foo'"),
        ([*demo, "--seeds", "-1"], "seed must be in [0, 2**32), got -1"),
        ([*demo, "--tracking-uri", "bogus://x"], "MLflow has no tracking store for the scheme 'bogus'"),
        ([*demo, "--data", str(tmp_path / "garbage.npz")], "--data names CIFAR data, but recipe demo/ce trains on synthetic"),
        ([*cifar, "--data", str(tmp_path / "garbage.npz")], "is not a packed CIFAR-LT file: not an .npz (zip) archive"),
        ([*cifar, "--data", str(tmp_path / "absent.tar.gz")], "no such file or folder"),
        ([*cifar, "--data", str(tmp_path / "empty")], "a folder without cifar-100-python/meta"),
        # A prefix without {if}: IF 100 trained, filed and compared as IF 50.
        ([*cifar, "--data", str(tmp_path / "garbage.npz"), "--imbalance-factors", "50", "--recipe-prefix", "cifar100-lt-if100-bbn"],
         "recipe cifar100-lt-if100-bbn/ce trains at imbalance factor 100, but its jobs and table column would say 50 "
         "(--imbalance-factors): pass --imbalance-factors 100"),
        ([*demo, "--imbalance-factors", "100"], "recipe demo/ce trains at imbalance factor 80, but"),
    ]:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists(), argv
    for argv, message in [
        ([*demo, "--seeds", "0,0"], "argument --seeds: '0,0' names an item twice"),
        ([*demo, "--concurrency", "0"], "--concurrency 0: run at least one lane at a time"),
        ([*demo, "--stop-after-minutes", "-5"], "--stop-after-minutes -5.0: must be >= 0"),
        ([*demo, "--imbalance-factors", "abc"], "argument --imbalance-factors: expected comma-separated numbers, got 'abc'"),
        ([*demo, "--device", "gpu0"], "--device 'gpu0': expected auto, cpu, cuda or cuda:<index>"),
        ([*demo, "--results-name", "a/b"], "a file name, not a path"),
        ([*demo, "--set", "seed=5"], "--set 'seed=5': --seeds sets seed for every job"),
        ([*cifar, "--set", " data.imbalance_factor=50"], "--imbalance-factors picks each job's recipe, and with it data.imbalance_factor"),
        ([*demo, "--set", "output_dir=/elsewhere"], "--output-dir sets output_dir"),
        ([*demo, "--set", "progress=true"], "--set 'progress=true': every job's log gets a line per stage and epoch"),
    ]:
        with pytest.raises(SystemExit) as refused:
            tool.main(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err, argv
    # A collect that finds no job file writes no (empty) table over one that has numbers.
    assert tool.main([*demo, "--collect-only"]) == 1
    assert "none of the 1 jobs asked for has a job file" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    # --device auto is what the jobs resolve it to, in the environment the table records.
    assert tool.environment(tool.parse_args([*demo, "--device", "auto"]))["device"] == "cpu"
    # A dot in the table's name is kept (not taken for a suffix to replace).
    args = tool.parse_args([*demo, "--results-name", "dive_t1.5"])
    assert [p.name for p in tool.results_paths(args)] == ["dive_t1.5.json", "dive_t1.5.csv", "dive_t1.5.md"]


def test_fetch_gpu_wheels_refuses_unknown_arguments_and_starts_from_an_empty_folder(tmp_path):
    """A typo (--sqllite) must not fetch the wrong set silently; wheels of an earlier fetch must not
    travel along (past the carry limit, or two versions of one package that pip cannot install)."""
    import shutil

    (tmp_path / "tools").mkdir()
    script = shutil.copy(REPO / "tools" / "fetch_gpu_wheels.sh", tmp_path / "tools" / "fetch_gpu_wheels.sh")
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "foo-1.0-py3-none-any.whl").write_bytes(b"old")
    env = {**os.environ, "PYTHON": "true"}  # `true -m pip download ...`: no download, success
    for bad in (["--sqllite"], ["-h"], ["--sqlite", "extra"]):
        done = subprocess.run(["bash", str(script), *bad], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "usage: tools/fetch_gpu_wheels.sh [--sqlite]" in done.stderr, bad
        assert (tmp_path / ".whl" / "foo-1.0-py3-none-any.whl").exists()  # a refused call changes nothing
    done = subprocess.run(["bash", str(script), "--sqlite"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / ".whl").is_dir() and not any((tmp_path / ".whl").iterdir())


def test_a_mean_of_seeds_is_rounded_from_its_decimal_value(monkeypatch):
    # 42.07 and 41.44 average to 41.755 exactly; a binary mean is 41.754999... and printed 41.75.
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import reproduce_cifar as tool

    stats = tool._stats([42.07, 41.44])
    assert tool._two_places(stats["mean"]) == "41.76" and stats["n"] == 2
    assert tool._two_places(stats["std"]) == "0.45"  # sample standard deviation (n - 1)
    assert tool._two_places(tool._stats([38.61, 39.13])["mean"]) == "38.87"


def test_the_table_averages_each_rows_own_stage_and_head_per_imbalance_factor(tmp_path, monkeypatch):
    """Each cell is the mean and sample std over the seeds of one imbalance factor; SSD's rows read
    the student's hard and soft heads and stage IV; a job file of another variant (a smoke run's)
    does not count."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import reproduce_cifar as tool

    args = tool.parse_args(["--methods", "ce,ssd", "--imbalance-factors", "100,10", "--seeds", "0,1", "--data", "x.npz",
                            "--output-dir", str(tmp_path)])
    plan = tool.build_plan(args)
    ce = {(100.0, 0): 40.0, (100.0, 1): 41.0, (10.0, 0): 56.0, (10.0, 1): 58.0}
    ssd = {(100.0, 0): (44.0, 43.0, 46.0), (100.0, 1): (45.0, 42.0, 47.5)}  # hard, soft, after stage IV
    for job in plan.jobs:
        key = (job.imbalance_factor, job.seed)
        if job.method == "ce":
            stages = {"teacher": {"run_id": "t", "metrics": {"test/top1": ce[key], "test/few": 1.0}}}
        elif key in ssd:
            hard, soft, after = ssd[key]
            stages = {"student": {"run_id": "s", "metrics": {"test/top1": hard, "test/hard/top1": hard, "test/soft/top1": soft}},
                      "student_lws": {"run_id": "l", "metrics": {"test/top1": after}}}
        else:  # IF 10, seed 0: a one-epoch smoke run's file in the full run's place
            stages = {"student_lws": {"run_id": "l", "metrics": {"test/top1": 99.0}}}
        signature = job.signature if key in ssd or job.method == "ce" else {**job.signature, "epochs": 1}
        if job.method == "ssd" and key == (10.0, 1):
            continue  # never ran
        job.record.parent.mkdir(parents=True, exist_ok=True)
        job.record.write_text(json.dumps({"signature": signature, "result_stage": job.result_stage, "stages": stages,
                                          "run_id": "p", "tracking_uri": "u", "command": job.command, "seconds": 1}))
    table = {row["row"]: row["cells"] for row in tool.aggregate(args, plan)["table"]}
    assert list(table) == ["ce", "ssd (hard head)", "ssd (soft head)", "ssd (after stage IV)"]

    def cell(row, factor):
        found = table[row][factor]
        return found["n"], found["mean"], found["std"]

    assert cell("ce", "100") == (2, 40.5, pytest.approx(0.5 ** 0.5))
    assert cell("ce", "10") == (2, 57.0, pytest.approx(2 ** 0.5))
    assert cell("ssd (hard head)", "100") == (2, 44.5, pytest.approx(0.5 ** 0.5))
    assert cell("ssd (soft head)", "100") == (2, 42.5, pytest.approx(0.5 ** 0.5))
    assert cell("ssd (after stage IV)", "100") == (2, 46.75, pytest.approx(1.125 ** 0.5))
    assert cell("ssd (after stage IV)", "10") == (0, None, None)
    assert table["ssd (after stage IV)"]["100"]["published"] == 46.0 and table["ce"]["10"]["published"] == 56.51


def test_published_numbers_are_those_of_methods_md(monkeypatch):
    """The table's reference column against ../shared/METHODS.md (which rounds DiVE's CE and BSCE to
    one decimal)."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import reproduce_cifar as tool

    methods_md = {"ce": (38.3, 42.4, 56.5), "bsce": (42.4, 47.6, 58.4), "lws": (42.3, 46.0, 58.1),
                  "dive": (45.35, 51.13, 62.0), "ssd (after stage IV)": (46.0, 50.5, 62.3)}
    for label, numbers in methods_md.items():
        for factor, number in zip((100.0, 50.0, 10.0), numbers):
            assert abs(tool.published(label, factor, tool.DEFAULT_PREFIX) - number) <= 0.051, (label, factor)
    assert [tool.published("dive", f, tool.DEFAULT_PREFIX) for f in (100.0, 50.0, 10.0)] == [45.35, 51.13, 62.0]
    assert [tool.published("ssd (after stage IV)", f, tool.DEFAULT_PREFIX) for f in (100.0, 50.0, 10.0)] == [46.0, 50.5, 62.3]


def test_concurrent_lanes_split_the_cpus_between_them(monkeypatch):
    """Each of N concurrent jobs gets 1/N of the usable CPUs (all of them each oversubscribed the
    cores); one lane, or an OMP_NUM_THREADS the caller set, leaves torch's default."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import argparse

    import reproduce_cifar as tool

    import ltscale.dist.runtime as runtime

    monkeypatch.setattr(runtime, "usable_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [tool.job_threads(argparse.Namespace(concurrency=n)) for n in (1, 2, 3, 16)] == [None, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert tool.job_threads(argparse.Namespace(concurrency=2)) is None


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def test_sigterm_stops_the_running_job_and_starts_no_other(tmp_path):
    """`kill` or `timeout` signal only the tool: its job must stop too (marked KILLED, its stage lock
    released), not train on orphaned, and the next job must not start."""
    import signal
    import time

    args = ["--recipe-prefix", "demo", "--methods", "ce,bsce", "--imbalance-factors", "80", "--seeds", "0",
            "--epochs", "200", "--concurrency", "1", "--device", "cpu", "--output-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--set", "data.synthetic.max_per_class=100",
            "--set", "data.synthetic.test_per_class=10"]
    tool = subprocess.Popen([sys.executable, str(TOOL), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job = None
    try:
        logs = tmp_path / "runs" / "logs"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the first job trains (past ltscale's start-up)
            started = [log for log in logs.glob("*.log") if "epoch 1/200" in log.read_text()] if logs.is_dir() else []
            if started:
                break
            assert tool.poll() is None, tool.communicate()
            time.sleep(0.5)
        assert started, "the first job did not reach its first epoch in 180 s"
        (job,) = _children_of(tool.pid)
        tool.send_signal(signal.SIGTERM)
        out, err = tool.communicate(timeout=120)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.communicate()
        if job is not None and _children_of(tool.pid) == [] and os.path.exists(f"/proc/{job}"):
            orphan = Path(f"/proc/{job}/cmdline").read_bytes()
            if b"ltscale" in orphan:  # the bug this test is for: the job trains on without the tool
                os.kill(job, signal.SIGKILL)
    assert tool.returncode == 128 + signal.SIGTERM, out + err
    assert "SIGTERM: no further job starts" in err and "not started: stopped by SIGTERM" in err, err
    assert not os.path.exists(f"/proc/{job}") or "zombie" in Path(f"/proc/{job}/status").read_text().lower()
    (log,) = logs.glob("*.log")  # the second job never started
    assert "ltscale: terminated (SIGTERM)" in log.read_text()
    assert not list((tmp_path / "runs" / "jobs").glob("*.json")) and not list((tmp_path / "runs").rglob("store/*/.lock"))
    assert "0/2 jobs have results" in out  # the table of the finished jobs is still written


def test_ctrl_c_reached_the_jobs_already_a_second_one_passes_sigterm_on(load_tool, monkeypatch):
    import signal

    tool = load_tool("reproduce_cifar.py")
    sent: list[tuple[str, int]] = []

    class Child:
        def __init__(self, name: str) -> None:
            self.name = name

        def send_signal(self, signum: int) -> None:
            sent.append((self.name, signum))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(tool.subprocess, "Popen", lambda argv, **popen: Child(argv[0]))
    children = tool.Children()
    running = children.start(["a"])
    children.stop(signal.SIGINT)
    assert sent == [] and children.stop_signal == signal.SIGINT  # the terminal signalled the jobs itself
    assert children.start(["b"]) is None  # nothing starts after a stop signal
    children.stop(signal.SIGINT)
    children.stop(signal.SIGTERM)
    assert sent == [("a", signal.SIGTERM)]  # once: a second SIGTERM would cut ltscale's clean-up short
    children.wait(running)

    children = tool.Children()
    children.start(["a"])
    second = children.start(["b"])
    children.wait(second)  # finished: not signalled
    children.stop(signal.SIGHUP)
    children.stop(signal.SIGTERM)
    assert sent[1:] == [("a", signal.SIGTERM)] and children.stop_signal == signal.SIGHUP


def test_signals_the_tool_was_started_ignoring_stay_ignored(load_tool, monkeypatch):
    """nohup (SIGHUP) and a non-interactive shell's `&` (SIGINT) ask for a run that outlives its
    terminal; the tool handles only the signals it was not told to ignore, and puts back the rest."""
    import signal

    tool = load_tool("reproduce_cifar.py")
    seen = {}

    def run_plan(args, plan, children):
        seen.update({signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)})
        return []

    monkeypatch.setattr(tool, "run_plan", run_plan)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist's workers ignore it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        children = tool.Children()
        assert tool._run_forwarding_signals(None, None, children) == []
        assert seen[signal.SIGHUP] == signal.SIG_IGN
        assert seen[signal.SIGTERM] == children.stop and seen[signal.SIGINT] == children.stop
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)

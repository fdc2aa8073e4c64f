"""End-to-end pipelines on tiny generated data: SSD and DiVE run, stages are skipped on rerun,
an interrupted stage resumes, lineage lands in a real MLflow server, bad input fails clearly."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import re
from pathlib import Path

import mlflow
import pytest
import torch

import ltscale.engine.trainer as trainer_module
from configs.methods import METHODS, Recipe
from ltscale.cli import main
from ltscale.config import apply_overrides
from ltscale.data.config import DataConfig, SyntheticConfig
from ltscale.engine.checkpoint import CheckpointError
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig, RebalanceConfig
from ltscale.stages.pipeline import run_pipeline
from ltscale.tracking import (TAG_CACHED, TAG_CONFIG_HASH, TAG_PARENT_RUNS, TAG_PRODUCED_BY, TAG_PRODUCED_WITH_CODE, TrackingConfig,
                              split_run_ids)

TINY = Recipe(
    model=ModelConfig(arch="resnet8", width=8),
    optim=OptimConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=1, milestones=(2,), decay_factors=(0.1,)),
    rebalance_optim=OptimConfig(epochs=1, batch_size=64, lr=0.1, warmup_epochs=0, schedule="cosine", milestones=(), decay_factors=()),
    ldam_drw_epoch=2,
)
TINY_DATA = DataConfig(dataset="synthetic", synthetic=SyntheticConfig(num_classes=6, max_per_class=120, imbalance_factor=20, test_per_class=10, image_size=8))


def tiny(method: str, tmp_path: Path, tracking_uri: str = "", experiment: str = "ltscale") -> PipelineConfig:
    return PipelineConfig(
        name=f"tiny/{method}", data=TINY_DATA, stages=METHODS[method](TINY), output_dir=str(tmp_path),
        tracking=TrackingConfig(tracking_uri=tracking_uri, experiment=experiment), progress=False, device="cpu",
    )


def test_ssd_pipeline_end_to_end_with_lineage_in_mlflow_server(tmp_path, mlflow_server):
    config = tiny("ssd", tmp_path, mlflow_server, experiment="e2e-ssd")
    result = run_pipeline(config)
    assert result.executed == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    for stage in ("teacher", "teacher_lws", "student", "student_lws"):
        metrics = result.metrics(stage)
        assert {"test/top1", "test/top5", "test/many", "test/medium", "test/few"} <= set(metrics)
        assert 0 <= metrics["test/top1"] <= 100
    # The student reports both heads; stage IV re-balances the hard one.
    student = result.metrics("student")
    assert {"test/hard/top1", "test/soft/top1"} <= set(student)
    assert student["test/top1"] == student["test/hard/top1"]
    # The printed table shows each head of the student with that head's own numbers.
    from ltscale.report import _rows

    rows = dict(_rows(result, detail=True))
    assert rows["  student (soft)"]["test/top1"] == student["test/soft/top1"]
    assert rows["  student (hard)"]["test/few"] == student["test/hard/few"]
    # Stage IV re-balances the hard head only, and it is the result: no rows repeating the student's
    # soft head or the pipeline's own row.
    assert not any(label.startswith("  student_lws") for label in rows)

    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(result.run_id)
    assert parent.data.metrics["test/top1"] == pytest.approx(result.metrics()["test/top1"])
    assert parent.data.params["stages.student.temperature"] == "2.0"
    # The run's name tells a sweep's seeds apart; the pipeline tag (on every run) is the bare name.
    assert parent.info.run_name == f"{config.name} seed {config.seed}"
    assert parent.data.tags["ltscale.pipeline"] == config.name
    # Where it ran: versions, processor and threads, on the pipeline run and on every stage run.
    env = {k.removeprefix("ltscale.env."): v for k, v in parent.data.tags.items() if k.startswith("ltscale.env.")}
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["python"] == platform.python_version()
    assert env["torch_threads"] == str(torch.get_num_threads()) and int(env["cpu_count"]) >= 1 and env["cpu"]
    assert "gpu" not in env  # no GPU entries for a CPU run
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    by_stage = {run.data.tags["ltscale.stage"]: run for run in children}
    assert set(by_stage) == set(config.stages)
    # Each stage run names the runs it consumed and the output key it produced.
    expect_parents = {"teacher": [], "teacher_lws": ["teacher"], "soft_labels": ["teacher_lws"], "student": ["soft_labels"], "student_lws": ["student"]}
    for stage, parents in expect_parents.items():
        run = by_stage[stage]
        assert split_run_ids(run.data.tags.get(TAG_PARENT_RUNS, "")) == [by_stage[p].info.run_id for p in parents]
        assert run.data.tags[TAG_CONFIG_HASH] == result.outputs[stage].key
        assert run.info.status == "FINISHED"
        assert run.data.tags["ltscale.pipeline"] == config.name
        assert run.data.tags["ltscale.env.torch"] == torch.__version__
    teacher_run = by_stage["teacher"]
    assert "train/loss" in teacher_run.data.metrics and "test/few" in teacher_run.data.metrics
    assert len(client.get_metric_history(teacher_run.info.run_id, "train/loss")) == TINY.optim.epochs
    assert teacher_run.inputs.dataset_inputs, "the dataset must be logged as an input"
    artifacts = {a.path for a in client.list_artifacts(teacher_run.info.run_id)}
    assert {"manifest.json", "stage_config.json", "per_class"} <= artifacts
    per_class = {a.path for a in client.list_artifacts(teacher_run.info.run_id, "per_class/cls")}
    assert "per_class/cls/per_class_accuracy.png" in per_class
    manifest = json.loads((result.outputs["student"].directory / "manifest.json").read_text())
    assert manifest["parents"]["teacher"]["key"] == result.outputs["soft_labels"].key
    assert manifest["code_version"] and manifest["world_size"] == 1 and manifest["world_sizes"] == [1]


def test_dive_pipeline_and_rerun_skips_unchanged_stages(tmp_path):
    config = tiny("dive", tmp_path)
    first = run_pipeline(config)
    assert first.executed == ["teacher", "virtual_examples", "student"]
    virtual = json.loads(first.outputs["virtual_examples"].file("virtual_examples").read_text())
    assert len(virtual["sweep"]) == 20 and {"temperature", "power"} == set(virtual["chosen"])

    again = run_pipeline(config)
    assert again.executed == [] and again.cached == ["teacher", "virtual_examples", "student"]
    assert again.metrics() == first.metrics()
    client = mlflow.MlflowClient(first.tracking_uri)
    cached_student = [r for r in client.search_runs([client.get_experiment_by_name("ltscale").experiment_id],
                                                    f"tags.mlflow.parentRunId = '{again.run_id}'")
                      if r.data.tags["ltscale.stage"] == "student"][0]
    assert cached_student.data.tags[TAG_CACHED] == "true"
    assert cached_student.data.tags[TAG_PRODUCED_BY] == first.outputs["student"].run_id
    assert cached_student.data.tags[TAG_PRODUCED_WITH_CODE] == first.outputs["student"].manifest["code_version"]
    assert TAG_PRODUCED_WITH_CODE not in client.get_run(again.run_id).data.tags  # all of it this code's

    # Changing only the student re-runs only the student; the teacher is shared.
    changed = apply_overrides(config, ["stages.student.alpha=0.7"])
    third = run_pipeline(changed)
    assert third.executed == ["student"] and third.cached == ["teacher", "virtual_examples"]

    # The BSCE teacher is also what the BSCE baseline trains: a different recipe reuses it.
    bsce = run_pipeline(tiny("bsce", tmp_path))
    assert bsce.cached == ["teacher"]


def test_ssd_student_distils_the_teacher_model_online_when_pointed_at_it(tmp_path):
    """stages.student.teacher=teacher_lws: the student is distilled from the LWS teacher run on each
    augmented batch instead of the stored soft labels; a different student key, the same teachers."""
    online = run_pipeline(apply_overrides(tiny("ssd", tmp_path), ["stages.student.teacher=teacher_lws"]))
    assert online.executed == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    manifest = json.loads((online.outputs["student"].directory / "manifest.json").read_text())
    assert manifest["parents"]["teacher"]["key"] == online.outputs["teacher_lws"].key
    assert 0 <= online.metrics("student")["test/soft/top1"] <= 100
    stored = run_pipeline(tiny("ssd", tmp_path))
    assert stored.cached == ["teacher", "teacher_lws", "soft_labels"] and stored.executed == ["student", "student_lws"]
    assert stored.outputs["student"].key != online.outputs["student"].key


class _Interrupt(Exception):
    pass


def test_interrupted_stage_resumes_from_its_last_epoch(tmp_path, monkeypatch, caplog, capsys):
    config = tiny("ce", tmp_path)
    config = apply_overrides(config, ["stages.teacher.optim.epochs=4"])
    original = trainer_module.Trainer._epoch
    seen: list[int] = []

    def crash_in_epoch_two(self, epoch, steps, advance):
        seen.append(epoch)
        if epoch == 2:
            raise _Interrupt("simulated preemption")
        return original(self, epoch, steps, advance)

    monkeypatch.setattr(trainer_module.Trainer, "_epoch", crash_in_epoch_two)
    with pytest.raises(_Interrupt):
        run_pipeline(config)
    store = list((tmp_path / "store").glob("teacher-*"))
    assert len(store) == 1
    assert not (store[0] / "manifest.json").exists(), "an interrupted stage must not look finished"
    assert not (store[0] / "model.pt").exists()
    assert (store[0] / "progress.pt").exists()
    # As if two processes had saved it: a one-process resume goes on, and says the result will differ.
    import torch

    state = torch.load(store[0] / "progress.pt", weights_only=False)
    assert state["world_size"] == 1 and state["metrics"]["epoch"] == 1
    assert state["world_sizes"] == [1]
    torch.save({**state, "world_size": 2, "world_sizes": [2]}, store[0] / "progress.pt")

    seen.clear()
    monkeypatch.setattr(trainer_module.Trainer, "_epoch", lambda self, e, s, a: (seen.append(e), original(self, e, s, a))[1])
    import dataclasses

    capsys.readouterr()
    result = run_pipeline(dataclasses.replace(config, progress=True))  # progress: not part of the key
    assert seen == [2, 3], "resumed training must start at the first unfinished epoch"
    assert "teacher: resuming after epoch 2/4 (loss " in capsys.readouterr().err  # off a terminal: a line says so
    assert "resuming epoch 2 with 1 process(es)" in caplog.text and "was saved by 2" in caplog.text
    assert "never decays" not in caplog.text  # its milestone (2) is before the last epoch
    manifest = result.outputs["teacher"].manifest
    assert manifest["world_size"] == 1 and manifest["world_sizes"] == [1, 2]  # epochs 0-1 by two processes
    assert torch.load(store[0] / "progress.pt", weights_only=False)["world_sizes"] == [1, 2]
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.outputs["teacher"].run_id)
    assert run.data.tags["ltscale.resumed_from_epoch"] == "2"
    # The failed attempt is recorded as FAILED in MLflow, and the resumed run links to it (its
    # learning curve holds epochs 0 and 1).
    earlier = client.get_run(run.data.tags["ltscale.resumed_from_run"])
    assert earlier.info.status == "FAILED" and earlier.data.tags["ltscale.stage"] == "teacher"
    assert [m.step for m in client.get_metric_history(earlier.info.run_id, "train/loss")] == [0, 1]
    # The resumed run logs again the epoch it resumed after (saved with the progress: a stop between
    # saving an epoch and logging it would otherwise lose that point), then its own epochs.
    resumed_curve = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in resumed_curve] == [1, 2, 3]
    assert resumed_curve[0].value == client.get_metric_history(earlier.info.run_id, "train/loss")[-1].value or \
        resumed_curve[0].value == pytest.approx(sorted(client.get_metric_history(earlier.info.run_id, "train/loss"),
                                                       key=lambda m: m.step)[-1].value)


def _weights(output) -> dict:
    import torch

    return torch.load(output.file("model"), map_location="cpu", weights_only=False)["state_dict"]


def _same_weights(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_key_gives_the_same_weights_whatever_ran_before_it(tmp_path, monkeypatch):
    """A stage's random start comes from its key: cRT over a teacher trained in the same process
    equals cRT over a reused teacher, and a student interrupted before its first saved epoch
    restarts to the same weights (the runs before it drew different numbers from torch's RNG)."""
    alone = run_pipeline(tiny("crt", tmp_path / "alone"))
    run_pipeline(tiny("ce", tmp_path / "shared"))
    after_ce = run_pipeline(tiny("crt", tmp_path / "shared"))
    assert after_ce.cached == ["teacher"] and alone.executed == ["teacher", "crt"]
    assert alone.outputs["crt"].key == after_ce.outputs["crt"].key
    assert _same_weights(_weights(alone.outputs["crt"]), _weights(after_ce.outputs["crt"]))

    config = tiny("dive", tmp_path / "dive")
    unbroken = run_pipeline(dataclasses.replace(config, output_dir=str(tmp_path / "dive-unbroken")))
    original = trainer_module.Trainer._epoch

    def stop_in_the_student(self, epoch, steps, advance):
        if self.name == "student":
            raise _Interrupt("simulated preemption before the student saved an epoch")
        return original(self, epoch, steps, advance)

    monkeypatch.setattr(trainer_module.Trainer, "_epoch", stop_in_the_student)
    with pytest.raises(_Interrupt):
        run_pipeline(config)
    monkeypatch.setattr(trainer_module.Trainer, "_epoch", original)
    resumed = run_pipeline(config)
    assert resumed.cached == ["teacher", "virtual_examples"] and resumed.executed == ["student"]
    assert _same_weights(_weights(unbroken.outputs["student"]), _weights(resumed.outputs["student"]))
    assert resumed.metrics() == unbroken.metrics()


def test_corrupt_checkpoint_is_recomputed_and_cli_names_it(tmp_path, capsys, caplog):
    config = tiny("ce", tmp_path)
    first = run_pipeline(config)
    model = first.outputs["teacher"].file("model")
    model.write_bytes(b"not a checkpoint")
    # The CLI refuses it with a message naming the file.
    code = main(["evaluate", str(model), "--recipe", "demo/ce", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the run above logged to stderr too)
    assert err.startswith(f"ltscale: error: {model} is not a torch checkpoint")
    assert "delete" not in err  # other files passed by mistake (the MLflow database, say) must not be deleted
    code = main(["evaluate", str(model.parent), "--recipe", "demo/ce", "--device", "cpu"])
    assert code == 2 and "is a directory, not a file; it holds model.pt" in capsys.readouterr().err
    # A training stage's unreadable progress checkpoint says how to go on (not to pass another file).
    from ltscale.engine.checkpoint import PROGRESS_KIND, load_checkpoint

    (tmp_path / "progress.pt").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"the progress checkpoint .*progress.pt cannot be read .*: delete it and run "
                                              r"again; that stage then trains from its first epoch") as caught:
        load_checkpoint(tmp_path / "progress.pt", kind=PROGRESS_KIND)
    assert "model.pt" not in str(caught.value)
    truncated = tmp_path / "truncated.pt"
    import torch

    torch.save({"kind": "x", "weights": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    code = main(["evaluate", str(truncated), "--recipe", "demo/ce", "--device", "cpu"])
    assert code == 2 and "is damaged; if it is in a stage directory, delete it" in capsys.readouterr().err
    # What killed writes left (temporaries of a model and of a ZeRO pointer) goes when the stage is
    # recomputed; a file that only looks alike stays.
    stale = [model.parent / ".model.pt.k3x_9abc.tmp", model.parent / "deepspeed-progress" / ".progress.json.a1b2c3d4.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    (model.parent / "notes.tmp").write_text("mine")
    # A rerun does not trust the damaged output: the checksum no longer matches, so it recomputes.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ltscale"):
        again = run_pipeline(config)
    assert again.executed == ["teacher"]
    assert again.metrics() == first.metrics()  # resumed from its final progress checkpoint, same weights
    assert caplog.text.count("model.pt does not match its checksum; recomputing") == 1, caplog.text  # said once
    assert "removed 2 temporary file(s) of writes a stopped attempt left" in caplog.text
    assert not any(path.exists() for path in stale) and (model.parent / "notes.tmp").exists()


def test_cli_rejects_unknown_recipe_and_key(capsys):
    assert main(["run", "cifar100-lt-if100/ssdd"]) == 2
    assert "cifar100-lt-if100/ssd" in capsys.readouterr().err
    assert main(["run", "demo/ssd", "--set", "stages.teacher.optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "lrr" in err and "'lr'" in err
    assert main(["run", "demo/ssd", "--set", "stages.teacher.optim.epochs=many"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_missing_dataset_root_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "cifar100-lt-if100/ce", "--set", f"data.root={tmp_path / 'nowhere.tar.gz'}", "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "nowhere.tar.gz" in err
    assert not list((tmp_path / "store").glob("*/manifest.json")) if (tmp_path / "store").exists() else True


def test_evaluate_cli_reports_groups(tmp_path, capsys):
    config = tiny("ce", tmp_path)
    result = run_pipeline(config)
    capsys.readouterr()
    # Evaluate through the recipe machinery with the tiny data spelled as overrides.
    overrides = [f"data.synthetic.{f.name}={getattr(TINY_DATA.synthetic, f.name)}" for f in dataclasses.fields(TINY_DATA.synthetic)]
    args = ["evaluate", str(result.outputs["teacher"].file("model")), "--recipe", "demo/ce", "--device", "cpu"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heads"]["cls"]["test/top1"] == pytest.approx(result.metrics()["test/top1"])
    assert "test/cls/top1" not in result.outputs["teacher"].manifest["metrics"]  # one head: no copy of test/*
    # It records nothing, so it takes no MLflow or output options rather than ignoring them.
    for option in ("--tracking-uri", "--output-dir"):
        with pytest.raises(SystemExit) as refused:
            main([*args, option, str(tmp_path)])
        assert refused.value.code == 2 and f"unrecognized arguments: {option}" in capsys.readouterr().err
    # Nor settings of the recipe it does not read (a stage's, the output's): refused, naming what it reads.
    for command, override, extra in (("evaluate", "stages.teacher.optim.lr=0.5", ""),
                                     ("virtual", "stages.virtual_examples.temperatures=2", "; the sweep is --temperatures"),
                                     ("virtual", "output_dir=elsewhere", "")):
        assert main([command, *args[1:], "--set", override]) == 2
        err = capsys.readouterr().err
        assert f"--set {override.split('=')[0]}: ltscale {command} reads only the recipe's data.*, device and precision" in err
        assert extra in err

    # A stage's model file that no longer has the bytes its manifest recorded is refused (torch would
    # load a damaged checkpoint and print wrong numbers); a copy outside the store is taken as it is.
    model = result.outputs["teacher"].file("model")
    import shutil

    outside = tmp_path / "copy" / "model.pt"
    outside.parent.mkdir()
    shutil.copy(model, outside)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch reads it without complaint
    model.write_bytes(bytes(data))
    assert main(args) == 2
    assert f"{model} does not match the checksum its stage's manifest.json recorded" in capsys.readouterr().err
    assert main([args[0], str(outside), *args[2:]]) == 0
    capsys.readouterr()
    # A spec naming an architecture that does not exist (an edited or foreign checkpoint) is named.
    import torch

    payload = torch.load(outside, weights_only=False)
    payload["spec"]["model"]["arch"] = "resnet9000"
    torch.save(payload, outside)
    assert main([args[0], str(outside), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "has an unusable model spec: model.arch must be one of resnet8, " in err and "got 'resnet9000'" in err
    payload["spec"]["model"]["arch"] = None  # not even a name
    torch.save(payload, outside)
    assert main([args[0], str(outside), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "has an unusable model spec: model.arch must be one of resnet8, " in err and "got None" in err


def test_plan_names_what_a_run_would_reuse_resume_or_train(tmp_path, capsys):
    from ltscale.config import apply_overrides
    from ltscale.stages.pipeline import plan_pipeline

    config = tiny("dive", tmp_path)
    before = plan_pipeline(config)
    assert [(p.name, p.state) for p in before] == [("teacher", "new"), ("virtual_examples", "new"), ("student", "new")]
    assert before[1].inputs == {"source": "teacher"} and before[2].inputs == {"teacher": "teacher"}
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()  # a plan writes nothing

    result = run_pipeline(config)
    after = plan_pipeline(config)
    assert [p.state for p in after] == ["finished"] * 3
    assert [p.key for p in after] == [p.key for p in before] == [result.outputs[p.name].key for p in after]

    # A changed student: the teacher and its distribution are reused, the student trains; a stage with a
    # progress checkpoint resumes.
    changed = apply_overrides(config, ["stages.student.alpha=0.25"])
    plan = plan_pipeline(changed)
    assert [p.state for p in plan] == ["finished", "finished", "new"]
    plan[2].directory.mkdir(parents=True)
    (plan[2].directory / "progress.pt").write_bytes(b"")
    assert plan_pipeline(changed)[2].state == "partial" and plan_pipeline(changed)[2].progress == {"plain"}
    from ltscale.stages.locks import StageLock

    lock = StageLock.try_acquire(plan[2].directory)  # another pipeline producing it right now
    assert plan_pipeline(changed)[2].state == "busy"
    lock.release()
    # A lock whose owner has exited is taken over by a run, so the plan says resume, not wait.
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = StageLock.try_acquire(plan[2].directory)
    owner = json.loads((plan[2].directory / ".lock").read_text())
    owner["ltscale.attempt.pid"] = int(dead.stdout)
    (plan[2].directory / ".lock").write_text(json.dumps(owner))
    assert plan_pipeline(changed)[2].state == "partial"
    lock.release()

    assert main(["run", "demo/dive", "--plan", "--output-dir", str(tmp_path / "cli"), "--set", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "demo/dive" in out and " run " in out and "<- teacher=teacher" in out and "reuse" not in out
    assert not (tmp_path / "cli" / "store").exists()


def test_large_soft_labels_are_stored_in_fp16_and_distilled_from(tmp_path, monkeypatch):
    """iNat18's 437k x 8142 soft labels are 14 GB in fp32: above FP16_ABOVE values they are made
    (batch by batch, so the peak halves too), stored and used in fp16."""
    import torch

    from ltscale.stages import soft_labels
    from ltscale.stages.context import load_model

    assert soft_labels.storage_dtype(437_513, 8142) == torch.float16 and soft_labels.storage_dtype(10_847, 100) == torch.float32
    monkeypatch.setattr(soft_labels, "FP16_ABOVE", 10)
    result = run_pipeline(tiny("ssd", tmp_path))
    assert result.executed == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    payload = torch.load(result.outputs["soft_labels"].file("soft_labels"), weights_only=True)
    assert payload["logits"].dtype == torch.float16
    from ltscale.data import LoaderConfig, build_dataset, build_loader

    bundle = build_dataset(tiny("ssd", tmp_path).data)
    loader = build_loader(bundle.train, bundle, train=False, batch_size=512, loader=LoaderConfig(), device="cpu", seed=0)
    teacher = load_model(result.outputs["teacher_lws"].file("model"), torch.device("cpu"))
    teacher.eval()
    with torch.no_grad():  # plain torch: the teacher's predicted head on every training image, in order
        exact = torch.cat([teacher(batch["image"], heads=(teacher.predict_head,))[teacher.predict_head] for batch in loader])
    torch.testing.assert_close(payload["logits"].float(), exact, rtol=1e-3, atol=1e-3)  # fp16 rounding only
    # The stage reports how often the stored labels' top class is the image's own.
    targets = torch.cat([batch["target"] for batch in loader])
    expected = 100 * (payload["logits"].argmax(1) == targets).double().mean().item()
    assert result.metrics("soft_labels")["soft_labels/train_top1"] == pytest.approx(expected)


def test_runs_lists_recorded_pipelines_with_status_and_results(tmp_path, capsys, monkeypatch):
    assert main(["runs", "--output-dir", str(tmp_path)]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    result = run_pipeline(tiny("ce", tmp_path))
    from ltscale.stages import pipeline as pipeline_module

    def broken(config, ctx, inputs):
        raise ValueError("the tau stage does not exist in the model (simulated)")

    monkeypatch.setitem(pipeline_module.RUNNERS, "rebalance", broken)
    failing = tiny("ce", tmp_path)
    failing = dataclasses.replace(failing, name="tiny/tau", stages={
        **failing.stages, "tau": RebalanceConfig(source="teacher", method="tau_norm")})
    with pytest.raises(ValueError, match="does not exist in the model"):
        run_pipeline(failing)
    assert main(["runs", "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["started", "pipeline", "seed"]
    finished = next(line for line in lines if result.run_id in line)
    assert "tiny/ce" in finished and "FINISHED" in finished and f"{result.metrics()['test/top1']:.2f}" in finished
    assert sum("FAILED" in line for line in lines) == 1
    failed_at = next(i for i, line in enumerate(lines) if "FAILED" in line)
    assert "tiny/tau" in lines[failed_at] and "does not exist in the model" in lines[failed_at + 1]


def test_runs_says_where_a_running_pipeline_is(tmp_path, capsys):
    """A pipeline still running (its process alive elsewhere): its running stage and last epoch."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from ltscale.tracking import TAG_PIPELINE, TAG_STAGE, default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri(tmp_path))
    experiment = client.create_experiment("ltscale")
    parent = client.create_run(experiment, tags={TAG_PIPELINE: "imagenet-lt/ssd"}, run_name="imagenet-lt/ssd seed 0")
    client.log_param(parent.info.run_id, "seed", 0)
    done = client.create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent.info.run_id, TAG_STAGE: "teacher"})
    client.set_terminated(done.info.run_id)
    student = client.create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent.info.run_id, TAG_STAGE: "student"})
    client.log_param(student.info.run_id, "optim.epochs", 90)
    for epoch, loss in enumerate([2.5, 1.75, 1.25]):
        client.log_metric(student.info.run_id, "train/loss", loss, step=epoch)
    assert main(["runs", "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if parent.info.run_id in line)
    assert "RUNNING" in lines[row] and lines[row + 1].strip() == "now: student, epoch 3/90 done (train loss 1.2500)"
    # With epoch times logged, the time left at the recent pace (the median of the last five epochs).
    for epoch, seconds in enumerate([100.0, 40.0, 40.0, 44.0, 36.0, 40.0]):
        client.log_metric(student.info.run_id, "train/epoch_seconds", seconds, step=epoch)
    client.log_metric(student.info.run_id, "train/loss", 1.0, step=5)
    assert main(["runs", "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if parent.info.run_id in line)
    assert lines[row + 1].strip() == "now: student, epoch 6/90 done (train loss 1.0000); 56.0 m left at 40 s per epoch"


def test_runs_lists_the_newest_pipelines_first_up_to_the_limit_with_the_recent_pace(tmp_path, capsys):
    """Newest first, ``--limit`` of them; a running pipeline's time left is at the median pace of
    its last five epochs (a slow start, or the first epochs of a resumed run elsewhere, left out)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from ltscale.tracking import TAG_PIPELINE, TAG_STAGE, default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri(tmp_path))
    experiment = client.create_experiment("ltscale")
    ids = {}
    for name, start in [("old", 1_000_000), ("newer", 3_000_000), ("middle", 2_000_000)]:
        ids[name] = client.create_run(experiment, tags={TAG_PIPELINE: name}, start_time=start).info.run_id
        client.set_terminated(ids[name], end_time=start + 60_000)
    ids["running"] = client.create_run(experiment, tags={TAG_PIPELINE: "running"}, start_time=4_000_000).info.run_id
    stage = client.create_run(experiment, start_time=4_000_000, tags={
        TAG_PIPELINE: "running", TAG_STAGE: "teacher", MLFLOW_PARENT_RUN_ID: ids["running"]}).info.run_id
    client.log_param(stage, "optim.epochs", 20)
    for epoch, seconds in enumerate([100.0, 100.0, 100.0, 10.0, 20.0, 30.0, 90.0, 40.0]):
        client.log_metric(stage, "train/loss", 1.0, step=epoch)
        client.log_metric(stage, "train/epoch_seconds", seconds, step=epoch)

    def listed(*limit: str) -> list[str]:
        assert main(["runs", "--output-dir", str(tmp_path), *limit]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split()[-1] for line in lines[1:] if not line.startswith(" ")], lines

    order, lines = listed()
    assert order == [ids["running"], ids["newer"], ids["middle"], ids["old"]]
    assert lines[2].strip() == "now: teacher, epoch 8/20 done (train loss 1.0000); 6.0 m left at 30 s per epoch"
    assert listed("--limit", "2")[0] == [ids["running"], ids["newer"]]


def test_stage_keys_follow_what_changes_results_and_only_that(tmp_path):
    """Augmentation settings and every split's contents (the test split's metrics are part of a
    stage's output) change the keys; where the data lives and how fast it is read do not."""
    from ltscale.stages.pipeline import plan_pipeline

    config = dataclasses.replace(tiny("ce", tmp_path), stages={"teacher": METHODS["ce"](TINY)["teacher"]})
    key = plan_pipeline(config)[0].key
    changed = {
        "data.loader.cutout=4": True,  # different pixels
        "data.synthetic.test_per_class=5": True,  # a different test split: the stored metrics would be stale
        "data.synthetic.noise=0.5": True,
        "data.loader.num_workers=0": False,
        "data.loader.max_bad_image_fraction=0.01": False,
        "data.loader.backend=tensor": False,  # what "auto" picks for in-memory data
        "data.loader.ffcv.cache_dir=/elsewhere": False,
        "tracking.experiment=other": False,
        # (data.image_size and data.imbalance_factor, which the generated set does not read, are
        # refused for it: test_config's test_a_data_setting_the_dataset_would_ignore_is_refused.)
        "data.synthetic.imbalance_factor=10": True,
        # Settings that cannot change the output: logging, the loss implementation, MoCo while off.
        "stages.teacher.eval_every=2": False,
        "stages.teacher.moco.queue_size=128": False,
        "stages.teacher.moco_weight=1.0": True,
        "stages.teacher.optim.lr=0.07": True,
    }
    for override, expect_new in changed.items():
        assert (plan_pipeline(apply_overrides(config, [override]))[0].key != key) == expect_new, override
    # Settings of parts that are switched off: LDAM's for a CE loss, DRW's without DRW, milestones
    # under a cosine schedule; they count where they are on.
    inactive = {
        "stages.teacher.loss.ldam_scale=10": False,
        "stages.teacher.loss.drw_beta=0.99": False,
        "stages.teacher.optim.schedule=cosine": True,
        "stages.teacher.rotation_batch_norm=split": False,  # no rotation task in CE's teacher
    }
    for override, expect_new in inactive.items():
        assert (plan_pipeline(apply_overrides(config, [override]))[0].key != key) == expect_new, override
    ssd = tiny("ssd", tmp_path)
    ssd_key = plan_pipeline(ssd)[0].key
    assert plan_pipeline(apply_overrides(ssd, ["stages.teacher.rotation_batch_norm=joint"]))[0].key == ssd_key  # the default
    assert plan_pipeline(apply_overrides(ssd, ["stages.teacher.rotation_batch_norm=split"]))[0].key != ssd_key
    cosine = apply_overrides(config, ["stages.teacher.optim.schedule=cosine"])
    cosine_key = plan_pipeline(cosine)[0].key
    assert plan_pipeline(apply_overrides(cosine, ["stages.teacher.optim.milestones=1", "stages.teacher.optim.decay_factors=0.5"]))[0].key == cosine_key
    ldam = tiny("ldam-drw", tmp_path)
    ldam_key = plan_pipeline(ldam)[0].key
    for override in ("stages.teacher.loss.ldam_scale=10", "stages.teacher.loss.drw_beta=0.99"):
        assert plan_pipeline(apply_overrides(ldam, [override]))[0].key != ldam_key, override
    tau = dataclasses.replace(config, stages={**config.stages, "tau": RebalanceConfig(source="teacher", method="tau_norm")})
    tau_key = plan_pipeline(tau)[1].key
    assert plan_pipeline(apply_overrides(tau, ["stages.tau.optim.lr=0.5"]))[1].key == tau_key  # tau-norm does not train
    assert plan_pipeline(apply_overrides(tau, ["stages.tau.tau=0.5"]))[1].key != tau_key
    lws = dataclasses.replace(config, stages={**config.stages, "lws": RebalanceConfig(source="teacher", method="lws")})
    lws_key = plan_pipeline(lws)[1].key
    assert plan_pipeline(apply_overrides(lws, ["stages.lws.tau=0.5"]))[1].key == lws_key  # LWS has no tau
    assert plan_pipeline(apply_overrides(lws, ["stages.lws.optim.lr=0.5"]))[1].key != lws_key

    dive = tiny("dive", tmp_path)
    student = plan_pipeline(dive)[-1].key
    assert plan_pipeline(apply_overrides(dive, ["stages.student.backend=torch"]))[-1].key == student
    assert plan_pipeline(apply_overrides(dive, ["stages.student.alpha=0.3"]))[-1].key != student
    # With temperature_from, the virtual_examples stage's choice replaces the configured T and p.
    chosen = apply_overrides(dive, ["stages.student.temperature_from=virtual_examples"])
    chosen_key = plan_pipeline(chosen)[-1].key
    assert chosen_key != student
    for override in ("stages.student.temperature=7", "stages.student.power=1"):
        assert plan_pipeline(apply_overrides(chosen, [override]))[-1].key == chosen_key, override
        assert plan_pipeline(apply_overrides(dive, [override]))[-1].key != student, override
    # A backend that reads image files is refused for in-memory data when the config is built.
    with pytest.raises(ValueError, match="data.loader.backend=ffcv decodes image files; synthetic is held in memory"):
        apply_overrides(config, ["data.loader.backend=ffcv"])


def test_stage_keys_follow_the_seed_the_precision_and_the_keys_of_their_inputs(tmp_path):
    """Another seed or precision is another output (a sweep's seeds must not share a teacher), and a
    stage whose input changed is recomputed: the student of a retrained teacher is a new student."""
    from ltscale.stages.pipeline import plan_pipeline

    config = tiny("dive", tmp_path)
    keys = [p.key for p in plan_pipeline(config)]
    for override in ("seed=1", "precision=fp32"):
        assert all(a != b for a, b in zip(keys, [p.key for p in plan_pipeline(apply_overrides(config, [override]))])), override
    teacher_changed = [p.key for p in plan_pipeline(apply_overrides(config, ["stages.teacher.optim.lr=0.07"]))]
    assert all(a != b for a, b in zip(keys, teacher_changed))  # teacher, its virtual examples and the student
    # The settings of SSD's large-data self-supervision count while it is on.
    moco = apply_overrides(config, ["stages.teacher.moco_weight=1.0"])
    moco_key = plan_pipeline(moco)[0].key
    assert plan_pipeline(apply_overrides(moco, ["stages.teacher.moco.temperature=0.1"]))[0].key != moco_key


def test_each_stage_hands_its_settings_and_its_inputs_to_its_training_task(tmp_path, monkeypatch):
    """What each training stage builds from its config and its inputs, with the training itself left
    out: the teacher's head, self-supervision and its settings, the SSD student's T, weights and
    stored soft labels, the DiVE student's teacher, T and p (chosen by the virtual-example stage
    when temperature_from names it), alpha and class counts, and the pipeline seed for the loaders."""
    from ltscale.data import build_dataset
    from ltscale.stages import distill, teacher
    from ltscale.stages.tasks import DiVEDistillTask, MoCoTask, SSDDistillTask, SupervisedTask

    built: dict[str, tuple] = {}

    def record(task, network, optim, sampler, eval_every, ctx, views=1):
        built[ctx.name] = (task, network, ctx.seed, views)

    monkeypatch.setattr(teacher, "train_and_evaluate", record)
    monkeypatch.setattr(distill, "train_and_evaluate", record)

    ssd = run_pipeline(apply_overrides(tiny("ssd", tmp_path / "ssd"), [
        "seed=5", "stages.teacher.rotation_weight=1.5", "stages.teacher.rotation_batch_norm=split",
        "stages.student.temperature=3.5", "stages.student.hard_weight=0.6", "stages.student.soft_weight=1.7"]))
    task, network, seed, _ = built["teacher"]
    assert isinstance(task, SupervisedTask) and (task.rotation_weight, task.rotation_batch_norm) == (1.5, "split")
    assert {name: spec.kind for name, spec in network.head_specs.items()} == {"cls": "linear", "rotation": "rotation"}
    assert seed == 5
    task, network, seed, _ = built["student"]
    assert isinstance(task, SSDDistillTask) and (task.temperature, task.hard_weight, task.soft_weight) == (3.5, 0.6, 1.7)
    stored = torch.load(ssd.outputs["soft_labels"].file("soft_labels"), weights_only=True)["logits"]
    assert torch.equal(task.soft_label_logits, stored) and network.predict_head == "hard" and seed == 5

    run_pipeline(tiny("ldam-drw", tmp_path / "ldam"))
    assert built["teacher"][1].head_specs["cls"].kind == "cosine"

    run_pipeline(apply_overrides(tiny("ce", tmp_path / "moco"), [
        "stages.teacher.moco_weight=0.4", "stages.teacher.moco.queue_size=64", "stages.teacher.moco.projection_dim=16"]))
    task, _, _, views = built["teacher"]
    assert isinstance(task, MoCoTask) and task.moco_weight == 0.4 and views == 2

    config = apply_overrides(tiny("dive", tmp_path / "dive"), [
        "stages.student.temperature_from=virtual_examples", "stages.student.temperature=9.5", "stages.student.power=0.25",
        "stages.student.alpha=0.3"])
    dive = run_pipeline(config)
    chosen = json.loads(dive.outputs["virtual_examples"].file("virtual_examples").read_text())["chosen"]
    task, network, _, _ = built["student"]
    assert isinstance(task, DiVEDistillTask) and (task.temperature, task.power, task.alpha) == (
        float(chosen["temperature"]), float(chosen["power"]), 0.3)
    counts = build_dataset(config.data).train.class_counts()
    assert task.class_counts.tolist() == list(counts) and len(set(counts)) > 1
    assert _same_weights(task.teacher.state_dict(), _weights(dive.outputs["teacher"]))


def test_image_file_stage_keys_cover_test_and_validation_lists_not_the_root(tmp_path):
    from PIL import Image

    from ltscale.stages.pipeline import plan_pipeline

    rows: dict[int, list[str]] = {i: [] for i in range(5)}
    for root in (tmp_path / "a", tmp_path / "b"):  # the same tree twice: a copy on node-local disk
        for label in range(2):
            for i in range(5):
                path = root / f"c{label}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 90 * label, 7)).save(path)
                if root.name == "a":
                    rows[i].append(f"c{label}/{i}.jpg {label}")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(rows[0] + rows[1] + rows[2]) + "\n")
    (lists / "test.txt").write_text("\n".join(rows[3]) + "\n")
    (lists / "test2.txt").write_text("\n".join(rows[4]) + "\n")
    data = DataConfig(dataset="imagenet_lt", root=str(tmp_path / "a"), train_list=str(lists / "train.txt"),
                      test_list=str(lists / "test.txt"), image_size=8)
    config = dataclasses.replace(tiny("ce", tmp_path / "out"), data=data, stages={"teacher": METHODS["ce"](TINY)["teacher"]})
    key = plan_pipeline(config)[0].key
    assert plan_pipeline(apply_overrides(config, [f"data.root={tmp_path / 'b'}"]))[0].key == key
    for override in (f"data.test_list={lists / 'test2.txt'}", f"data.val_list={lists / 'test2.txt'}", "data.image_size=16"):
        assert plan_pipeline(apply_overrides(config, [override]))[0].key != key, override


def test_a_stage_builds_each_evaluation_loader_once(tmp_path, monkeypatch):
    """LWS evaluates before and after re-balancing, a teacher with eval_every at several epochs:
    one loader each (FFCV compiles, DataLoader workers start, once per stage), closed at its end."""
    import ltscale.stages.context as context
    from ltscale.config import apply_overrides

    built, closed = [], []
    real = context.build_loader

    def counting(split, *args, train, **kwargs):
        loader = real(split, *args, train=train, **kwargs)
        if not train:
            built.append(split.name)
            loader.close = lambda: closed.append(split.name)  # what close() releases (DALI pipelines)
        return loader

    monkeypatch.setattr(context, "build_loader", counting)
    config = apply_overrides(tiny("lws", tmp_path), ["stages.teacher.eval_every=1", "stages.teacher.optim.epochs=3"])
    result = run_pipeline(config)
    assert result.executed == ["teacher", "lws"]
    test_split = [name for name in built if name.endswith("test")]
    assert len(test_split) == 2, built  # one per stage, however many evaluations each made
    assert sorted(closed) == sorted(built)


def test_results_table_keeps_whole_run_ids_when_not_a_terminal(capsys):
    """Logs, tee and SLURM output files are not terminals: the run ids must not be cut there."""
    from ltscale.report import print_results
    from ltscale.stages.pipeline import PipelineResult
    from ltscale.stages.store import StageOutput

    metrics = {"test/many": 70.0, "test/medium": 50.0, "test/few": 20.5, "test/top1": 51.25}
    run_id = "04e55b23a6a8477096493430a1b2c3d4"
    result = PipelineResult(name="imagenet-lt/ssd-with-a-long-name", run_id=run_id, tracking_uri="", result_stage="student",
                            outputs={"student": StageOutput("student", "distill", "k", Path(), {"metrics": metrics})})
    print_results([result])
    out = capsys.readouterr().out
    assert run_id in out and "20.50" in out and "imagenet-lt/ssd-with-a-long-name" in out


def test_results_table_puts_each_group_in_its_column_and_the_run_id_on_the_pipeline_row():
    from rich.console import Console

    from ltscale.report import print_results
    from ltscale.stages.pipeline import PipelineResult
    from ltscale.stages.store import StageOutput

    student = {"test/many": 71.0, "test/medium": 52.0, "test/few": 23.0, "test/top1": 54.0}
    teacher = {"test/many": 81.0, "test/medium": 42.0, "test/few": 13.0, "test/top1": 44.0}
    run_id = "0123456789abcdef0123456789abcdef"
    result = PipelineResult(name="demo/ssd", run_id=run_id, tracking_uri="", result_stage="student", outputs={
        "teacher": StageOutput("teacher", "teacher", "k1", Path(), {"metrics": teacher, "run_id": "f" * 32}),
        "student": StageOutput("student", "distill", "k2", Path(), {"metrics": student, "run_id": "e" * 32})})
    console = Console(width=200, record=True)
    print_results([result], detail=True, console=console)
    rows = {cells[0]: cells[1:] for line in console.export_text().splitlines()
            if len(cells := [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]) == 6}
    assert rows["pipeline / stage"][:4] == ["many", "medium", "few", "all"]
    assert rows["demo/ssd"] == ["71.00", "52.00", "23.00", "54.00", run_id]
    assert rows["teacher"] == ["81.00", "42.00", "13.00", "44.00", ""]  # a stage's row: the pipeline run's id is above


def test_top5_is_left_out_where_every_image_is_in_its_top_5():
    import numpy as np
    import torch

    from ltscale.engine.evaluate import HitCounter

    for classes, has_top5 in ((3, False), (5, False), (6, True)):
        counter = HitCounter(["cls"], classes, torch.device("cpu"))
        targets = torch.arange(classes)
        logits = torch.eye(classes).roll(1, dims=1)  # every top-1 wrong
        counter.add(targets, {"cls": logits})
        metrics = counter.results(np.full(classes, 50))["cls"].metrics("test")
        assert metrics["test/top1"] == 0.0
        assert ("test/top5" in metrics) == has_top5, classes


def test_cli_refuses_bad_arguments_in_one_line_before_anything_runs(tmp_path, capsys):
    def refused(argv, message, code=2):
        try:
            assert main(argv) == code
        except SystemExit as exit:  # argparse's own refusals
            assert exit.code == code
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        return err

    out = tmp_path / "out"
    refused(["run", "demo/ce", "--device", "gpu", "--output-dir", str(out)], "device must be auto, cpu, cuda or cuda:<index>, got 'gpu'")
    refused(["run", "demo/ce", "--output-dir", ""], "output_dir is empty")
    refused(["run", "demo/ce", "--tracking-uri", str(tmp_path / "store"), "--output-dir", str(out)],
            f"is a path, not a URI: for a database there, use sqlite:///{(tmp_path / 'store').resolve()}/mlflow.db")
    refused(["ui", "--output-dir", str(tmp_path / "typo")], "no such directory")
    # A flag and a --set of the same key: the flag would win silently.
    refused(["run", "demo/ce", "--output-dir", str(out), "--set", f"output_dir={tmp_path / 'other'}"],
            "--output-dir and --set output_dir=... both set output_dir: give one")
    refused(["run", "demo/ce", "--set", "device=cpu", "--device", "cpu", "--set", f"output_dir={out}"],
            "--device and --set device=... both set device")
    refused(["demo", "--no-progress", "--set", "progress=true", "--output-dir", str(out)], "both set progress")
    refused(["run", "demo/ce", "--tracking-uri", "garbage://x", "--output-dir", str(out)],
            "tracking.tracking_uri 'garbage://x': MLflow has no tracking store for the scheme 'garbage' (supported: http, https")
    refused(["runs", "--tracking-uri", "notascheme"], "--tracking-uri 'notascheme' is a path, not a URI")
    refused(["runs", "--tracking-uri", "garbage://x"], "MLflow has no tracking store for the scheme 'garbage'")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "mlflow.db").write_text("garbage\n")  # not a database: MLflow would answer with an SQLAlchemy traceback
    message = f"{junk / 'mlflow.db'} is not an SQLite database, so it cannot be the MLflow store"
    refused(["runs", "--output-dir", str(junk)], message)
    refused(["ui", "--output-dir", str(junk)], message)
    refused(["run", "demo/ce", "--output-dir", str(junk)], message)
    assert (junk / "mlflow.db").read_text() == "garbage\n" and sorted(p.name for p in junk.iterdir()) == ["mlflow.db"]
    refused(["runs", "--limit", "-1"], "argument --limit: expected a whole number >= 0, got -1")
    refused(["runs", "--limit", "0"], "argument --limit: expected a whole number >= 1, got 0")
    refused(["recipes", "zzz"], "no recipe name contains 'zzz'", code=1)
    refused(["data", "stats", "nosuch"], "argument dataset: invalid choice: 'nosuch' (choose from 'synthetic', ")
    # The data commands take their keys as `ltscale run` spells them too (data.<field>).
    assert main(["data", "stats", "synthetic", "--set", "data.synthetic.num_classes=5", "--compact"]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == 5
    refused(["data", "verify", "synthetic", "--workers", "-2"], "argument --workers: expected a whole number >= 0, got -2")
    refused(["virtual", str(tmp_path / "model.pt"), "--recipe", "demo/dive", "--temperatures", "0"],
            "--temperatures / --powers: temperatures must be one or more finite numbers > 0")
    refused(["virtual", str(tmp_path / "model.pt"), "--recipe", "demo/dive", "--powers", "2"], "powers must be one or more numbers in (0, 1]")
    # The demo's --set goes to the recipes that have the field; every config is checked first.
    refused(["demo", "--set", "stages.studnt.temperature=2", "--output-dir", str(out)], "no stage of demo/ce, demo/ssd, demo/dive has that field")
    refused(["demo", "--set", "stages.student.temprature=2", "--output-dir", str(out)],
            "Did you mean 'stages.student.temperature', 'stages.student.temperature_from'?")
    refused(["demo", "--set", "stages.student.temperature=0", "--output-dir", str(out)],
            "recipe demo/ssd: stages.student: temperature must be a finite number > 0")
    assert not out.exists() and not (tmp_path / "typo").exists()  # nothing ran, nothing was created


def test_a_store_that_refuses_is_not_a_store_that_is_down(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    assert main(["runs", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    # MLflow's own fix is kept whole; no "rerun once the store answers" for a store that said no.
    assert "refused the request" in err and "MLFLOW_ALLOW_FILE_STORE=true" in err and "rerun" not in err
    config = ["--set", "stages.*.optim.epochs=1", "--set", "stages.*.optim.warmup_epochs=0", "--device", "cpu"]
    # A scheme MLflow has no store for is the config's error (MLflow's own answer is about its model registry).
    assert main(["run", "demo/ce", "--tracking-uri", "bogus://x", "--output-dir", str(tmp_path / "o"), *config]) == 2
    err = capsys.readouterr().err
    assert "MLflow has no tracking store for the scheme 'bogus'" in err and "rerun" not in err
    assert not (tmp_path / "o").exists()


def test_a_run_off_a_terminal_reports_stages_and_epochs_as_lines(tmp_path, capsys):
    """A SLURM job's log is not a terminal: no bars there, but a line per stage and per epoch, so
    a run hours long shows where it is."""
    import dataclasses
    import re

    config = dataclasses.replace(tiny("ce", tmp_path), progress=True)
    first = run_pipeline(config)
    err = capsys.readouterr().err
    epochs = config.stages["teacher"].optim.epochs
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d teacher: teacher stage started \(.*store/teacher-", err, re.M), err
    assert len(re.findall(r"teacher: epoch \d+/%d  loss \d+\.\d{4}  train top-1 " % epochs, err)) == epochs
    top1 = first.metrics("teacher")["test/top1"]
    assert re.search(r"teacher: finished in \d+s, test top-1 %.2f$" % top1, err, re.M), err
    run_pipeline(config)
    assert f"teacher: reused {first.outputs['teacher'].directory}, test top-1 {top1:.2f}" in capsys.readouterr().err
    run_pipeline(dataclasses.replace(config, progress=False))
    assert "teacher:" not in capsys.readouterr().err  # progress=false: silent


def test_a_stage_resumed_twice_keeps_its_whole_lineage(tmp_path, monkeypatch):
    """Each resumed attempt links the run it continued as soon as it resumes: one stopped again
    before its end is still linked, so the chain of runs holds every epoch's curve."""
    config = apply_overrides(tiny("ce", tmp_path), ["stages.teacher.optim.epochs=4"])
    original = trainer_module.Trainer._epoch

    def stop_at(epoch_to_stop):
        def epoch(self, epoch, steps, advance):
            if epoch == epoch_to_stop:
                raise _Interrupt("simulated preemption")
            return original(self, epoch, steps, advance)
        return epoch

    for stop in (1, 2):
        monkeypatch.setattr(trainer_module.Trainer, "_epoch", stop_at(stop))
        with pytest.raises(_Interrupt):
            run_pipeline(config)
    monkeypatch.setattr(trainer_module.Trainer, "_epoch", original)
    result = run_pipeline(config)
    client = mlflow.MlflowClient(result.tracking_uri)
    last = client.get_run(result.outputs["teacher"].run_id)
    middle = client.get_run(last.data.tags["ltscale.resumed_from_run"])
    first = client.get_run(middle.data.tags["ltscale.resumed_from_run"])
    assert (last.data.tags["ltscale.resumed_from_epoch"], middle.data.tags["ltscale.resumed_from_epoch"]) == ("2", "1")
    assert "ltscale.resumed_from_run" not in first.data.tags and middle.info.status == "FAILED"
    curves = [sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) for r in (first, middle, last)]
    assert curves == [[0], [0, 1], [1, 2, 3]]  # each resumed curve repeats the epoch it continues after


def test_an_attempt_that_dies_while_resuming_keeps_the_link_to_the_trained_epochs(tmp_path, monkeypatch):
    """An attempt stopped while it loads the progress (preempted, out of memory) holds none of the
    stage's epochs: the next attempt links to the run that trained them, not to the empty one."""
    config = apply_overrides(tiny("ce", tmp_path), ["stages.teacher.optim.epochs=4"])
    original_epoch, original_resume = trainer_module.Trainer._epoch, trainer_module.Trainer._resume

    def stop_in_epoch_2(self, epoch, steps, advance):
        if epoch == 2:
            raise _Interrupt("simulated preemption")
        return original_epoch(self, epoch, steps, advance)

    def stop_while_loading(self):
        raise _Interrupt("simulated preemption while loading progress.pt")

    monkeypatch.setattr(trainer_module.Trainer, "_epoch", stop_in_epoch_2)
    with pytest.raises(_Interrupt):
        run_pipeline(config)
    monkeypatch.setattr(trainer_module.Trainer, "_epoch", original_epoch)
    monkeypatch.setattr(trainer_module.Trainer, "_resume", stop_while_loading)
    with pytest.raises(_Interrupt):
        run_pipeline(config)
    monkeypatch.setattr(trainer_module.Trainer, "_resume", original_resume)
    result = run_pipeline(config)
    client = mlflow.MlflowClient(result.tracking_uri)
    last = client.get_run(result.outputs["teacher"].run_id)
    first = client.get_run(last.data.tags["ltscale.resumed_from_run"])
    assert last.data.tags["ltscale.resumed_from_epoch"] == "2"
    curves = [sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) for r in (first, last)]
    assert curves == [[0, 1], [1, 2, 3]]


def test_progress_saved_without_metrics_still_links_each_attempt(tmp_path, monkeypatch):
    """Progress without the last epoch's metrics (ZeRO progress of an older ltscale) still makes a
    resume: each attempt links the run it continued and names itself for the next one."""
    config = apply_overrides(tiny("ce", tmp_path), ["stages.teacher.optim.epochs=4"])
    original_epoch, original_resume = trainer_module.Trainer._epoch, trainer_module.Trainer._resume
    monkeypatch.setattr(trainer_module.Trainer, "_resume", lambda self: (original_resume(self)[0], None))

    def stop_at(epoch_to_stop):
        def epoch(self, epoch, steps, advance):
            if epoch == epoch_to_stop:
                raise _Interrupt("simulated preemption")
            return original_epoch(self, epoch, steps, advance)
        return epoch

    for stop in (2, 3):
        monkeypatch.setattr(trainer_module.Trainer, "_epoch", stop_at(stop))
        with pytest.raises(_Interrupt):
            run_pipeline(config)
    monkeypatch.setattr(trainer_module.Trainer, "_epoch", original_epoch)
    result = run_pipeline(config)
    client = mlflow.MlflowClient(result.tracking_uri)
    last = client.get_run(result.outputs["teacher"].run_id)
    middle = client.get_run(last.data.tags["ltscale.resumed_from_run"])
    first = client.get_run(middle.data.tags["ltscale.resumed_from_run"])
    assert (last.data.tags["ltscale.resumed_from_epoch"], middle.data.tags["ltscale.resumed_from_epoch"]) == ("3", "2")
    curves = [sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) for r in (first, middle, last)]
    assert curves == [[0, 1], [2], [3]]


def test_a_stage_record_refuses_at_once_what_its_run_would_refuse_later():
    """Kept for after the stage is stored, a result MLflow would refuse (NaN: a diverged model;
    an infinite per-class accuracy) would reach the run only then, with the stage already stored
    as finished: it is refused at the call. Kept calls are sent in order; dropped ones close
    their figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ltscale.stages.context import StageRecord

    class Run:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append(("log_metrics", metrics, step))

        def log_per_class_accuracy(self, accuracy, class_counts, prefix):
            self.calls.append(("log_per_class_accuracy", prefix))

        def log_figure(self, figure, artifact_file):
            self.calls.append(("log_figure", artifact_file))

    run = Run()
    record = StageRecord(run)
    with pytest.raises(ValueError, match="metric 'test/top1' is nan at step 3: not finite"):
        record.log_metrics({"test/top1": float("nan")}, step=3)
    with pytest.raises(ValueError, match=r"per-class accuracy of classes \[0\] is not finite"):
        record.log_per_class_accuracy([float("inf"), 0.5], [10, 3], prefix="per_class/cls")
    with pytest.raises(ValueError, match="accuracy has 1 entries but class_counts has 2"):
        record.log_per_class_accuracy([0.5], [10, 3], prefix="per_class/cls")
    with pytest.raises(AttributeError, match="StageRecord has no method 'log_nothing'"):
        record.log_nothing()
    record.log_metrics({"test/top1": 50.0}, step=3)
    record.log_per_class_accuracy([0.5, float("nan")], [10, 3], prefix="per_class/cls")  # NaN: a class without test images
    record.log_figure(plt.figure(), "f.png")
    assert run.calls == []
    record.send()
    assert run.calls == [("log_metrics", {"test/top1": 50.0}, 3), ("log_per_class_accuracy", "per_class/cls"),
                         ("log_figure", "f.png")]
    figure = plt.figure()
    record.log_figure(figure, "g.png")
    record.discard()
    record.send()
    assert len(run.calls) == 3 and not plt.fignum_exists(figure.number)
    plt.close("all")


def test_a_tracking_store_down_when_a_stage_ends_fails_its_run_but_keeps_its_work(tmp_path, monkeypatch):
    """The final evaluation's metrics and per-class tables reach MLflow after the stage's outputs
    are stored: a store that is down then (MLflow's client gives up after minutes) fails the run,
    and the next run of the pipeline reuses the trained stage instead of training it again."""
    from mlflow.exceptions import MlflowException

    config = tiny("ce", tmp_path)
    down = {"now": False}
    log_batch, fit = mlflow.MlflowClient.log_batch, trainer_module.Trainer.fit

    def failing_log_batch(self, *args, **kwargs):
        if down["now"]:
            raise MlflowException("simulated outage: max retries exceeded")
        return log_batch(self, *args, **kwargs)

    def fit_then_store_goes_down(self):
        start = fit(self)
        down["now"] = True  # right after the last epoch
        return start

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", failing_log_batch)
    monkeypatch.setattr(trainer_module.Trainer, "fit", fit_then_store_goes_down)
    with pytest.raises(MlflowException, match="simulated outage"):
        run_pipeline(config)
    (directory,) = (Path(config.output_dir) / "store").glob("teacher-*")
    assert {"model.pt", "manifest.json"} <= {p.name for p in directory.iterdir()}
    stored = json.loads((directory / "manifest.json").read_text())["metrics"]
    from ltscale.tracking.mlflow_tracker import default_tracking_uri

    failed = mlflow.MlflowClient(default_tracking_uri(Path(config.output_dir))).get_run(
        json.loads((directory / "manifest.json").read_text())["run_id"])
    assert failed.info.status == "FAILED" and "test/top1" not in failed.data.metrics

    down["now"] = False
    trained = []
    monkeypatch.setattr(trainer_module.Trainer, "fit", lambda self: trained.append(self.name) or fit(self))
    result = run_pipeline(config)
    assert result.cached == ["teacher"] and trained == []
    assert result.metrics("teacher")["test/top1"] == stored["test/top1"]


def test_a_milestone_past_the_last_epoch_is_warned_about(tmp_path, caplog):
    config = apply_overrides(tiny("ce", tmp_path), ["stages.teacher.optim.epochs=2", "stages.teacher.optim.warmup_epochs=0"])
    with caplog.at_level("WARNING", logger="ltscale.engine.trainer"):
        run_pipeline(config)
    assert ("stage teacher: optim.milestones [2] are not before optim.epochs=2, so the lr never decays there; "
            "shortening a schedule for a real run, move the milestones too") in caplog.text



def test_outputs_reused_from_other_code_are_credited_to_it(tmp_path, monkeypatch):
    """A reused stage's metrics were computed by the code that produced it: its run and the pipeline
    run say which, beside the code version of the process that reused them."""
    from ltscale.stages import pipeline as pipeline_module

    config = dataclasses.replace(tiny("ce", tmp_path), stages={"teacher": METHODS["ce"](TINY)["teacher"]})
    monkeypatch.setattr(pipeline_module, "code_version", lambda: "a" * 40 + "-dirty")
    first = run_pipeline(config)
    monkeypatch.setattr(pipeline_module, "code_version", lambda: "b" * 40)
    again = run_pipeline(config)
    assert again.cached == ["teacher"]
    client = mlflow.MlflowClient(again.tracking_uri)
    reused = _stage_run(client, again.run_id, "teacher")  # (the output's run_id is the producer's)
    assert reused.info.run_id != first.outputs["teacher"].run_id
    assert reused.data.tags[TAG_PRODUCED_WITH_CODE] == "a" * 40 + "-dirty"
    assert reused.data.tags["ltscale.code_version"] == "b" * 40
    assert client.get_run(again.run_id).data.tags[TAG_PRODUCED_WITH_CODE] == "a" * 40 + "-dirty"
    lineage = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=again.run_id, artifact_path="lineage.json",
                                                                 tracking_uri=again.tracking_uri)).read_text())
    assert lineage["teacher"]["code_version"] == "a" * 40 + "-dirty"


def _stage_run(client, pipeline_run_id: str, stage: str):
    experiment = client.get_run(pipeline_run_id).info.experiment_id
    return next(r for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{pipeline_run_id}'")
                if r.data.tags["ltscale.stage"] == stage)


def test_recorded_outputs_are_absolute_and_a_relative_output_dir_reaches_the_same_store(tmp_path, monkeypatch):
    """With a relative output_dir (the default ``runs``), ``ltscale.output`` and ``lineage.json``
    held paths relative to a working directory no run records: from a shared tracking server, or
    after a ``cd``, the outputs could not be found."""
    from ltscale.stages.pipeline import plan_pipeline
    from ltscale.tracking import TAG_OUTPUT

    monkeypatch.chdir(tmp_path)
    config = dataclasses.replace(tiny("ce", tmp_path), output_dir="runs")
    first = run_pipeline(config)
    directory = (tmp_path / "runs").resolve() / "store" / f"teacher-{first.outputs['teacher'].key}"
    client = mlflow.MlflowClient(first.tracking_uri)
    assert _stage_run(client, first.run_id, "teacher").data.tags[TAG_OUTPUT] == str(directory)
    lineage = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="lineage.json",
                                                                 tracking_uri=first.tracking_uri)).read_text())
    assert lineage["teacher"]["directory"] == str(directory) and first.outputs["teacher"].directory == directory

    # The same directory by its absolute path from elsewhere, and by the relative one for --plan:
    # one store, one MLflow record, the stage reused.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = run_pipeline(dataclasses.replace(config, output_dir=str(tmp_path / "runs")))
    assert again.cached == ["teacher"] and again.tracking_uri == first.tracking_uri
    assert _stage_run(client, again.run_id, "teacher").data.tags[TAG_OUTPUT] == str(directory)
    monkeypatch.chdir(tmp_path)
    assert [(plan.state, plan.directory) for plan in plan_pipeline(config)] == [("finished", directory)]

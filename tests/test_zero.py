"""DeepSpeed ZeRO under the training loop (CPU accelerator, gloo): the same update as plain
training and DDP, progress saved by every rank and resumed exactly, whole pipelines under torchrun.

DeepSpeed always needs a process group, so every run here is in its own process (spawned or
torchrun) and the pytest process never holds one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltscale.data import LoaderConfig, SamplerConfig, build_loader
from ltscale.dist import runtime
from ltscale.engine.schedule import OptimConfig
from ltscale.engine.trainer import Trainer
from ltscale.engine.zero import DeepSpeedConfig, ZeroEngine, deepspeed_available, engine_config
from ltscale.dist.ports import free_port
from tests.test_distributed import LinearTask, _dataset, _spawn

ROOT = Path(__file__).resolve().parents[1]
# The config and progress-pointer tests run everywhere; the engine's own runs need DeepSpeed.
requires_deepspeed = pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed (pip install 'ltscale[deepspeed]')")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def test_config_refuses_stage_3_and_unknown_stages():
    with pytest.raises(ValueError, match="partitions the parameters"):
        DeepSpeedConfig(enabled=True, zero_stage=3)
    with pytest.raises(ValueError, match="must be 0, 1 or 2"):
        DeepSpeedConfig(enabled=True, zero_stage=4)


# ---- without DeepSpeed: the engine's config and the progress pointer ------------------------------


def test_engine_config_keeps_the_recipe():
    config = engine_config(64, 2)
    assert config["train_micro_batch_size_per_gpu"] == 64 and config["gradient_accumulation_steps"] == 1
    assert config["zero_optimization"] == {"stage": 2}
    assert config["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0; no recipe clips
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]  # the loop's autocast decides


class _FakeEngine:
    """What ZeroEngine.save / load use of DeepSpeed's engine: a folder per tag."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir(parents=True)
        (Path(directory) / tag / "rank0.pt").write_text(json.dumps(client_state))

    def load_checkpoint(self, directory, tag, load_optimizer_states, load_lr_scheduler_states):
        self.loaded.append(tag)
        return (str(Path(directory) / tag) if (Path(directory) / tag).is_dir() else None), {}


def _zero_engine(stage: int):
    engine = object.__new__(ZeroEngine)  # no DeepSpeed: only the pointer bookkeeping runs
    engine.config = DeepSpeedConfig(enabled=True, zero_stage=stage)
    engine.engine = _FakeEngine()
    return engine


def test_progress_pointer_names_the_last_complete_epoch_and_a_resume_checks_the_layout(tmp_path):
    from ltscale.engine.checkpoint import CheckpointError

    engine = _zero_engine(1)
    assert engine.load(tmp_path) == (0, None)  # nothing saved yet
    engine.save(tmp_path, 1, {"loss": 2.0})
    engine.save(tmp_path, 2, {"loss": 1.5})
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0002"]  # the older one removed
    pointer = json.loads((tmp_path / "progress.json").read_text())
    assert pointer == {"kind": "ltscale.deepspeed_progress", "tag": "epoch-0002", "epoch": 2, "world_size": 1,
                       "zero_stage": 1, "metrics": {"loss": 1.5}}
    assert engine.load(tmp_path) == (2, {"loss": 1.5}) and engine.engine.loaded == ["epoch-0002"]
    # ZeRO's partitions are per rank and per stage: another layout must not load them.
    with pytest.raises(CheckpointError, match="saved by 1 rank\\(s\\) under ZeRO stage 1, this run has 1 under stage 2"):
        _zero_engine(2).load(tmp_path)
    (tmp_path / "progress.json").write_text(json.dumps({**pointer, "world_size": 2}))
    with pytest.raises(CheckpointError, match="saved by 2 rank\\(s\\)"):
        _zero_engine(1).load(tmp_path)


def _train(world: int, progress: Path, deepspeed: DeepSpeedConfig | None, epochs: int = 3):
    bundle = _dataset()
    task = LinearTask(bundle.num_classes)
    loader = build_loader(bundle.train, bundle, train=True, augment=False, batch_size=16 // world, loader=LoaderConfig(),
                          device=torch.device("cpu"), seed=3, sampler=SamplerConfig(kind="class_balanced", samples_per_class=2))
    optim = OptimConfig(epochs=epochs, batch_size=16, lr=0.5, warmup_epochs=1, milestones=(2,), decay_factors=(0.1,), weight_decay=1e-3)
    seen, resumed = [], []
    trainer = Trainer(task, loader, optim, torch.device("cpu"), "fp32", progress, "toy", on_epoch_end=seen.append,
                      deepspeed=deepspeed, on_resume=lambda epochs_done, metrics: resumed.append((epochs_done, metrics)))
    started = trainer.fit()
    assert len(resumed) == (1 if started else 0)
    if resumed:  # the metrics of the epoch it resumes after, as that epoch's on_epoch_end got them
        assert resumed[0][0] == started and resumed[0][1].epoch == started - 1
    resumed = [metrics for _, metrics in resumed]
    return task, seen + resumed, started


def _worker(rank: int, world: int, port: int, out: str, stage: int, epochs: int, tag: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if world > 1:
        runtime.ensure_process_group(runtime.DistEnv(rank=rank, world_size=world, local_rank=rank, master_port=port),
                                     torch.device("cpu"))  # with the product's exit handling of the group
    deepspeed = DeepSpeedConfig(enabled=True, zero_stage=stage) if stage >= 0 else None
    task, seen, started = _train(world, Path(out) / "stage" / "progress.pt", deepspeed, epochs)
    torch.save({"state": task.network.state_dict(), "loss": [m.loss for m in seen if m.epoch >= started], "started": started,
                "resumed_loss": [m.loss for m in seen if m.epoch < started]},
               Path(out) / f"{tag}-rank{rank}.pt")


@requires_deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_on_two_ranks_equals_one_plain_process(tmp_path, stage):
    plain, seen, _ = _train(1, tmp_path / "plain.pt", None)
    _spawn(_worker, 2, str(tmp_path), stage, 3, "zero")
    ranks = [torch.load(tmp_path / f"zero-rank{r}.pt") for r in range(2)]
    for name, value in plain.network.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ranks[0]["loss"], [m.loss for m in seen], rtol=1e-5)
    # Each rank wrote its optimiser partition; the pointer names the last epoch.
    progress = tmp_path / "stage" / "deepspeed-progress"
    pointer = json.loads((progress / "progress.json").read_text())
    metrics = pointer.pop("metrics")
    assert pointer == {"kind": "ltscale.deepspeed_progress", "tag": "epoch-0003", "epoch": 3, "world_size": 2, "zero_stage": stage}
    assert metrics["epoch"] == 2 and metrics["loss"] == pytest.approx(seen[2].loss, rel=1e-5)
    assert [p.name for p in progress.glob("epoch-*")] == ["epoch-0003"]  # older epochs removed
    if stage:
        # ZeRO really partitions: each rank's file holds half of the 772 fp32 master values (and
        # their momentum), not a copy of all of them.
        for rank in range(2):
            saved = torch.load(progress / "epoch-0003" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
            optimizer = saved["optimizer_state_dict"]
            assert int(optimizer["zero_stage"]) == stage
            assert [t.numel() for t in optimizer["single_partition_of_fp32_groups"]] == [772 // 2]


@requires_deepspeed
def test_zero_resume_continues_exactly_and_refuses_another_layout(tmp_path):
    one_go = tmp_path / "one_go"
    one_go.mkdir()
    _spawn(_worker, 1, str(one_go), 1, 3, "full")
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    _spawn(_worker, 1, str(interrupted), 1, 2, "first")  # stops after epoch 2, as a killed job would
    _spawn(_worker, 1, str(interrupted), 1, 3, "resumed")  # same stage directory, the full schedule
    full, resumed = torch.load(one_go / "full-rank0.pt"), torch.load(interrupted / "resumed-rank0.pt")
    assert resumed["started"] == 2 and len(resumed["loss"]) == 1
    for name, value in full["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, rtol=1e-6, atol=1e-7)  # momentum restored too
    assert resumed["loss"][0] == pytest.approx(full["loss"][2], rel=1e-6)
    assert resumed["resumed_loss"] == pytest.approx([full["loss"][1]], rel=1e-6)  # epoch 1's, kept with the progress

    # Two ranks cannot pick up a single rank's ZeRO partitions.
    with pytest.raises(Exception) as caught:  # the CheckpointError comes back inside mp.spawn's error
        _spawn(_worker, 2, str(interrupted), 1, 4, "two")
    assert "CheckpointError" in str(caught.value) and "saved by 1 rank(s) under ZeRO stage 1" in str(caught.value)

    # Nor does a run without DeepSpeed start the stage over beside them (the stage key, and so the
    # directory, is the same with and without DeepSpeed): it stops and says how to resume.
    with pytest.raises(Exception) as caught:
        _spawn(_worker, 1, str(interrupted), -1, 3, "plain")
    assert "progress.json holds this stage's progress saved with DeepSpeed, and this run has deepspeed.enabled=false" in str(caught.value)
    assert "--set deepspeed.enabled=true to resume" in str(caught.value)
    assert not (interrupted / "stage" / "progress.pt").exists() and not (interrupted / "plain-rank0.pt").exists()


@requires_deepspeed
def test_zero_run_refuses_progress_saved_without_deepspeed(tmp_path, capsys):
    _train(1, tmp_path / "stage" / "progress.pt", None, epochs=2)  # a plain run interrupted after epoch 2
    with pytest.raises(Exception) as caught:
        _spawn(_worker, 1, str(tmp_path), 1, 3, "zero")
    message = str(caught.value)
    assert "progress.pt holds this stage's progress saved without DeepSpeed, and this run has deepspeed.enabled=true" in message
    assert "--set deepspeed.enabled=false to resume" in message and f"delete {tmp_path / 'stage' / 'progress.pt'}" in message
    assert not (tmp_path / "stage" / "deepspeed-progress").exists()


def test_plan_says_a_partial_stage_resumes_only_in_its_format(tmp_path, capsys):
    from ltscale.config import apply_overrides
    from ltscale.stages.pipeline import plan_pipeline
    from tests.test_pipeline import tiny

    config = tiny("ce", tmp_path)
    stage = plan_pipeline(config)[0].directory
    (stage / "deepspeed-progress").mkdir(parents=True)
    (stage / "deepspeed-progress" / "progress.json").write_text("{}")
    assert plan_pipeline(config)[0].progress == {"deepspeed"}
    zero = apply_overrides(config, ["deepspeed.enabled=true"])
    assert plan_pipeline(zero)[0].key == plan_pipeline(config)[0].key  # one directory for both

    import ltscale.cli as cli

    for overrides, warned in (([], True), (["deepspeed.enabled=true"], False)):
        cli._print_plan(apply_overrides(config, overrides))
        out = capsys.readouterr().out
        assert "resume" in out
        assert ("resumes only with --set deepspeed.enabled=true" in out) == warned, out


DRIVER = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_pipeline import tiny
from ltscale.config import apply_overrides
from ltscale.stages.pipeline import run_pipeline
from ltscale.dist.runtime import detect

out = Path(sys.argv[1])
config = apply_overrides(tiny(sys.argv[2], out), sys.argv[3:])
result = run_pipeline(config)
report = {"run_id": result.run_id, "metrics": result.metrics(), "executed": result.executed}
(out / f"report{detect().rank}.json").write_text(json.dumps(report))
"""


def _run(tmp_path: Path, nproc: int, method: str, *overrides: str) -> list[dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    if nproc == 1:
        command = [sys.executable, str(driver), str(out), method, *overrides]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), str(driver), str(out), method, *overrides]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((out / f"report{r}.json").read_text()) for r in range(nproc)]


@requires_deepspeed
def test_lws_pipeline_under_zero_2_on_two_ranks(tmp_path):
    """A teacher then a classifier re-balanced on its frozen features (only the LWS scales train),
    both stages under ZeRO stage 2 on two torchrun ranks: one tracked run, the same metrics on
    both ranks."""
    reports = _run(tmp_path, 2, "lws", "deepspeed.enabled=true", "deepspeed.zero_stage=2")
    assert reports[0]["executed"] == ["teacher", "lws"]
    assert reports[0]["run_id"] == reports[1]["run_id"]
    assert reports[0]["metrics"] == reports[1]["metrics"] and "test/top1" in reports[0]["metrics"]


@requires_deepspeed
def test_single_process_pipeline_refuses_the_fast_step_with_deepspeed(tmp_path):
    from ltscale.config import apply_overrides
    from tests.test_pipeline import tiny

    with pytest.raises(ValueError, match="cannot run under deepspeed"):
        apply_overrides(tiny("ce", tmp_path), ["deepspeed.enabled=true", "step=fast"])
    reports = _run(tmp_path, 1, "ce", "deepspeed.enabled=true", "deepspeed.zero_stage=1")
    assert reports[0]["executed"] == ["teacher"] and reports[0]["metrics"]["test/top1"] >= 0

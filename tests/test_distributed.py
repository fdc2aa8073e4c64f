"""Multi-process training on CPU (gloo): the launcher environment, evaluation shards, DDP's
update against a single process's, and whole pipelines under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from ltscale.data import ShardSampler, build_loader
from ltscale.data.base import ArraySplit, DatasetBundle, Normalization
from ltscale.data.config import LoaderConfig, SamplerConfig
from ltscale.dist import runtime
from ltscale.dist.ports import free_port
from ltscale.engine.evaluate import evaluate
from ltscale.engine.schedule import OptimConfig
from ltscale.engine.trainer import Trainer
from ltscale.losses.modules import ClassificationLoss, LossConfig

ROOT = Path(__file__).resolve().parents[1]


# --- the launcher's environment -------------------------------------------------------------------

def test_single_process_without_launcher_variables():
    assert runtime.detect({}) == runtime.DistEnv()
    assert not runtime.detect({"PATH": "/bin"}).distributed


def test_torchrun_environment():
    env = runtime.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29511"})
    assert env == runtime.DistEnv(rank=3, world_size=4, local_rank=1, master_addr="node7", master_port=29511, source="torchrun")
    assert env.distributed and not env.is_main


def test_slurm_step_environment():
    env = runtime.detect({
        "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[07-09,12]", "SLURM_NTASKS": "8",
    })
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu07"
    assert env.master_port == 20000 + 4242  # every task derives the same port from the job id


def test_concurrent_steps_of_a_slurm_job_rendezvous_on_their_own_ports():
    """Two seeds as two srun steps of one job on one node: the same port made one step fail with
    EADDRINUSE and the other join the first step's store. The tasks of a step still agree."""
    def port(job: int, step: int, rank: int) -> int:
        return runtime.detect({"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(rank),
                               "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step), "SLURM_STEP_NODELIST": "n1"}).master_port

    assert port(4242, 0, 0) == port(4242, 0, 1) and port(4242, 1, 0) == port(4242, 1, 1)
    assert port(4242, 0, 0) != port(4242, 1, 0)
    # Neighbouring job ids (submitted one after another, running together) do not meet either.
    ports = [port(job, step, 0) for job in range(4240, 4250) for step in range(4)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port(job, step, 0) < 40000 for job in (0, 19999, 39999, 2**31) for step in (0, 3, 4294967294))


def test_slurm_batch_script_is_one_process():
    # The batch step sees the job's task count but is a single process: it must not wait for peers.
    env = runtime.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert env == runtime.DistEnv()


@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("n[1-4]", "n1"), ("gpu[007-009],cpu1", "gpu007"),
                                             ("a-b[3,5]", "a-b3"), ("host1,host2", "host1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert runtime.first_host(nodelist) == first


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "0"}, "WORLD_SIZE not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
])
def test_broken_launcher_environment_is_named(environ, message):
    with pytest.raises(runtime.DistributedEnvError, match=message):
        runtime.detect(environ)


@pytest.mark.parametrize("visible, local_rank, expected", [
    (4, 2, "cuda:2"),  # torchrun / srun --gpus-per-node: every process sees the node's GPUs
    (1, 0, "cuda:0"),
    (1, 3, "cuda:0"),  # srun --gpus-per-task 1: each task sees only its own GPU, as device 0
    (2, 3, None),      # neither layout: refused, with what this process sees
])
def test_each_rank_takes_its_own_gpu(monkeypatch, visible, local_rank, expected):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    env = runtime.DistEnv(rank=local_rank, world_size=8, local_rank=local_rank, source="slurm")
    if expected is None:
        with pytest.raises(runtime.DistributedEnvError, match=f"local rank 3 has no GPU of its own: this process sees {visible} GPUs"):
            runtime.device_for(env, "auto")
        return
    assert str(runtime.device_for(env, "auto")) == expected
    assert str(runtime.device_for(env, "cuda")) == expected
    assert [str(d) for d in chosen] == [expected] * 2
    if visible > 1:
        assert str(runtime.device_for(env, "cuda:1")) == "cuda:1"  # an explicit index is the user's choice
    else:  # ...among the GPUs this process sees
        with pytest.raises(ValueError, match=r"device='cuda:1': this process sees 1 GPU\(s\) \(indices 0..0"):
            runtime.device_for(env, "cuda:1")


def test_ranks_sharing_a_gpu_are_found():
    placements = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n1", "GPU-a"), ("n2", "GPU-a")]
    assert runtime.shared_gpus(placements) == [[0, 3], [2, 4]]  # same UUID on another host is another GPU
    assert runtime.shared_gpus(placements[:3]) == []


def test_fast_step_refuses_several_processes():
    from ltscale.engine.fast_step import resolve_step

    assert resolve_step("auto", torch.device("cuda"), world_size=2) == "eager"
    with pytest.raises(ValueError, match="step=fast runs one process"):
        resolve_step("fast", torch.device("cuda"), world_size=2)


# --- evaluation shards ------------------------------------------------------------------------------

@pytest.mark.parametrize("size,world", [(10, 3), (7, 2), (2, 4), (64, 4)])
def test_shard_sampler_covers_every_image_exactly_once(size, world):
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(ShardSampler(size, r, world)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --- helpers run in spawned gloo processes ----------------------------------------------------------

def _init(rank: int, world: int, port: int) -> None:
    """Join as the product does: its exit handler lets gloo's threads finish before the interpreter
    goes (a worker ending without it aborted now and then, SIGABRT after all its work was done)."""
    torch.set_num_threads(1)
    runtime.ensure_process_group(runtime.DistEnv(rank=rank, world_size=world, local_rank=rank, master_port=port),
                                 torch.device("cpu"))


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def _dataset(n: int = 48, classes: int = 4, seed: int = 0) -> DatasetBundle:
    rng = np.random.default_rng(seed)
    targets = np.sort(rng.integers(0, classes, size=n))
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    images[..., 0] = np.clip(images[..., 0] // 2 + targets[:, None, None] * 40, 0, 255)  # learnable signal
    split = ArraySplit(name="train", targets=targets, num_classes=classes, images=images)
    test = ArraySplit(name="test", targets=targets[::-1].copy(), num_classes=classes, images=images[::-1].copy())
    return DatasetBundle(name="toy", train=split, test=test, normalization=Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                         image_size=8)


class LinearTask(nn.Module):
    """A batch-norm-free task: DDP over W ranks must then equal one process on the whole batch.
    ``loss``: plain CE, or LDAM-DRW (a loss whose per-batch normaliser, the sum of the DRW weights,
    differs between a rank's batch and the global one) re-weighting from the second epoch."""

    def __init__(self, classes: int, loss: str = "ce", class_counts: np.ndarray | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.network = nn.Linear(3 * 8 * 8, classes)
        self.unused = nn.Linear(2, 2)  # requires grad but is not trained: DDP must not wait for it
        self.loss = None
        if loss == "ldam_drw":
            assert class_counts is not None
            config = LossConfig(kind="ldam", drw_epoch=1, ldam_scale=2.0, drw_beta=0.9)
            self.loss = ClassificationLoss(config, class_counts, torch.device("cpu"))

    def set_epoch(self, epoch: int) -> None:
        if self.loss is not None:
            self.loss.set_epoch(epoch)

    def trainable_parameters(self):
        return list(self.network.parameters())

    def forward(self, batch):
        logits = self.network(batch["image"].flatten(1))
        loss = F.cross_entropy(logits, batch["target"]) if self.loss is None else self.loss(logits, batch["target"])
        return {"loss": loss, "logits": logits, "target": batch["target"]}


def _train(bundle: DatasetBundle, batch_size: int, progress: Path, loss: str = "ce") -> tuple[nn.Module, list]:
    task = LinearTask(bundle.num_classes, loss, bundle.train.class_counts())
    loader = build_loader(bundle.train, bundle, train=True, augment=False, batch_size=batch_size, loader=LoaderConfig(),
                          device=torch.device("cpu"), seed=3, sampler=SamplerConfig(kind="class_balanced", samples_per_class=2))
    optim = OptimConfig(epochs=3, batch_size=16, lr=0.5, warmup_epochs=1, milestones=(2,), decay_factors=(0.1,), weight_decay=1e-3)
    seen = []
    trainer = Trainer(task, loader, optim, torch.device("cpu"), "fp32", progress, "toy", on_epoch_end=seen.append)
    trainer.fit()
    return task, seen


def _ddp_worker(rank: int, world: int, port: int, out: str, loss: str) -> None:
    import warnings

    _init(rank, world, port)
    bundle = _dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # DDP built with the current torch's arguments
        task, seen = _train(bundle, 16 // world, Path(out) / "progress.pt", loss)
    torch.save({"state": task.network.state_dict(), "loss": [m.loss for m in seen], "top1": [m.top1 for m in seen]},
               Path(out) / f"rank{rank}.pt")
    runtime.leave_process_group()  # drains gloo's threads first: a bare destroy aborted now and then


@pytest.mark.parametrize("loss", ["ce", "ldam_drw"])
def test_ddp_update_equals_one_process_on_the_global_batch(tmp_path, loss):
    single, seen = _train(_dataset(), 16, tmp_path / "single.pt", loss)
    _spawn(_ddp_worker, 2, str(tmp_path), loss)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in single.network.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6)
    # The epoch metrics are the global ones (summed over ranks), the same a single process reports.
    np.testing.assert_allclose(ranks[0]["loss"], [m.loss for m in seen], rtol=1e-5)
    np.testing.assert_allclose(ranks[1]["top1"], [m.top1 for m in seen], rtol=1e-6)
    assert (tmp_path / "progress.pt").is_file()  # written by rank 0


class BatchNormTask(nn.Module):
    """A task with batch norm: each rank's running statistics follow its own batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.network = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))

    def set_epoch(self, epoch: int) -> None:
        pass

    def trainable_parameters(self):
        return list(self.network.parameters())

    def forward(self, batch):
        logits = self.network(batch["image"])
        return {"loss": F.cross_entropy(logits, batch["target"]), "logits": logits, "target": batch["target"]}


class _RankBatches(list):
    batch_size = 4

    def set_epoch(self, epoch: int) -> None:
        pass


def _batch_norm_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    generator = torch.Generator().manual_seed(rank)  # each rank's images differ, so would its statistics
    batches = _RankBatches({"image": torch.randn(4, 6, generator=generator) * (1 + rank) + rank,
                            "target": torch.tensor([0, 1, 2, 0])} for _ in range(3))
    task = BatchNormTask()
    optim = OptimConfig(epochs=2, batch_size=4 * world, lr=0.1, warmup_epochs=0, milestones=(), decay_factors=())
    seen = []
    Trainer(task, batches, optim, torch.device("cpu"), "fp32", Path(out) / "progress.pt", "bn", step="eager",
            on_epoch_end=lambda metrics: seen.append({k: v.clone() for k, v in task.network.named_buffers()})).fit()
    torch.save(seen, Path(out) / f"bn{rank}.pt")
    runtime.leave_process_group()


def test_batch_norm_statistics_are_the_same_on_every_rank_after_each_epoch(tmp_path):
    """DDP here does not broadcast buffers each forward (MoCo's queue would go every step); the
    trainer sends rank 0's once an epoch, so every rank evaluates and saves the same model."""
    _spawn(_batch_norm_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for epoch, (first, second) in enumerate(zip(*ranks)):
        for name in first:
            assert torch.equal(first[name], second[name]), f"{name} differs between ranks after epoch {epoch}"
    assert not torch.equal(ranks[0][0]["1.running_mean"], torch.zeros(5))  # the statistics did move


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    bundle = _dataset(n=37)  # 37 test images: shards of 13, 12, 12 on 3 ranks
    task = LinearTask(bundle.num_classes)
    loader = build_loader(bundle.test, bundle, train=False, batch_size=5, loader=LoaderConfig(), device=torch.device("cpu"), seed=0)
    result = evaluate(task.network_as_classifier(), loader, bundle.train.class_counts(), ["cls"], torch.device("cpu"))["cls"]
    rows = torch.arange(rank, 37, world, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])
    from ltscale.dist import gather

    gather.GATHER_CHUNK_BYTES = 5 * rows[0].numel() * rows.element_size() * world  # 5 rows a rank: chunks of 5, 5, 3
    collectives: list[int] = []  # bytes each collective delivers to every rank, all ranks' rows together
    plain_all_gather = gather.all_gather_no_grad

    def counting_all_gather(piece):
        gathered = plain_all_gather(piece)
        collectives.append(gathered.numel() * gathered.element_size())
        return gathered
    gather.all_gather_no_grad = counting_all_gather
    on_main = gather.gather_strided_rows_to_main(rows, 37)
    gather.all_gather_no_grad = plain_all_gather
    # A split smaller than the number of ranks (2 images, 3 ranks): rank 2's shard is empty, and it
    # still counts with the others (tau-norm's search over a validation split does this).
    from ltscale.engine.evaluate import evaluate_head_on_features, extract_features
    from ltscale.models.heads import HeadSpec
    from ltscale.models.network import ModelConfig, Network

    torch.manual_seed(0)
    network = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", bundle.num_classes)}, "cls")
    small = ArraySplit(name="val", targets=bundle.test.targets[:2].copy(), num_classes=bundle.num_classes,
                       images=bundle.test.images[:2].copy())
    small_loader = build_loader(small, bundle, train=False, batch_size=5, loader=LoaderConfig(), device=torch.device("cpu"), seed=0)
    features, targets = extract_features(network, small_loader, torch.device("cpu"))
    small_top1 = evaluate_head_on_features(network.heads["cls"], features, targets, bundle.train.class_counts(),
                                           torch.device("cpu")).top1
    torch.save({"top1": result.top1, "per_class": result.per_class_top1, "count": result.per_class_count, "on_main": on_main,
                "collectives": collectives, "chunk_bytes": gather.GATHER_CHUNK_BYTES,
                "small_rows": len(features), "small_top1": small_top1}, Path(out) / f"eval{rank}.pt")
    runtime.leave_process_group()  # drains gloo's threads first: a bare destroy aborted now and then


class _Classifier(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, images, heads=("cls",)):
        return {"cls": self.linear(images.flatten(1))}


LinearTask.network_as_classifier = lambda self: _Classifier(self.network)  # type: ignore[attr-defined]


def test_sharded_evaluation_and_gather_equal_one_process(tmp_path):
    bundle = _dataset(n=37)
    task = LinearTask(bundle.num_classes)
    loader = build_loader(bundle.test, bundle, train=False, batch_size=5, loader=LoaderConfig(), device=torch.device("cpu"), seed=0)
    expected = evaluate(task.network_as_classifier(), loader, bundle.train.class_counts(), ["cls"], torch.device("cpu"))["cls"]
    from ltscale.engine.evaluate import evaluate_head_on_features, extract_features
    from ltscale.models.heads import HeadSpec
    from ltscale.models.network import ModelConfig, Network

    torch.manual_seed(0)
    network = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", bundle.num_classes)}, "cls")
    small = ArraySplit(name="val", targets=bundle.test.targets[:2].copy(), num_classes=bundle.num_classes,
                       images=bundle.test.images[:2].copy())
    features, targets = extract_features(network, build_loader(small, bundle, train=False, batch_size=5, loader=LoaderConfig(),
                                                               device=torch.device("cpu"), seed=0), torch.device("cpu"))
    small_top1 = evaluate_head_on_features(network.heads["cls"], features, targets, bundle.train.class_counts(),
                                           torch.device("cpu")).top1
    _spawn(_eval_worker, 3, str(tmp_path))
    for rank in range(3):
        got = torch.load(tmp_path / f"eval{rank}.pt", weights_only=False)
        assert got["top1"] == pytest.approx(expected.top1, abs=1e-12)
        np.testing.assert_array_equal(got["count"], expected.per_class_count)  # each image counted once
        np.testing.assert_allclose(got["per_class"], expected.per_class_top1)
        every_row = torch.arange(37, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])
        assert got["small_rows"] == (1 if rank < 2 else 0)
        assert got["small_top1"] == pytest.approx(small_top1, abs=1e-12)
        # Too large to hold twice on every rank (soft labels): rank 0 alone assembles them, in chunks.
        if rank == 0:
            assert got["on_main"].device == torch.device("cpu")
            torch.testing.assert_close(got["on_main"], every_row, rtol=0, atol=0)
        else:
            assert got["on_main"] is None
        # Each collective stays within the budget counted over all ranks (37 rows of 2 floats, 3 ranks).
        assert got["collectives"] == [5 * 3 * 8, 5 * 3 * 8, 3 * 3 * 8]
        assert max(got["collectives"]) <= got["chunk_bytes"]


def _shared_check_worker(rank: int, world: int, port: int, directories: list[str], rounds: int, out: str) -> None:
    from ltscale.stages.pipeline import _check_shared_directory

    _init(rank, world, port)
    outcome = "ok"
    for _ in range(rounds):
        try:
            _check_shared_directory(Path(directories[rank]))
        except RuntimeError as error:
            outcome = str(error)
            break
    Path(out, f"rank{rank}-{port}.txt").write_text(outcome)


def test_shared_directory_check_of_concurrent_pipelines_on_one_output_dir(tmp_path):
    """A sweep's pipelines start together on one output_dir: their checks must not see (or delete)
    each other's marker. Two 2-rank groups, 40 checks each, at the same time."""
    shared = tmp_path / "out"
    shared.mkdir()
    context = mp.get_context("spawn")
    first, second = free_port(), free_port()
    while second == first:  # two draws coincide about once in 14,000
        second = free_port()
    processes = [context.Process(target=_shared_check_worker, args=(rank, 2, port, [str(shared)] * 2, 40, str(tmp_path)))
                 for port in (first, second) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    outcomes = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert outcomes == ["ok"] * 4
    assert list(shared.iterdir()) == []  # every marker removed


def test_shared_directory_check_names_the_rank_that_sees_another_directory(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _spawn(_shared_check_worker, 2, [str(tmp_path / "a"), str(tmp_path / "b")], 1, str(tmp_path))
    outcomes = [path.read_text() for path in sorted(tmp_path.glob("rank*.txt"))]
    assert len(outcomes) == 2 and all("rank(s) [1] do not see rank 0's files" in o for o in outcomes), outcomes


# --- whole pipelines under torchrun -----------------------------------------------------------------

DRIVER = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_pipeline import tiny
from ltscale.stages.pipeline import run_pipeline
from ltscale.dist.runtime import detect

out = Path(sys.argv[1])
rank = detect().rank
report = {}
for method in sys.argv[2:]:
    if method == "ssd-moco":  # SSD's large-data teacher: MoCo v2 with a global key queue and shuffled BN
        import dataclasses
        from configs.methods import METHODS
        from ltscale.config import apply_overrides
        from tests.test_pipeline import TINY
        config = dataclasses.replace(tiny("ssd", out), name="tiny/ssd-moco",
                                     stages=METHODS["ssd"](dataclasses.replace(TINY, ssd_moco_weight=1.0, ssd_self_supervision=0.0)))
        config = apply_overrides(config, ["stages.teacher.moco.queue_size=64", "stages.teacher.moco.projection_dim=16"])
    else:
        config = tiny(method, out)
    result = run_pipeline(config)
    report[method] = {"run_id": result.run_id, "metrics": result.metrics(), "executed": result.executed, "cached": result.cached,
                      "outputs": {n: str(o.directory) for n, o in result.outputs.items()}}
(out / f"report{rank}.json").write_text(json.dumps(report))
"""


def _torchrun(tmp_path: Path, methods: list[str], nproc: int = 2) -> list[dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # Python stacks of every thread if a rank dies of a signal (a rare SIGABRT under gloo was seen
    # once in CI with nothing but "terminate called without an active exception" to go on).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "TORCH_SHOW_CPP_STACKTRACES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(driver), str(tmp_path / "out"), *methods]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-20000:]
    return [json.loads((tmp_path / "out" / f"report{r}.json").read_text()) for r in range(nproc)]


def test_pipelines_under_torchrun_match_across_ranks_and_one_process(tmp_path):
    import mlflow

    from ltscale.engine.checkpoint import load_checkpoint
    from ltscale.stages.context import load_model
    from tests.test_pipeline import tiny

    reports = _torchrun(tmp_path, ["ssd", "dive"])  # two pipelines in a row share one process group
    for method, stages in {"ssd": 5, "dive": 3}.items():
        first, second = reports[0][method], reports[1][method]
        assert len(first["executed"]) == stages and first["cached"] == []
        assert first["run_id"] and second["run_id"] == first["run_id"]  # every rank reports rank 0's record
        assert second["metrics"] == first["metrics"]

    # One MLflow record, written by rank 0 alone: a parent per pipeline and a child per stage.
    config = tiny("ssd", tmp_path / "out")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ltscale")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_id for r in parents) == sorted(reports[0][m]["run_id"] for m in ("ssd", "dive"))
    assert len(runs) == 2 + 5 + 3 and all(r.info.status == "FINISHED" for r in runs)

    # The sharded evaluation equals a single process evaluating the saved model.
    bundle = __import__("ltscale.data", fromlist=["build_dataset"]).build_dataset(config.data)
    final = Path(reports[0]["ssd"]["outputs"]["student_lws"])
    network = load_model(final / "model.pt", torch.device("cpu"))
    from ltscale.data import build_loader as loader_of

    test_loader = loader_of(bundle.test, bundle, train=False, batch_size=512, loader=LoaderConfig(), device=torch.device("cpu"), seed=0)
    single = evaluate(network, test_loader, bundle.train.class_counts(), ["hard"], torch.device("cpu"))["hard"]
    assert reports[0]["ssd"]["metrics"]["test/top1"] == pytest.approx(round(100 * single.top1, 4), abs=1e-9)
    assert reports[0]["ssd"]["metrics"]["test/few"] == pytest.approx(round(100 * single.few, 4), abs=1e-9)

    # The gathered soft labels are the teacher's logits on every training image, in order.
    teacher = load_model(Path(reports[0]["ssd"]["outputs"]["teacher_lws"]) / "model.pt", torch.device("cpu"))
    train_loader = loader_of(bundle.train, bundle, train=False, batch_size=512, loader=LoaderConfig(), device=torch.device("cpu"), seed=0)
    teacher.eval()
    with torch.no_grad():
        expected = torch.cat([teacher(b["image"], heads=(teacher.predict_head,))[teacher.predict_head] for b in train_loader])
    stored = load_checkpoint(Path(reports[0]["ssd"]["outputs"]["soft_labels"]) / "soft_labels.pt", kind="ltscale.soft_labels")["logits"]
    torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-4)

    # DiVE's virtual examples: each rank's sums over its shard, added, equal one process's sweep.
    from ltscale.stages.config import VirtualExamplesConfig
    from ltscale.stages.virtual_examples import sweep

    dive = reports[0]["dive"]["outputs"]
    recorded = json.loads((Path(dive["virtual_examples"]) / "virtual_examples.json").read_text())
    defaults = VirtualExamplesConfig(source="teacher")
    chosen, rows = sweep(load_model(Path(dive["teacher"]) / "model.pt", torch.device("cpu")), train_loader, torch.device("cpu"),
                         None, bundle.train.class_counts(), defaults.temperatures, defaults.powers)
    assert recorded["chosen"] == {"temperature": chosen["temperature"], "power": chosen["power"]}
    assert len(recorded["sweep"]) == len(rows) == len(defaults.temperatures) * len(defaults.powers)
    for got, want in zip(recorded["sweep"], rows):
        assert (got["temperature"], got["power"]) == (want["temperature"], want["power"])
        np.testing.assert_allclose(got["distribution"], want["distribution"], rtol=1e-5)
        assert sum(got["distribution"]) == pytest.approx(len(bundle.train), rel=1e-6)  # one unit of mass per image (fp32 softmax)

    # Rerun: rank 0's store decides, and every rank skips every stage.
    again = _torchrun(tmp_path, ["ssd"])
    for report in again:
        assert report["ssd"]["executed"] == [] and len(report["ssd"]["cached"]) == 5
        assert report["ssd"]["metrics"] == reports[0]["ssd"]["metrics"]


def test_moco_teacher_pipeline_under_torchrun(tmp_path):
    from ltscale.engine.checkpoint import load_checkpoint

    reports = _torchrun(tmp_path, ["ssd-moco"])
    first, second = reports[0]["ssd-moco"], reports[1]["ssd-moco"]
    assert first["executed"] == ["teacher", "teacher_lws", "soft_labels", "student", "student_lws"]
    assert second["metrics"] == first["metrics"] and 0 <= first["metrics"]["test/top1"] <= 100
    # The saved teacher is the classifier alone (the MoCo parts stay in its progress checkpoint),
    # whose queue rank 0 filled with keys gathered from both ranks.
    progress = load_checkpoint(Path(first["outputs"]["teacher"]) / "progress.pt", kind="ltscale.progress")
    assert (progress["network"]["moco.queue_labels"] >= 0).all()


def _two_ranks_fail(driver: Path, out: Path) -> subprocess.CompletedProcess:
    """``driver`` (given ``out``) run as two ranks under torchrun, expected to fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(driver), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_batch_size_that_does_not_split_over_ranks_is_refused_before_anything_trains(tmp_path):
    # The second stage's batch is the one that does not split: refused before the teacher trains.
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, dataclasses\nfrom pathlib import Path\nfrom tests.test_pipeline import tiny\n"
        "from ltscale.config import apply_overrides\nfrom ltscale.stages.pipeline import run_pipeline\n"
        "run_pipeline(apply_overrides(tiny('lws', Path(sys.argv[1])), ['stages.lws.optim.batch_size=63']))\n"
    )
    done = _two_ranks_fail(driver, tmp_path / "out")
    assert done.returncode != 0
    assert "stages.lws.optim.batch_size=63 does not split over 2 processes" in done.stderr
    assert not list((tmp_path / "out").glob("**/progress.pt")) and not list((tmp_path / "out").glob("**/model.pt"))


def test_a_tracking_store_that_fails_after_a_stage_is_stored_stops_every_rank(tmp_path):
    """Rank 0 alone records in MLflow: when that fails after the stage is stored, the other ranks
    stop with it instead of waiting in the next collective until their timeout."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nfrom pathlib import Path\nimport torch\ntorch.set_num_threads(1)\n"
        "from mlflow.exceptions import MlflowException\nfrom tests.test_pipeline import tiny\n"
        "from ltscale.dist.runtime import detect\nfrom ltscale.stages import context\n"
        "from ltscale.stages.pipeline import run_pipeline\n"
        "def send(self):\n"
        "    if detect().rank == 0:\n"
        "        raise MlflowException('simulated outage: max retries exceeded')\n"
        "context.StageRecord.send = send\n"
        "run_pipeline(tiny('ce', Path(sys.argv[1])))\n"
    )
    done = _two_ranks_fail(driver, tmp_path / "out")
    assert done.returncode != 0
    assert "simulated outage" in done.stderr  # rank 0's own error
    assert "stage teacher: rank 0 could not record the stage's results in MLflow" in done.stderr  # rank 1's
    assert len(list((tmp_path / "out").glob("store/teacher-*/manifest.json"))) == 1  # the work is kept


def test_cli_run_under_torchrun_reports_once(tmp_path):
    from tests.test_launch import TINY_RECIPE_OVERRIDES

    sets = [arg for item in [*TINY_RECIPE_OVERRIDES, f"output_dir={tmp_path / 'out'}"] for arg in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "ltscale.cli", "run", "demo/ce", "--no-progress", *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("demo/ce") == 1, done.stdout  # rank 0 prints the table; rank 1 stays quiet
    assert done.stderr.count("the lr never decays") == 1, done.stderr  # 3 epochs keep the recipe's milestones: warned once


EXIT_DRIVER = r"""
import torch, torch.distributed as dist
from ltscale.dist import runtime
torch.set_num_threads(1)
runtime.ensure_process_group(runtime.detect(), torch.device("cpu"))
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 10))
for _ in range(3):
    model(torch.randn(32, 64)).square().mean().backward()
for _ in range(20):  # collectives still in gloo's worker threads when the interpreter shuts down
    dist.all_reduce(torch.randn(1000), async_op=True)
"""


def test_gloo_ranks_exit_cleanly_with_collectives_in_flight(tmp_path):
    """Gloo's workers drop finished collectives' tensors under the GIL; during finalization that
    aborted the process ("terminate called without an active exception") in 4 of 6 runs of this
    driver before the exit hook let them finish first."""
    driver = tmp_path / "exit_driver.py"
    driver.write_text(EXIT_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(free_port()), str(driver)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


def _bad_image_budget_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    from ltscale.data.config import DataConfig
    from ltscale.data.errors import DatasetError
    from ltscale.data.image_list import IMAGENET_NORMALIZATION, build_image_list_dataset
    from ltscale.data.loaders.files import FileLoader
    from tests.test_image_list import IMAGE_SIZE

    _init(rank, world, port)
    split = build_image_list_dataset(DataConfig(dataset="imagenet_lt", root=root, image_size=IMAGE_SIZE)).train
    loader = FileLoader(split, train=True, batch_size=1, sampler=ShardSampler(len(split), rank, world), image_size=IMAGE_SIZE,
                        normalization=IMAGENET_NORMALIZATION, num_workers=0, max_bad_image_fraction=0.1, drop_last=False,
                        device="cpu")
    served = [int(i) for batch in loader for i in batch["index"]]  # one bad file per rank: within each rank's count
    try:
        loader.check_bad_images_across_ranks()
        outcome = "ok"
    except DatasetError as error:
        outcome = str(error)
    Path(out, f"budget{rank}.txt").write_text(f"{len(served)}\n{outcome}")


def test_bad_image_budget_counts_every_ranks_files(tmp_path):
    """10 images, 10 % allowed (1 file); ranks 0 and 1 each meet one of the two bad files."""
    from tests.test_image_list import _make_tree, _truncate

    data = _make_tree(tmp_path / "tree")
    lines = (Path(data.root) / "ImageNet_LT_train.txt").read_text().split()[::2]
    bad = [Path(data.root) / lines[i] for i in (2, 7)]  # round-robin shards: index 2 on rank 0, 7 on rank 1
    for path in bad:
        _truncate(path)
    _spawn(_bad_image_budget_worker, 2, data.root, str(tmp_path))
    for rank in range(2):
        served, outcome = (tmp_path / f"budget{rank}.txt").read_text().split("\n", 1)
        assert served == "5"
        assert "2 images of imagenet_lt/train cannot be decoded, more than the 1 allowed" in outcome, outcome
        assert str(bad[0]) in outcome and str(bad[1]) in outcome


def _file_check_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import types

    from ltscale.data import image_list
    from ltscale.data.config import DataConfig
    from ltscale.stages import pipeline
    from tests.test_image_list import IMAGE_SIZE

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # as torchrun on one node
    _init(rank, world, port)
    checked = []
    real = image_list.check_files_exist
    image_list.check_files_exist = lambda root, paths, source: (checked.append(source), real(root, paths, source))[1]
    config = types.SimpleNamespace(data=DataConfig(dataset="imagenet_lt", root=root, image_size=IMAGE_SIZE))
    try:
        outcome = f"ok {len(pipeline._build_dataset_checked_per_node(config).train)}"
    except Exception as error:  # noqa: BLE001
        outcome = f"{type(error).__name__}: {error}"
    Path(out, f"check{rank}-{len(list(Path(out).glob(f'check{rank}-*')))}.json").write_text(json.dumps([len(checked), outcome]))


def test_image_files_are_checked_once_per_node_and_every_rank_gets_the_verdict(tmp_path):
    """Local rank 0 lists the image folders (each node its own, for node-local copies); the other
    ranks of the node do not, and all raise the same error when a file is missing."""
    from tests.test_image_list import _make_tree

    data = _make_tree(tmp_path / "tree")
    _spawn(_file_check_worker, 2, data.root, str(tmp_path))
    first = [json.loads((tmp_path / f"check{rank}-0.json").read_text()) for rank in range(2)]
    assert first[0] == [2, "ok 10"] and first[1] == [0, "ok 10"]  # train and test lists, checked by rank 0 alone
    missing = Path(data.root) / (Path(data.root) / "ImageNet_LT_train.txt").read_text().split()[4]
    missing.unlink()
    _spawn(_file_check_worker, 2, data.root, str(tmp_path))
    second = [json.loads((tmp_path / f"check{rank}-1.json").read_text()) for rank in range(2)]
    assert second[1][0] == 0
    for _, outcome in second:
        assert outcome.startswith("DatasetError: 1 of 10 files listed in") and missing.name in outcome, outcome
    assert second[1][1].endswith(f"(seen by rank 0 on {socket.gethostname()})")

#!/usr/bin/env python
"""ResNet-32 training throughput on CIFAR-100-LT: the field's usual pipeline against ltscale's.

Usage (on a CUDA machine, from the repository root):

    python tools/bench/cifar_train.py --data cifar100_lt_if10.npz --epochs 3 --out results/bench_cifar_train.json
    python tools/bench/cifar_train.py --data cifar100_lt_if10.npz --ssd-pipeline --out results/bench_cifar_train.json

The two pipelines train the same network (``ltscale.models`` ResNet-32, one linear head, CE, SGD
lr 0.1 momentum 0.9 wd 2e-4, batch 128, constant lr) on the same long-tailed training arrays:

- ``usual``: what the public CIFAR-LT code (LDAM-DRW, BBN, SSD, DiVE) does: a torch ``Dataset``
  over the uint8 arrays with torchvision ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize`` per sample; ``DataLoader(num_workers=8, shuffle, pin_memory,
  persistent_workers)``; fp32 eager step; ``loss.item()`` every step (their AverageMeter) and
  ``cudnn.benchmark = True``, as in LDAM-DRW's ``cifar_train.py``.
- ``ltscale``: the :class:`~ltscale.engine.trainer.Trainer` over the GPU-resident
  ``TensorLoader`` with the fast step (bf16 autocast, channels_last, the whole step as a CUDA
  graph), including its per-epoch device-side metrics and atomic progress checkpoint.
- ``ltscale-eager`` (optional, ``--variants``): the same trainer with the plain eager step.

Timing: ``--warmup-epochs`` (default 4: DataLoader workers, cuDNN autotuning, and the capture of
every batch shape's graph, the partial last batch's in the fourth epoch) are run and not counted; each counted epoch is wall-clock between host synchronisations (so the whole
epoch's GPU work is in it), cross-checked with CUDA events. images/s = training images / s.
``--ssd-pipeline`` also times the whole ``cifar100-lt-if100/ssd`` pipeline end to end with
``run_pipeline`` (stages I-IV at the recipe's 200 epochs, evaluation and tracking included), with
per-stage times from its MLflow runs.

Writes JSON (GPU, versions, git commit, arguments, per-epoch times) to ``--out`` and prints a
markdown table. Needs CUDA unless ``--device cpu`` (a tiny smoke run: ``--limit 512``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ltscale.engine.fast_step import WARMUP_STEPS  # noqa: E402

VARIANTS = ("usual", "ltscale", "ltscale-eager")
TARGET_RATIO = 4.0  # the target on one H100: ltscale >= 4x the usual pipeline
TARGET_SSD_SECONDS = 180.0  # and the whole SSD pipeline on CIFAR-100-LT IF 100 in <= 3 minutes


class _Clock:
    """Wall-clock stamps taken after a host synchronisation, with CUDA events beside them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.walls: list[float] = []
        self.events: list[Any] = []

    def stamp(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            torch.cuda.synchronize(self.device)
            self.events.append(event)
        self.walls.append(time.perf_counter())

    def epochs(self) -> list[dict[str, float]]:
        out = []
        for i in range(1, len(self.walls)):
            entry = {"seconds": self.walls[i] - self.walls[i - 1]}
            if self.events:
                entry["gpu_seconds"] = self.events[i - 1].elapsed_time(self.events[i]) / 1000.0
            out.append(entry)
        return out


def load_data(args: argparse.Namespace):
    from ltscale.data import build_dataset
    from ltscale.data.base import ArraySplit
    from ltscale.data.config import DataConfig

    if not args.data:
        raise SystemExit("cifar_train: pass --data (the CIFAR-100 python archive or a .npz from tools/pack_cifar_npz.py)")
    bundle = build_dataset(DataConfig(dataset="cifar100_lt", root=args.data, imbalance_factor=args.imbalance_factor))
    if args.limit and args.limit < len(bundle.train):
        # A random subset (the LT split is ordered by class) for CPU smoke runs.
        keep = np.sort(np.random.default_rng(0).choice(len(bundle.train), args.limit, replace=False))
        train = bundle.train
        bundle.train = ArraySplit(name=f"{train.name}[{args.limit}]", targets=train.targets[keep],
                                  num_classes=train.num_classes, class_names=train.class_names, images=train.images[keep])
    return bundle


def resnet32(num_classes: int, device: torch.device):
    from ltscale.models.heads import HeadSpec
    from ltscale.models.network import ModelConfig, Network

    return Network(ModelConfig(arch="resnet32"), {"cls": HeadSpec("linear", num_classes)}, "cls").to(device)


def run_usual(bundle, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """torchvision transforms per sample in DataLoader workers, fp32 eager step."""
    import torchvision.transforms as T
    from PIL import Image

    class CifarArrays(torch.utils.data.Dataset):
        def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Callable) -> None:
            self.images, self.targets, self.transform = images, targets, transform

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, index: int):
            return self.transform(Image.fromarray(self.images[index])), int(self.targets[index])

    norm = bundle.normalization
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(norm.mean, norm.std)])
    loader = torch.utils.data.DataLoader(
        CifarArrays(bundle.train.images, bundle.train.targets, transform), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )
    torch.manual_seed(0)
    model = resnet32(bundle.num_classes, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    clock = _Clock(device)
    losses = []
    clock.stamp()
    for _ in range(args.warmup_epochs + args.epochs):
        model.train()
        total, count = 0.0, 0
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images, heads=("cls",))["cls"], targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)  # host sync every step, as the reference code's AverageMeter
            count += len(targets)
        losses.append(total / count)
        clock.stamp()
    del loader  # stops the persistent workers
    return {"epochs": clock.epochs(), "train_loss": losses}


def run_ltscale(bundle, args: argparse.Namespace, device: torch.device, step: str) -> dict[str, Any]:
    """The trainer over the TensorLoader with the ``step`` step."""
    from ltscale.data import LoaderConfig, build_loader
    from ltscale.engine.schedule import OptimConfig
    from ltscale.engine.trainer import Trainer
    from ltscale.losses.modules import ClassificationLoss, LossConfig
    from ltscale.stages.tasks import SupervisedTask

    loader = build_loader(bundle.train, bundle, train=True, batch_size=args.batch_size, loader=LoaderConfig(),
                          device=device, seed=0)
    torch.manual_seed(0)
    network = resnet32(bundle.num_classes, device)
    task = SupervisedTask(network, ClassificationLoss(LossConfig("ce"), bundle.train.class_counts(), device), 0.0, seed=0)
    optim = OptimConfig(epochs=args.warmup_epochs + args.epochs, batch_size=args.batch_size, lr=0.1, momentum=0.9,
                        weight_decay=2e-4, warmup_epochs=0, schedule="constant")
    clock = _Clock(device)
    metrics = []

    def on_epoch_end(epoch_metrics) -> None:
        metrics.append(epoch_metrics)
        clock.stamp()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(task, loader, optim, device, "auto", Path(tmp) / "progress.pt", f"bench-{step}",
                          on_epoch_end=on_epoch_end, step=step)
        clock.stamp()
        trainer.fit()
    return {"epochs": clock.epochs(), "train_loss": [m.loss for m in metrics],
            "trainer_epoch_seconds": [m.seconds for m in metrics], "step": trainer.step,
            "cuda_graphs": bool(trainer.fast_step is not None and trainer.fast_step.graphs)}


def summarise(raw: dict[str, Any], images: int, warmup_epochs: int) -> dict[str, Any]:
    counted = raw["epochs"][warmup_epochs:]
    seconds = [e["seconds"] for e in counted]
    summary = {"images_per_epoch": images, "counted_epochs": len(counted),
               "seconds_per_epoch": statistics.median(seconds), "images_per_second": images / statistics.median(seconds),
               "seconds_per_epoch_all": seconds, "warmup_seconds": [e["seconds"] for e in raw["epochs"][:warmup_epochs]]}
    if counted and "gpu_seconds" in counted[0]:
        summary["gpu_seconds_per_epoch"] = statistics.median(e["gpu_seconds"] for e in counted)
    return {**summary, **{k: v for k, v in raw.items() if k != "epochs"}}


def run_ssd_pipeline(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The whole SSD recipe, end to end, in a fresh output directory (nothing cached)."""
    from mlflow import MlflowClient

    from ltscale.stages.pipeline import run_pipeline

    with contextlib.ExitStack() as stack:
        output_dir = args.ssd_output_dir or stack.enter_context(tempfile.TemporaryDirectory())
        config, overrides = ssd_config(args, device, output_dir)
        started = time.perf_counter()
        result = run_pipeline(config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        client = MlflowClient(tracking_uri=result.tracking_uri)
        stages = {}
        for name, output in result.outputs.items():
            info = client.get_run(output.run_id).info
            stages[name] = {"seconds": (info.end_time - info.start_time) / 1000.0, "run_id": output.run_id,
                            "test_top1": output.manifest.get("metrics", {}).get("test/top1")}
    return {"recipe": args.ssd_recipe, "overrides": overrides[3:], "tracking_uri": result.tracking_uri, "seconds": seconds, "run_id": result.run_id,
            "executed": result.executed, "cached": result.cached, "stages": stages,
            "test_top1": result.metrics().get("test/top1"),
            # reused stages (a kept --ssd-output-dir) make it no end-to-end time
            "full_schedule": not args.ssd_epochs and not args.ssd_overrides and not result.cached}


def ssd_config(args: argparse.Namespace, device: torch.device, output_dir: str):
    """The SSD recipe with the benchmark's overrides, resolved and checked; and those overrides."""
    from ltscale.config import apply_overrides, get_recipe
    from reproduce_cifar import epoch_overrides

    config = get_recipe(args.ssd_recipe)
    # progress=true: off a terminal, a line per stage and epoch, so a run cut by a time limit still shows how far it got
    overrides = [f"output_dir={output_dir}", "progress=true", f"device={device}"]
    if args.tracking_store == "file":
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses its file store otherwise
        overrides.append(f"tracking.tracking_uri={(Path(output_dir) / 'mlruns').resolve().as_uri()}")
    if config.data.dataset.startswith("cifar"):
        overrides.append(f"data.root={Path(args.data).resolve()}")
    if args.ssd_epochs:
        overrides += epoch_overrides(config, args.ssd_epochs)
    overrides += args.ssd_overrides
    return apply_overrides(config, overrides), overrides


def preflight(args: argparse.Namespace, device: torch.device) -> None:
    """What would fail after the variants have been timed (losing their numbers), checked first."""
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a directory; name the JSON file to write")
    if args.ssd_pipeline:
        ssd_config(args, device, args.ssd_output_dir or tempfile.gettempdir())
        if args.tracking_store == "sqlite":
            from ltscale.tracking.mlflow_tracker import require_sqlalchemy

            require_sqlalchemy()


def environment(device: torch.device) -> dict[str, Any]:
    from ltscale.tracking import runtime_environment

    return {**runtime_environment(device), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"ResNet-32, CIFAR-100-LT IF {report['arguments']['imbalance_factor']:g}, batch {report['arguments']['batch_size']}, "
             f"{env.get('gpu', env['device'])}, torch {env['torch']} (CUDA {env['cuda']}), code {env['code_version']}", "",
             "| pipeline | images/s | s/epoch | x usual |", "|---|---:|---:|---:|"]
    usual = report["variants"].get("usual")
    for name, summary in report["variants"].items():
        ratio = f"{summary['images_per_second'] / usual['images_per_second']:.2f}" if usual else "—"
        lines.append(f"| {name} | {summary['images_per_second']:,.0f} | {summary['seconds_per_epoch']:.3f} | {ratio} |")
    if "ratio" in report:
        lines += ["", f"ltscale / usual: {report['ratio']:.2f}x (target >= {TARGET_RATIO:g}x on one H100)"]
    if "ssd_pipeline" in report:
        ssd = report["ssd_pipeline"]
        lines += ["", f"{ssd['recipe']} end to end: {ssd['seconds']:.1f} s (target <= {TARGET_SSD_SECONDS:g} s"
                  + ("" if ssd["full_schedule"] else "; NOT the full schedule")
                  + (f"; {len(ssd['cached'])} stage(s) reused from the store, not trained" if ssd["cached"] else "")
                  + f"), test top-1 {ssd['test_top1']}, "
                  f"MLflow run {ssd['run_id']}",
                  "", "| stage | s | test top-1 |", "|---|---:|---:|"]
        for name, stage in ssd["stages"].items():
            lines.append(f"| {name} | {stage['seconds']:.1f} | {stage['test_top1'] if stage['test_top1'] is not None else '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="CIFAR-100 python archive, its folder, or a .npz from tools/pack_cifar_npz.py")
    parser.add_argument("--epochs", type=int, default=3, help="counted epochs per pipeline (default 3)")
    # The fast step captures each batch shape after WARMUP_STEPS eager steps of it; the partial last
    # batch comes once an epoch, so its graph exists from epoch WARMUP_STEPS + 1 on: counting earlier
    # epochs would time eager steps and a capture (~4 % of an epoch at CIFAR scale).
    parser.add_argument("--warmup-epochs", type=int, default=WARMUP_STEPS + 1,
                        help=f"epochs run first and not counted (default {WARMUP_STEPS + 1}: every batch shape's graph captured)")
    parser.add_argument("--imbalance-factor", type=float, default=100.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the usual pipeline (default 8)")
    parser.add_argument("--variants", default="usual,ltscale",
                        help=f"comma-separated from {', '.join(VARIANTS)}; '' for none (only --ssd-pipeline)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--limit", type=int, default=0, help="train on a random subset of this many images (smoke runs)")
    parser.add_argument("--ssd-pipeline", action="store_true", help="also time the whole SSD pipeline end to end")
    parser.add_argument("--ssd-recipe", default="cifar100-lt-if100/ssd")
    parser.add_argument("--ssd-epochs", type=int, default=0, help="override every SSD stage's epochs (smoke runs only)")
    parser.add_argument("--ssd-set", dest="ssd_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override of the SSD recipe (smoke runs only)")
    parser.add_argument("--ssd-output-dir", default="", help="keep the SSD pipeline's outputs here (default: a temp dir)")
    parser.add_argument("--tracking-store", choices=("sqlite", "file"), default="sqlite",
                        help="MLflow store of the SSD pipeline: sqlite (default) or a file store (fewer wheels to carry)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} unknown; choose from {', '.join(VARIANTS)}")
    if args.epochs < 1 or args.warmup_epochs < 0:
        parser.error("--epochs must be >= 1 and --warmup-epochs >= 0")
    if args.limit < 0 or args.workers < 0 or args.batch_size < 1:
        parser.error(f"--limit {args.limit}, --workers {args.workers}: must be >= 0; --batch-size {args.batch_size}: >= 1")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device {args.device!r}: cuda, cuda:<index> or cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cifar_train: CUDA is not available. This benchmark measures GPU training throughput; "
              "for a CPU smoke run pass --device cpu (with e.g. --limit 512).", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as LDAM-DRW's cifar_train.py; the fast step autotunes regardless

    from ltscale.config import ConfigError
    from ltscale.data.errors import DatasetError

    try:
        preflight(args, device)
        bundle = load_data(args)
    except (ConfigError, DatasetError, ValueError) as error:
        print(f"cifar_train: error: {error}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "environment": environment(device), "dataset": bundle.train.name,
                              "fingerprint": bundle.train.fingerprint(), "variants": {}}
    for variant in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        raw = run_usual(bundle, args, device) if variant == "usual" else run_ltscale(
            bundle, args, device, "fast" if variant == "ltscale" else "eager")
        summary = summarise(raw, len(bundle.train), args.warmup_epochs)
        if device.type == "cuda":
            summary["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        report["variants"][variant] = summary
        print(f"{variant}: {summary['images_per_second']:,.0f} img/s, {summary['seconds_per_epoch']:.3f} s/epoch", flush=True)
    if "usual" in report["variants"] and "ltscale" in report["variants"]:
        report["ratio"] = report["variants"]["ltscale"]["images_per_second"] / report["variants"]["usual"]["images_per_second"]
        report["meets_ratio_target"] = report["ratio"] >= TARGET_RATIO
    if args.ssd_pipeline:
        report["ssd_pipeline"] = run_ssd_pipeline(args, device)
        ssd = report["ssd_pipeline"]
        report["meets_ssd_target"] = ssd["full_schedule"] and ssd["seconds"] <= TARGET_SSD_SECONDS
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a running stage gets from the pipeline: data, device, its output directory, tracking."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ltscale.data import DatasetBundle, LoaderConfig, SamplerConfig, Split, build_loader
from ltscale.dist.gather import is_main_process, rank_and_world_size
from ltscale.engine.checkpoint import atomic_save, load_checkpoint, load_state_strict
from ltscale.engine.evaluate import EvalResult, evaluate
from ltscale.engine.progress import Progress
from ltscale.engine.trainer import autocast_dtype
from ltscale.engine.zero import DeepSpeedConfig
from ltscale.models.heads import HeadSpec
from ltscale.models.network import ModelConfig, Network
from ltscale.models.pretrained import InitWeights, load_backbone
from ltscale.tracking import RunHandle
from ltscale.tracking.mlflow_tracker import close_figure, metric_entries, per_class_values

MODEL_KIND = "ltscale.model"


class StageRecord:
    """A stage's results for its MLflow run, sent once the stage's outputs are stored.

    Has the logging methods of :class:`~ltscale.tracking.RunHandle`; each call is kept, in order,
    until :meth:`send`, which the pipeline calls after it has finished the stage in the store. A
    tracking store that is down when a stage ends (MLflow's client gives up after about four
    minutes) then fails the stage's run, not its work: the outputs are complete, and the next run
    of the pipeline reuses them instead of training the stage, or passing over iNat, again.
    """

    def __init__(self, run: RunHandle) -> None:
        self._run = run
        self._calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method.startswith("_") or not callable(getattr(self._run, method, None)):
            raise AttributeError(f"{type(self).__name__} has no method {method!r}")

        def keep(*args: Any, **kwargs: Any) -> None:
            self._calls.append((method, args, kwargs))

        return keep

    # What the run would refuse (NaN: a diverged model) fails the stage at the call, before anything
    # is stored, and on every rank (the others' runs record nothing and check nothing).
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metric_entries(metrics, step)
        self._calls.append(("log_metrics", (metrics,), {"step": step}))

    def log_per_class_accuracy(self, accuracy: Sequence[float], class_counts: Sequence[int], prefix: str) -> None:
        per_class_values(accuracy, class_counts)
        self._calls.append(("log_per_class_accuracy", (accuracy, class_counts, prefix), {}))

    def send(self) -> None:
        """Log every kept call on the run, in the order they were made."""
        calls, self._calls = self._calls, []
        for method, args, kwargs in calls:
            getattr(self._run, method)(*args, **kwargs)

    def discard(self) -> None:
        """Drop what is kept (the stage failed before it was stored), closing kept figures."""
        calls, self._calls = self._calls, []
        for method, args, kwargs in calls:
            if method == "log_figure":
                close_figure(kwargs.get("figure", args[0] if args else None))


@dataclass
class StageContext:
    name: str
    bundle: DatasetBundle
    device: torch.device
    precision: str
    seed: int
    loader_config: LoaderConfig
    directory: Path
    run: RunHandle
    progress: Progress
    metrics: dict[str, float] = field(default_factory=dict)
    step: str = "auto"  # the trainer's step: auto, eager or fast (PipelineConfig.step)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # PipelineConfig.deepspeed
    init_weights: InitWeights | None = None  # this stage's model.init_from, resolved by the pipeline
    world_sizes: tuple[int, ...] = ()  # a training stage's process counts over its attempts (Trainer.world_sizes)
    _eval_loaders: dict = field(default_factory=dict, repr=False)
    record: StageRecord = field(init=False, repr=False)  # the stage's results, logged once its outputs are stored

    def __post_init__(self) -> None:
        self.record = StageRecord(self.run)

    @property
    def class_counts(self) -> np.ndarray:
        return self.bundle.train.class_counts()

    @property
    def autocast(self) -> torch.dtype | None:
        return autocast_dtype(self.precision, self.device)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes stage files."""
        return is_main_process()

    def train_loader(self, batch_size: int, sampler: SamplerConfig, views: int = 1):
        """``batch_size`` is the global batch (the recipes', as in the papers); each of W ranks
        loads ``batch_size / W`` of it."""
        _, world_size = rank_and_world_size()
        if batch_size % world_size:
            raise ValueError(f"stage {self.name}: the batch size {batch_size} does not split evenly over {world_size} "
                             f"processes; set stages.{self.name}.optim.batch_size to a multiple of {world_size}")
        return build_loader(self.bundle.train, self.bundle, train=True, batch_size=batch_size // world_size, sampler=sampler,
                            loader=self.loader_config, device=self.device, seed=self.seed, views=views)

    def eval_loader(self, split: Split, batch_size: int = 512, substitute: bool = False):
        """A sequential loader over ``split``, built once per stage and reused by every evaluation
        of it (``eval_every``, before and after re-balancing): FFCV compiles its pipeline and the
        DataLoader starts its workers once, not per evaluation. :meth:`close` releases them.

        ``substitute``: for passes over the *training* split (soft labels, virtual examples), an
        unreadable image is replaced by a same-class one as in training, so the file that training
        replaced does not stop the pipeline there. Its row then holds the substitute's output:
        never read by distillation, which looks rows up by the index the training loader served
        (the substitute's)."""
        key = (id(split), batch_size, substitute)
        if key not in self._eval_loaders:
            loader = build_loader(split, self.bundle, train=False, batch_size=batch_size, loader=self.loader_config,
                                  device=self.device, seed=self.seed, substitute=substitute)
            self._eval_loaders[key] = (split, loader)  # the split kept alive, so its id stays its own
        return self._eval_loaders[key][1]

    def close(self) -> None:
        """Release the stage's evaluation loaders (worker processes, DALI pipelines)."""
        loaders, self._eval_loaders = self._eval_loaders, {}
        for _, loader in loaders.values():
            close = getattr(loader, "close", None)
            if close is not None:
                close()

    def evaluate(self, network: Network, step: int | None = None, final: bool = True) -> dict[str, EvalResult]:
        """Evaluate every classifier head on the test split; log ``test/*`` for the predicted head
        and, for networks with several (SSD's student), ``test/<head>/*`` for each. ``final`` also
        logs per-class tables and plots."""
        heads = network.classifier_heads()
        results = evaluate(network, self.eval_loader(self.bundle.test), self.class_counts, heads, self.device, self.autocast)
        metrics = results[network.predict_head].metrics("test")
        if len(results) > 1:  # one head: test/<head>/* would repeat test/*
            for head, result in results.items():
                metrics.update(result.metrics(f"test/{head}"))
        if not final:  # mid-training: as the epoch metrics
            self.run.log_metrics(metrics, step=step, background=True)
            return results
        self.metrics.update(metrics)
        self.record.log_metrics(metrics, step=step)
        for head, result in results.items():
            self.record.log_per_class_accuracy(result.per_class_top1, self.class_counts, prefix=f"per_class/{head}")
        return results

    def new_network(self, model: ModelConfig, heads: dict[str, HeadSpec], predict_head: str) -> Network:
        """The stage's fresh network on its device: random weights, or ``model.init_from``'s backbone."""
        network = Network(model, heads, predict_head)
        if model.init_from:
            if self.init_weights is None or self.init_weights.spec != model.init_from:
                raise RuntimeError(f"stage {self.name}: model.init_from={model.init_from!r} was not resolved by the pipeline")
            load_backbone(network.backbone, self.init_weights)
        return network.to(self.device)

    def save_model(self, network: Network, filename: str = "model.pt") -> str:
        if not self.is_main:
            return filename  # every rank holds the same network; rank 0 writes it
        atomic_save({"kind": MODEL_KIND, "spec": network.spec(), "state_dict": network.state_dict()}, self.directory / filename)
        return filename


def load_model(path: Path, device: torch.device) -> Network:
    """Rebuild a network from an ltscale model checkpoint and load its weights strictly."""
    payload = load_checkpoint(path, kind=MODEL_KIND, required=("spec", "state_dict"))
    try:
        network = Network.from_spec(payload["spec"])
    except (KeyError, TypeError, ValueError) as error:
        from ltscale.engine.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint {path} has an unusable model spec: {error}") from None
    load_state_strict(network, payload["state_dict"], path)
    return network.to(device)

"""Typed configs of the stages and of a whole pipeline.

A pipeline is an ordered mapping of stage name -> stage config; a stage names the earlier stages
it consumes (``source`` / ``teacher``), which makes the pipeline a DAG that is checked up front.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Union

from ltscale.config.hashing import keyed_when_set
from ltscale.data.config import DataConfig, SamplerConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.engine.zero import DeepSpeedConfig
from ltscale.losses.modules import LossBackend, LossConfig
from ltscale.models.moco import MoCoConfig
from ltscale.models.network import ModelConfig
from ltscale.tracking import TrackingConfig


def _check_number(name: str, value: float, minimum: float, *, strict: bool = False) -> None:
    """``value`` must be finite and >= ``minimum`` (> with ``strict``); nan fails every comparison,
    so the checks are written to reject it rather than let it through."""
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value}")


def _check_eval_every(value: int) -> None:
    if value < 0:
        raise ValueError(f"eval_every must be >= 0 (epochs between test evaluations; 0: only at the end), got {value}")


@dataclass(frozen=True)
class TeacherConfig:
    """Stage I / baselines: train a network from scratch with a supervised loss.

    ``rotation_weight`` > 0 adds SSD's rotation-prediction task: each batch is also fed rotated by
    a random multiple of 90 degrees, and a 4-way head on the shared feature predicts the rotation.
    ``moco_weight`` > 0 adds SSD's large-dataset task instead, MoCo v2 instance discrimination
    (``moco``; two augmented views per image, ``ltscale/models/moco.py``). At most one of the two.

    ``rotation_batch_norm``: ``joint`` (the paper's "sent simultaneously": one forward of the
    upright and the rotated batch, so batch norm's statistics, running ones included, are the
    mixture's) or ``split`` (two forwards; only the upright batch updates the running statistics
    that evaluation, LWS and the soft labels use). Only with ``rotation_weight`` > 0.
    """

    kind: Literal["teacher"] = "teacher"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rotation_weight: float = 0.0
    rotation_batch_norm: Literal["joint", "split"] = keyed_when_set("joint")  # stages stored before it keep their keys
    moco_weight: float = 0.0
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval_every: int = 0  # evaluate on the test set every N epochs (0: only at the end)

    def __post_init__(self) -> None:
        if self.loss.drw_epoch >= self.optim.epochs:
            raise ValueError(f"loss.drw_epoch={self.loss.drw_epoch} is not before the last epoch (optim.epochs="
                             f"{self.optim.epochs}): DRW would never start; shortening a schedule, move drw_epoch too")
        _check_number("rotation_weight", self.rotation_weight, 0)
        _check_number("moco_weight", self.moco_weight, 0)
        _check_eval_every(self.eval_every)
        if self.rotation_weight > 0 and self.moco_weight > 0:
            raise ValueError(
                f"rotation_weight ({self.rotation_weight}) and moco_weight ({self.moco_weight}) are both on; SSD uses one "
                "self-supervised task (rotation on CIFAR, MoCo on large datasets): set the other to 0"
            )
        if self.loss.kind == "ldam" and self.model.classifier != "cosine":
            raise ValueError("loss.kind=ldam expects model.classifier=cosine (LDAM's normalised head)")

    @property
    def self_supervision(self) -> Literal["none", "rotation", "moco"]:
        """The self-supervised task the weights select."""
        if self.moco_weight > 0:
            return "moco"
        return "rotation" if self.rotation_weight > 0 else "none"


@dataclass(frozen=True)
class RebalanceConfig:
    """Stage II / IV and the decoupled baselines: re-balance one classifier head on frozen features.

    ``method``: ``lws`` (learnable per-class scales), ``crt`` (re-initialise and re-train the
    linear layer), ``tau_norm`` (no training; ``tau``, or with ``tau_search`` the best tau in
    0..2 on the validation split).

    ``backbone_bn``: ``eval`` keeps the frozen backbone's batch norm on the statistics it was
    trained with; ``train`` runs it in train mode, so the features are normalised with each
    re-balanced batch's statistics and the running statistics are re-estimated on class-balanced
    data (the saved model keeps them). The published LWS / cRT numbers were trained with public code
    that does the latter (classifier-balancing and SSD-LT call ``model.train()`` on the whole
    network, the frozen encoder included), an effect MiSLAS later measured as "shifted BN".
    """

    kind: Literal["rebalance"] = "rebalance"
    source: str = "teacher"
    head: str = "cls"
    method: Literal["lws", "crt", "tau_norm"] = "lws"
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(epochs=5, batch_size=512, lr=0.2, weight_decay=5e-4, warmup_epochs=0, schedule="cosine")
    )
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="class_balanced"))
    tau: float = 1.0
    tau_search: bool = False
    backbone_bn: Literal["eval", "train"] = keyed_when_set("eval")  # stages stored before it keep their keys

    def __post_init__(self) -> None:
        _check_number("tau", self.tau, 0)
        if self.method == "tau_norm" and self.backbone_bn != "eval":
            raise ValueError(
                f"backbone_bn={self.backbone_bn!r} needs a trained re-balancing (lws or crt); tau_norm does not train, "
                "so the backbone's batch norm keeps its statistics: set backbone_bn=eval"
            )


@dataclass(frozen=True)
class SoftLabelsConfig:
    """Store the ``source`` model's logits on every training image (no augmentation, eval mode).

    The temperature is applied where the labels are used, so one stored file serves every T.
    """

    kind: Literal["soft_labels"] = "soft_labels"
    source: str = "teacher_lws"


@dataclass(frozen=True)
class DistillConfig:
    """Stage III: a freshly initialised student distilled from ``teacher``.

    ``ssd``: two linear heads on one feature, CE on the hard head + KD (temperature T) on the soft
    head against the stored soft labels of stage ``teacher`` (a soft_labels stage: the paper's
    offline labels), or against a ``teacher`` model stage run in eval mode on each augmented batch
    (as SSD-LT's public code does; the recipes' soft_labels stage then still runs, unused).
    ``dive``: one head, alpha * KD_{T,p} + (1 - alpha) * BSCE against the ``teacher`` model stage run
    in eval mode on the same augmented batch. With ``temperature_from`` naming a
    virtual_examples stage, T and p are that stage's rule-of-thumb choice (for ``ssd``, whose KD
    has no power normalisation, a sweep of p = 1 only). Each method's own weights: ``ssd``
    ``hard_weight`` / ``soft_weight``; ``dive`` ``alpha`` and ``power``. The other method's are
    refused, not ignored.
    """

    kind: Literal["distill"] = "distill"
    method: Literal["ssd", "dive"] = "ssd"
    teacher: str = "soft_labels"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    temperature: float = 2.0
    power: float = 1.0
    alpha: float = 0.5
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    temperature_from: str = ""
    backend: LossBackend = "auto"
    eval_every: int = 0

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, 0, strict=True)
        if not 0 < self.power <= 1:  # nan fails the comparison: rejected too
            raise ValueError(f"power must be in (0, 1], got {self.power}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        _check_number("hard_weight", self.hard_weight, 0)
        _check_number("soft_weight", self.soft_weight, 0)
        _check_eval_every(self.eval_every)
        # Each method reads only its own weights; a setting of the other's would change nothing but the key.
        plain = DistillConfig.__dataclass_fields__
        if self.method == "ssd":
            if self.power != plain["power"].default:
                raise ValueError(f"power={self.power:g} is DiVE's power normalisation (method=dive); method=ssd "
                                 "distils with plain KD at temperature T (p = 1)")
            if self.alpha != plain["alpha"].default:
                raise ValueError(f"alpha={self.alpha:g} weighs DiVE's two terms (method=dive); method=ssd weighs its "
                                 "heads with hard_weight and soft_weight")
        elif (self.hard_weight, self.soft_weight) != (plain["hard_weight"].default, plain["soft_weight"].default):
            raise ValueError(f"hard_weight / soft_weight ({self.hard_weight:g} / {self.soft_weight:g}) weigh SSD's two "
                             "heads (method=ssd); method=dive weighs its KD and BSCE terms with alpha")


@dataclass(frozen=True)
class VirtualExamplesConfig:
    """DiVE's virtual-example distribution v_c(T, p) = sum over training images of p_t[c], for a
    sweep of temperatures with and without power normalisation, and the rule-of-thumb choice."""

    kind: Literal["virtual_examples"] = "virtual_examples"
    source: str = "teacher"
    temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
    powers: tuple[float, ...] = (1.0, 0.5)

    def __post_init__(self) -> None:
        if not self.temperatures or not all(math.isfinite(t) and t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be one or more finite numbers > 0, got {self.temperatures}")
        if not self.powers or not all(0 < p <= 1 for p in self.powers):
            raise ValueError(f"powers must be one or more numbers in (0, 1], got {self.powers}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate the ``source`` model on the test split (every training stage also does this itself)."""

    kind: Literal["evaluate"] = "evaluate"
    source: str = "teacher"


def _float_leaves(config: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a config tree (tuple elements included)."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _float_leaves(value, f"{path}.{key}" if path else str(key))
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            yield from _float_leaves(getattr(config, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(config, (tuple, list)):
        for value in config:
            yield from _float_leaves(value, path)
    elif isinstance(config, float):
        yield path, config


StageConfig = Union[TeacherConfig, RebalanceConfig, SoftLabelsConfig, DistillConfig, VirtualExamplesConfig, EvaluateConfig]


def stage_inputs(config: StageConfig) -> dict[str, str]:
    """Role -> name of the stage whose output this stage consumes."""
    inputs: dict[str, str] = {}
    if isinstance(config, (RebalanceConfig, SoftLabelsConfig, VirtualExamplesConfig, EvaluateConfig)):
        inputs["source"] = config.source
    if isinstance(config, DistillConfig):
        inputs["teacher"] = config.teacher
        if config.temperature_from:
            inputs["temperature"] = config.temperature_from
    return inputs


@dataclass(frozen=True)
class _Product:
    """What a stage leaves for later ones: ``kind`` ("model", "soft_labels", "virtual_examples" or
    "evaluation"); for a model, its classifier heads as (name, head kind) and the head it predicts
    with; for a virtual-example sweep, the powers it may choose; for soft labels and a sweep, the
    stage whose model's logits they were computed from."""

    kind: str
    heads: tuple[tuple[str, str], ...] = ()
    predicts: str = ""
    powers: tuple[float, ...] = ()
    computed_from: str = ""

    def head_kind(self, name: str) -> str:
        return dict(self.heads)[name]


_PRODUCT_WORDS = {"model": "a model", "soft_labels": "soft labels", "virtual_examples": "a virtual-example distribution",
                  "evaluation": "only test metrics"}


def _check_inputs(pipeline: str, name: str, stage: StageConfig, products: dict[str, _Product]) -> _Product:
    """Refuse, before anything trains, a stage fed the wrong kind of output (found otherwise only
    when the stage starts, after its parents have trained); return what the stage produces."""

    def need(role: str, parent: str, kind: str | tuple[str, ...], why: str) -> _Product:
        product = products[parent]
        if product.kind not in ((kind,) if isinstance(kind, str) else kind):
            raise ValueError(f"pipeline {pipeline!r}: stage {name!r} {why}, but its {role} {parent!r} "
                             f"produces {_PRODUCT_WORDS[product.kind]}")
        return product

    def logits_of(role: str, parent: str, product: _Product, why: str) -> None:
        # A cosine head's logits are LDAM's unscaled cosines in [-1, 1] (its scale s lives in the
        # loss): softmax turns them into near-uniform targets.
        if product.kind == "model" and product.head_kind(product.predicts) == "cosine":
            raise ValueError(f"pipeline {pipeline!r}: stage {name!r} {why}, but its {role} {parent!r} predicts with a "
                             "cosine (LDAM) head, whose logits are unscaled cosines; re-balance it with method=crt first")

    if isinstance(stage, TeacherConfig):
        return _Product("model", (("cls", "cosine" if stage.model.classifier == "cosine" else "linear"),), "cls")
    if isinstance(stage, RebalanceConfig):
        source = need("source", stage.source, "model", f"re-balances a classifier head (method={stage.method})")
        heads = dict(source.heads)
        if stage.head not in heads:
            raise ValueError(f"pipeline {pipeline!r}: stage {name!r} re-balances head {stage.head!r}, but the model of "
                             f"{stage.source!r} has the classifier heads {sorted(heads)} (set head to one of them)")
        if stage.method != "crt" and heads[stage.head] != "linear":  # checked at run time only after the source trained
            raise ValueError(f"pipeline {pipeline!r}: stage {name!r} (method={stage.method}) rescales a linear classifier's "
                             f"weights, but head {stage.head!r} of {stage.source!r} is a {heads[stage.head]} head; "
                             "method=crt retrains a linear one on the frozen features")
        heads[stage.head] = {"crt": "linear", "lws": "lws", "tau_norm": "tau_norm"}[stage.method]
        return _Product("model", tuple(heads.items()), stage.head)
    if isinstance(stage, SoftLabelsConfig):
        why = "stores a model's logits"
        logits_of("source", stage.source, need("source", stage.source, "model", why), why)
        return _Product("soft_labels", computed_from=stage.source)
    if isinstance(stage, VirtualExamplesConfig):
        why = "measures a teacher model's virtual examples"
        logits_of("source", stage.source, need("source", stage.source, "model", why), why)
        return _Product("virtual_examples", powers=stage.powers, computed_from=stage.source)
    if isinstance(stage, DistillConfig):
        if stage.method == "ssd":
            why = "(method=ssd) distils stored soft labels or a teacher model run on each batch"
            teacher = need("teacher", stage.teacher, ("soft_labels", "model"), why)
        else:
            why = "(method=dive) distils from a teacher model run on each batch"
            teacher = need("teacher", stage.teacher, "model", why)
        logits_of("teacher", stage.teacher, teacher, why)
        if stage.temperature_from:
            sweep = need("temperature_from", stage.temperature_from, "virtual_examples",
                         "takes T and p from a virtual_examples stage")
            if stage.method == "ssd" and any(p != 1 for p in sweep.powers):
                raise ValueError(f"pipeline {pipeline!r}: stage {name!r} (method=ssd) distils with plain KD (p = 1), but "
                                 f"its temperature_from {stage.temperature_from!r} may choose a power from {sweep.powers}; "
                                 f"set stages.{stage.temperature_from}.powers=[1.0] or use method=dive")
            # The rule of thumb reads T and p off the distilled teacher's own distribution; measured
            # on another model it would choose for a teacher the student never sees.
            distilled = teacher.computed_from or stage.teacher
            if sweep.computed_from != distilled:
                raise ValueError(f"pipeline {pipeline!r}: stage {name!r} distils {distilled!r}"
                                 + (f" (through {stage.teacher!r})" if distilled != stage.teacher else "")
                                 + f", but its temperature_from {stage.temperature_from!r} measures the virtual examples of "
                                 f"{sweep.computed_from!r}; set stages.{stage.temperature_from}.source={distilled}")
        if stage.method == "ssd":
            return _Product("model", (("hard", "linear"), ("soft", "linear")), "hard")
        return _Product("model", (("cls", "linear"),), "cls")
    need("source", stage.source, "model", "evaluates a model")
    return _Product("evaluation")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole multi-stage run: the data, the ordered stages, and where results go.

    ``result_stage``: the stage whose test metrics are the pipeline's result (default: the last
    stage that produces a model).
    """

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    result_stage: str = ""
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # "fast": channels_last + the whole step as a CUDA graph (ltscale/engine/fast_step.py);
    # "auto": fast on CUDA, eager on a CPU.
    step: Literal["auto", "eager", "fast"] = "auto"
    # Train every stage under a DeepSpeed ZeRO engine (ltscale/engine/zero.py) instead of DDP.
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "runs"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"pipeline {self.name!r} has no stages")
        if not 0 <= self.seed < 2**32:
            # numpy's generators take no negative seeds; torch's generators are 64-bit and seeds are mixed
            # with epochs and ranks before they get there
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {self.device!r}")
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty: name the directory for stage outputs and the local MLflow store (default: runs)")
        # Every float anywhere in the tree, including the fields of configs defined elsewhere (loss,
        # moco, data): nan / inf pass most range checks and only fail when the config is recorded.
        for key, value in _float_leaves(self):
            if not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value}")
        seen: list[str] = []
        products: dict[str, _Product] = {}
        for name, stage in self.stages.items():
            for role, parent in stage_inputs(stage).items():
                if parent not in seen:
                    where = ("is this stage itself" if parent == name else
                             "comes later" if parent in self.stages else "does not exist")
                    raise ValueError(
                        f"pipeline {self.name!r}: stage {name!r} consumes {parent!r} as its {role}, but that stage "
                        f"{where}; stages run in order and can only consume earlier ones ({seen or 'none before it'})"
                    )
            products[name] = _check_inputs(self.name, name, stage, products)
            seen.append(name)
        if self.result_stage and self.result_stage not in self.stages:
            raise ValueError(f"result_stage {self.result_stage!r} is not one of the stages {seen}")
        if self.result_stage and products[self.result_stage].kind not in ("model", "evaluation"):
            raise ValueError(f"result_stage {self.result_stage!r} has no test metrics (it produces "
                             f"{_PRODUCT_WORDS[products[self.result_stage].kind]}); name a stage that trains or "
                             f"re-balances a model: {[n for n, p in products.items() if p.kind == 'model']}")
        if self.deepspeed.enabled and self.step == "fast":
            raise ValueError("step=fast (one CUDA graph per step) cannot run under deepspeed.enabled; use step=auto or eager")

    def batch_split_problem(self, processes: int) -> str | None:
        """Why this pipeline cannot train on ``processes`` processes, or None: every stage's batch is
        global (each process loads ``batch_size / processes`` of it), so it must split evenly.
        Checked before anything runs; found at its stage, it ended a run after the earlier stages trained."""
        for name, stage in self.stages.items():
            optim = getattr(stage, "optim", None)
            if optim is not None and optim.batch_size % processes:
                return (f"stages.{name}.optim.batch_size={optim.batch_size} does not split over {processes} processes: "
                        f"the batch is global, so make it a multiple of {processes}")
        return None

    @property
    def result(self) -> str:
        if self.result_stage:
            return self.result_stage
        model_stages = [n for n, s in self.stages.items() if isinstance(s, (TeacherConfig, RebalanceConfig, DistillConfig))]
        return model_stages[-1] if model_stages else list(self.stages)[-1]

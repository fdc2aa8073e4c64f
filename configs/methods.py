"""The methods as stage graphs, shared by every dataset's recipes.

Each builder takes the dataset-specific pieces (data, model, schedules) and returns the stages;
the papers' numbers come from these graphs with the dataset recipes' settings.
"""

from __future__ import annotations

import dataclasses

from ltscale.data.config import SamplerConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.losses.modules import LossConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import (
    DistillConfig,
    RebalanceConfig,
    SoftLabelsConfig,
    StageConfig,
    TeacherConfig,
    VirtualExamplesConfig,
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The dataset-specific settings every method graph is built from."""

    model: ModelConfig
    optim: OptimConfig
    rebalance_optim: OptimConfig  # cRT (and the tau-norm stage, which does not train)
    rebalance_sampler: SamplerConfig = SamplerConfig(kind="class_balanced")
    lws_epochs: int | None = None  # LWS's epochs where they differ from cRT's (large data: 5 vs 10)
    tau_search: bool = False  # tau-norm's tau swept on the validation split (datasets that have one)
    ldam_drw_epoch: int = 160
    dive_temperature: float = 3.0
    dive_power: float = 0.5
    dive_alpha: float = 0.5
    ssd_temperature: float = 2.0
    ssd_self_supervision: float = 1.0  # rotation weight (CIFAR); 0 where MoCo is used instead
    ssd_moco_weight: float = 0.0  # MoCo v2 weight of SSD's teacher on large datasets (alpha_1 = alpha_2 = 1)


def teacher(recipe: Recipe, loss: str = "ce", rotation: float = 0.0, moco: float = 0.0) -> TeacherConfig:
    return TeacherConfig(model=recipe.model, loss=LossConfig(kind=loss), rotation_weight=rotation, moco_weight=moco,  # type: ignore[arg-type]
                         optim=recipe.optim)


def rebalance(recipe: Recipe, method: str, source: str = "teacher", head: str = "cls") -> RebalanceConfig:
    optim = recipe.rebalance_optim
    if method == "lws" and recipe.lws_epochs is not None:
        optim = dataclasses.replace(optim, epochs=recipe.lws_epochs)
    return RebalanceConfig(source=source, head=head, method=method, optim=optim, sampler=recipe.rebalance_sampler,  # type: ignore[arg-type]
                           tau_search=method == "tau_norm" and recipe.tau_search)


def ce(recipe: Recipe) -> dict[str, StageConfig]:
    return {"teacher": teacher(recipe, "ce")}


def bsce(recipe: Recipe) -> dict[str, StageConfig]:
    return {"teacher": teacher(recipe, "bsce")}


def ldam_drw(recipe: Recipe) -> dict[str, StageConfig]:
    model = dataclasses.replace(recipe.model, classifier="cosine")
    loss = LossConfig(kind="ldam", drw_epoch=recipe.ldam_drw_epoch)
    return {"teacher": TeacherConfig(model=model, loss=loss, optim=recipe.optim)}


def decoupled(recipe: Recipe, method: str) -> dict[str, StageConfig]:
    """cRT / LWS / tau-norm: a CE teacher, then its classifier re-balanced on frozen features."""
    return {"teacher": teacher(recipe, "ce"), method: rebalance(recipe, method)}


def dive(recipe: Recipe, auto_temperature: bool = False) -> dict[str, StageConfig]:
    """A BSCE teacher, its virtual-example distribution, and the distilled student."""
    student = DistillConfig(method="dive", teacher="teacher", model=recipe.model, optim=recipe.optim,
                            temperature=recipe.dive_temperature, power=recipe.dive_power, alpha=recipe.dive_alpha,
                            temperature_from="virtual_examples" if auto_temperature else "")
    return {"teacher": teacher(recipe, "bsce"), "virtual_examples": VirtualExamplesConfig(source="teacher"), "student": student}


def ssd(recipe: Recipe) -> dict[str, StageConfig]:
    """I: CE + self-supervision, II: LWS, soft labels, III: two-head student, IV: LWS on the hard head."""
    return {
        "teacher": teacher(recipe, "ce", rotation=recipe.ssd_self_supervision, moco=recipe.ssd_moco_weight),
        "teacher_lws": rebalance(recipe, "lws", source="teacher"),
        "soft_labels": SoftLabelsConfig(source="teacher_lws"),
        "student": DistillConfig(method="ssd", teacher="soft_labels", model=recipe.model, optim=recipe.optim,
                                 temperature=recipe.ssd_temperature),
        "student_lws": rebalance(recipe, "lws", source="student", head="hard"),
    }


def ssd_dive(recipe: Recipe) -> dict[str, StageConfig]:
    """SSD's self-supervised, LWS-re-balanced teacher with DiVE's flattened (T, p) targets and BSCE."""
    stages = ssd(recipe)
    stages["student"] = DistillConfig(method="dive", teacher="teacher_lws", model=recipe.model, optim=recipe.optim,
                                      temperature=recipe.dive_temperature, power=recipe.dive_power, alpha=recipe.dive_alpha)
    stages["student_lws"] = rebalance(recipe, "lws", source="student", head="cls")
    del stages["soft_labels"]
    return stages


METHODS = {
    "ce": ce,
    "bsce": bsce,
    "ldam-drw": ldam_drw,
    "crt": lambda r: decoupled(r, "crt"),
    "lws": lambda r: decoupled(r, "lws"),
    "tau-norm": lambda r: decoupled(r, "tau_norm"),
    "dive": dive,
    "ssd": ssd,
    "ssd-dive": ssd_dive,
}

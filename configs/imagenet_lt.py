"""ImageNet-LT recipes: ResNeXt-50 32x4d, 90 epochs, batch 256, lr 0.1 cosine, wd 5e-4.

Re-balancing on frozen features: cRT 10 epochs, LWS 5, lr 0.2, batch 512, cosine, 4 samples per
class per draw; tau-norm's tau is swept on the validation split (``ImageNet_LT_val.txt``).
``imagenet-lt-135ep/*`` is SSD's 1.5x schedule (its 56.0 row).

DiVE on ImageNet-LT uses no power normalisation (T = 3, p = 1). SSD's large-data teacher uses
MoCo v2 instance discrimination as its self-supervised task (CE + InfoNCE, weights 1 / 1, no
rotation; ``--set stages.teacher.moco_weight=0`` gives the paper's "without self-supervision"
ablation row). Set ``data.root`` to the ImageNet root holding train/ and val/,
and ``data.train_list`` / ``data.test_list`` / ``data.val_list`` to the split lists.
"""

from __future__ import annotations

import dataclasses
import functools

from configs.methods import METHODS, Recipe
from ltscale.config import recipe
from ltscale.data.config import DataConfig, SamplerConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig

IMAGENET_LT_RECIPE = Recipe(
    model=ModelConfig(arch="resnext50_32x4d"),
    optim=OptimConfig(epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4, warmup_epochs=0, schedule="cosine",
                      milestones=(), decay_factors=()),
    rebalance_optim=OptimConfig(epochs=10, batch_size=512, lr=0.2, weight_decay=5e-4, warmup_epochs=0, schedule="cosine",
                                milestones=(), decay_factors=()),
    rebalance_sampler=SamplerConfig(kind="class_balanced", samples_per_class=4),
    lws_epochs=5,
    tau_search=True,  # on ImageNet_LT_val.txt
    ldam_drw_epoch=60,
    dive_power=1.0,
    ssd_self_supervision=0.0,
    ssd_moco_weight=1.0,
)


def imagenet_lt(method: str, epochs: int = 90) -> PipelineConfig:
    # DRW starts two thirds in, as at epoch 60 of 90, in the longer schedules too.
    base = dataclasses.replace(IMAGENET_LT_RECIPE, optim=dataclasses.replace(IMAGENET_LT_RECIPE.optim, epochs=epochs),
                               ldam_drw_epoch=round(IMAGENET_LT_RECIPE.ldam_drw_epoch * epochs / 90))
    name = f"imagenet-lt/{method}" if epochs == 90 else f"imagenet-lt-{epochs}ep/{method}"  # the registered recipe name
    return PipelineConfig(name=name, data=DataConfig(dataset="imagenet_lt", image_size=224), stages=METHODS[method](base))


for _method in METHODS:
    recipe(f"imagenet-lt/{_method}", f"{_method} on ImageNet-LT, ResNeXt-50 32x4d, 90 epochs")(functools.partial(imagenet_lt, _method))
    # SSD's 1.5x schedule (its 56.0 row): teacher and student train 135 epochs, re-balancing as usual.
    recipe(f"imagenet-lt-135ep/{_method}", f"{_method} on ImageNet-LT, ResNeXt-50 32x4d, 135 epochs (1.5x)")(
        functools.partial(imagenet_lt, _method, 135)
    )

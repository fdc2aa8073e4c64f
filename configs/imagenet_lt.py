"""ImageNet-LT recipes: ResNeXt-50 32x4d, 90 epochs, batch 256, lr 0.1 cosine, wd 5e-4.

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
from ltscale.data.config import DataConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig

IMAGENET_LT_RECIPE = Recipe(
    model=ModelConfig(arch="resnext50_32x4d"),
    optim=OptimConfig(epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4, warmup_epochs=0, schedule="cosine",
                      milestones=(), decay_factors=()),
    rebalance_optim=OptimConfig(epochs=10, batch_size=512, lr=0.2, weight_decay=5e-4, warmup_epochs=0, schedule="cosine",
                                milestones=(), decay_factors=()),
    ldam_drw_epoch=60,
    dive_power=1.0,
    ssd_self_supervision=0.0,
    ssd_moco_weight=1.0,
)


def imagenet_lt(method: str) -> PipelineConfig:
    base = IMAGENET_LT_RECIPE
    if method in ("lws", "ssd"):  # LWS trains 5 epochs with 4 samples per class per draw
        base = dataclasses.replace(base, rebalance_optim=dataclasses.replace(base.rebalance_optim, epochs=5))
    base = dataclasses.replace(base, rebalance_sampler=dataclasses.replace(base.rebalance_sampler, samples_per_class=4))
    return PipelineConfig(name=f"imagenet-lt/{method}", data=DataConfig(dataset="imagenet_lt", image_size=224), stages=METHODS[method](base))


for _method in METHODS:
    recipe(f"imagenet-lt/{_method}", f"{_method} on ImageNet-LT, ResNeXt-50 32x4d, 90 epochs")(functools.partial(imagenet_lt, _method))

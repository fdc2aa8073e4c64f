"""iNaturalist 2018 recipes: ResNet-50, 90 epochs, batch 256, lr 0.1 cosine, wd 1e-4 (also in the
re-balancing stages).

DiVE: T = 3 with power normalisation p = 0.5 (as on CIFAR). SSD's teacher trains with CE + MoCo v2
instance discrimination, weights 1 / 1 (see configs/imagenet_lt.py). Set ``data.root`` to the iNat
image root and the lists (``iNaturalist18_train.txt`` / ``iNaturalist18_val.txt``) or the official JSON files
(``data.train_annotations`` / ``data.test_annotations``).
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

INAT18_RECIPE = Recipe(
    model=ModelConfig(arch="resnet50"),
    optim=OptimConfig(epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4, warmup_epochs=0, schedule="cosine",
                      milestones=(), decay_factors=()),
    # wd 1e-4 as classifier-balancing's iNaturalist18 cRT / LWS configs (5e-4 is its ImageNet-LT value).
    rebalance_optim=OptimConfig(epochs=10, batch_size=512, lr=0.2, weight_decay=1e-4, warmup_epochs=0, schedule="cosine",
                                milestones=(), decay_factors=()),
    rebalance_sampler=SamplerConfig(kind="class_balanced", samples_per_class=4),
    lws_epochs=5,  # cRT 10; no validation split, so tau-norm keeps a fixed tau
    ldam_drw_epoch=60,
    ssd_self_supervision=0.0,
    ssd_moco_weight=1.0,
)


def inat18(method: str, epochs: int = 90) -> PipelineConfig:
    # DRW starts two thirds in, as at epoch 60 of 90, in the longer schedules too.
    base = dataclasses.replace(INAT18_RECIPE, optim=dataclasses.replace(INAT18_RECIPE.optim, epochs=epochs),
                               ldam_drw_epoch=round(INAT18_RECIPE.ldam_drw_epoch * epochs / 90))
    name = f"inat18/{method}" if epochs == 90 else f"inat18-{epochs}ep/{method}"  # the registered recipe name
    return PipelineConfig(name=name, data=DataConfig(dataset="inat2018", image_size=224), stages=METHODS[method](base))


for _method in METHODS:
    recipe(f"inat18/{_method}", f"{_method} on iNaturalist 2018, ResNet-50, 90 epochs")(functools.partial(inat18, _method))
    recipe(f"inat18-200ep/{_method}", f"{_method} on iNaturalist 2018, ResNet-50, 200 epochs")(functools.partial(inat18, _method, 200))

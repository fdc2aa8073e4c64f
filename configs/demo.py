"""The demo: SSD, DiVE and the CE baseline on the generated long-tailed dataset, CPU-sized.

Same stage graphs as the paper recipes (configs/methods.py); only the data (30 synthetic classes,
16 px, imbalance 80), the network (ResNet-8) and the schedule (30 epochs) are scaled down so the
three pipelines finish on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import functools

from configs.methods import METHODS, Recipe
from ltscale.config import recipe
from ltscale.data.config import DataConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig

DEMO_METHODS = ("ce", "ssd", "dive")

DEMO_RECIPE = Recipe(
    model=ModelConfig(arch="resnet8", width=16),
    optim=OptimConfig(epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=2,
                      milestones=(20, 26), decay_factors=(0.1, 0.01)),
    rebalance_optim=OptimConfig(epochs=5, batch_size=256, lr=0.2, weight_decay=5e-4, warmup_epochs=0, schedule="cosine",
                                milestones=(), decay_factors=()),
    ldam_drw_epoch=20,
)


def demo(method: str) -> PipelineConfig:
    return PipelineConfig(name=f"demo/{method}", data=DataConfig(dataset="synthetic"), stages=METHODS[method](DEMO_RECIPE))


for _method in METHODS:
    recipe(f"demo/{_method}", f"{_method} on the synthetic long-tailed set, ResNet-8, 30 epochs (CPU minutes)")(
        functools.partial(demo, _method)
    )

"""CIFAR-100-LT / CIFAR-10-LT recipes (ResNet-32), as the papers' tables were trained.

200 epochs, batch 128, SGD lr 0.1 momentum 0.9 wd 2e-4, 5 linear warm-up epochs, x0.01 after 160
and x1e-4 after 180 (the LDAM-DRW schedule, with which CE 38.3 / BSCE 42.2 / DiVE 45.3 were
measured on ../shared's CIFAR-100), random crop 32 pad 4 + flip. Re-balancing: 5 epochs, lr 0.2,
batch 512, class-balanced. Set ``data.root`` to the official python archive.
"""

from __future__ import annotations

import functools

from configs.methods import METHODS, Recipe
from ltscale.config import recipe
from ltscale.data.config import DataConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig

CIFAR_RECIPE = Recipe(
    model=ModelConfig(arch="resnet32"),
    optim=OptimConfig(epochs=200, batch_size=128, lr=0.1, weight_decay=2e-4, warmup_epochs=5,
                      milestones=(160, 180), decay_factors=(0.01, 0.0001)),
    rebalance_optim=OptimConfig(epochs=5, batch_size=512, lr=0.2, weight_decay=5e-4, warmup_epochs=0, schedule="cosine"),
)


def cifar_lt(method: str, dataset: str = "cifar100_lt", imbalance_factor: float = 100.0) -> PipelineConfig:
    """The ``method`` pipeline on CIFAR-LT with imbalance factor ``imbalance_factor``."""
    short = "cifar100" if dataset == "cifar100_lt" else "cifar10"
    return PipelineConfig(
        name=f"{short}-lt-if{imbalance_factor:g}/{method}",
        data=DataConfig(dataset=dataset, imbalance_factor=imbalance_factor),  # type: ignore[arg-type]
        stages=METHODS[method](CIFAR_RECIPE),
    )


for _if in (100, 50, 10):
    for _method in METHODS:
        recipe(f"cifar100-lt-if{_if}/{_method}", f"{_method} on CIFAR-100-LT, imbalance {_if}, ResNet-32, 200 epochs")(
            functools.partial(cifar_lt, _method, "cifar100_lt", float(_if))
        )
    for _method in ("ce", "bsce", "ldam-drw", "dive", "ssd"):
        recipe(f"cifar10-lt-if{_if}/{_method}", f"{_method} on CIFAR-10-LT, imbalance {_if}, ResNet-32, 200 epochs")(
            functools.partial(cifar_lt, _method, "cifar10_lt", float(_if))
        )

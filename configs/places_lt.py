"""Places-LT recipes: an ImageNet-pretrained ResNet-152 fine-tuned for 30 epochs.

Neither paper reports Places-LT, so there is no published number to match here; the recipe follows
the protocol the long-tail literature uses for it: torchvision's ImageNet weights for ResNet-152
(``model.init_from``, downloaded once into the torch hub cache, or a local file via
``--set 'stages.*.model.init_from=/path/resnet152.pth'``), batch 128,
lr 0.01 cosine, wd 5e-4, 30 epochs; the re-balancing stages as on ImageNet-LT (10 epochs, 5 for
LWS, 4 samples per class per draw; tau-norm's tau swept on ``Places_LT_val.txt``). Students start
from the same pretrained weights. Set ``data.root`` to the Places-365 root and
``data.train_list`` / ``data.val_list`` / ``data.test_list`` to the Places-LT split lists.
"""

from __future__ import annotations

import dataclasses
import functools

from configs.imagenet_lt import IMAGENET_LT_RECIPE
from configs.methods import METHODS
from ltscale.config import recipe
from ltscale.data.config import DataConfig
from ltscale.engine.schedule import OptimConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig

PLACES_LT_RECIPE = dataclasses.replace(
    IMAGENET_LT_RECIPE,
    model=ModelConfig(arch="resnet152", init_from="torchvision:ResNet152_Weights.IMAGENET1K_V1"),
    optim=OptimConfig(epochs=30, batch_size=128, lr=0.01, weight_decay=5e-4, warmup_epochs=0, schedule="cosine",
                      milestones=(), decay_factors=()),
    ldam_drw_epoch=20,
)


def places_lt(method: str) -> PipelineConfig:
    return PipelineConfig(name=f"places-lt/{method}", data=DataConfig(dataset="places_lt", image_size=224),
                          stages=METHODS[method](PLACES_LT_RECIPE))


for _method in METHODS:
    recipe(f"places-lt/{_method}", f"{_method} on Places-LT, ImageNet-pretrained ResNet-152, 30 epochs")(functools.partial(places_lt, _method))

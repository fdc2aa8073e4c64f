"""Places-LT recipes: ResNet-50 (ImageNet-LT schedule and augmentation; the field fine-tunes an
ImageNet-pretrained ResNet-152, which needs weights from a hub and is not bundled)."""

from __future__ import annotations

import dataclasses
import functools

from configs.imagenet_lt import IMAGENET_LT_RECIPE
from configs.methods import METHODS
from ltscale.config import recipe
from ltscale.data.config import DataConfig
from ltscale.models.network import ModelConfig
from ltscale.stages.config import PipelineConfig


def places_lt(method: str) -> PipelineConfig:
    base = dataclasses.replace(IMAGENET_LT_RECIPE, model=ModelConfig(arch="resnet50"))
    return PipelineConfig(name=f"places-lt/{method}", data=DataConfig(dataset="places_lt", image_size=224), stages=METHODS[method](base))


for _method in METHODS:
    recipe(f"places-lt/{_method}", f"{_method} on Places-LT, ResNet-50, 90 epochs")(functools.partial(places_lt, _method))

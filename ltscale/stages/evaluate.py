"""Evaluate a model stage's output on the test split."""

from __future__ import annotations

from ltscale.stages.config import EvaluateConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.store import StageOutput


def run(config: EvaluateConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    ctx.evaluate(load_model(inputs["source"].file("model"), ctx.device))
    return {}

"""Stage I and the from-scratch baselines: train a network with CE / BSCE / LDAM(-DRW),
optionally with SSD's self-supervision (rotation prediction, or MoCo v2 on large datasets)."""

from __future__ import annotations

from ltscale.losses.modules import build_classification_loss
from ltscale.models.heads import HeadSpec
from ltscale.models.moco import MoCo
from ltscale.stages.config import TeacherConfig
from ltscale.stages.context import StageContext
from ltscale.stages.store import StageOutput
from ltscale.stages.tasks import MoCoTask, SupervisedTask
from ltscale.stages.training import train_and_evaluate


def run(config: TeacherConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    heads = {"cls": HeadSpec(kind="cosine" if config.model.classifier == "cosine" else "linear", num_outputs=ctx.bundle.num_classes)}
    if config.rotation_weight > 0:
        heads["rotation"] = HeadSpec(kind="rotation", num_outputs=4, classifier=False)
    network = ctx.new_network(config.model, heads, predict_head="cls")
    loss = build_classification_loss(config.loss, ctx.class_counts, ctx.device)
    if config.moco_weight > 0:
        # The MoCo parts (key encoder, projections, queue) live in the task and its progress
        # checkpoints only; the saved model is the classifier network, loadable by load_model.
        moco = MoCo(config.moco, network.backbone, network.feature_dim).to(ctx.device)
        task = MoCoTask(network, moco, loss, config.moco_weight, ctx.seed)
        train_and_evaluate(task, network, config.optim, config.sampler, config.eval_every, ctx, views=2)
        return {"model": ctx.save_model(network)}
    task = SupervisedTask(network, loss, config.rotation_weight, ctx.seed, config.rotation_batch_norm)
    train_and_evaluate(task, network, config.optim, config.sampler, config.eval_every, ctx)
    return {"model": ctx.save_model(network)}

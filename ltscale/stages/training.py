"""The shared tail of every training stage: fit with per-epoch logging, then a final evaluation."""

from __future__ import annotations

from ltscale.dist.gather import all_gather_object
from ltscale.engine.trainer import EpochMetrics, Trainer
from ltscale.models.network import Network
from ltscale.stages.context import StageContext
from ltscale.stages.store import PROGRESS


def train_and_evaluate(task, network: Network, optim, sampler, eval_every: int, ctx: StageContext, views: int = 1) -> None:
    """The shared tail of every training stage: fit with per-epoch logging, then a final evaluation.
    ``views``: augmented views per image in each batch (2 for MoCo: ``image`` and ``image_key``)."""
    loader = ctx.train_loader(optim.batch_size, sampler, views=views)

    def on_epoch_end(metrics: EpochMetrics) -> None:
        if hasattr(loader, "check_bad_images_across_ranks"):  # image files: the run's budget, all ranks' files
            loader.check_bad_images_across_ranks()
        ctx.run.log_metrics(metrics.as_dict(), step=metrics.epoch, background=True)  # an unreachable store does not stop training
        if eval_every and (metrics.epoch + 1) % eval_every == 0 and metrics.epoch + 1 < optim.epochs:
            ctx.evaluate(network, step=metrics.epoch, final=False)

    trainer = Trainer(task, loader, optim, ctx.device, ctx.precision, ctx.directory / PROGRESS, ctx.name,
                      on_epoch_end=on_epoch_end, progress=ctx.progress, step=ctx.step, deepspeed=ctx.deepspeed)
    resumed_from = trainer.fit()
    if resumed_from:
        ctx.run.set_tags({"ltscale.resumed_from_epoch": str(resumed_from)})
    _record_unreadable_images(loader, ctx)
    ctx.evaluate(network, step=optim.epochs - 1)


def _record_unreadable_images(loader, ctx: StageContext) -> None:
    """The training images that were replaced by same-class substitutes (every rank's), as a metric
    in the stage's manifest, so a reused stage still shows it, and a list in its MLflow run.
    Only images met since the stage last (re)started are known: a resumed stage counts from there."""
    unreadable = sorted(set().union(*all_gather_object(list(getattr(loader, "bad_files", [])))))
    if not unreadable:
        return
    ctx.metrics["data/unreadable_train_images"] = float(len(unreadable))
    ctx.run.log_metrics({"data/unreadable_train_images": float(len(unreadable))})
    if ctx.is_main:
        ctx.run.log_dict({"replaced_by_same_class_images": unreadable}, "unreadable_train_images.json")

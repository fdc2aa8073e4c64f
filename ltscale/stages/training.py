"""The shared tail of every training stage: fit with per-epoch logging, then a final evaluation."""

from __future__ import annotations

from ltscale.dist.gather import all_gather_object
from ltscale.engine.checkpoint import atomic_write_text
from ltscale.engine.trainer import EpochMetrics, Trainer, saved_progress
from ltscale.models.network import Network
from ltscale.stages.context import StageContext
from ltscale.stages.store import PROGRESS


TRAINING_RUN = "training_run.txt"
"""In a stage directory: the MLflow run id of the attempt training it (for a resumed attempt's link)."""


def train_and_evaluate(task, network: Network, optim, sampler, eval_every: int, ctx: StageContext, views: int = 1) -> None:
    """The shared tail of every training stage: fit with per-epoch logging, then a final evaluation.
    ``views``: augmented views per image in each batch (2 for MoCo: ``image`` and ``image_key``)."""
    loader = ctx.train_loader(optim.batch_size, sampler, views=views)

    def on_epoch_end(metrics: EpochMetrics) -> None:
        ctx.progress.note(f"{ctx.name}: epoch {metrics.epoch + 1}/{optim.epochs}  loss {metrics.loss:.4f}  train top-1 "
                          f"{metrics.top1:.2f}  lr {metrics.lr:.4g}  {metrics.images_per_second:,.0f} img/s  "
                          f"{metrics.seconds:.1f} s", epoch=True)
        if hasattr(loader, "check_bad_images_across_ranks"):  # image files: the run's budget, all ranks' files
            loader.check_bad_images_across_ranks()
        ctx.run.log_metrics(metrics.as_dict(), step=metrics.epoch, background=True)  # an unreachable store does not stop training
        if eval_every and (metrics.epoch + 1) % eval_every == 0 and metrics.epoch + 1 < optim.epochs:
            ctx.evaluate(network, step=metrics.epoch, final=False)

    # The run that trained the epochs a resumed stage starts after holds their learning curve:
    # link it. The file names the run whose progress the stage directory holds.
    run_file = ctx.directory / TRAINING_RUN
    earlier = run_file.read_text().strip() if run_file.is_file() else ""

    def hold_progress() -> None:
        # Written once this run holds the progress (resumed from it, or starting without any), not
        # before: an attempt that dies while resuming (preempted, out of memory) would otherwise
        # leave the file naming its empty run, and the next attempt would link to that one and
        # lose the run that trained the first epochs.
        if ctx.is_main and ctx.run.run_id:
            atomic_write_text(ctx.run.run_id, run_file)

    def on_resume(epochs_done: int, metrics: EpochMetrics | None) -> None:
        # Linked now, not when training ends: an attempt stopped again before its end must still
        # point at the run it continued, or a stage resumed twice loses the middle of its lineage.
        tags = {"ltscale.resumed_from_epoch": str(epochs_done)}
        if earlier and earlier != ctx.run.run_id:
            tags["ltscale.resumed_from_run"] = earlier
        ctx.run.set_tags(tags)
        hold_progress()
        loss = ""
        if metrics is not None:
            # The epoch the stage resumes after, again in this run: its point is lost if the stop came
            # between saving it and sending it, and the resumed curve then starts where it continues.
            ctx.run.log_metrics(metrics.as_dict(), step=metrics.epoch, background=True)
            loss = f" (loss {metrics.loss:.4f})"
        ctx.progress.note(f"{ctx.name}: resuming after epoch {epochs_done}/{optim.epochs}{loss} from {ctx.directory / PROGRESS}")

    trainer = Trainer(task, loader, optim, ctx.device, ctx.precision, ctx.directory / PROGRESS, ctx.name,
                      on_epoch_end=on_epoch_end, progress=ctx.progress, step=ctx.step, deepspeed=ctx.deepspeed,
                      on_resume=on_resume)
    if not saved_progress(ctx.directory / PROGRESS):
        hold_progress()
    trainer.fit()
    ctx.world_sizes = trainer.world_sizes
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
    ctx.record.log_metrics({"data/unreadable_train_images": float(len(unreadable))})
    if ctx.is_main:
        ctx.record.log_dict({"replaced_by_same_class_images": unreadable}, "unreadable_train_images.json")

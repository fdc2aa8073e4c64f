"""Stage II / IV and the decoupled baselines: LWS, cRT or tau-norm on frozen features."""

from __future__ import annotations

import numpy as np

from ltscale.engine.evaluate import evaluate_head_on_features, extract_features
from ltscale.models.heads import HeadSpec, rebalanced_head
from ltscale.models.network import replace_head
from ltscale.stages.config import RebalanceConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.store import StageOutput
from ltscale.stages.tasks import RebalanceTask
from ltscale.stages.training import train_and_evaluate

TAU_GRID = tuple(np.round(np.arange(0.0, 2.01, 0.1), 2))


def run(config: RebalanceConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    source = inputs["source"]
    network = load_model(source.file("model"), ctx.device)
    if config.head not in network.heads:
        raise ValueError(
            f"stage {ctx.name}: head {config.head!r} does not exist in the model of stage {source.name!r} "
            f"(heads: {sorted(network.heads)}); set stages.{ctx.name}.head"
        )
    old_spec = network.head_specs[config.head]
    if config.method == "crt":
        spec = HeadSpec(kind="linear", num_outputs=old_spec.num_outputs)
    elif config.method == "lws":
        spec = HeadSpec(kind="lws", num_outputs=old_spec.num_outputs)
    else:
        spec = HeadSpec(kind="tau_norm", num_outputs=old_spec.num_outputs, tau=_choose_tau(config, ctx, network))
    replace_head(network, config.head, rebalanced_head(network.heads[config.head], spec, network.feature_dim), spec)
    network.predict_head = config.head
    if config.method == "tau_norm":
        ctx.record.log_metrics({"rebalance/tau": spec.tau})
        ctx.evaluate(network, step=0)
    else:
        task = RebalanceTask(network, config.head, config.backbone_bn)
        train_and_evaluate(task, network, config.optim, config.sampler, 0, ctx)
    return {"model": ctx.save_model(network)}


def _choose_tau(config: RebalanceConfig, ctx: StageContext, network) -> float:
    """``config.tau``, or with ``tau_search`` the tau in 0..2 with the best validation top-1."""
    if not config.tau_search:
        return config.tau
    if ctx.bundle.val is None:
        raise ValueError(
            f"stage {ctx.name}: tau_search needs a validation split, and {ctx.bundle.name} has none "
            "(set data.val_list, or set tau_search=false and a fixed tau)"
        )
    # tau only changes the head: the backbone runs over the validation split once, not once per tau.
    features, targets = extract_features(network, ctx.eval_loader(ctx.bundle.val), ctx.device, ctx.autocast)
    source_head = network.heads[config.head]
    best_tau, best_top1 = config.tau, -1.0
    for tau in TAU_GRID:
        spec = HeadSpec(kind="tau_norm", num_outputs=network.head_specs[config.head].num_outputs, tau=float(tau))
        head = rebalanced_head(source_head, spec, network.feature_dim).to(ctx.device).eval()
        top1 = evaluate_head_on_features(head, features, targets, ctx.class_counts, ctx.device, ctx.autocast).top1
        ctx.record.log_metrics({"rebalance/val_top1": 100 * top1}, step=int(round(tau * 10)))
        if top1 > best_top1:
            best_tau, best_top1 = float(tau), top1
    return best_tau

"""DiVE's virtual-example distribution and its rule-of-thumb temperature choice.

v_c(T, p) = sum over training images of p_t[c], p_t = softmax(z_t / T)^p normalised, which is
softmax(z_t / (T / p)): the flattening depends on the effective temperature T / p alone. The rule:
going through the settings from the least flattening (smallest T / p) up, pick the first whose
mean v_c over few-shot classes is at least that over many-shot classes, i.e. the least flattening
that makes the tail slightly heavier than the head. Settings with the same T / p (T = 2, p = 0.5
and T = 4, p = 1) give the same distribution; the one with power normalisation (the smaller T) is
taken, as in the paper's example (teacher flattened with p = 0.5, student temperature T). One
pass of teacher logits, no training.
"""

from __future__ import annotations

import numpy as np
import torch

from ltscale.data.base import ClassGroups
from ltscale.engine.checkpoint import atomic_write_json
from ltscale.losses.functional import teacher_distribution
from ltscale.stages.config import VirtualExamplesConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.soft_labels import predict_logits
from ltscale.stages.store import StageOutput


def virtual_example_distribution(logits: torch.Tensor, temperature: float, power: float) -> np.ndarray:
    """(C,) v_c: the teacher's soft targets summed over all training images."""
    return teacher_distribution(logits, temperature, power).sum(0).cpu().double().numpy()


def choose_setting(logits: torch.Tensor, class_counts: np.ndarray, temperatures, powers) -> tuple[dict, list[dict]]:
    """The rule-of-thumb (T, p) and the whole sweep (one row per setting)."""
    groups = ClassGroups.from_counts(class_counts)
    # Without both a head and a tail the rule compares nothing; fall back to the top/bottom thirds.
    order = np.argsort(-class_counts)
    head = groups.many if len(groups.many) else order[: max(1, len(order) // 3)]
    tail = groups.few if len(groups.few) else order[-max(1, len(order) // 3) :]
    rows = []
    for temperature in sorted(temperatures):
        for power in sorted(powers, reverse=True):
            v = virtual_example_distribution(logits, temperature, power)
            rows.append({
                "temperature": float(temperature), "power": float(power),
                "head_mean": float(v[head].mean()), "tail_mean": float(v[tail].mean()),
                "distribution": v.tolist(),
            })
    by_flattening = sorted(rows, key=lambda r: (r["temperature"] / r["power"], r["temperature"]))
    chosen = next((r for r in by_flattening if r["tail_mean"] >= r["head_mean"]), by_flattening[-1])
    return chosen, rows


def run(config: VirtualExamplesConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    network = load_model(inputs["source"].file("model"), ctx.device)
    logits = predict_logits(network, ctx.eval_loader(ctx.bundle.train, substitute=True), ctx.device, ctx.autocast)
    chosen, rows = choose_setting(logits, ctx.class_counts, config.temperatures, config.powers)
    summary = {"chosen": {"temperature": chosen["temperature"], "power": chosen["power"]}, "sweep": rows}
    if ctx.is_main:  # one writer; the other ranks computed the same choice
        atomic_write_json(summary, ctx.directory / "virtual_examples.json")
        ctx.run.log_dict(summary, "virtual_examples.json")
        from ltscale.tracking.plots import virtual_example_figure

        shown = {f"T={r['temperature']:g}, p={r['power']:g}": np.array(r["distribution"]) for r in rows
                 if r["temperature"] in (1.0, chosen["temperature"]) and r["power"] in (1.0, chosen["power"])}
        ctx.run.log_figure(virtual_example_figure(shown, ctx.class_counts, f"virtual examples ({ctx.bundle.name})"), "virtual_examples.png")
    metrics = {"virtual/temperature": chosen["temperature"], "virtual/power": chosen["power"],
               "virtual/head_mean": chosen["head_mean"], "virtual/tail_mean": chosen["tail_mean"]}
    ctx.run.log_metrics(metrics)
    ctx.metrics.update(metrics)
    return {"virtual_examples": "virtual_examples.json"}

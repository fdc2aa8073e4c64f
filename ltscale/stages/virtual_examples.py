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
from ltscale.dist.gather import all_reduce_sum
from ltscale.engine.checkpoint import atomic_write_json
from ltscale.losses.functional import teacher_distribution
from ltscale.stages.config import VirtualExamplesConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.soft_labels import predicted_logits
from ltscale.stages.store import StageOutput


def virtual_example_distribution(logits: torch.Tensor, temperature: float, power: float) -> torch.Tensor:
    """(C,) v_c of these images: the teacher's soft targets summed over them, in float64."""
    return teacher_distribution(logits, temperature, power).sum(0, dtype=torch.float64)


class VirtualExampleSums:
    """v_c for every (T, p) setting, summed batch by batch over this rank's images; :meth:`rows`
    adds the ranks' sums. Nothing per image is kept: iNat18's logits in fp32 would be 13 GiB on
    every rank, where these sums are settings x classes."""

    def __init__(self, temperatures, powers, num_classes: int, device: torch.device) -> None:
        self.settings = [(float(t), float(p)) for t in sorted(temperatures) for p in sorted(powers, reverse=True)]
        self.sums = torch.zeros((len(self.settings), num_classes), dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor) -> None:
        for row, (temperature, power) in enumerate(self.settings):
            self.sums[row] += virtual_example_distribution(logits, temperature, power)

    def rows(self) -> list[dict]:
        """One row per setting, ``distribution`` summed over every rank's images."""
        sums = all_reduce_sum(self.sums.clone()).cpu().numpy()
        return [{"temperature": t, "power": p, "distribution": sums[i]} for i, (t, p) in enumerate(self.settings)]


def rule_of_thumb(rows: list[dict], class_counts: np.ndarray) -> tuple[dict, list[dict]]:
    """The rule-of-thumb setting among ``rows`` (:meth:`VirtualExampleSums.rows`) and the sweep,
    each row with its head and tail means and the distribution as a list."""
    groups = ClassGroups.from_counts(class_counts)
    # Without both a head and a tail the rule compares nothing; fall back to the top/bottom thirds.
    order = np.argsort(-class_counts)
    head = groups.many if len(groups.many) else order[: max(1, len(order) // 3)]
    tail = groups.few if len(groups.few) else order[-max(1, len(order) // 3) :]
    swept = [{
        "temperature": row["temperature"], "power": row["power"],
        "head_mean": float(row["distribution"][head].mean()), "tail_mean": float(row["distribution"][tail].mean()),
        "distribution": row["distribution"].tolist(),
    } for row in rows]
    by_flattening = sorted(swept, key=lambda r: (r["temperature"] / r["power"], r["temperature"]))
    chosen = next((r for r in by_flattening if r["tail_mean"] >= r["head_mean"]), by_flattening[-1])
    return chosen, swept


def sweep(network, loader, device: torch.device, autocast, class_counts: np.ndarray, temperatures, powers) -> tuple[dict, list[dict]]:
    """One pass of ``network`` over ``loader`` (this rank's shard of the training split): the
    chosen setting and the whole sweep, the same on every rank."""
    sums = VirtualExampleSums(temperatures, powers, len(class_counts), device)
    for logits, _ in predicted_logits(network, loader, device, autocast):
        sums.add(logits)
    return rule_of_thumb(sums.rows(), class_counts)


def run(config: VirtualExamplesConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    network = load_model(inputs["source"].file("model"), ctx.device)
    chosen, rows = sweep(network, ctx.eval_loader(ctx.bundle.train, substitute=True), ctx.device, ctx.autocast,
                         ctx.class_counts, config.temperatures, config.powers)
    summary = {"chosen": {"temperature": chosen["temperature"], "power": chosen["power"]}, "sweep": rows}
    if ctx.is_main:  # one writer; the other ranks computed the same choice
        atomic_write_json(summary, ctx.directory / "virtual_examples.json")
        ctx.record.log_dict(summary, "virtual_examples.json")
        from ltscale.tracking.plots import virtual_example_figure

        shown = {f"T={r['temperature']:g}, p={r['power']:g}": np.array(r["distribution"]) for r in rows
                 if r["temperature"] in (1.0, chosen["temperature"]) and r["power"] in (1.0, chosen["power"])}
        ctx.record.log_figure(virtual_example_figure(shown, ctx.class_counts, f"virtual examples ({ctx.bundle.name})"), "virtual_examples.png")
    metrics = {"virtual/temperature": chosen["temperature"], "virtual/power": chosen["power"],
               "virtual/head_mean": chosen["head_mean"], "virtual/tail_mean": chosen["tail_mean"]}
    ctx.record.log_metrics(metrics)
    ctx.metrics.update(metrics)
    return {"virtual_examples": "virtual_examples.json"}

"""Stage III: a fresh student distilled with SSD's two-head loss or DiVE's loss."""

from __future__ import annotations

import json

import torch

from ltscale.dist.gather import rank_and_world_size
from ltscale.engine.fast_step import resolve_step
from ltscale.losses.modules import distillation_losses
from ltscale.models.heads import HeadSpec
from ltscale.stages.config import DistillConfig
from ltscale.stages.context import StageContext, load_model
from ltscale.stages.soft_labels import load_soft_labels, soft_label_device
from ltscale.stages.store import StageOutput
from ltscale.stages.tasks import DiVEDistillTask, SSDDistillTask
from ltscale.stages.training import train_and_evaluate


def run(config: DistillConfig, ctx: StageContext, inputs: dict[str, StageOutput]) -> dict[str, str]:
    losses = distillation_losses(config.backend, ctx.device)
    classes = ctx.bundle.num_classes
    temperature, power = config.temperature, config.power
    if "temperature" in inputs:
        chosen = json.loads(inputs["temperature"].file("virtual_examples").read_text())["chosen"]
        temperature, power = float(chosen["temperature"]), float(chosen["power"])
    ctx.run.log_params({"resolved.temperature": temperature, "resolved.power": power})
    teacher_output = inputs["teacher"]
    has_model = "model" in teacher_output.manifest.get("files", {})
    if config.method == "ssd":
        if teacher_output.kind == "soft_labels":
            soft = load_soft_labels(teacher_output, ctx.bundle.train.fingerprint(), len(ctx.bundle.train))
            step = resolve_step(ctx.step, ctx.device, rank_and_world_size()[1],  # the step the trainer will take
                                zero=ctx.deepspeed is not None and ctx.deepspeed.enabled)
            soft = soft.to(soft_label_device(soft.numel() * soft.element_size(), ctx.device, step))
        elif has_model:  # the teacher run on each augmented batch
            soft = load_model(teacher_output.file("model"), ctx.device)
        else:
            raise ValueError(f"stage {ctx.name}: method=ssd distils stored soft labels or a teacher model; "
                             f"{teacher_output.name!r} is a {teacher_output.kind} stage")
        heads = {"hard": HeadSpec("linear", classes), "soft": HeadSpec("linear", classes)}
        network = ctx.new_network(config.model, heads, predict_head="hard")
        task = SSDDistillTask(network, soft, losses, temperature, config.hard_weight, config.soft_weight)
    else:
        if not has_model:
            raise ValueError(f"stage {ctx.name}: method=dive needs a teacher model; {teacher_output.name!r} is a {teacher_output.kind} stage")
        teacher = load_model(teacher_output.file("model"), ctx.device)
        network = ctx.new_network(config.model, {"cls": HeadSpec("linear", classes)}, predict_head="cls")
        counts = torch.as_tensor(ctx.class_counts, device=ctx.device)
        task = DiVEDistillTask(network, teacher, counts, losses, temperature, power, config.alpha)
    train_and_evaluate(task, network, config.optim, config.sampler, config.eval_every, ctx)
    return {"model": ctx.save_model(network)}

"""DiVE's stage task: the loss it trains with is DiVE's formula on the teacher's eval-mode logits,
with its temperature, power and alpha in their places, and the teacher stays frozen in eval mode.
(SSD's task: test_soft_labels.py. The fast step is compared with these tasks in test_fast_step.py,
so it cannot catch a task that is wrong in both.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltscale.losses.modules import distillation_losses
from ltscale.models.heads import HeadSpec
from ltscale.models.network import ModelConfig, Network
from ltscale.stages.tasks import DiVEDistillTask


def _dive(student_logits, teacher_logits, targets, counts, temperature, power, alpha):
    """METHODS.md written out: alpha T^2 KL(softmax(z_t / T)^p renormalised || softmax(z_s / T))
    + (1 - alpha) CE(z_s + log n, y), batch means."""
    teacher = torch.softmax(teacher_logits / temperature, 1) ** power
    teacher = teacher / teacher.sum(1, keepdim=True)
    kd = temperature**2 * F.kl_div(F.log_softmax(student_logits / temperature, 1), teacher, reduction="batchmean")
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits + counts.float().log(), targets)


def test_dive_task_trains_on_the_dive_loss_of_an_eval_mode_teacher():
    torch.manual_seed(0)
    counts = torch.tensor([200, 40, 5])
    student = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", 3)}, "cls")
    teacher = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", 3)}, "cls")
    with torch.no_grad():  # trained-looking statistics, so a train-mode teacher would give other logits
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
        teacher.heads["cls"].weight.mul_(5)
    teacher.train()  # as a loaded model may come; the task must put it in eval mode
    statistics = {name: value.clone() for name, value in teacher.state_dict().items()}
    temperature, power, alpha = 3.0, 0.5, 0.3
    task = DiVEDistillTask(student, teacher, counts, distillation_losses("torch", torch.device("cpu")),
                           temperature, power, alpha)
    task.train()
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in student.parameters()}

    batch = {"image": torch.randn(6, 3, 8, 8), "target": torch.tensor([0, 1, 2, 0, 0, 1])}
    student_state = {name: value.clone() for name, value in student.state_dict().items()}
    out = task(batch)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # eval mode: running statistics untouched
        assert torch.equal(value, statistics[name]), name

    student.load_state_dict(student_state)  # the task's forward moved the student's statistics once
    with torch.no_grad():
        teacher_logits = teacher(batch["image"], heads=("cls",))["cls"]
        student_logits = student(batch["image"], heads=("cls",))["cls"]  # train mode, as in the task
    expected = _dive(student_logits, teacher_logits, batch["target"], counts, temperature, power, alpha)
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(out["logits"].detach(), student_logits)
    # The settings are far enough apart that one in the wrong place shows.
    for wrong in ((power, temperature, alpha), (temperature, power, 1 - alpha)):
        assert not torch.isclose(expected, _dive(student_logits, teacher_logits, batch["target"], counts, *wrong))
    teacher.train()
    with torch.no_grad():
        assert not torch.allclose(teacher(batch["image"], heads=("cls",))["cls"], teacher_logits)

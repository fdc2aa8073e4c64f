"""Soft labels at iNaturalist scale: where the student's table lives, how it is loaded, what the
soft-label stage refuses. (The stage end to end, in fp32 and fp16, is in test_pipeline.py; its
gather over several ranks in test_distributed.py.)"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ltscale.stages import soft_labels
from ltscale.stages.soft_labels import DEVICE_SHARE, soft_label_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_of(monkeypatch):
    """A pretend GPU of the given memory: the placement rule reads only its total memory."""
    def install(total_bytes: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=total_bytes))
    return install


def test_placement_keeps_small_tables_and_the_fast_step_on_the_gpu(gpu_of):
    gpu = torch.device("cuda:0")
    gpu_of(80 << 30)
    inat = 437_513 * 8142 * 2  # 6.6 GiB in fp16: 8 % of an 80 GiB GPU
    assert soft_label_device(inat, gpu, "eager") == gpu
    gpu_of(16 << 30)  # 41 % of a 16 GiB GPU: host memory, looked up row by row
    assert soft_label_device(inat, gpu, "eager") == torch.device("cpu")
    assert soft_label_device(int(DEVICE_SHARE * (16 << 30)), gpu, "eager") == gpu  # the boundary is inclusive
    # The fast step is one CUDA graph, which cannot read host memory: the table stays on the GPU.
    assert soft_label_device(inat, gpu, "fast") == gpu
    assert soft_label_device(inat, torch.device("cpu"), "eager") == torch.device("cpu")


class _Network(nn.Module):
    predict_head = "hard"

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.hard = nn.Linear(4, classes)
        self.soft = nn.Linear(4, classes)

    def forward(self, image, heads):
        return {name: getattr(self, name)(image) for name in heads}


def test_the_student_task_holds_the_table_as_an_attribute_not_a_buffer():
    """DDP broadcasts a module's buffers from rank 0 when it wraps it: 6.6 GiB sent to ranks that
    already hold the same table. The task keeps it outside the module state, and looks rows up."""
    from ltscale.losses.modules import distillation_losses
    from ltscale.stages.tasks import SSDDistillTask

    table = torch.randn(10, 3)
    # T, hard and soft weights all different from SSD's defaults: each must reach its place in the loss.
    task = SSDDistillTask(_Network(3), table, distillation_losses("torch", torch.device("cpu")), 2.5, 0.7, 1.9)
    assert not any(buffer is table for buffer in task.buffers()) and "soft_label_logits" not in task.state_dict()
    batch = {"image": torch.randn(4, 4), "target": torch.tensor([0, 1, 2, 0]), "index": torch.tensor([9, 0, 3, 3])}
    out = task(batch)
    from ltscale.losses.functional import ssd_hybrid_loss

    network = task.network
    expected = ssd_hybrid_loss(network.hard(batch["image"]), network.soft(batch["image"]), batch["target"],
                               table[[9, 0, 3, 3]], temperature=2.5, hard_weight=0.7, soft_weight=1.9)
    torch.testing.assert_close(out["loss"], expected)
    swapped = ssd_hybrid_loss(network.hard(batch["image"]), network.soft(batch["image"]), batch["target"],
                              table[[9, 0, 3, 3]], temperature=2.5, hard_weight=1.9, soft_weight=0.7)
    assert not torch.isclose(out["loss"], swapped)


def test_the_student_task_can_distil_a_teacher_run_in_eval_mode_on_each_batch():
    """The online variant (SSD-LT's public code): soft targets are the frozen teacher's logits on
    the student's augmented batch, with the teacher's trained batch-norm statistics."""
    from ltscale.losses.functional import ssd_hybrid_loss
    from ltscale.losses.modules import distillation_losses
    from ltscale.models.heads import HeadSpec
    from ltscale.models.network import ModelConfig, Network
    from ltscale.stages.tasks import SSDDistillTask

    torch.manual_seed(0)
    heads = {"hard": HeadSpec("linear", 3), "soft": HeadSpec("linear", 3)}
    student = Network(ModelConfig(arch="resnet8", width=4), heads, "hard")
    teacher = Network(ModelConfig(arch="resnet8", width=4), {"cls": HeadSpec("linear", 3)}, "cls")
    statistics = {name: value.clone() for name, value in teacher.state_dict().items()}
    task = SSDDistillTask(student, teacher, distillation_losses("torch", torch.device("cpu")), 2.0, 1.0, 1.0)
    task.train()
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in student.parameters()}
    batch = {"image": torch.randn(4, 3, 8, 8), "target": torch.tensor([0, 1, 2, 0])}  # no index needed
    out = task(batch)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # eval mode: running statistics untouched
        assert torch.equal(value, statistics[name]), name
    with torch.no_grad():
        teacher_logits = teacher(batch["image"], heads=("cls",))["cls"]  # eval mode, as in the task
        student_out = student(batch["image"], heads=("hard", "soft"))  # train mode, as in the task
    expected = ssd_hybrid_loss(student_out["hard"], student_out["soft"], batch["target"], teacher_logits, 2.0, 1.0, 1.0)
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_host_table_serves_a_gpu_batch():
    from ltscale.losses.modules import distillation_losses
    from ltscale.stages.tasks import SSDDistillTask

    table = torch.randn(10, 3, dtype=torch.float16)
    network = _Network(3).cuda()
    task = SSDDistillTask(network, table, distillation_losses("torch", torch.device("cuda")), 2.0, 1.0, 1.0)
    batch = {"image": torch.randn(4, 4, device="cuda"), "target": torch.tensor([0, 1, 2, 0], device="cuda"),
             "index": torch.tensor([9, 0, 3, 3], device="cuda")}
    on_host = task(batch)["loss"]
    task.soft_label_logits = table.cuda()
    torch.testing.assert_close(on_host, task(batch)["loss"])


LOAD = r"""
import sys
from pathlib import Path
from ltscale.stages.soft_labels import load_soft_labels
from ltscale.stages.store import StageOutput

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

output = StageOutput("soft_labels", "soft_labels", "k", Path(sys.argv[1]), {"files": {"soft_labels": "soft_labels.pt"}})
before = rss()
logits = load_soft_labels(output, "fp", 2048)
grown = rss() - before
row = logits[2047].float().sum().item()  # readable
print(grown, row)
"""


def test_stored_soft_labels_are_memory_mapped_not_copied(tmp_path):
    """The ranks of a node share the file's pages: loading maps it (a private copy per rank was
    8 x 6.6 GiB of host memory on an iNat18 node)."""
    logits = torch.ones(2048, 16384, dtype=torch.float16)  # 64 MiB
    torch.save({"kind": soft_labels.SOFT_LABELS_KIND, "logits": logits, "train_fingerprint": "fp"}, tmp_path / "soft_labels.pt")
    done = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    grown, row = done.stdout.split()
    assert float(row) == 16384.0
    assert int(grown) < 16 << 20, f"loading grew the process by {int(grown) >> 20} MiB for a 64 MiB file"


def test_soft_labels_of_another_training_set_are_refused(tmp_path):
    """Rows are looked up by training-image index: a table from other data (same size or not) would
    hand each image another image's targets."""
    from ltscale.stages.store import StageOutput

    torch.save({"kind": soft_labels.SOFT_LABELS_KIND, "logits": torch.zeros(8, 3), "train_fingerprint": "fp"},
               tmp_path / "soft_labels.pt")
    output = StageOutput("soft_labels", "soft_labels", "k", tmp_path, {"files": {"soft_labels": "soft_labels.pt"}})
    assert soft_labels.load_soft_labels(output, "fp", 8).shape == (8, 3)
    with pytest.raises(ValueError, match=r"were computed on a different training set \(fingerprint fp, 8 rows; expected other, 8\)"):
        soft_labels.load_soft_labels(output, "other", 8)
    with pytest.raises(ValueError, match="expected fp, 9"):
        soft_labels.load_soft_labels(output, "fp", 9)


def test_overflowing_soft_labels_are_refused_with_the_count(tmp_path, monkeypatch):
    """Checked batch by batch as stored (fp16 overflows where fp32 did not), summed over ranks,
    and nothing is written."""
    from ltscale.stages.pipeline import run_pipeline
    from tests.test_pipeline import tiny

    monkeypatch.setattr(soft_labels, "FP16_ABOVE", 10)
    real = soft_labels.load_model

    def blown_up(path, device):
        network = real(path, device)
        with torch.no_grad():
            for parameter in network.heads[network.predict_head].parameters():
                parameter.mul_(1e6)  # logits far beyond fp16's 65504
        return network

    monkeypatch.setattr(soft_labels, "load_model", blown_up)
    with pytest.raises(ValueError, match=r"soft labels of 'teacher_lws' are not all finite \(\d+ values, stored as torch.float16\)"):
        run_pipeline(tiny("ssd", tmp_path))
    assert not list((tmp_path / "store").glob("soft_labels-*/soft_labels.pt"))

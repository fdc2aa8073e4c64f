"""Autograd wrappers and public functions for the fused distillation losses.

The maths is derived in :mod:`ltscale.kernels._distill_kernels`.  This module does not import
``triton`` at import time (so that ``TRITON_INTERPRET`` can still be set after ``import ltscale``);
the kernel module is imported on first use.

Each public function has the signature and semantics of its reference in
:mod:`ltscale.losses.functional` and returns a 0-dim fp32 tensor.  When the kernels cannot run on
the given tensors (see :func:`kernels_usable`) the public functions fall back to the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Any

import torch

_KERNEL_MODULE = "ltscale.kernels._distill_kernels"

# CE_SRC values understood by the kernels.
_CE_NONE = 0
_CE_ON_STUDENT = 1
_CE_SEPARATE = 2


def _interpret_env() -> bool:
    # the spellings triton's getenv_bool accepts as true
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def kernels_usable(tensor: Any) -> bool:
    """True when the Triton kernels can run on ``tensor``; never raises.

    That is: ``tensor`` is a CUDA tensor and triton is importable (and not in interpreter mode),
    or ``tensor`` is a CPU tensor and ``TRITON_INTERPRET=1`` is set.  The interpreter/compiler
    choice is fixed when the kernel module is first imported; a mismatch with the current
    environment makes this return False rather than run in the wrong mode.
    """
    try:
        if not isinstance(tensor, torch.Tensor):
            return False
        interpret = _interpret_env()
        if tensor.is_cuda:
            if interpret or torch.cuda.get_device_capability(tensor.device) < (7, 0):
                return False
        elif tensor.device.type == "cpu":
            if not interpret:
                return False
        else:
            return False
        if importlib.util.find_spec("triton") is None:
            return False
        import sys

        mod = sys.modules.get(_KERNEL_MODULE)
        if mod is not None and bool(getattr(mod, "INTERPRETED", False)) != interpret:
            return False
        return True
    except Exception:  # noqa: BLE001 - contract: never raise
        return False


def _kernels():
    return importlib.import_module(_KERNEL_MODULE)


def _block_and_warps(num_classes: int) -> tuple[int, int]:
    """Chunk size along the classes and warps per program (one program per row)."""
    block = 1 << max(int(num_classes) - 1, 0).bit_length()  # next power of two >= C
    block = max(128, min(block, 4096))
    if block >= 4096:
        warps = 16
    elif block >= 2048:
        warps = 8
    elif block >= 512:
        warps = 4
    else:
        warps = 2
    return block, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The logits as a 2-D tensor with unit stride along the classes (copy only if needed)."""
    if x.dim() != 2:
        raise ValueError(f"expected 2-D logits (N x C), got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    return x


def _on_device(device: torch.device):
    """Launch on the tensors' GPU even when it is not the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_fwd(k, n, student, teacher, h, y, cnt, row_loss, lse_s, lse_t, lse_h, c,
                temperature, power, kd_coef, ce_coef, ce_src, has_prior, block, warps):
    k._distill_fwd_kernel[(n,)](
        student, student.stride(0),
        teacher, teacher.stride(0),
        h, h.stride(0),
        y, cnt,
        row_loss, lse_s, lse_t, lse_h,
        c,
        1.0 / temperature,
        power / temperature,
        kd_coef,
        ce_coef,
        CE_SRC=ce_src,
        HAS_PRIOR=has_prior,
        BLOCK=block,
        num_warps=warps,
    )



def _launch_bwd(k, n, g, student, teacher, h, y, cnt, lse_s, lse_t, lse_h, ds, dh, c,
                temperature, power, kd_coef, ce_coef, ce_src, has_prior, block, warps):
    k._distill_bwd_kernel[(n,)](
        g,
        student, student.stride(0),
        teacher, teacher.stride(0),
        h, h.stride(0),
        y, cnt,
        lse_s, lse_t, lse_h,
        ds if ds is not None else lse_s,  # dummy pointer when not written
        dh if dh is not None else lse_s,  # dummy pointer when not written
        c,
        1.0 / temperature,
        power / temperature,
        kd_coef / (temperature * n),
        ce_coef / n,
        CE_SRC=ce_src,
        HAS_PRIOR=has_prior,
        WRITE_DS=ds is not None,
        WRITE_DH=dh is not None,
        BLOCK=block,
        num_warps=warps,
    )


class _FusedDistillFn(torch.autograd.Function):
    """mean_rows(kd_coef * KL(softmax(zt p / T) || softmax(z / T)) + ce_coef * CE(h [+ log n], y)).

    ``ce_src``: 0 no CE term; 1 CE on the student logits (DiVE); 2 CE on ``ce_logits`` (SSD).
    Gradients are returned for ``student`` and (``ce_src == 2``) ``ce_logits`` only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        ce_logits: torch.Tensor | None,
        targets: torch.Tensor | None,
        class_counts: torch.Tensor | None,
        temperature: float,
        power: float,
        kd_coef: float,
        ce_coef: float,
        ce_src: int,
    ) -> torch.Tensor:
        k = _kernels()
        student = _rows(student)
        teacher = _rows(teacher.detach())
        n, c = student.shape
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} != student logits {tuple(student.shape)}"
            )
        dev = student.device
        if ce_src == _CE_SEPARATE:
            assert ce_logits is not None
            ce_logits = _rows(ce_logits)
            if ce_logits.shape != student.shape:
                raise ValueError(
                    f"CE logits {tuple(ce_logits.shape)} != soft logits {tuple(student.shape)}"
                )
        if ce_src != _CE_NONE:
            assert targets is not None
            if targets.shape != (n,):
                raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
            targets = targets.to(device=dev, dtype=torch.int64).contiguous()
        has_prior = class_counts is not None
        if has_prior:
            if class_counts.shape != (c,):
                raise ValueError(
                    f"class_counts must have shape ({c},), got {tuple(class_counts.shape)}"
                )
            class_counts = class_counts.to(device=dev).contiguous()

        f32 = torch.float32
        row_loss = torch.empty(n, device=dev, dtype=f32)
        lse_s = torch.empty(n, device=dev, dtype=f32)
        lse_t = torch.empty(n, device=dev, dtype=f32)
        lse_h = torch.empty(n if ce_src != _CE_NONE else 1, device=dev, dtype=f32)
        h = ce_logits if ce_src == _CE_SEPARATE else student
        y = targets if targets is not None else lse_h  # dummy pointer when unused
        cnt = class_counts if has_prior else lse_h  # dummy pointer when unused
        block, warps = _block_and_warps(c)
        if n > 0:
            with _on_device(dev):
                _launch_fwd(k, n, student, teacher, h, y, cnt, row_loss, lse_s, lse_t, lse_h, c,
                            temperature, power, kd_coef, ce_coef, ce_src, has_prior, block, warps)
        ctx.save_for_backward(student, teacher, h, y, cnt, lse_s, lse_t, lse_h)
        ctx.params = (temperature, power, kd_coef, ce_coef, ce_src, has_prior, block, warps)
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        student, teacher, h, y, cnt, lse_s, lse_t, lse_h = ctx.saved_tensors
        temperature, power, kd_coef, ce_coef, ce_src, has_prior, block, warps = ctx.params
        n, c = student.shape
        write_ds = bool(ctx.needs_input_grad[0])
        write_dh = ce_src == _CE_SEPARATE and bool(ctx.needs_input_grad[2])
        ds = torch.empty((n, c), device=student.device, dtype=student.dtype) if write_ds else None
        dh = torch.empty((n, c), device=h.device, dtype=h.dtype) if write_dh else None
        if (write_ds or write_dh) and n > 0:
            g = grad_output.detach().to(torch.float32).reshape(())  # stays on device: no sync
            with _on_device(student.device):
                _launch_bwd(_kernels(), n, g, student, teacher, h, y, cnt, lse_s, lse_t, lse_h,
                            ds, dh, c, temperature, power, kd_coef, ce_coef, ce_src, has_prior,
                            block, warps)
        return ds, None, dh, None, None, None, None, None, None, None


def _reference():
    from ltscale.losses import functional

    return functional


def _all_usable(*tensors: torch.Tensor) -> bool:
    return all(kernels_usable(t) for t in tensors)


def fused_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    power: float = 1.0,
) -> torch.Tensor:
    """Fused ``T^2 * KL(softmax(z_t p / T) || softmax(z_s / T))``, batch mean; see ``kd_loss``."""
    if not _all_usable(student_logits, teacher_logits):
        return _reference().kd_loss(student_logits, teacher_logits, temperature, power)
    t = float(temperature)
    return _FusedDistillFn.apply(
        student_logits, teacher_logits, None, None, None, t, float(power), t * t, 0.0, _CE_NONE
    )


def fused_dive_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: torch.Tensor,
    temperature: float,
    power: float,
    alpha: float,
) -> torch.Tensor:
    """Fused DiVE loss ``alpha * KD_{T,p} + (1 - alpha) * BSCE``; see ``dive_loss``."""
    if not _all_usable(student_logits, teacher_logits):
        return _reference().dive_loss(
            student_logits, teacher_logits, targets, class_counts, temperature, power, alpha
        )
    t = float(temperature)
    a = float(alpha)
    return _FusedDistillFn.apply(
        student_logits,
        teacher_logits,
        None,
        targets,
        class_counts,
        t,
        float(power),
        a * t * t,
        1.0 - a,
        _CE_ON_STUDENT,
    )


def fused_ssd_hybrid_loss(
    hard_logits: torch.Tensor,
    soft_logits: torch.Tensor,
    targets: torch.Tensor,
    soft_label_logits: torch.Tensor,
    temperature: float = 2.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
) -> torch.Tensor:
    """Fused SSD loss ``hard_weight * CE(hard, y) + soft_weight * KD_T(soft, soft labels)``."""
    if not _all_usable(hard_logits, soft_logits, soft_label_logits):
        return _reference().ssd_hybrid_loss(
            hard_logits,
            soft_logits,
            targets,
            soft_label_logits,
            temperature,
            hard_weight,
            soft_weight,
        )
    t = float(temperature)
    return _FusedDistillFn.apply(
        soft_logits,
        soft_label_logits,
        hard_logits,
        targets,
        None,
        t,
        1.0,
        float(soft_weight) * t * t,
        float(hard_weight),
        _CE_SEPARATE,
    )

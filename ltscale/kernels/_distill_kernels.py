"""Triton kernels for the fused distillation losses (KD, DiVE, SSD hybrid).

This module imports ``triton`` at import time, so it is only ever imported lazily from
:mod:`ltscale.kernels.distill` (inside functions).  ``triton.jit`` decides between the compiled
and the interpreted (``TRITON_INTERPRET=1``) implementation when the decorators below run, i.e.
on the first import of this module; :data:`INTERPRETED` records which one was chosen.

Notation (one row of the batch; N rows, C classes)
--------------------------------------------------
    z   student logits (KD side)          v = z / T                    q   = softmax(v)
    zt  teacher logits                    u = zt * p / T               p_t = softmax(u)
    h   cross-entropy logits              b = h + log n   (DiVE: h = z, prior log n_c)
                                                  b = h           (SSD: h = hard head, no prior)
                                                  r   = softmax(b)
    y   target class, n_c class counts, T temperature, p DiVE power.

Loss of one row (the wrapper takes the mean over rows):

    l = kd_coef * KL(p_t || q) + ce_coef * CE(b, y)

    KD:   kd_coef = T^2,               no CE term
    DiVE: kd_coef = alpha * T^2,       ce_coef = 1 - alpha,      CE on b = z + log n
    SSD:  kd_coef = soft_weight * T^2, ce_coef = hard_weight,    CE on b = h (separate tensor)

Forward, in one pass over the classes (chunks of BLOCK classes)
---------------------------------------------------------------
With lse(x) = log sum_c exp(x_c):

    KL(p_t || q) = sum_c p_t[c] * ((u_c - lse(u)) - (v_c - lse(v)))
                 = W / D_t + lse(v) - lse(u)
    where  D_t = sum_c exp(u_c - m_t),  W = sum_c exp(u_c - m_t) * (u_c - v_c),  m_t = max_c u_c
    CE(b, y)     = lse(b) - b_y

All three log-sum-exps are computed online (running max m and running sum d):  for each chunk,
m' = max(m, max_chunk x),  d' = d * exp(m - m') + sum_chunk exp(x - m');  W is rescaled by the
same factor as D_t.  Terms with exp(u_c - m_t) == 0 (teacher probability underflowing to 0, or a
-inf teacher logit) are dropped from W, which matches the reference's xlogy(0, 0) = 0.  The running
maxima start at a finite -3e38 instead of -inf so that a chunk whose logits are all -inf does not
produce exp(-inf - (-inf)) = nan.

The forward stores per row only: the weighted row loss and lse(v), lse(u), lse(b) (fp32, N each).

Backward (recompute, one more pass; no N x C intermediates)
-----------------------------------------------------------
    d l / d z  = kd_coef / T * (q - p_t)      [+ ce_coef * (r - onehot(y))   for DiVE]
    d l / d h  = ce_coef * (r - onehot(y))                                    for SSD
with q = exp(v - lse(v)), p_t = exp(u - lse(u)), r = exp(b - lse(b)) recomputed from the saved
statistics, and everything multiplied by g / N where g is the incoming grad_output (read from
device memory inside the kernel, so there is no host synchronisation).  The teacher receives no
gradient.  All arithmetic is fp32; the gradient is stored in the dtype of the logits.

Targets must lie in [0, C) (no ignore_index); this is not checked to avoid a host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)

# Finite stand-in for -inf as the initial running maximum (see module docstring).  Globals used
# inside @triton.jit functions must be constexpr.
_NEG_BIG = tl.constexpr(-3.0e38)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _distill_fwd_kernel(
    S_ptr,  # (N, C) student logits z for the KD term (fp32/bf16/fp16); unit stride along C
    s_stride,  # row stride of S_ptr, in elements
    T_ptr,  # (N, C) teacher logits zt (any float dtype); unit stride along C; read only
    t_stride,  # row stride of T_ptr, in elements
    H_ptr,  # (N, C) CE logits h when CE_SRC == 2 (SSD hard head); ignored otherwise
    h_stride,  # row stride of H_ptr, in elements
    Y_ptr,  # (N,) int64 target classes in [0, C); ignored when CE_SRC == 0
    CNT_ptr,  # (C,) class counts n_c (any numeric dtype); read only when HAS_PRIOR
    LOSS_ptr,  # (N,) fp32 out: weighted per-row loss  kd_coef * KL + ce_coef * CE
    LSE_S_ptr,  # (N,) fp32 out: lse(v), v = z / T
    LSE_T_ptr,  # (N,) fp32 out: lse(u), u = zt * p / T
    LSE_H_ptr,  # (N,) fp32 out: lse(b), b = h (+ log n); not written when CE_SRC == 0
    C,  # number of classes
    inv_temp,  # 1 / T
    teacher_scale,  # p / T
    kd_coef,  # weight of KL(p_t || q) in the row loss (already includes T^2)
    ce_coef,  # weight of CE(b, y) in the row loss
    CE_SRC: tl.constexpr,  # 0: no CE term, 1: CE on the student z (DiVE), 2: CE on H_ptr (SSD)
    HAS_PRIOR: tl.constexpr,  # add log n_c to the CE logits
    BLOCK: tl.constexpr,  # classes per chunk (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_stride
    T_row = T_ptr + row * t_stride
    offs = tl.arange(0, BLOCK)

    # running statistics: student (m_s, d_s), teacher (m_t, d_t, w), CE logits (m_h, d_h)
    m_s = _NEG_BIG
    d_s = 0.0
    m_t = _NEG_BIG
    d_t = 0.0
    w = 0.0
    m_h = _NEG_BIG
    d_h = 0.0

    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        z = tl.load(S_row + cols, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(T_row + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, z * inv_temp, _NEG_INF)
        u = tl.where(mask, zt * teacher_scale, _NEG_INF)

        # student log-sum-exp at temperature T
        m_s_new = tl.maximum(m_s, tl.max(v, axis=0))
        d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(v - m_s_new), axis=0)
        m_s = m_s_new

        # teacher log-sum-exp at temperature T / p, and W = sum exp(u - m_t) * (u - v)
        m_t_new = tl.maximum(m_t, tl.max(u, axis=0))
        rescale = tl.exp(m_t - m_t_new)
        e_t = tl.exp(u - m_t_new)
        d_t = d_t * rescale + tl.sum(e_t, axis=0)
        # u - v on real lanes only (no -inf - -inf); classes with e_t == 0 contribute exactly 0
        diff = tl.where(mask, zt * teacher_scale - z * inv_temp, 0.0)
        w = w * rescale + tl.sum(e_t * tl.where(e_t > 0.0, diff, 0.0), axis=0)
        m_t = m_t_new

        if CE_SRC != 0:
            if CE_SRC == 1:
                h = z
            else:
                h = tl.load(H_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_PRIOR:
                cnt = tl.load(CNT_ptr + cols, mask=mask, other=1).to(tl.float32)
                h = h + tl.log(cnt)
            b = tl.where(mask, h, _NEG_INF)
            m_h_new = tl.maximum(m_h, tl.max(b, axis=0))
            d_h = d_h * tl.exp(m_h - m_h_new) + tl.sum(tl.exp(b - m_h_new), axis=0)
            m_h = m_h_new

    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    kl = w / d_t + lse_s - lse_t
    loss = kd_coef * kl
    tl.store(LSE_S_ptr + row, lse_s)
    tl.store(LSE_T_ptr + row, lse_t)

    if CE_SRC != 0:
        y = tl.load(Y_ptr + row)
        if CE_SRC == 1:
            b_y = tl.load(S_row + y).to(tl.float32)
        else:
            b_y = tl.load(H_ptr + row * h_stride + y).to(tl.float32)
        if HAS_PRIOR:
            b_y = b_y + tl.log(tl.load(CNT_ptr + y).to(tl.float32))
        lse_h = m_h + tl.log(d_h)
        loss = loss + ce_coef * (lse_h - b_y)
        tl.store(LSE_H_ptr + row, lse_h)

    tl.store(LOSS_ptr + row, loss)


@triton.jit
def _distill_bwd_kernel(
    G_ptr,  # () fp32 grad_output of the (mean) loss, read on device
    S_ptr,  # (N, C) student logits z (KD side); unit stride along C
    s_stride,  # row stride of S_ptr, in elements
    T_ptr,  # (N, C) teacher logits zt; unit stride along C
    t_stride,  # row stride of T_ptr, in elements
    H_ptr,  # (N, C) CE logits h when CE_SRC == 2; ignored otherwise
    h_stride,  # row stride of H_ptr, in elements
    Y_ptr,  # (N,) int64 targets; ignored when CE_SRC == 0
    CNT_ptr,  # (C,) class counts n_c; read only when HAS_PRIOR
    LSE_S_ptr,  # (N,) fp32 lse(v) saved by the forward
    LSE_T_ptr,  # (N,) fp32 lse(u) saved by the forward
    LSE_H_ptr,  # (N,) fp32 lse(b) saved by the forward; ignored when CE_SRC == 0
    DS_ptr,  # (N, C) out: d loss / d z, contiguous, dtype of S_ptr (only when WRITE_DS)
    DH_ptr,  # (N, C) out: d loss / d h, contiguous, dtype of H_ptr (CE_SRC == 2 and WRITE_DH)
    C,  # number of classes
    inv_temp,  # 1 / T
    teacher_scale,  # p / T
    kd_gscale,  # kd_coef / (T * N): multiplies (q - p_t)
    ce_gscale,  # ce_coef / N: multiplies (r - onehot(y))
    CE_SRC: tl.constexpr,  # 0: no CE term, 1: CE on the student z (DiVE), 2: CE on H_ptr (SSD)
    HAS_PRIOR: tl.constexpr,  # add log n_c to the CE logits
    WRITE_DS: tl.constexpr,  # compute/store the student gradient
    WRITE_DH: tl.constexpr,  # compute/store the CE-logit gradient (CE_SRC == 2 only)
    BLOCK: tl.constexpr,  # classes per chunk (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g = tl.load(G_ptr).to(tl.float32)
    kd_g = g * kd_gscale
    ce_g = g * ce_gscale
    lse_s = tl.load(LSE_S_ptr + row)
    lse_t = tl.load(LSE_T_ptr + row)
    if CE_SRC != 0:
        y = tl.load(Y_ptr + row)
        lse_h = tl.load(LSE_H_ptr + row)

    # Padding lanes load -inf so that every exp() below is exp(-inf) = 0 there (no inf/nan).
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        if WRITE_DS:
            z = tl.load(S_ptr + row * s_stride + cols, mask=mask, other=_NEG_INF)
            zt = tl.load(T_ptr + row * t_stride + cols, mask=mask, other=_NEG_INF)
            z = z.to(tl.float32)
            zt = zt.to(tl.float32)
            q = tl.exp(z * inv_temp - lse_s)
            p_t = tl.exp(zt * teacher_scale - lse_t)
            ds = kd_g * (q - p_t)
            if CE_SRC == 1:
                b = z
                if HAS_PRIOR:
                    b = b + tl.log(tl.load(CNT_ptr + cols, mask=mask, other=1).to(tl.float32))
                r = tl.exp(b - lse_h)
                ds = ds + ce_g * (r - tl.where(cols == y, 1.0, 0.0))
            tl.store(
                DS_ptr + row * C + cols, ds.to(DS_ptr.dtype.element_ty), mask=mask
            )
        if CE_SRC == 2:
            if WRITE_DH:
                b = tl.load(H_ptr + row * h_stride + cols, mask=mask, other=_NEG_INF)
                b = b.to(tl.float32)
                if HAS_PRIOR:
                    b = b + tl.log(tl.load(CNT_ptr + cols, mask=mask, other=1).to(tl.float32))
                r = tl.exp(b - lse_h)
                dh = ce_g * (r - tl.where(cols == y, 1.0, 0.0))
                tl.store(
                    DH_ptr + row * C + cols, dh.to(DH_ptr.dtype.element_ty), mask=mask
                )

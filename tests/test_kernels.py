"""Fused Triton distillation losses vs the plain-PyTorch references (forward and backward).

Without CUDA the kernels run on CPU under Triton's interpreter: ``TRITON_INTERPRET=1`` is set
below, before anything imports ``triton`` (``ltscale.kernels`` imports it lazily, on first use),
and the batches are kept to a few rows.  With CUDA the same tests run on the GPU with more rows.

Run:  python -m pytest tests/test_kernels.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # Must happen before ``import triton`` anywhere in the process (triton.jit reads it when the
    # kernel module is imported, on the first launch).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
try:
    import ltscale  # noqa: F401
except ImportError:  # running without the repo root on sys.path
    sys.path.insert(0, str(_ROOT))

from ltscale.kernels import (  # noqa: E402
    fused_dive_loss,
    fused_kd_loss,
    fused_ssd_hybrid_loss,
    kernels_usable,
)
from ltscale.losses import functional as ref  # noqa: E402

pytest.importorskip("triton")

# Under the interpreter an inf/nan intermediate anywhere in a kernel (even in padding lanes)
# shows up as a numpy RuntimeWarning: treat it as a failure.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# --------------------------------------------------------------------------------------------
# Tolerance table.  Kernel and reference both compute in fp32 (bf16 inputs are upcast first), so
# the loss agrees to fp32 summation-order noise for either input dtype.  The gradient is returned
# in the input dtype: for bf16 the two can round to neighbouring bf16 values, i.e. differ by one
# bf16 ulp, which is at most 2^-7 relative.  Gradient atol is relative to max|reference grad|.
# --------------------------------------------------------------------------------------------
TOLS = {
    #                 loss rtol          loss atol           grad rtol           grad atol/max|g|
    torch.float32: {"loss_rtol": 1e-5, "loss_atol": 1e-6, "grad_rtol": 1e-5, "grad_atol_rel": 1e-5},
    torch.bfloat16: {"loss_rtol": 2e-5, "loss_atol": 1e-6, "grad_rtol": 2**-7, "grad_atol_rel": 1e-3},
}  # fmt: skip

DEVICE = torch.device("cuda" if _CUDA else "cpu")
ROWS = 64 if _CUDA else 3  # the interpreter is slow: keep CPU batches tiny
CLASS_COUNTS = [1000, 8142, 365, 997]
DTYPES = [torch.float32, torch.bfloat16]
GRAD_SCALE = 0.37  # (loss * 0.37).backward(): grad_output != 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n, c, dtype, seed, scale=3.0, offset=0.0):
    x = torch.randn(n, c, generator=_gen(seed)) * scale + offset
    return x.to(device=DEVICE, dtype=dtype)


def _targets(n, c, seed):
    return torch.randint(0, c, (n,), generator=_gen(seed)).to(DEVICE)


def _counts(c, seed):
    # long-tailed counts (Zipf-like), int64 as stored by the datasets
    ranks = torch.randperm(c, generator=_gen(seed)).double() + 1.0
    return (2000.0 / ranks).ceil().long().to(DEVICE)


def _run(fn, leaves, *args, **kwargs):
    """Loss and grads of ``leaves`` for ``(loss * GRAD_SCALE).backward()``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    loss = fn(*leaves, *args, **kwargs)
    (loss * GRAD_SCALE).backward()
    return loss.detach(), [x.grad for x in leaves]


def _check(loss, grads, loss_ref, grads_ref, dtype, tol_scale=1.0):
    tol = TOLS[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss)
    torch.testing.assert_close(
        loss,
        loss_ref,
        rtol=tol["loss_rtol"] * tol_scale,
        atol=tol["loss_atol"] * tol_scale,
    )
    for g, g_ref in zip(grads, grads_ref):
        assert g is not None and g.dtype == g_ref.dtype == dtype
        assert torch.isfinite(g).all()
        atol = tol["grad_atol_rel"] * tol_scale * g_ref.abs().max().item()
        torch.testing.assert_close(
            g.float(), g_ref.float(), rtol=tol["grad_rtol"] * tol_scale, atol=atol
        )


def _dev_check(*tensors):
    for t in tensors:
        assert kernels_usable(t), f"kernels not usable on {t.device} (TRITON_INTERPRET mismatch?)"


# ------------------------------------------------------------------------------------ KD -----
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("temperature,power", [(2.0, 0.5), (3.0, 1.0)])
def test_kd_loss_matches_reference(num_classes, dtype, temperature, power):
    zs = _logits(ROWS, num_classes, dtype, 1)
    zt = _logits(ROWS, num_classes, dtype, 2)
    _dev_check(zs, zt)
    loss, grads = _run(lambda s: fused_kd_loss(s, zt, temperature, power), [zs])
    loss_ref, grads_ref = _run(lambda s: ref.kd_loss(s, zt, temperature, power), [zs])
    _check(loss, grads, loss_ref, grads_ref, dtype)


# ---------------------------------------------------------------------------------- DiVE -----
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("temperature,power,alpha", [(2.0, 0.5, 0.3), (3.0, 1.0, 0.8)])
def test_dive_loss_matches_reference(num_classes, dtype, temperature, power, alpha):
    zs = _logits(ROWS, num_classes, dtype, 3)
    zt = _logits(ROWS, num_classes, dtype, 4)
    y = _targets(ROWS, num_classes, 5)
    n_c = _counts(num_classes, 6)
    _dev_check(zs, zt)
    args = (y, n_c, temperature, power, alpha)
    loss, grads = _run(lambda s: fused_dive_loss(s, zt, *args), [zs])
    loss_ref, grads_ref = _run(lambda s: ref.dive_loss(s, zt, *args), [zs])
    _check(loss, grads, loss_ref, grads_ref, dtype)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_dive_loss_extreme_alpha(alpha):
    c = 997
    zs, zt = _logits(ROWS, c, torch.float32, 7), _logits(ROWS, c, torch.float32, 8)
    y, n_c = _targets(ROWS, c, 9), _counts(c, 10)
    args = (y, n_c, 2.0, 0.5, alpha)
    loss, grads = _run(lambda s: fused_dive_loss(s, zt, *args), [zs])
    loss_ref, grads_ref = _run(lambda s: ref.dive_loss(s, zt, *args), [zs])
    _check(loss, grads, loss_ref, grads_ref, torch.float32)


# ----------------------------------------------------------------------------------- SSD -----
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_ssd_hybrid_loss_matches_reference(num_classes, dtype):
    hard = _logits(ROWS, num_classes, dtype, 11)
    soft = _logits(ROWS, num_classes, dtype, 12)
    soft_labels = _logits(ROWS, num_classes, dtype, 13)
    y = _targets(ROWS, num_classes, 14)
    _dev_check(hard, soft, soft_labels)
    kw = {"temperature": 3.0, "hard_weight": 0.7, "soft_weight": 1.3}
    loss, grads = _run(
        lambda h, s: fused_ssd_hybrid_loss(h, s, y, soft_labels, **kw), [hard, soft]
    )
    loss_ref, grads_ref = _run(
        lambda h, s: ref.ssd_hybrid_loss(h, s, y, soft_labels, **kw), [hard, soft]
    )
    _check(loss, grads, loss_ref, grads_ref, dtype)


def test_ssd_defaults_and_partial_grads():
    c = 365
    hard, soft = _logits(ROWS, c, torch.float32, 15), _logits(ROWS, c, torch.float32, 16)
    soft_labels, y = _logits(ROWS, c, torch.float32, 17), _targets(ROWS, c, 18)
    # defaults (T=2, weights 1)
    loss, grads = _run(lambda h, s: fused_ssd_hybrid_loss(h, s, y, soft_labels), [hard, soft])
    loss_ref, grads_ref = _run(lambda h, s: ref.ssd_hybrid_loss(h, s, y, soft_labels), [hard, soft])
    _check(loss, grads, loss_ref, grads_ref, torch.float32)
    # only one head requires grad: the other gets none, the one that does is still right
    (_, (g_soft,)) = _run(lambda s: fused_ssd_hybrid_loss(hard, s, y, soft_labels), [soft])
    torch.testing.assert_close(g_soft, grads_ref[1], rtol=1e-5, atol=1e-8)
    (_, (g_hard,)) = _run(lambda h: fused_ssd_hybrid_loss(h, soft, y, soft_labels), [hard])
    torch.testing.assert_close(g_hard, grads_ref[0], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------- large C, strides, no grads ----
def test_kd_loss_many_classes_bf16():
    c = 65537 if not _CUDA else 65536  # > 16 chunks; odd tail under the interpreter
    n = 2 if not _CUDA else 256
    zs, zt = _logits(n, c, torch.bfloat16, 19), _logits(n, c, torch.bfloat16, 20)
    loss, grads = _run(lambda s: fused_kd_loss(s, zt, 2.0, 0.5), [zs])
    loss_ref, grads_ref = _run(lambda s: ref.kd_loss(s, zt, 2.0, 0.5), [zs])
    _check(loss, grads, loss_ref, grads_ref, torch.bfloat16)


def test_non_contiguous_rows_and_teacher_gets_no_grad():
    c = 1000
    wide_s = _logits(ROWS, c + 24, torch.float32, 21)
    wide_t = _logits(ROWS, c + 40, torch.float32, 22)
    zs = wide_s[:, 7 : 7 + c].detach().requires_grad_(True)  # row stride c + 24
    zt = wide_t[:, :c].detach().requires_grad_(True)  # row stride c + 40
    y, n_c = _targets(ROWS, c, 23), _counts(c, 24)
    loss = fused_dive_loss(zs, zt, y, n_c, 2.0, 0.5, 0.5)
    (loss * GRAD_SCALE).backward()
    assert zt.grad is None  # the teacher gets no gradient
    assert zs.grad.shape == zs.shape
    loss_ref, (g_ref,) = _run(
        lambda s: ref.dive_loss(s, zt.detach(), y, n_c, 2.0, 0.5, 0.5), [zs.detach()]
    )
    _check(loss.detach(), [zs.grad], loss_ref, [g_ref], torch.float32)


def test_forward_without_grad():
    c = 101
    zs, zt = _logits(ROWS, c, torch.float32, 25), _logits(ROWS, c, torch.float32, 26)
    with torch.no_grad():
        loss = fused_kd_loss(zs, zt, 2.0, 0.5)
    torch.testing.assert_close(loss, ref.kd_loss(zs, zt, 2.0, 0.5), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- numerical stability -----
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_wide_logit_range(dtype):
    """Logits spread over +-1e3 and more: teacher softmax is one-hot up to underflow."""
    c = 997
    zs = _logits(ROWS, c, dtype, 27, scale=1e3)
    zt = _logits(ROWS, c, dtype, 28, scale=1e3)
    y, n_c = _targets(ROWS, c, 29), _counts(c, 30)
    args = (y, n_c, 2.0, 0.5, 0.5)
    loss, grads = _run(lambda s: fused_dive_loss(s, zt, *args), [zs])
    loss_ref, grads_ref = _run(lambda s: ref.dive_loss(s, zt, *args), [zs])
    _check(loss, grads, loss_ref, grads_ref, dtype)


def test_large_constant_offsets_are_invisible():
    """Softmax is shift invariant: rows offset by +-1e4 give the loss of the unshifted rows.

    The tolerance is the fp32 resolution at 1e4 (|z| * eps ~ 1e-3) relative to the O(1) loss.
    """
    c = 1000
    zs, zt = _logits(ROWS, c, torch.float32, 31), _logits(ROWS, c, torch.float32, 32)
    hard, y = _logits(ROWS, c, torch.float32, 33), _targets(ROWS, c, 34)
    offs = torch.tensor([1e4, -1e4, 5e3] * ROWS, device=DEVICE)[:ROWS, None]
    kw = {"temperature": 2.0, "hard_weight": 1.0, "soft_weight": 1.0}
    loss, grads = _run(
        lambda h, s: fused_ssd_hybrid_loss(h, s, y, zt - offs, **kw), [hard + offs, zs - 2 * offs]
    )
    loss_ref, grads_ref = _run(lambda h, s: ref.ssd_hybrid_loss(h, s, y, zt, **kw), [hard, zs])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-3)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-2, atol=1e-3 * g_ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_zero_teacher_probability_classes(dtype):
    """Classes with p_t == 0 exactly (underflow, and -inf teacher logits) contribute 0 * log 0 = 0.

    The first 4096-class chunk of row 0 is entirely -inf on the teacher side (a chunk without a
    single finite teacher logit must not produce nan).
    """
    c = 8142
    zs = _logits(ROWS, c, dtype, 35)
    zt = _logits(ROWS, c, torch.float32, 36)
    zt[:, ::3] = -1e4  # p_t underflows to 0
    zt[:, 1::7] = float("-inf")  # p_t is exactly 0
    zt[0, :4096] = float("-inf")
    zt = zt.to(dtype)
    for fn_fused, fn_ref, args in [
        (fused_kd_loss, ref.kd_loss, (2.0, 0.5)),
        (fused_dive_loss, ref.dive_loss, (_targets(ROWS, c, 37), _counts(c, 38), 3.0, 0.5, 0.4)),
    ]:
        loss, grads = _run(lambda s: fn_fused(s, zt, *args), [zs])
        loss_ref, grads_ref = _run(lambda s: fn_ref(s, zt, *args), [zs])
        assert torch.isfinite(loss_ref)
        _check(loss, grads, loss_ref, grads_ref, dtype)


# --------------------------------------------------------------------------- plumbing -----
def test_kernels_usable_never_raises():
    assert kernels_usable(torch.zeros(2, 3, device=DEVICE))
    assert not kernels_usable(None)
    assert not kernels_usable("cuda")
    assert not kernels_usable(torch.empty(2, 3, device="meta"))
    if not _CUDA:
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            assert not kernels_usable(torch.zeros(2, 3))
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


def test_import_does_not_import_triton():
    code = "import sys, ltscale.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]


def test_kernels_compile_for_gpu():
    """Ahead-of-time compile of every kernel variant for sm_90 (PTX + ptxas), no GPU needed.

    The interpreter accepts some constructs the GPU compiler rejects (e.g. non-constexpr globals);
    this catches them on CPU-only machines.  Skipped when Triton's AOT API differs.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-m", "ltscale.kernels._aot_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if res.returncode == 3:
        pytest.skip(f"triton AOT API unavailable: {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]


# Runs the script named by argv[1] (with the arguments after it) as if MLflow were not installed.
_WITHOUT_MLFLOW = "import runpy, sys; sys.modules['mlflow'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def test_what_the_kernel_benchmark_records_needs_no_mlflow(tmp_path):
    """kd_loss.py stops early without CUDA, so its imports are checked here: the run environment and
    code version come from ltscale.tracking without MLflow; what needs MLflow says so on use."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch\n"
        "import ltscale.kernels\n"
        "from ltscale.tracking import TAG_CODE_VERSION, code_version, runtime_environment\n"
        "assert runtime_environment(torch.device('cpu'))['code_version'] == code_version()\n"
        "try:\n"
        "    from ltscale.tracking import Tracker\n"
        "except ImportError as error:\n"
        "    print('Tracker:', error)\n"
    )
    res = subprocess.run([sys.executable, "-c", _WITHOUT_MLFLOW, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Tracker: import of mlflow halted" in res.stdout


@pytest.mark.parametrize("loss", ["dive", "ssd"])
def test_convergence_tool_writes_its_verdict_with_the_environment(tmp_path, loss):
    """tools/kernels_convergence.py, a few steps (on CPU under the interpreter): both curves, the verdict, where it ran."""
    out = tmp_path / "convergence.json"
    device = "cuda" if _CUDA else "cpu"
    res = subprocess.run(  # without MLflow, as on the GPU machine, where tools/README's command 8 carries no wheels
        [sys.executable, "-c", _WITHOUT_MLFLOW, str(_ROOT / "tools" / "kernels_convergence.py"), "--device", device,
         "--steps", "6", "--loss", loss, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["loss"] == loss and result["steps"] == 6
    assert len(result["curve_fused"]) == len(result["curve_reference"]) == 6
    assert result["max_abs_diff"] <= result["tolerance"]["bound"]
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == device and env["code_version"]


def test_convergence_tool_refuses_sizes_below_one(tmp_path):
    """0 steps (or batch, classes, features) would fall back to the default or report success on nothing."""
    out = tmp_path / "convergence.json"
    res = subprocess.run([sys.executable, str(_ROOT / "tools" / "kernels_convergence.py"), "--device", "cpu",
                          "--steps", "0", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--steps 0: steps, batch and features must be >= 1" in res.stderr
    assert not out.exists()


def test_kd_loss_benchmark_refuses_bad_lists_before_measuring(capsys, load_tool):
    """A bad --losses or --shapes item is an argument error, not a failure after the first cases."""
    bench = load_tool("bench/kd_loss.py")
    assert bench._shapes("256x8142:bf16, 4096x65536:fp32") == [(256, 8142, "bf16"), (4096, 65536, "fp32")]
    for argv, message in [(["--losses", "kd,foo"], "argument --losses: 'kd,foo': choose from kd, dive, ssd, infonce"),
                          (["--shapes", "256x100"], "'256x100' is not NxC:dtype"),
                          (["--shapes", "256x100:bf16,256x1000:fp64"], "'256x1000:fp64': N >= 1, C >= 2 and a dtype of"),
                          (["--iters", "0"], "--iters 0 >= 1")]:
        with pytest.raises(SystemExit) as refused:
            bench.main(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err, argv


def test_kd_loss_benchmark_infonce_rows_time_moco_s_own_loss(load_tool, monkeypatch):
    """The InfoNCE rows time the loss the MoCo task computes: N queries, C = 1 + K logits a row."""
    import torch.nn.functional as F

    bench = load_tool("bench/kd_loss.py")
    monkeypatch.setattr(bench, "_DEV", "cpu")
    (query, keys, queue), leaves = bench._make_inputs("infonce", 6, 1 + 40, torch.float32)
    assert query.shape == keys.shape == (6, bench.INFONCE_DIM) and queue.shape == (40, bench.INFONCE_DIM)
    assert leaves == (query,) and torch.allclose(queue.norm(dim=1), torch.ones(40))
    bind, reference, fused = bench._loss_fns("infonce")
    assert fused is None  # no kernel: the rows are eager and compile only
    loss = bind(reference)(query, keys, queue)
    logits = torch.cat([(query * keys).sum(1, keepdim=True), query @ queue.t()], dim=1) / bench.INFONCE_TEMPERATURE
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, leaves)
    (expected_grad,) = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(grad, expected_grad)
    forward, backward = bench._bytes("infonce", (query, keys, queue), leaves)  # inputs read; again + the gradient
    assert forward == (6 + 6 + 40) * bench.INFONCE_DIM * 4 and backward == forward + 6 * bench.INFONCE_DIM * 4

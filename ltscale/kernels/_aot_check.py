"""Compile every kernel variant for a CUDA target without a GPU (PTX + ptxas -> cubin).

The interpreter (``TRITON_INTERPRET=1``) proves the maths on CPU but accepts constructs the GPU
compiler rejects; this catches those on machines without a GPU::

    python -m ltscale.kernels._aot_check            # sm_90 (H100/H200)
    python -m ltscale.kernels._aot_check --arch 80  # A100

Exits 0 when every variant compiles and reports registers/spills when ptxas output is available.
Uses Triton's ahead-of-time API (``ASTSource`` / ``triton.compile`` with an explicit
``GPUTarget``), which is internal and may change between Triton versions; exit status 3 means
"API not available here", not a kernel bug.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _variants():
    """(kernel name, constexprs, dtype of the logits) for every combination the wrappers launch."""
    for dt in ("fp32", "bf16"):
        for ce_src, prior in ((0, False), (1, True), (2, False)):
            for block, warps in ((4096, 16), (1024, 4)):
                fwd_consts = {"CE_SRC": ce_src, "HAS_PRIOR": prior, "BLOCK": block}
                yield "_distill_fwd_kernel", fwd_consts, dt, warps
                for write_ds, write_dh in ((True, ce_src == 2), (False, True)):
                    if not write_ds and ce_src != 2:
                        continue
                    consts = {
                        "CE_SRC": ce_src,
                        "HAS_PRIOR": prior,
                        "WRITE_DS": write_ds,
                        "WRITE_DH": write_dh,
                        "BLOCK": block,
                    }
                    yield "_distill_bwd_kernel", consts, dt, warps


def _arg_types(dt: str) -> dict[str, str]:
    return {
        "S_ptr": f"*{dt}", "T_ptr": f"*{dt}", "H_ptr": f"*{dt}", "DS_ptr": f"*{dt}",
        "DH_ptr": f"*{dt}", "Y_ptr": "*i64", "CNT_ptr": "*i64", "G_ptr": "*fp32",
        "LOSS_ptr": "*fp32", "LSE_S_ptr": "*fp32", "LSE_T_ptr": "*fp32", "LSE_H_ptr": "*fp32",
        "inv_temp": "fp32", "teacher_scale": "fp32", "kd_coef": "fp32", "ce_coef": "fp32",
        "kd_gscale": "fp32", "ce_gscale": "fp32",
    }  # everything else (strides, C) is i32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90, 80")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET for the ahead-of-time compile check", file=sys.stderr)
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:  # noqa: BLE001
        print(f"triton AOT API not available: {exc}", file=sys.stderr)
        return 3

    from ltscale.kernels import _distill_kernels as k

    t0 = time.time()
    count = 0
    for name, consts, dt, warps in _variants():
        fn = getattr(k, name)
        types = _arg_types(dt)
        sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
        # pointers 16-byte aligned, as from the caching allocator (row strides left unknown)
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(fn.arg_names)
            if types.get(a, "").startswith("*")
        }
        try:
            src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
            compiled = triton.compile(
                src, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": warps}
            )
        except TypeError as exc:  # AOT API drift, not a kernel problem
            print(f"triton AOT API mismatch: {exc}", file=sys.stderr)
            return 3
        assert compiled.asm.get("cubin"), f"{name} {consts}: no cubin produced"
        count += 1
        print(f"ok  sm_{args.arch} {name:<20} {dt} warps={warps:<2} {consts}")
    print(f"{count} variants compiled for sm_{args.arch} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

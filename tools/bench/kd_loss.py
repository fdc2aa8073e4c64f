#!/usr/bin/env python
"""Benchmark of the fused Triton distillation losses against eager and torch.compile'd references.

Usage (on a CUDA machine, from the repository root):

    python tools/bench/kd_loss.py --out results.json
    python tools/bench/kd_loss.py --out results.json --losses kd,dive,ssd --iters 100

For every shape (N x C, dtype) and method (``eager`` reference from ltscale.losses.functional,
``compile`` = torch.compile(reference), ``fused`` = ltscale.kernels) it measures, with CUDA events
after warm-up, the median time of the forward, the backward and forward+backward; the achieved
bandwidth and its fraction of a device-to-device copy moving the same number of bytes, measured in
the same run; and the peak memory allocated above the inputs during forward+backward.

Bytes model (the minimum traffic of a fused implementation, used for every method so that GB/s
is comparable between methods):
    forward           = the logits read (student, teacher; SSD also the hard head) + labels/counts
    backward          = the logits read again + the gradient(s) written
    forward+backward  = forward + backward
The copy reference for B bytes copies a B/2-byte buffer (B/2 read + B/2 written); "% copy" is
copy_time / method_time.

``--losses infonce`` measures MoCo's loss (``ltscale.models.moco``: the query against its positive
key and a queue, then a cross-entropy over the N x (1 + K) logits; D = 128, t = 0.2) in eager and
compiled form, with N x C read as N queries and C = 1 + K logits a row. No fused kernel exists for
it (ltscale/kernels/README.md); these rows are what one would have to beat, and what the loss costs
beside a training step. Its bytes model: queries, keys and queue read, the queries' gradient
written.

Writes JSON (GPU, torch/triton/CUDA versions, code version, per-case results) to --out and prints a
markdown table.  Exits with a clear message when CUDA is not available.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

DEFAULT_SHAPES = [
    (256, 8142, "fp32"),
    (256, 8142, "bf16"),
    (256, 1000, "fp32"),
    (256, 1000, "bf16"),
    (512, 365, "fp32"),
    (512, 365, "bf16"),
    (4096, 65536, "bf16"),
]
INFONCE_SHAPES = [(256, 65537, "fp32"), (256, 65537, "bf16"), (4096, 65537, "bf16")]  # the recipes' queue of 65,536
INFONCE_DIM, INFONCE_TEMPERATURE = 128, 0.2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE, POWER, ALPHA = 2.0, 0.5, 0.5
_DEV = "cuda"  # benchmark device; a module constant so a smoke test can redirect it


def _median_ms(fn, setup=None, warmup: int = 10, iters: int = 50) -> float:
    """Median of per-iteration CUDA-event times of ``fn(state)``; ``setup()`` is untimed."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        state = setup() if setup else None
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def _make_inputs(loss: str, n: int, c: int, dtype: torch.dtype, seed: int = 0):
    dev = _DEV
    g = torch.Generator(device=dev).manual_seed(seed)
    if loss == "infonce":  # unit vectors, as the projection head's normalised outputs are
        def unit(rows: int) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.randn(rows, INFONCE_DIM, device=dev, generator=g), dim=1).to(dtype)

        query = unit(n).requires_grad_(True)
        return (query, unit(n), unit(c - 1)), (query,)
    zs = (torch.randn(n, c, device=dev, generator=g) * 3).to(dtype).requires_grad_(True)
    zt = (torch.randn(n, c, device=dev, generator=g) * 3).to(dtype)
    y = torch.randint(0, c, (n,), device=dev, generator=g)
    counts = (2000.0 / (torch.randperm(c, device=dev, generator=g) + 1.0)).ceil().long()
    if loss == "ssd":
        hard = (torch.randn(n, c, device=dev, generator=g) * 3).to(dtype).requires_grad_(True)
    if loss == "kd":
        return (zs, zt), (zs,)
    if loss == "dive":
        return (zs, zt, y, counts), (zs,)
    if loss == "ssd":
        return (hard, zs, y, zt), (hard, zs)
    raise ValueError(loss)


def _loss_fns(loss: str):
    from ltscale import kernels
    from ltscale.losses import functional as ref

    if loss == "kd":
        return (
            lambda f: (lambda zs, zt: f(zs, zt, TEMPERATURE, POWER)),
            ref.kd_loss,
            kernels.fused_kd_loss,
        )
    if loss == "dive":
        return (
            lambda f: (lambda zs, zt, y, n: f(zs, zt, y, n, TEMPERATURE, POWER, ALPHA)),
            ref.dive_loss,
            kernels.fused_dive_loss,
        )
    if loss == "ssd":
        return (
            lambda f: (lambda h, s, y, t: f(h, s, y, t, TEMPERATURE, 1.0, 1.0)),
            ref.ssd_hybrid_loss,
            kernels.fused_ssd_hybrid_loss,
        )
    if loss == "infonce":
        from ltscale.models.moco import info_nce_logits, info_nce_loss

        def info_nce(query: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
            """MoCo's loss as the training step computes it."""
            return info_nce_loss(info_nce_logits(query, keys, queue, INFONCE_TEMPERATURE))

        return (lambda f: f), info_nce, None
    raise ValueError(loss)


def _bytes(loss: str, inputs, leaves) -> tuple[int, int]:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    read = sum(t.numel() * t.element_size() for t in tensors)
    written = sum(t.numel() * t.element_size() for t in leaves)
    return read, read + written  # forward, backward


def _copy_ms(total_bytes: int, warmup: int, iters: int) -> float:
    half = max(total_bytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8, device=_DEV)
    dst = torch.empty_like(src)
    return _median_ms(lambda _: dst.copy_(src), warmup=warmup, iters=iters)  # the buffers go with this frame


def _bench_method(fn, inputs, leaves, warmup: int, iters: int) -> dict:
    def fwd(_):
        return fn(*inputs)

    def fwd_setup():
        return None

    def bwd_setup():
        return fn(*inputs)

    def bwd(loss):
        torch.autograd.grad(loss, leaves)

    def fwd_bwd(_):
        torch.autograd.grad(fn(*inputs), leaves)

    out = {
        "fwd_ms": _median_ms(fwd, fwd_setup, warmup, iters),
        "bwd_ms": _median_ms(bwd, bwd_setup, warmup, iters),
        "fwd_bwd_ms": _median_ms(fwd_bwd, None, warmup, iters),
    }
    # peak memory above the inputs, one forward+backward (the gradient buffer is included)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(fn(*inputs), leaves)
    torch.cuda.synchronize()
    out["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del grads
    return out


def _accuracy(ref_fn, fused_fn, inputs, leaves) -> dict:
    lr = ref_fn(*inputs)
    gr = torch.autograd.grad(lr, leaves)
    lf = fused_fn(*inputs)
    gf = torch.autograd.grad(lf, leaves)
    loss_rel = ((lf - lr).abs() / lr.abs().clamp_min(1e-12)).item()
    grad_rel = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip(gf, gr)
    )
    return {"loss_rel_err": loss_rel, "grad_max_rel_err": grad_rel}


LOSSES = ("kd", "dive", "ssd", "infonce")


def _losses(text: str) -> list[str]:
    losses = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in losses if item not in LOSSES]
    if not losses or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(LOSSES)}")
    return losses


def _shapes(text: str) -> list[tuple[int, int, str]]:
    shapes = []
    for item in text.split(","):
        try:
            size, dtype = item.strip().split(":")
            n, c = (int(x) for x in size.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not NxC:dtype (e.g. 256x8142:bf16)") from None
        if dtype not in DTYPES or n < 1 or c < 2:
            raise argparse.ArgumentTypeError(f"{item!r}: N >= 1, C >= 2 and a dtype of {', '.join(DTYPES)}")
        shapes.append((n, c, dtype))
    return shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("kd_loss_bench.json"))
    ap.add_argument("--losses", type=_losses, default=["kd"], help="comma list of kd,dive,ssd,infonce (default: kd)")
    ap.add_argument(
        "--shapes",
        type=_shapes,
        default=None,
        help="comma list of NxC:dtype, e.g. 256x8142:bf16 (default: the standard set; for infonce "
             "256x65537 and 4096x65537, C = 1 + the queue's length)",
    )
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args(argv)  # bad lists fail here, not after the first cases were benchmarked
    if args.warmup < 0 or args.iters < 1:
        ap.error(f"--warmup {args.warmup} must be >= 0 and --iters {args.iters} >= 1")
    if args.out.is_dir():
        ap.error(f"--out {args.out}: is a directory; name the JSON file to write")

    if not torch.cuda.is_available():
        print(
            "error: tools/bench/kd_loss.py needs a CUDA GPU (torch.cuda.is_available() is False). "
            "Run it on a GPU machine; correctness on CPU is covered by "
            "`TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`.",
            file=sys.stderr,
        )
        return 2

    from ltscale.kernels import kernels_usable
    from ltscale.tracking import runtime_environment

    losses = args.losses

    results = []
    for loss in losses:
        bind, ref_fn, fused_fn = _loss_fns(loss)
        methods = {"eager": bind(ref_fn)}
        if not args.no_compile:
            methods["compile"] = bind(torch.compile(ref_fn, dynamic=False))
        if fused_fn is not None:
            methods["fused"] = bind(fused_fn)
        for n, c, dt in args.shapes or (INFONCE_SHAPES if loss == "infonce" else DEFAULT_SHAPES):
            inputs, leaves = _make_inputs(loss, n, c, DTYPES[dt])
            if fused_fn is not None and not kernels_usable(inputs[0]):
                raise SystemExit("error: ltscale.kernels are not usable on this CUDA tensor")
            fwd_b, bwd_b = _bytes(loss, inputs, leaves)
            phase_bytes = {"fwd": fwd_b, "bwd": bwd_b, "fwd_bwd": fwd_b + bwd_b}
            copy_ms = {k: _copy_ms(b, args.warmup, args.iters) for k, b in phase_bytes.items()}
            acc = _accuracy(methods["eager"], methods["fused"], inputs, leaves) if fused_fn is not None else {}
            for name, fn in methods.items():
                try:
                    r = _bench_method(fn, inputs, leaves, args.warmup, args.iters)
                except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failure
                    r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                if "error" not in r:
                    for k, b in phase_bytes.items():
                        t = r[f"{k}_ms"]
                        r[f"{k}_gbps"] = b / (t * 1e-3) / 1e9
                        r[f"{k}_copy_frac"] = copy_ms[k] / t
                row = {"loss": loss, "N": n, "C": c, "dtype": dt, "method": name, **r}
                if name == "fused":
                    row.update(acc)
                results.append(row)
                print(f"  {loss} {n}x{c} {dt} {name}: {r}", file=sys.stderr, flush=True)
            results.append(
                {
                    "loss": loss, "N": n, "C": c, "dtype": dt, "method": "copy",
                    **{f"{k}_ms": v for k, v in copy_ms.items()},
                    **{f"{k}_gbps": phase_bytes[k] / (copy_ms[k] * 1e-3) / 1e9 for k in copy_ms},
                    "bytes": phase_bytes,
                }
            )
            del inputs, leaves
            torch.cuda.empty_cache()

    env = runtime_environment(_DEV)  # GPU, versions and the code version (.code-version on a copy without .git)
    payload = {
        "benchmark": "ltscale fused distillation losses",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "environment": env,
        "params": {"temperature": TEMPERATURE, "power": POWER, "alpha": ALPHA,
                   "infonce": {"dim": INFONCE_DIM, "temperature": INFONCE_TEMPERATURE},
                   "warmup": args.warmup, "iters": args.iters},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))

    print(f"\n{env.get('gpu', env['device'])} | torch {env['torch']} | triton {env['triton']} | "
          f"CUDA {env['cuda']} | code {env['code_version']}\n")
    hdr = ("| loss | N x C | dtype | method | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s "
           "| % copy BW (fwd / bwd / f+b) | peak MiB | max rel err (loss / grad) |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        if r["method"] == "copy":
            continue
        shape = f"{r['N']}x{r['C']}"
        if "error" in r:
            print(f"| {r['loss']} | {shape} | {r['dtype']} | {r['method']} | error: "
                  f"{r['error'][:60]} | | | | | | |")
            continue
        fr = " / ".join(f"{100 * r[f'{k}_copy_frac']:.0f}%" for k in ("fwd", "bwd", "fwd_bwd"))
        err = (f"{r['loss_rel_err']:.1e} / {r['grad_max_rel_err']:.1e}"
               if "loss_rel_err" in r else "")
        print(f"| {r['loss']} | {shape} | {r['dtype']} | {r['method']} | {r['fwd_ms']:.3f} | "
              f"{r['bwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_gbps']:.0f} | {fr} | "
              f"{r['peak_mem_mib']:.1f} | {err} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

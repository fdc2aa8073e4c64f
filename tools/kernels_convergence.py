#!/usr/bin/env python
"""Convergence check: train the same student twice, with the fused kernel and with the reference.

A small MLP student is trained on fixed random features to match a fixed random teacher (DiVE
loss by default, i.e. KD at temperature T with power p plus balanced-softmax CE; ``--loss kd`` or
``--loss ssd`` for the others) with SGD + momentum.  Both runs use the same seed, data order and
initialisation; the only difference is the loss implementation.  The two loss curves and their
maximum absolute difference go to a JSON file, and the exit status is 1 when

    max_step |loss_fused - loss_ref| > atol + rtol * max_step |loss_ref|

(defaults atol = 1e-5, rtol = 1e-4 for fp32; 0.02 relative for bf16 logits), or when either
run produced a non-finite loss.

    python tools/kernels_convergence.py --device cuda --out convergence.json            # 300 steps
    python tools/kernels_convergence.py --device cpu --steps 40 --out convergence.json  # interp.

On ``--device cpu`` the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` is set by
this script before triton is imported) with a smaller problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when available, else cpu (Triton interpreter)")
    ap.add_argument("--steps", type=int, default=None, help="default: 300 (cuda) / 40 (cpu)")
    ap.add_argument("--loss", choices=["dive", "kd", "ssd"], default="dive")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="dtype of the logits fed to the loss")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 (cuda) / 4 (cpu)")
    ap.add_argument("--classes", type=int, default=None, help="default: 1000 (cuda) / 101 (cpu)")
    ap.add_argument("--features", type=int, default=None, help="default: 256 (cuda) / 32 (cpu)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atol", type=float, default=None)
    ap.add_argument("--rtol", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("kernels_convergence.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    small = [f"--{name} {value}" for name, value in (("steps", args.steps), ("batch", args.batch), ("classes", args.classes),
                                                      ("features", args.features)) if value is not None and value < 1]
    if small or (args.classes is not None and args.classes < 2):
        # 0 would silently fall back to the default (or train nothing and report success)
        print(f"error: {', '.join(small) or f'--classes {args.classes}'}: steps, batch and features must be >= 1, "
              "classes >= 2", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: triton already imported without TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    gpu = device == "cuda"
    steps = args.steps if args.steps is not None else (300 if gpu else 40)
    batch = args.batch or (256 if gpu else 4)
    num_classes = args.classes or (1000 if gpu else 101)
    feat = args.features or (256 if gpu else 32)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    atol = args.atol if args.atol is not None else 1e-5
    rtol = args.rtol if args.rtol is not None else (1e-4 if dtype == torch.float32 else 2e-2)

    from ltscale import kernels
    from ltscale.losses import functional as ref

    temperature, power, alpha = 2.0, 0.5, 0.5

    # fixed problem: features, teacher, long-tailed labels and counts
    g = torch.Generator().manual_seed(args.seed)
    num_samples = 64 * batch
    x_all = torch.randn(num_samples, feat, generator=g)
    w_teacher = torch.randn(feat, num_classes, generator=g) / math.sqrt(feat) * 4.0
    counts = (1000.0 / (torch.arange(num_classes, dtype=torch.float64) + 1.0) ** 1.2).ceil().long()
    # labels drawn from the long-tailed prior, biased toward the teacher's prediction
    teacher_all = x_all @ w_teacher
    prior = counts.double() / counts.sum()
    lab_logits = teacher_all.double() + prior.log()[None]
    y_all = torch.distributions.Categorical(logits=lab_logits).sample()
    order = torch.randint(0, num_samples, (steps, batch), generator=g)
    x_all, teacher_all, y_all = (t.to(device) for t in (x_all, teacher_all, y_all))
    counts = counts.to(device)

    def loss_fn(fused: bool, out, teacher, y):
        if args.loss == "kd":
            f = kernels.fused_kd_loss if fused else ref.kd_loss
            return f(out[0], teacher, temperature, power)
        if args.loss == "dive":
            f = kernels.fused_dive_loss if fused else ref.dive_loss
            return f(out[0], teacher, y, counts, temperature, power, alpha)
        f = kernels.fused_ssd_hybrid_loss if fused else ref.ssd_hybrid_loss
        return f(out[1], out[0], y, teacher, temperature, 1.0, 1.0)

    def train(fused: bool) -> list[float]:
        torch.manual_seed(args.seed + 1)
        hidden = 2 * feat
        body = torch.nn.Sequential(torch.nn.Linear(feat, hidden), torch.nn.ReLU())
        heads = torch.nn.ModuleList(
            [torch.nn.Linear(hidden, num_classes) for _ in range(2 if args.loss == "ssd" else 1)]
        )
        model = torch.nn.ModuleDict({"body": body, "heads": heads}).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        curve = []
        for step in range(steps):
            idx = order[step].to(device)
            feats = model["body"](x_all[idx])
            out = [h(feats).to(dtype) for h in model["heads"]]
            teacher = teacher_all[idx].to(dtype)
            if fused and step == 0 and not kernels.kernels_usable(out[0]):
                raise SystemExit(f"error: fused kernels not usable on device {device}")
            loss = loss_fn(fused, out, teacher, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))  # one host sync per step: fine for a check
        return curve

    t0 = time.time()
    curve_fused = train(True)
    t1 = time.time()
    curve_ref = train(False)
    t2 = time.time()

    diffs = [abs(a - b) for a, b in zip(curve_fused, curve_ref)]
    max_diff = max(diffs) if diffs else 0.0
    scale = max((abs(v) for v in curve_ref), default=0.0)
    bound = atol + rtol * scale
    finite = all(math.isfinite(v) for v in curve_fused + curve_ref)
    ok = finite and max_diff <= bound
    from ltscale.tracking import runtime_environment

    result = {
        "ok": ok,
        "environment": runtime_environment(device),  # GPU, versions, code version
        "device": device,
        "interpreter": device == "cpu",
        "loss": args.loss,
        "dtype": args.dtype,
        "steps": steps,
        "batch": batch,
        "classes": num_classes,
        "features": feat,
        "lr": args.lr,
        "seed": args.seed,
        "temperature": temperature,
        "power": power,
        "alpha": alpha,
        "tolerance": {"atol": atol, "rtol": rtol, "bound": bound,
                      "rule": "max|fused-ref| <= atol + rtol * max|ref|"},
        "max_abs_diff": max_diff,
        "argmax_step": diffs.index(max_diff) if diffs else None,
        "first_loss": curve_ref[0] if curve_ref else None,
        "last_loss": {"fused": curve_fused[-1], "reference": curve_ref[-1]} if steps else None,
        "seconds": {"fused": t1 - t0, "reference": t2 - t1},
        "curve_fused": curve_fused,
        "curve_reference": curve_ref,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    status = "OK" if ok else "FAIL"
    print(f"{status}: {args.loss} {args.dtype} on {device}, {steps} steps, loss "
          f"{result['first_loss']:.4f} -> {curve_ref[-1]:.4f}; max |fused - ref| = "
          f"{max_diff:.3e} (bound {bound:.3e}); wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Pack CIFAR-LT (the long-tailed training subset + the test set) into one ~50 MiB ``.npz``.

The official CIFAR-100 archive (169 MB) is too large to carry to the GPU machine in one call
(64 MiB in all); this file is small enough and serves every imbalance factor at or above the one
it is packed at (see ``ltscale/data/cifar_npz.py`` for why and for the format). Use it anywhere a
recipe takes the archive: ``--set data.root=.data/cifar100_lt_if10.npz``.

    python tools/pack_cifar_npz.py --archive ../shared/data/cifar-100-python.tar.gz \\
        --imbalance-factor 10 --out .data/cifar100_lt_if10.npz

After writing, the file is checked against the archive at each ``--verify`` IF (default 100, 50
and the packed IF): the same training and test arrays, the same dataset fingerprint. Packing
takes ~2 minutes (LZMA) for IF 10.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def verify(dataset: str, archive: str, packed: Path, imbalance_factor: float) -> dict:
    """Compare the packed file with the archive at ``imbalance_factor``; raise on any difference."""
    from ltscale.data.cifar import load_cifar_lt

    reference = load_cifar_lt(dataset, archive, imbalance_factor)
    loaded = load_cifar_lt(dataset, str(packed), imbalance_factor)
    for split in ("train", "test"):
        a, b = getattr(reference, split), getattr(loaded, split)
        if a.name != b.name or not np.array_equal(a.targets, b.targets) or not np.array_equal(a.images, b.images):
            raise SystemExit(f"pack_cifar_npz: the {split} split at IF {imbalance_factor:g} differs from the archive")
        if a.fingerprint() != b.fingerprint() or a.class_names != b.class_names:
            raise SystemExit(f"pack_cifar_npz: the {split} fingerprint at IF {imbalance_factor:g} differs from the archive")
    return {"imbalance_factor": imbalance_factor, "train_images": len(reference.train), "fingerprint": reference.train.fingerprint()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True, help="the official CIFAR python archive (.tar.gz) or its folder")
    parser.add_argument("--dataset", default="cifar100_lt", choices=("cifar100_lt", "cifar10_lt"))
    parser.add_argument("--imbalance-factor", type=float, default=10.0,
                        help="the smallest IF the file must serve (default 10: serves 10, 50, 100)")
    parser.add_argument("--out", required=True, type=Path, help="the .npz to write")
    parser.add_argument("--verify", type=float, nargs="*", default=None,
                        help="IFs to check against the archive (default: 100, 50 and the packed IF)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npz":
        parser.error("--out must end in .npz (that is how data.root recognises a packed file)")
    if args.out.is_dir():
        parser.error(f"--out {args.out}: is a directory")
    if not (args.imbalance_factor >= 1 and args.imbalance_factor < float("inf")):
        parser.error(f"--imbalance-factor {args.imbalance_factor}: must be a finite number >= 1")
    below = [f for f in args.verify or () if f < args.imbalance_factor]
    if below or args.verify == []:
        parser.error(f"--verify {' '.join(map(str, args.verify))}: give IFs >= the packed --imbalance-factor "
                     f"{args.imbalance_factor:g} (the file serves only those)")
    from ltscale.data.cifar import TRAINING_SETS, long_tailed_counts
    from ltscale.data.cifar_npz import pack_from_archive
    from ltscale.data.errors import DatasetError

    classes, per_class = TRAINING_SETS[args.dataset]
    for option, factor in [("--imbalance-factor", args.imbalance_factor), *(("--verify", f) for f in args.verify or ())]:
        try:
            long_tailed_counts(per_class, classes, factor)
        except ValueError as error:
            parser.error(f"{option} {factor:g}: {args.dataset}'s {error}")

    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot make its folder ({error.strerror or error})")
    started = time.perf_counter()
    try:
        summary = pack_from_archive(args.dataset, args.archive, args.imbalance_factor, args.out)
    except DatasetError as error:
        print(f"pack_cifar_npz: error: --archive: {error}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - started, 1)
    targets = args.verify if args.verify is not None else sorted({100.0, 50.0, args.imbalance_factor}, reverse=True)
    summary["verified"] = [verify(args.dataset, args.archive, args.out, f) for f in targets if f >= args.imbalance_factor]
    summary["mib"] = round(summary["bytes"] / 2**20, 1)
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The many / medium / few table printed after a run (and by the demo, one row per method)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _rows(result, detail: bool) -> list[tuple[str, dict[str, float]]]:
    rows = [(f"{result.name}", result.metrics())]
    if detail:
        for stage, output in result.outputs.items():
            metrics = output.manifest.get("metrics", {})
            heads = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2 and k.startswith("test/")})
            config = output.manifest.get("config", {})
            if config.get("kind") == "rebalance" and config.get("head") in heads:
                heads = [config["head"]]  # the other heads are the source's, unchanged: rows already shown
            for head in heads if len(heads) > 1 else []:
                prefix = f"test/{head}/"
                rows.append((f"  {stage} ({head})", {"test/" + k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}))
            if stage != result.result_stage and len(heads) <= 1 and "test/top1" in metrics:
                rows.append((f"  {stage}", metrics))
    return rows


def print_results(results, detail: bool = False, console: Console | None = None) -> None:
    # Not a terminal (a log file, tee, a SLURM output file): rich would assume 80 columns and cut the
    # run ids, which are what a reader copies from there.
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    table = Table(title="top-1 accuracy (%) on the balanced test set")
    for column in ("pipeline / stage", "many", "medium", "few", "all"):
        table.add_column(column, justify="left" if column == "pipeline / stage" else "right")
    table.add_column("MLflow run", no_wrap=True, min_width=32)
    for result in results:
        for label, metrics in _rows(result, detail):
            cells = [f"{metrics[f'test/{g}']:.2f}" if f"test/{g}" in metrics else "-" for g in ("many", "medium", "few", "top1")]
            table.add_row(escape(label), *cells, result.run_id if not label.startswith(" ") else "")
    console.print(table)

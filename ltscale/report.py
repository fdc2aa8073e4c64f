"""The many / medium / few table printed after a run (and by the demo, one row per method)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _rows(result, detail: bool) -> list[tuple[str, dict[str, float]]]:
    rows = [(f"{result.name}", result.metrics())]
    if detail:
        for stage, output in result.outputs.items():
            metrics = output.manifest.get("metrics", {})
            heads = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2 and k.startswith("test/")})
            for head in heads if len(heads) > 1 else []:
                prefix = f"test/{head}/"
                rows.append((f"  {stage} ({head})", {"test/" + k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}))
            if stage != result.result_stage and len(heads) <= 1 and "test/top1" in metrics:
                rows.append((f"  {stage}", metrics))
    return rows


def print_results(results, detail: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="top-1 accuracy (%) on the balanced test set")
    for column in ("pipeline / stage", "many", "medium", "few", "all", "MLflow run"):
        table.add_column(column, justify="left" if column in ("pipeline / stage", "MLflow run") else "right")
    for result in results:
        for label, metrics in _rows(result, detail):
            cells = [f"{metrics[f'test/{g}']:.2f}" if f"test/{g}" in metrics else "-" for g in ("many", "medium", "few", "top1")]
            table.add_row(escape(label), *cells, result.run_id if not label.startswith(" ") else "")
    console.print(table)

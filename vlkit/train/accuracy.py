"""The table printed after a stage: generation accuracy per question type."""
from __future__ import annotations

from typing import Any

from rich.console import Console


def print_accuracy(console: Console, stage: str, m: dict[str, Any]) -> None:
    from rich.table import Table

    if list(m["accuracy_by_type"]) == ["all"]:  # no question types (a caption set): BLEU is the measure
        console.print(f"{stage}: {m['n']} generations, exact match {m['accuracy']:.3f}")
    else:
        table = Table(title=f"{stage}: generation accuracy (exact match) on {m['n']} samples")
        table.add_column("question type")
        table.add_column("n", justify="right")
        table.add_column("accuracy", justify="right")
        for k, v in m["accuracy_by_type"].items():
            table.add_row(k, str(m["count_by_type"][k]), f"{v:.3f}")
        table.add_row("[bold]all", str(m["n"]), f"[bold]{m['accuracy']:.3f}")
        console.print(table)
    console.print(f"val loss {m['val_loss']:.4f} (ppl {m['val_perplexity']:.2f}), BLEU {m['bleu']:.1f}")

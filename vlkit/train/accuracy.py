"""The table printed after a stage: generation accuracy per question type, beside the references the evaluated
questions carry (``vlkit.evaluate.reference_report``: blind, uniform chance, position-blind reader, toy-lm from
text), spatial types marked."""
from __future__ import annotations

from typing import Any

from rich.console import Console

# the references a table shows, in this order, when the evaluated records carry them
REFERENCES = {"blind": "blind", "uniform": "uniform\nchance", "position_blind": "reader\nblind to\nposition",
              "toy_lm_from_text": "toy-lm\nfrom\ntext"}
SPATIAL_MARK = "◆"


def print_accuracy(console: Console, stage: str, m: dict[str, Any]) -> None:
    from rich.table import Table

    if list(m["accuracy_by_type"]) == ["all"]:  # no question types (a caption set): BLEU is the measure
        console.print(f"{stage}: {m['n']} generations, exact match {m['accuracy']:.3f}")
    else:
        refs = [r for r in REFERENCES if r in (m.get("references") or {})]
        spatial = set(m.get("spatial_types") or [])
        table = Table(title=f"{stage}: generation accuracy (exact match) on {m['n']} samples")
        table.add_column("question type", no_wrap=True)  # the names stay whole; reference headers wrap
        table.add_column("n", justify="right")
        table.add_column("accuracy", justify="right", no_wrap=True, min_width=8)  # whole in an 80-column terminal
        for r in refs:
            table.add_column(REFERENCES[r], justify="right", style="dim")
        for k, v in m["accuracy_by_type"].items():
            by_ref = m["references_by_type"].get(k, {}) if refs else {}
            table.add_row(k + (f" {SPATIAL_MARK}" if k in spatial else ""), str(m["count_by_type"][k]), f"{v:.3f}",
                          *[f"{by_ref[r]:.3f}" if r in by_ref else "" for r in refs])
        table.add_row("[bold]all", str(m["n"]), f"[bold]{m['accuracy']:.3f}",
                      *[f"{m['references'][r]:.3f}" for r in refs])
        console.print(table)
        if spatial:
            console.print(f"{SPATIAL_MARK} spatial: the answer depends on where objects are; the position-blind reader "
                          "knows every object but not its cell (docs/toyworld.md#references)")
    console.print(f"val loss {m['val_loss']:.4f} (ppl {m['val_perplexity']:.2f}), BLEU {m['bleu']:.1f}")

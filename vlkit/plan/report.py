"""``vlkit plan``'s printed report: one table per stage and its verdict. rich is imported when printing."""
from __future__ import annotations

from typing import Any

from vlkit.plan.configs import GB
from vlkit.plan.stage import Plan, Row

# ---- printing ----------------------------------------------------------------------------------------------------
def _gb(x: float) -> str:
    return "-" if not x else (f"{x / GB:.2f}" if x >= 0.01 * GB else f"{x / GB:.3f}")


def _count(n: int) -> str:
    if not n:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def print_plan(console: Any, p: Plan) -> None:
    from rich.table import Table

    console.print(f"[bold]{p.recipe}[/]: llm {p.llm.name} ({_count(p.llm.params)} params, {p.llm.layers} layers, "
                  f"hidden {p.llm.hidden}, vocab {p.llm.vocab}) from {p.llm.source}")
    console.print(f"  encoder {p.encoder.name} ({_count(p.encoder.params)} params, {p.encoder.depth} blocks, "
                  f"{p.encoder.tokens} tokens/image) from {p.encoder.source}")
    console.print(f"  {p.vision.image_tokens} image tokens per image; projector {_count(p.vision.projector_params)} "
                  "params")
    for note in p.llm.notes + p.encoder.notes + p.vision.notes:
        console.print(f"  [yellow]note[/]: {note}")
    for s in p.stages:
        prec = {2: "bf16/fp16 autocast", 4: "fp32"}[s.compute_bytes]
        per_gpu = f" per GPU (global {s.global_micro_batch})" if s.gpus > 1 else ""
        title = (f"stage {s.stage}: llm={s.llm_mode}, micro-batch {s.micro_batch}{per_gpu} x {s.seq_len} tokens "
                 f"({s.image_tokens} image), {prec}, "
                 f"gradient_checkpointing={'on' if s.gradient_checkpointing else 'off'}, "
                 f"{s.gpus} GPU(s), ZeRO-{s.zero}")
        table = Table(title=title, title_justify="left")
        table.add_column("component")
        for col in ("params", "trainable", "weights GB", "grads GB", "optim GB", "activ. GB", "total GB"):
            table.add_column(col, justify="right")
        for r in s.rows:
            table.add_row(r.component, _count(r.params), _count(r.trainable), _gb(r.weights), _gb(r.grads),
                          _gb(r.optimizer), _gb(r.activations), _gb(r.total))
        tot = Row("total per GPU", weights=sum(r.weights for r in s.rows), grads=sum(r.grads for r in s.rows),
                  optimizer=sum(r.optimizer for r in s.rows), activations=sum(r.activations for r in s.rows))
        table.add_row("[bold]total per GPU", "", "", _gb(tot.weights), _gb(tot.grads), _gb(tot.optimizer),
                      _gb(tot.activations), f"[bold]{_gb(tot.total)}")
        console.print(table)
        console.print(f"  peak: {s.peak_phase}; {s.supervised_tokens:,} supervised tokens reach the LM head")
        for note in s.notes:
            console.print(f"  [yellow]note[/]: {note}")
        style = "bold green" if s.fits else "bold red"
        console.print(f"  [{style}]{s.verdict()}[/]", highlight=False)

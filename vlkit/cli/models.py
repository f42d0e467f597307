"""``vlkit list``, ``config``, ``inspect`` and ``plan``: the components, a resolved recipe, a built model, a memory
plan."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from vlkit.cli.common import app, console, friendly


@app.command("list")
@friendly
def list_cmd(family: Optional[str] = typer.Argument(None, help="encoders, token_strategies, projectors or llms"),
             pattern: str = typer.Option("*", help="glob over component names")) -> None:
    """Every registered component with its source (built-in, or plugin distribution + version)."""
    import fnmatch

    from vlkit.registry import FAMILIES, suggest

    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'.{suggest(family, FAMILIES)} Families: {', '.join(FAMILIES)}")
    table = Table(title="vlkit components")
    for col in ("family", "name", "source", "status"):
        table.add_column(col)
    for fam, reg in FAMILIES.items():
        if family and fam != family:
            continue
        for entry in reg.entries():
            if not fnmatch.fnmatch(entry.name, pattern):
                continue
            status = Text("ok", style="green") if entry.error is None else Text(entry.error, style="red")
            table.add_row(fam, entry.name, entry.source, status)
    console.print(table)


@app.command("config")
@friendly
def config_cmd(recipe: str = typer.Argument(..., help="recipe YAML"),
               overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ...")) -> None:
    """Print the resolved recipe (base merged, overrides applied, validated)."""
    from vlkit.config import dump_recipe, load_recipe

    r = load_recipe(recipe, overrides or [])
    console.print(dump_recipe(r), markup=False, highlight=False)


@app.command("inspect")
@friendly
def inspect_cmd(recipe: str = typer.Argument(..., help="recipe YAML"),
                overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ..."),
                stage: Optional[str] = typer.Option(None, help="stage whose data sample to show (default: first)")) -> None:
    """Build the model: parameters per component, image tokens, dims, one sample with its label mask."""
    from vlkit.config import load_recipe
    from vlkit.inspect import describe_model, sample_view

    r = load_recipe(recipe, overrides or [])
    info, model = describe_model(r)
    table = Table(title=f"{r.name}: components")
    for col in ("component", "name", "source", "trainable", "frozen"):
        table.add_column(col)
    for row in info["components"]:
        table.add_row(row["part"], row["name"], row["source"], f"{row['trainable']:,}", f"{row['frozen']:,}")
    console.print(table)
    for k, v in info["facts"].items():
        console.print(f"[bold]{k}[/]: {v}")
    console.print(sample_view(r, model, stage))


@app.command("plan")
@friendly
def plan_cmd(recipe: str = typer.Argument(..., help="recipe YAML"),
             overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ..."),
             gpus: int = typer.Option(1, help="data-parallel GPUs: each takes 1/gpus of a micro-batch; ZeRO "
                                              "shards across them"),
             zero: Optional[int] = typer.Option(None, help="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 "
                                                           "+weights (default: the recipe's train.deepspeed, else 0)"),
             gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="memory per GPU in GB (10^9 bytes)"),
             stage: Optional[str] = typer.Option(None, help="plan only this stage (default: train.stages)"),
             seq_len: Optional[int] = typer.Option(None, "--seq-len",
                                                   help="tokens per sample incl. image tokens (default data.max_length)"),
             supervised_frac: float = typer.Option(0.3, "--supervised-frac",
                                                   help="fraction of tokens with a label (they reach the LM head)"),
             micro_batch: Optional[int] = typer.Option(None, "--micro-batch",
                                                       help="samples per GPU per step (default batch_size/grad_accum)"),
             device: str = typer.Option("cuda", help="cuda (autocast per train.precision) or cpu (fp32)"),
             overhead_gb: Optional[float] = typer.Option(None, "--overhead-gb",
                                                         help="CUDA context/workspace allowance (default 1 on cuda)"),
             offline: bool = typer.Option(False, "--offline", help="never ask the hub for a config"),
             as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Estimate per-GPU training memory of each stage (weights, gradients, AdamW, activations) without downloading."""
    import json

    from vlkit.config import load_recipe
    from vlkit.plan import plan, print_plan

    r = load_recipe(recipe, overrides or [])
    p = plan(r, [stage] if stage else None, online=False if offline else None, gpus=gpus, zero=zero,
             gpu_memory_gb=gpu_memory, seq_len=seq_len, supervised_frac=supervised_frac, micro_batch=micro_batch,
             device=device, overhead_gb=overhead_gb)
    if as_json:
        print(json.dumps(p.to_dict(), indent=1))
        return
    print_plan(console, p)

"""``vlkit ablate`` and ``vlkit report``: run a declared grid and report it; regenerate a report."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from vlkit.cli.common import app, console, friendly


@app.command("ablate")
@friendly
def ablate_cmd(recipe: str = typer.Argument("mlp_patch", help="base recipe (default: the embedded default)"),
               overrides: Optional[list[str]] = typer.Argument(None, help="base overrides key.path=value"),
               projector: Optional[str] = typer.Option(None, help="projectors, e.g. linear,mlp"),
               tokens: Optional[str] = typer.Option(None, help="token strategies, e.g. cls,patch"),
               num_image_tokens: Optional[str] = typer.Option(None, help="image token counts, e.g. 1,4,16,64"),
               seeds: Optional[str] = typer.Option(None, help="number of seeds (3) or a list (0,1,2)"),
               grid: Optional[list[str]] = typer.Option(None, help="generic axis key.path=a,b,c (repeatable)"),
               out: Optional[Path] = typer.Option(None, help="ablation directory (default: runs/ablate/<recipe>)"),
               executor: str = typer.Option("local", help="local, slurm or submitit-local"),
               workers: Optional[int] = typer.Option(None, help="parallel runs (default from cores and memory)"),
               feature_cache: bool = typer.Option(True, "--feature-cache/--no-feature-cache",
                                                  help="share frozen encoder features across runs"),
               dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and a time estimate, run nothing"),
               partition: Optional[str] = typer.Option(None, help="slurm partition"),
               gpus: int = typer.Option(1, help="slurm GPUs per run"),
               time_min: int = typer.Option(240, "--time", help="slurm time limit per run (minutes)"),
               compare: Optional[list[Path]] = typer.Option(None, help="another study's directory: the report sets "
                                                                        "its axes' spreads beside this one's "
                                                                        "(repeatable)"),
               reuse: Optional[list[Path]] = typer.Option(None, help="another study's directory (or a run "
                                                                      "directory): its finished runs of a config "
                                                                      "this grid plans are copied in, not trained "
                                                                      "again (repeatable)")) -> None:
    """Run a declared grid (projector x tokens x N x seeds x any key) and write results and a report."""
    import shlex

    from vlkit.ablate.plan import adopt_reusable, estimate_time, make_plan, print_grid_plan, print_reuse
    from vlkit.ablate.report import write_report
    from vlkit.ablate.results import study_rows
    from vlkit.ablate.run import run_grid

    for other in compare or []:
        study_rows(other)  # a wrong --compare directory fails now, not after the grid has trained

    cli_axes: dict[str, str] = {}
    for name, value in (("projector", projector), ("tokens", tokens), ("num_image_tokens", num_image_tokens)):
        if value:
            cli_axes[name] = value
    for g in grid or []:
        key, sep, values = g.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid '{g}' is not of the form key.path=a,b,c")
        cli_axes[key.strip()] = values
    command = "vlkit ablate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    plan = make_plan(recipe, overrides or [], cli_axes, seeds, out, command, reuse)
    print_grid_plan(console, plan)
    print_reuse(console, plan)
    if dry_run:
        estimate_time(console, plan, workers)
        return
    adopt_reusable(console, plan)
    slurm = {"partition": partition, "gpus": gpus, "time_min": time_min}
    run_grid(plan["recipe_path"], plan["specs"], plan["out"], executor, workers, feature_cache, console, slurm)
    result = write_report(plan["out"], compare=compare)
    print_ablation_summary(result, plan["axes"])
    console.print(f"[bold]report[/]: {plan['out'] / 'report.md'}, {plan['out'] / 'results.csv'}")


@app.command("report")
@friendly
def report_cmd(out: Path = typer.Argument(..., help="ablation directory"),
               compare: Optional[list[Path]] = typer.Option(None, help="another study's directory: set its axes' "
                                                                        "spreads beside this one's (repeatable)")) -> None:
    """Regenerate results.csv/json, report.md and plots from an ablation's run directories (kept without them: report.md
    and findings.json from its results.json)."""
    from vlkit.ablate.report import write_report
    from vlkit.ablate.results import load_plan, study_rows

    plan, _ = load_plan(out)
    for other in compare or []:
        study_rows(other)
    result = write_report(out, compare=compare)
    print_ablation_summary(result, plan["axes"])
    console.print(f"[bold]report[/]: {out / 'report.md'}")


def print_ablation_summary(result: dict[str, Any], axes: list[str]) -> None:
    from vlkit.ablate.report import fmt_mean_ci

    table = Table(title="ablation: mean ± 95% CI across seeds")
    for col in [*axes, "image tokens", "trainable", "seeds", "accuracy", "val loss"]:
        table.add_column(col)
    for a in result["aggregate"]:
        table.add_row(*[str(a.get(x)) for x in axes], str(a.get("image_tokens")), f"{a.get('trainable_params') or 0:,}",
                      str(a["seeds"]), fmt_mean_ci(a.get("accuracy")), fmt_mean_ci(a.get("val_loss")))
    console.print(table)

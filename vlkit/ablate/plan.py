"""Turn a recipe plus declared axes into a validated plan (printed before anything runs, saved as plan.json)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlkit._atomic import write_json_atomic

from vlkit.ablate.grid import RunSpec, expand, parse_values
from vlkit.ablate.run import run_status
from vlkit.config import ConfigError, check_expect, eval_question_types, find_recipe, load_recipe


def _seeds(value: Any) -> list[int]:
    """``seeds``: a count N (seeds 0..N-1) or a list; a count below 1 is an error, not an empty grid."""
    if value is None:
        return [0]
    if isinstance(value, list):
        seeds = [int(v) for v in value]
    else:
        vals = [value] if isinstance(value, int) else parse_values(str(value))
        seeds = list(range(int(vals[0]))) if len(vals) == 1 else [int(v) for v in vals]
        if len(vals) == 1 and int(vals[0]) < 1:
            raise ValueError(f"seeds {value}: a single number is a count of seeds (0..N-1) and must be at least 1; "
                             "for one seed by its value give a list (grid: seeds: [4], or --seeds 4,)")
    if not seeds:
        raise ValueError("seeds is an empty list: name at least one seed")
    return seeds


def make_plan(recipe: str, overrides: list[str], cli_axes: dict[str, str], seeds: str | None, out: Path | None,
              command: str, reuse: list[Path] | None = None) -> dict[str, Any]:
    """The grid's points, checked (every point's recipe loads; no run directory holds another config or toy
    world), with the finished runs ``reuse`` offers for points not yet run (``plan["reuse"]``: id -> directory)."""
    from vlkit.ablate.reuse import check_run_dirs, find_reusable
    from vlkit.model import count_image_tokens
    from vlkit.toyworld import toy_world_of

    path = find_recipe(recipe)
    base = load_recipe(path, overrides)
    axes: dict[str, list[Any]] = {}
    yaml_grid = dict(base.grid or {})
    yaml_seeds = yaml_grid.pop("seeds", None)
    for key, values in yaml_grid.items():
        axes[key] = values if isinstance(values, list) else [values]
    for key, text in cli_axes.items():
        axes[key] = parse_values(text)
    expect_errors = check_expect(base, str(path), axes)  # against the final axes (command-line ones too)
    if expect_errors:
        raise ConfigError(str(path), expect_errors)
    seed_list = _seeds(seeds if seeds is not None else yaml_seeds)
    num_patches = count_image_tokens(load_recipe(path, overrides + ["tokens.name=patch", "projector.name=linear"]))
    base_ov = list(overrides) + ["grid=null"]
    base_pooled = base.tokens.params().get("num_tokens") if base.tokens.name == "pooled" else None
    specs = expand(axes, seed_list, num_patches, base_pooled=base_pooled)
    errors = []
    worlds: dict[str, str | None] = {}
    for s in specs:
        s.overrides = base_ov + s.overrides
        if s.skipped:
            continue
        try:
            point = load_recipe(path, s.overrides)
        except ConfigError as exc:
            errors += [f"run {s.id}: {e}" for e in exc.errors]
            continue
        s.identity, s.work_identity = point.identity(), point.work_identity()
        worlds[s.id] = toy_world_of(point.to_dict())
    if errors:
        raise ConfigError(str(path), errors)
    out = Path(out or Path(base.train.output_dir) / "ablate" / base.name)
    dirs = check_run_dirs(out, specs, worlds)
    if dirs.problems:
        n = len(dirs.problems)
        raise ValueError(f"{n} run director{'y' if n == 1 else 'ies'} of this grid hold something else:\n  - "
                         + "\n  - ".join(dirs.problems))
    reusable = find_reusable(out, specs, worlds, list(reuse or []))
    out.mkdir(parents=True, exist_ok=True)
    plan = {"recipe": base.name, "recipe_path": str(path), "axes": list(axes), "seeds": seed_list,
            "base_overrides": base_ov,
            "num_patches": num_patches, "command": command, "runs": [s.to_dict() for s in specs]}
    if base.expect:
        plan["expect"] = list(base.expect)  # judged by the report (vlkit/ablate/findings.py)
        plan["question_types"] = eval_question_types(base)
    extended = seed_extensions(out, seed_list)
    if extended:
        plan["extended"] = extended  # the report labels its Findings exploratory
    write_json_atomic(out / "plan.json", plan)
    return {**plan, "specs": specs, "out": out, "reuse": reusable.chosen, "passed_over": reusable.passed_over,
            "renamed": dirs.renamed, "reuse_asked": bool(reuse)}


def print_reuse(console: Console, plan: dict[str, Any]) -> None:
    """What ``--reuse`` found, what it passed over and why, and points relabelled after a rename."""
    for s in plan["renamed"]:
        console.print(f"{s}: its directory holds this point's run under another recipe name or description; "
                      "relabelled, not run again", markup=False, highlight=False)
    if plan["reuse_asked"] and not plan["reuse"]:
        console.print("--reuse: no finished run there computes a point this grid still has to run",
                      markup=False, highlight=False)
    for line in plan["passed_over"]:
        console.print(f"--reuse passed over {line}", style="yellow", markup=False, highlight=False)


def adopt_reusable(console: Console, plan: dict[str, Any]) -> None:
    """Relabel the renamed points' directories and copy in the finished runs ``--reuse`` offered (see
    vlkit/ablate/reuse.py)."""
    from vlkit.ablate.reuse import adopt_run, relabel, remove_scratch

    remove_scratch(plan["out"])
    for s in plan["specs"]:
        if s.id in plan["renamed"]:
            relabel(plan["out"] / "runs" / s.id, load_recipe(plan["recipe_path"], s.overrides))
        source = plan["reuse"].get(s.id)
        if source is not None:
            adopt_run(source, plan["out"], s, load_recipe(plan["recipe_path"], s.overrides))
            console.print(f"reused {source} as {s.id}", markup=False, highlight=False)


def print_grid_plan(console: Console, plan: dict[str, Any]) -> None:
    specs: list[RunSpec] = plan["specs"]
    t = Table(title=f"plan: {len(specs)} runs over {', '.join(plan['axes']) or '(no axes)'} x seeds {plan['seeds']} "
                    f"-> {plan['out']}")
    for col in ("run", "state", "overrides", "note"):
        t.add_column(col, overflow="fold")
    for s in specs:
        state = "skip" if s.skipped else run_status(plan["out"] / "runs" / s.id)
        note = s.skipped or s.mapping or ""
        if s.id in plan.get("reuse", {}):
            state, note = "reuse", f"finished run {plan['reuse'][s.id]}" + (f"; {note}" if note else "")
        elif s.id in plan.get("renamed", []):
            note = "its run under another recipe name: relabelled" + (f"; {note}" if note else "")
        shown = [o for o in s.overrides if o not in plan["base_overrides"]]
        # Text, not markup: an override such as train.stages=[align,instruct] would read as a style tag
        t.add_row(Text(s.id), Text(state), Text(" ".join(shown)), Text(note))
    console.print(t)


def estimate_time(console: Console, plan: dict[str, Any], workers: int | None) -> None:
    """Rough time: one measured training step of the first run x every run's steps (evaluation excluded)."""
    from vlkit.ablate.run import default_workers
    from vlkit.train import estimate_steps, train

    todo = [s for s in plan["specs"] if not s.skipped and s.id not in plan.get("reuse", {})
            and run_status(plan["out"] / "runs" / s.id) != "finished"]
    if not todo:
        console.print("nothing to run: every run is finished")
        return
    recipe = load_recipe(plan["recipe_path"], todo[0].overrides)
    import shutil

    scratch = plan["out"] / ".estimate"
    try:
        m = train(recipe, scratch, console=Console(quiet=True), dry_run=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    steps = sum(sum(estimate_steps(load_recipe(plan["recipe_path"], s.overrides)).values()) for s in todo)
    w = workers or default_workers(len(todo))
    secs = m["step_time_s"] * steps / w
    console.print(f"estimate: {len(todo)} runs, {steps} optimizer steps, ~{m['step_time_s']:.2f} s/step measured on "
                  f"run {todo[0].id} -> ~{secs / 60:.1f} min with {w} worker(s), plus evaluation")


def seed_extensions(out: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Seeds added to a study after a report of it was written (the p-values then saw an earlier look): the earlier
    plan's record, plus this extension when ``seeds`` adds to its seeds and its report.md exists."""
    path = out / "plan.json"
    if not path.exists():
        return []
    from vlkit._atomic import read_json

    before = read_json(path, "Delete it: the grid's runs are kept and the plan is written again")
    old = list(before.get("seeds") or [])
    record = list(before.get("extended") or [])
    if set(old) < set(seeds) and (out / "report.md").exists():
        record.append({"from": len(old), "to": len(seeds), "seeds_before": old})
    return record

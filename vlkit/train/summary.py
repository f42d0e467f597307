"""A run directory: where it is, its config and identity, and its ``summary.json`` (per stage, rebuilt from the
finished stages' final checkpoints when it is damaged)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from vlkit._atomic import StateError, read_json, write_text_atomic
from vlkit._locks import hold_run_dir, release_run
from vlkit.checkpoint import find_checkpoint
from vlkit.config import Recipe, dump_recipe


def default_run_dir(recipe: Recipe, run_dir: Path | None) -> Path:
    """``run_dir`` as given, else ``train.output_dir/<train.run_name or recipe name>``."""
    return Path(run_dir or Path(recipe.train.output_dir) / (recipe.train.run_name or recipe.name))


def prepare_run_dir(recipe: Recipe, run_dir: Path | None) -> Path:
    run_dir = default_run_dir(recipe, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / "config.yaml"
    ident = run_dir / "identity.txt"
    if ident.exists() and ident.read_text().strip() != recipe.identity():
        raise ValueError(f"run directory {run_dir} holds a run of a different config (identity "
                         f"{ident.read_text().strip()} != {recipe.identity()}); choose another train.run_name or "
                         "remove the directory")
    from vlkit.toyworld import toy_world_of

    world, held = toy_world_of(recipe.to_dict()), recorded_world(run_dir)
    if world and held and held != world:
        raise ValueError(f"run directory {run_dir} holds a run on toy world {held}, and this vlkit's is {world} "
                         "(another release or $VLKIT_TOY_PRESET): resuming would mix two instruments. Give "
                         "another --run-dir, or remove the directory")
    write_text_atomic(cfg, dump_recipe(recipe))
    write_text_atomic(ident, recipe.identity() + "\n")
    if world:
        write_text_atomic(run_dir / TOY_WORLD, world + "\n")
    return run_dir


TOY_WORLD = "toy_world.txt"  # the toy world a run's toy: references stood for, written before it trains


def recorded_world(run_dir: Path) -> str | None:
    """The toy world a run directory records: ``toy_world.txt``, else (runs made before it) ``summary.json``'s
    ``toy_world``; None when neither says."""
    try:
        return (run_dir / TOY_WORLD).read_text().strip() or None
    except OSError:
        pass
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("toy_world") if isinstance(summary, dict) else None


def clear_run_dir(recipe: Recipe, run_dir: Path | None) -> Path:
    """``vlkit train --fresh``: delete a run directory's checkpoints, log, summary and predictions (its config stays), holding
    its lock, so a directory another process trains is never cleared (RunBusyError)."""
    lock = hold_run_dir(default_run_dir(recipe, run_dir))
    try:
        d = prepare_run_dir(recipe, run_dir)
        kept = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard")
        for sub in (*kept, *(p.name for p in d.glob("predictions_*.jsonl"))):
            target = d / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return d
    finally:
        if lock is not None:
            release_run(lock)


STAGE_METRICS = "metrics.json"  # a finished stage's summary entry, kept beside its final checkpoint


def stage_metrics_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "checkpoints" / stage / "final" / STAGE_METRICS


def load_summary(run_dir: Path, recipe: Recipe, console: Console) -> dict[str, Any]:
    """``summary.json`` as written last; when it is cut short or damaged, rebuilt (see :func:`recorded_stages`)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {"stages": {}}
    try:
        summary = read_json(path, "")
        if not isinstance(summary, dict) or not isinstance(summary.get("stages"), dict):
            raise StateError(f"{path} does not hold a run summary (an object with 'stages')")
        return summary
    except StateError as exc:
        stages = recorded_stages(run_dir, recipe)
        console.print(str(exc), style="yellow", markup=False, highlight=False)
        console.print(f"[yellow]rebuilt {path.name} from the final checkpoints of the finished stages "
                      f"({', '.join(stages) or 'none'}); the others resume from their checkpoints[/]")
        return {"stages": stages, "wall_time_s": sum(m.get("wall_time_s", 0.0) for m in stages.values()),
                "rebuilt": {"from": "checkpoints/*/final/" + STAGE_METRICS, "reason": str(exc)}}


def recorded_stages(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """The summary entries of finished stages, in order, from ``checkpoints/<stage>/final/metrics.json``.

    Stops at the first stage without one: later stages were trained on top of it. A stage whose final checkpoint
    lacks the file (written by vlkit before it kept one) resumes at its last step, which re-runs its evaluation."""
    stages: dict[str, Any] = {}
    for name in recipe.train.stages:
        path = stage_metrics_path(run_dir, name)
        if find_checkpoint(path.parent) is None or not path.exists():
            break
        stages[name] = read_json(path, f"Delete it to have stage '{name}' evaluated again on the next run")
    return stages

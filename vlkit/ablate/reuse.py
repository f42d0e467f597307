"""Which config a study's run directories hold, and runs taken over from another study.

Every run directory records the identity of the config it ran (``identity.txt``) and, when it used the toy world,
which world (``summary.json: toy_world``; ``$VLKIT_TOY_PRESET`` and the vlkit release pick it, not the recipe).
A grid never counts a directory that holds another config or another world as one of its points:
:func:`foreign_runs` names them and ``vlkit ablate`` stops before anything runs.

``vlkit ablate --reuse DIR`` takes a finished run from another study (or any run directory) whose config computes
the same thing as a planned point -- the same :func:`vlkit.config.work_identity`, which leaves out only the names
-- and the same toy world: it is copied in under the point's id, its ``config.yaml`` and ``identity.txt`` rewritten
to the point's recipe, and ``reused.json`` records where it came from. The report lists such runs. A candidate that
records no toy world (made before vlkit recorded it) is never taken for a toy-world point.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from vlkit._atomic import write_json_atomic, write_text_atomic
from vlkit._locks import RUN_LOCK
from vlkit.ablate.grid import RunSpec
from vlkit.ablate.run import run_status
from vlkit.config import dump_recipe, work_identity

REUSED = "reused.json"


def recorded_world(run_dir: Path) -> str | None:
    """The toy world a run directory's summary records (None: none recorded or unreadable)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("toy_world") if isinstance(summary, dict) else None


def foreign_runs(out: Path, specs: list[RunSpec], worlds: dict[str, str | None]) -> list[str]:
    """One problem per planned point whose directory holds a run of another config or another toy world."""
    problems = []
    for s in specs:
        rd = out / "runs" / s.id
        if s.skipped or not rd.exists():
            continue
        try:
            held = (rd / "identity.txt").read_text().strip()
        except OSError:
            held = None
        if held and s.identity and held != s.identity:
            problems.append(f"{rd} holds a run of another config (identity {held}; this grid's point is "
                            f"{s.identity}): the recipe or an override changed since it ran, or it was copied from "
                            "another study. Remove the directory to run the point again (another study's run of the "
                            "same config: then take it with --reuse), or give the grid another --out")
        world, now = recorded_world(rd), worlds.get(s.id)
        if world and now and world != now:
            problems.append(f"{rd} was trained on toy world {world}, and this vlkit's is {now} (another release or "
                            "$VLKIT_TOY_PRESET): its results belong to another instrument. Remove the directory or "
                            "give the grid another --out")
    return problems


def _candidates(source: Path) -> list[Path]:
    if not source.is_dir():
        raise FileNotFoundError(f"--reuse {source}: no such directory (give a study's directory or a run directory)")
    if (source / "identity.txt").exists():
        return [source]
    runs = source / "runs" if (source / "runs").is_dir() else source
    found = sorted(p for p in runs.iterdir() if (p / "config.yaml").exists())
    if not found:
        raise FileNotFoundError(f"--reuse {source}: holds no run directories (none with a config.yaml, here or under "
                                "runs/)")
    return found


def find_reusable(out: Path, specs: list[RunSpec], worlds: dict[str, str | None],
                  sources: list[Path]) -> dict[str, Path]:
    """Planned point id -> a finished run elsewhere that computes it (points with no directory yet only)."""
    index: dict[tuple[str, str | None], Path] = {}
    for source in sources:
        for cand in _candidates(Path(source)):
            if cand.resolve().parent == (out / "runs").resolve() or run_status(cand) != "finished":
                continue
            try:
                config = yaml.safe_load((cand / "config.yaml").read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(config, dict):
                index.setdefault((work_identity(config), recorded_world(cand)), cand)
    chosen = {}
    for s in specs:
        if s.skipped or (out / "runs" / s.id).exists():
            continue
        hit = index.get((s.work_identity or "", worlds.get(s.id)))
        if hit is not None:
            chosen[s.id] = hit
    return chosen


def adopt_run(source: Path, out: Path, spec: RunSpec, recipe: Any) -> Path:
    """Copy a finished run in as ``spec``'s point (whole, or not at all: copied aside, then renamed into place)."""
    target = out / "runs" / spec.id
    scratch = out / "runs" / f".{spec.id}.reusing"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch, ignore=shutil.ignore_patterns(RUN_LOCK))
    old = (scratch / "identity.txt").read_text().strip()
    write_text_atomic(scratch / "config.yaml", dump_recipe(recipe))
    write_text_atomic(scratch / "identity.txt", recipe.identity() + "\n")
    summary = json.loads((scratch / "summary.json").read_text())
    write_json_atomic(scratch / "summary.json", {**summary, "recipe": recipe.name, "identity": recipe.identity()})
    write_json_atomic(scratch / REUSED, {"from": str(source.resolve()), "identity": old,
                                         "work_identity": spec.work_identity})
    scratch.rename(target)
    return target

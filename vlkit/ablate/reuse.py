"""Which config a study's run directories hold, and runs taken over from another study.

Every run directory records the identity of the config it ran (``identity.txt``) and, when it used the toy world,
which world (``toy_world.txt``; ``$VLKIT_TOY_PRESET`` and the vlkit release pick it, not the recipe). A grid never
counts a directory that holds another computation or another world as one of its points: :func:`check_run_dirs`
names them and ``vlkit ablate`` stops before anything runs. A directory whose config differs from its point's in
names only (the recipe's name or description was edited; :func:`vlkit.config.work_identity` is equal) is the
point's run: it is relabelled (its ``config.yaml`` and ``identity.txt`` rewritten), not refused.

``vlkit ablate --reuse DIR`` takes a finished run from another study (or any run directory) whose config computes
the same thing as a planned point -- the same work identity -- and that records the same toy world: it is copied in
under the point's id (aside first, then renamed into place), relabelled, and ``reused.json`` records where it came
from. The report lists such runs. A candidate that records no toy world (made before vlkit recorded it) is never
taken for a toy-world point; the command says which candidates it passed over and why.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlkit._atomic import write_json_atomic, write_text_atomic
from vlkit._locks import RUN_LOCK
from vlkit.ablate.grid import RunSpec
from vlkit.ablate.run import run_status
from vlkit.config import dump_recipe, work_identity
from vlkit.train.summary import recorded_world

REUSED = "reused.json"
SCRATCH = ".reusing"  # suffix of a copy being made (runs/.<id>.reusing), never a run of the grid


def held_identity(run_dir: Path) -> str | None:
    try:
        return (run_dir / "identity.txt").read_text().strip() or None
    except OSError:
        return None


def held_work_identity(run_dir: Path) -> str | None:
    """The work identity of the config a run directory holds (None: no readable config.yaml)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return work_identity(config) if isinstance(config, dict) else None


@dataclass
class DirCheck:
    problems: list[str] = field(default_factory=list)  # directories of another computation or world
    renamed: list[str] = field(default_factory=list)  # point ids whose directory differs in names only


def check_run_dirs(out: Path, specs: list[RunSpec], worlds: dict[str, str | None]) -> DirCheck:
    """Each planned point's existing directory: its own, its own under other names, or another's (a problem)."""
    check = DirCheck()
    for s in specs:
        rd = out / "runs" / s.id
        if s.skipped or not rd.exists():
            continue
        held = held_identity(rd)
        if held and s.identity and held != s.identity:
            if held_work_identity(rd) == s.work_identity:
                check.renamed.append(s.id)
            else:
                check.problems.append(
                    f"{rd} holds a run of another config (identity {held}; this grid's point is {s.identity}): "
                    "the recipe or an override changed since it ran, or it was copied from another study. Remove "
                    "the directory to run the point again (another study's run of the same config: then take it "
                    "with --reuse), or give the grid another --out")
        world, now = recorded_world(rd), worlds.get(s.id)
        if world and now and world != now:
            check.problems.append(
                f"{rd} was trained on toy world {world}, and this vlkit's is {now} (another release or "
                "$VLKIT_TOY_PRESET): its results belong to another instrument. Remove the directory or give the "
                "grid another --out")
    return check


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "summary.json").is_file()


def _candidates(source: Path) -> list[Path]:
    if not source.is_dir():
        raise FileNotFoundError(f"--reuse {source}: no such directory (give a study's directory or a run directory)")
    if _is_run(source):
        return [source]
    runs = source / "runs" if (source / "runs").is_dir() else source
    found = sorted(p for p in runs.iterdir() if not p.name.startswith(".") and _is_run(p))
    if not found:
        raise FileNotFoundError(f"--reuse {source}: holds no run directories (none with a config.yaml and a "
                                "summary.json, here or under runs/)")
    return found


@dataclass
class Reuse:
    chosen: dict[str, Path] = field(default_factory=dict)  # point id -> the finished run it takes
    passed_over: list[str] = field(default_factory=list)  # runs of a planned config not taken, and why


def find_reusable(out: Path, specs: list[RunSpec], worlds: dict[str, str | None], sources: list[Path]) -> Reuse:
    """For each planned point with no directory yet, a finished run elsewhere that computes it on the same world."""
    wanted = {s.work_identity: s for s in specs if not s.skipped and not (out / "runs" / s.id).exists()}
    found = Reuse()
    own = (out / "runs").resolve()
    for source in sources:
        for cand in _candidates(Path(source)):
            spec = wanted.get(held_work_identity(cand))
            if spec is None or cand.resolve().parent == own or spec.id in found.chosen:
                continue
            status, world, now = run_status(cand), recorded_world(cand), worlds.get(spec.id)
            if status != "finished":
                found.passed_over.append(f"{cand} ({spec.id}'s config): {status}, not finished")
            elif now and world != now:
                found.passed_over.append(f"{cand} ({spec.id}'s config): "
                                         + (f"toy world {world}, this vlkit's is {now}" if world else
                                            "records no toy world (made before vlkit recorded it)"))
            else:
                found.chosen[spec.id] = cand
    return found


def relabel(run_dir: Path, recipe: Any) -> None:
    """A run directory's config and identity rewritten as ``recipe``'s (a computation of the same work identity)."""
    write_text_atomic(run_dir / "config.yaml", dump_recipe(recipe))
    write_text_atomic(run_dir / "identity.txt", recipe.identity() + "\n")
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # an unfinished or damaged run: vlkit train rebuilds its summary
    if isinstance(summary, dict):
        write_json_atomic(path, {**summary, "recipe": recipe.name, "identity": recipe.identity()})


def adopt_run(source: Path, out: Path, spec: RunSpec, recipe: Any) -> Path:
    """Copy a finished run in as ``spec``'s point: copied aside, relabelled, then renamed into place (whole, or not
    at all; a copy cut short stays a hidden ``.<id>.reusing`` that no grid counts and the next adoption removes)."""
    target = out / "runs" / spec.id
    scratch = out / "runs" / f".{spec.id}{SCRATCH}"
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(source, scratch, ignore=shutil.ignore_patterns(RUN_LOCK))
        old = held_identity(scratch)
        relabel(scratch, recipe)
        write_json_atomic(scratch / REUSED, {"from": str(source.resolve()), "identity": old,
                                             "work_identity": spec.work_identity})
        scratch.rename(target)
    except OSError as exc:
        raise ValueError(f"could not copy {source} in as {target}: {exc}. Nothing of it counts; run the command "
                         "again (or drop --reuse to train the point)") from exc
    return target


def remove_scratch(out: Path) -> None:
    """Copies cut short by a kill (``runs/.<id>.reusing``)."""
    for stale in (out / "runs").glob(f".*{SCRATCH}") if (out / "runs").is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)

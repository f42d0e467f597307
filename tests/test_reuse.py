"""A study's run directories hold the config and toy world they ran, and ``vlkit ablate --reuse`` takes finished
runs of the same config from another study (vlkit/ablate/reuse.py). No training: run directories are written as a
finished run leaves them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from vlkit.ablate.plan import adopt_reusable, make_plan
from vlkit.ablate.report import notes_markdown
from vlkit.ablate.results import collect
from vlkit.config import dump_recipe, load_recipe, work_identity
from vlkit.toyworld import toy_world_of

STAGES = "recipes/ablations/stages.yaml"
CLS_VS_PATCH = "recipes/ablations/cls_vs_patch.yaml"


def fake_run(run_dir: Path, recipe_path: str, overrides: list[str], world: str | None = "current",
             status: str = "finished") -> Path:
    """A run directory as `vlkit train` leaves it (config, identity, summary, status), without training."""
    recipe = load_recipe(recipe_path, overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_recipe(recipe))
    (run_dir / "identity.txt").write_text(recipe.identity() + "\n")
    summary = {"recipe": recipe.name, "identity": recipe.identity(), "status": status,
               "stages": {"instruct": {"accuracy": 0.5, "accuracy_by_type": {"count": 0.5}}}}
    if world:
        summary["toy_world"] = toy_world_of(recipe.to_dict()) if world == "current" else world
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "status.json").write_text(json.dumps({"status": status}))
    return run_dir


def plan(out: Path, reuse=None, recipe=STAGES, seeds="0,1") -> dict:
    return make_plan(recipe, [], {}, seeds, out, "vlkit ablate (test)", reuse)


def test_work_identity_leaves_out_names_only():
    a = load_recipe(STAGES, ["grid=null", "train.stages=[align,instruct]", "train.seed=0"])
    b = load_recipe(CLS_VS_PATCH, ["grid=null", "tokens.name=pooled", "train.seed=0"])
    assert a.identity() != b.identity()  # two studies' names ...
    assert a.work_identity() == b.work_identity()  # ... one computation
    renamed = load_recipe(STAGES, ["grid=null", "train.seed=0", "train.run_name=x", "train.output_dir=elsewhere"])
    assert renamed.work_identity() == a.work_identity()
    for change in ("train.seed=1", "stages.instruct.max_steps=999", "projector.name=linear"):
        assert load_recipe(STAGES, ["grid=null", change]).work_identity() != a.work_identity(), change
    # a run's config.yaml read back hashes as the recipe does
    assert work_identity(yaml.safe_load(dump_recipe(a))) == a.work_identity()


def test_reuse_takes_finished_runs_of_the_same_config_and_world_only(tmp_path):
    other = tmp_path / "cls_vs_patch" / "runs"
    src = fake_run(other / "tokens-pooled_seed-0", CLS_VS_PATCH, ["grid=null", "tokens.name=pooled", "train.seed=0"])
    fake_run(other / "tokens-cls_seed-0", CLS_VS_PATCH, ["grid=null", "tokens.name=cls", "train.seed=0"])
    # seed 1 of the same arm, but of another toy world / of no recorded world / not finished: none is taken
    fake_run(other / "tokens-pooled_seed-1", CLS_VS_PATCH, ["grid=null", "tokens.name=pooled", "train.seed=1"],
             world="0000000000000000")
    fake_run(tmp_path / "loose" / "a", CLS_VS_PATCH, ["grid=null", "tokens.name=pooled", "train.seed=1"], world=None)
    fake_run(tmp_path / "loose" / "b", CLS_VS_PATCH, ["grid=null", "tokens.name=pooled", "train.seed=1"],
             status="failed")
    out = tmp_path / "stages"
    p = plan(out, [tmp_path / "cls_vs_patch", tmp_path / "loose"])
    assert p["reuse"] == {"stages-align+instruct_seed-0": src}
    # a run directory given directly works as well
    assert plan(tmp_path / "stages2", [src])["reuse"] == {"stages-align+instruct_seed-0": src}
    adopt_reusable(Console(quiet=True), p)
    taken = out / "runs" / "stages-align+instruct_seed-0"
    point = load_recipe(STAGES, ["grid=null", "train.stages=[align,instruct]", "train.seed=0"])
    assert (taken / "identity.txt").read_text().strip() == point.identity()
    assert yaml.safe_load((taken / "config.yaml").read_text())["name"] == "ablate_stages"
    assert json.loads((taken / "reused.json").read_text())["from"] == str(src.resolve())
    assert json.loads((taken / "summary.json").read_text())["identity"] == point.identity()
    assert (src / "identity.txt").read_text().strip() != point.identity()  # the source is left as it was
    again = plan(out, [tmp_path / "cls_vs_patch"])  # now a point of this grid: planned again without complaint
    assert again["reuse"] == {}
    rows = {r["run"]: r for r in collect(out)}
    assert rows["stages-align+instruct_seed-0"]["status"] == "finished"
    assert rows["stages-align+instruct_seed-0"]["reused_from"] == str(src.resolve())
    notes = "\n".join(notes_markdown(list(rows.values()), []))
    assert "Runs taken from other studies" in notes and "stages-align+instruct_seed-0" in notes
    assert "## Instrument" in notes and rows["stages-align+instruct_seed-0"]["toy_world"] in notes


def test_a_grid_refuses_run_directories_of_another_config_or_world(tmp_path):
    out = tmp_path / "stages"
    # what copying a run in by hand leaves: the other study's identity
    fake_run(out / "runs" / "stages-align+instruct_seed-0", CLS_VS_PATCH,
             ["grid=null", "tokens.name=pooled", "train.seed=0"])
    with pytest.raises(ValueError, match=r"stages-align\+instruct_seed-0 holds a run of another config"):
        plan(out)
    out2 = tmp_path / "stages2"
    fake_run(out2 / "runs" / "stages-instruct_seed-1", STAGES, ["grid=null", "train.stages=[instruct]",
                                                                 "train.seed=1"], world="0000000000000000")
    with pytest.raises(ValueError, match="trained on toy world 0000000000000000"):
        plan(out2)
    with pytest.raises(FileNotFoundError, match="--reuse"):
        plan(tmp_path / "stages3", [tmp_path / "nowhere"])

"""A study's run directories hold the config and toy world they ran, and ``vlkit ablate --reuse`` takes finished
runs of the same config from another study (vlkit/ablate/reuse.py). No training: run directories are written as a
finished run leaves them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from helpers import vlkit
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
        (run_dir / "toy_world.txt").write_text((toy_world_of(recipe.to_dict()) if world == "current" else world)
                                               + "\n")
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
    # a copy cut short by a kill (hidden, summary already there) is never a candidate
    fake_run(other / ".tokens-pooled_seed-1.reusing", CLS_VS_PATCH, ["grid=null", "tokens.name=pooled",
                                                                     "train.seed=1"])
    out = tmp_path / "stages"
    p = plan(out, [tmp_path / "cls_vs_patch", tmp_path / "loose"])
    assert p["reuse"] == {"stages-align+instruct_seed-0": src}
    passed = "\n".join(p["passed_over"])  # each near miss is named with its reason
    assert "toy world 0000000000000000" in passed and "records no toy world" in passed and "failed" in passed
    assert ".reusing" not in passed
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
    from vlkit.ablate.report import time_markdown

    timed = [{**r, "t_run": 10.0, **{k: 1.0 for k in ("t_build", "t_checks", "t_cache", "t_train", "t_eval")}}
             for r in rows.values() if r["status"] == "finished"]
    assert "1 of them were taken from other studies" in "\n".join(time_markdown(timed))


def test_a_grid_refuses_run_directories_of_another_config_or_world(tmp_path):
    out = tmp_path / "stages"
    # another study's run of another seed copied in by hand (of the same computation it would be relabelled)
    fake_run(out / "runs" / "stages-align+instruct_seed-0", CLS_VS_PATCH,
             ["grid=null", "tokens.name=pooled", "train.seed=1"])
    with pytest.raises(ValueError, match=r"stages-align\+instruct_seed-0 holds a run of another config"):
        plan(out)
    out2 = tmp_path / "stages2"
    fake_run(out2 / "runs" / "stages-instruct_seed-1", STAGES, ["grid=null", "train.stages=[instruct]",
                                                                 "train.seed=1"], world="0000000000000000")
    with pytest.raises(ValueError, match="trained on toy world 0000000000000000"):
        plan(out2)
    with pytest.raises(FileNotFoundError, match="--reuse"):
        plan(tmp_path / "stages3", [tmp_path / "nowhere"])


def test_a_run_renamed_only_is_relabelled_and_a_run_without_identity_file_is_taken(tmp_path):
    """A study whose recipe's description (or name) was edited keeps its runs: same work identity, relabelled. A
    kept run without identity.txt (as studies are committed) can still be taken whole."""
    out = tmp_path / "stages"
    run = fake_run(out / "runs" / "stages-instruct_seed-0", STAGES,
                   ["grid=null", "train.stages=[instruct]", "train.seed=0", "description=worded otherwise"])
    (out / "runs" / ".stages-instruct_seed-1.reusing").mkdir(parents=True)  # a copy cut short earlier
    src = fake_run(tmp_path / "kept" / "tokens-pooled_seed-0", CLS_VS_PATCH,
                   ["grid=null", "tokens.name=pooled", "train.seed=0"])
    (src / "identity.txt").unlink()
    p = plan(out, [src], seeds="1")
    assert p["renamed"] == ["stages-instruct_seed-0"] and p["reuse"] == {"stages-align+instruct_seed-0": src}
    adopt_reusable(Console(quiet=True), p)
    point = load_recipe(STAGES, ["grid=null", "train.stages=[instruct]", "train.seed=0"])
    assert (run / "identity.txt").read_text().strip() == point.identity()
    assert json.loads((run / "summary.json").read_text())["identity"] == point.identity()
    assert not (out / "runs" / ".stages-instruct_seed-1.reusing").exists()
    taken = out / "runs" / "stages-align+instruct_seed-0"
    assert json.loads((taken / "reused.json").read_text())["identity"] is None
    again = plan(out, seeds="1")
    assert again["renamed"] == [] and again["reuse"] == {}


def test_cli_dry_run_shows_what_reuse_takes(tiny_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE_DIR", str(tmp_path / "cache"))
    quick = ["stages.instruct.max_steps=2", "stages.instruct.batch_size=4", "stages.align.max_steps=2",
             "stages.align.batch_size=4"]
    src = fake_run(tmp_path / "other" / "runs" / "tokens-pooled_seed-0", CLS_VS_PATCH,
                   [*quick, "grid=null", "tokens.name=pooled", "train.seed=0"])
    res = vlkit("ablate", STAGES, *quick, "--seeds", "1", "--out", str(tmp_path / "stages"), "--reuse",
                str(tmp_path / "other"), "--dry-run")
    row = next(line for line in res.stdout.splitlines() if "align+instruct_seed-0" in line)
    assert "reuse" in row and "train.stages=[align, instruct]" in row  # an override is shown as written
    assert "estimate: 1 runs" in res.stdout and not (tmp_path / "stages" / "runs").exists()
    with pytest.raises(ValueError, match="at least 1"):  # --seeds 0 is no grid, not an empty one
        plan(tmp_path / "none", seeds="0")


def test_vlkit_train_records_the_toy_world_first_and_refuses_another(tmp_path):
    """The world is written with the config, before any step (a run killed in its first stage records it too), and
    a run directory of another world is not resumed."""
    from vlkit.train.summary import prepare_run_dir, recorded_world

    recipe = load_recipe("mlp_patch")
    run = prepare_run_dir(recipe, tmp_path / "run")
    assert recorded_world(run) == toy_world_of(recipe.to_dict()) and not (run / "summary.json").exists()
    (run / "toy_world.txt").write_text("0000000000000000\n")
    with pytest.raises(ValueError, match="toy world 0000000000000000"):
        prepare_run_dir(recipe, tmp_path / "run")
    # a recipe that names nothing of the toy world records none
    real = load_recipe("recipes/llava15_qwen2.5-1.5b_clip-l336.yaml")
    assert toy_world_of(real.to_dict()) is None

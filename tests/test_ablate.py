"""`vlkit ablate`: grid expansion, fair combinations, feature cache equivalence, execution, rerun, report."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from helpers import losses, vlkit
from vlkit.ablate.grid import Skip, combo_overrides, expand
from vlkit.config import load_recipe

QUICK = ["train.stages=[instruct]", "stages.instruct.max_steps=2", "stages.instruct.batch_size=4",
         "stages.instruct.eval_max_samples=4", "stages.instruct.eval_batch_size=4", "data.max_length=224"]


@pytest.mark.parametrize("tokens,proj,n,expected,note", [
    ("cls", "mlp", 1, ["projector.name=mlp", "tokens.name=cls"], None),
    ("cls", "mlp", 16, ["projector.name=cls_reshape", "tokens.name=cls", "projector.num_tokens=16"], "cls_reshape"),
    ("patch", "mlp", 64, ["projector.name=mlp", "tokens.name=patch"], None),
    ("patch", "linear", 16, ["projector.name=linear", "tokens.name=pooled", "tokens.num_tokens=16"], "pooled"),
    ("patch", "cross_attention", 16, ["projector.name=cross_attention", "tokens.name=patch", "projector.num_tokens=16"],
     "learned queries"),
    # a projector axis without a tokens axis (recipes/ablations/projectors.yaml): cls_reshape takes the CLS vector
    (None, "cls_reshape", 16, ["projector.name=cls_reshape", "tokens.name=cls", "projector.num_tokens=16"],
     "reads the CLS vector"),
    (None, "mlp", 16, ["projector.name=mlp", "tokens.name=pooled", "tokens.num_tokens=16"], None),
    ("merged", "mlp", 9, ["projector.name=mlp", "tokens.name=merged", "tokens.num_tokens=9"], None),
])
def test_combinations_map_to_defined_models(tokens, proj, n, expected, note):
    ov, why = combo_overrides(tokens, proj, n, num_patches=64)
    assert ov == expected
    assert (note is None and why is None) or note in why


@pytest.mark.parametrize("tokens,proj,n,reason", [
    ("patch", "mlp", 128, "more than the encoder's 64 patches"),
    ("patch", "mlp", 8, "square"),
    ("patch", "cls_reshape", 16, "one vector"),
    ("cls_patch", "mlp", 16, r"1 \+ 64"),
    ("merged", "mlp", 8, "square token count"),
    ("merged", "mlp", 81, "square token count up to the encoder's 64"),
    ("merged", "cls_reshape", 16, "one vector"),
    ("merged", "mlp", None, "merged needs num_image_tokens"),
])
def test_impossible_combinations_are_skipped_with_reason(tokens, proj, n, reason):
    with pytest.raises(Skip, match=reason):
        combo_overrides(tokens, proj, n, num_patches=64)


def test_pooled_without_a_count_takes_the_base_recipes_and_other_strategies_drop_it():
    """The default pools to 16: `tokens: [cls, pooled]` compares CLS with the default's 16 tokens, and switching to
    a strategy that takes no count (cls, patch) does not carry the base's num_tokens into it."""
    from vlkit.config import load_recipe

    assert combo_overrides("pooled", None, None, num_patches=64, base_pooled=16)[0] == [
        "tokens.name=pooled", "tokens.num_tokens=16"]
    with pytest.raises(Skip, match="pooled needs num_image_tokens"):
        combo_overrides("pooled", None, None, num_patches=64)
    # learned queries over the base's tokens: as many queries as the base gives tokens, not the 64 patches
    assert combo_overrides(None, "cross_attention", None, num_patches=64, base_pooled=16)[0] == [
        "projector.name=cross_attention", "projector.num_tokens=16"]
    # merged (concatenation) without a count merges to the base's count too: `tokens: [pooled, merged]`
    assert combo_overrides("merged", None, None, num_patches=64, base_pooled=16)[0] == [
        "tokens.name=merged", "tokens.num_tokens=16"]
    specs = {s.id: s for s in expand({"tokens": ["cls", "pooled"]}, [0], num_patches=64, base_pooled=16)}
    assert specs["tokens-cls_seed-0"].overrides == ["tokens.name=cls", "train.seed=0"]
    base = load_recipe("mlp_patch")
    assert (base.tokens.name, base.tokens.params()) == ("pooled", {"num_tokens": 16})
    for name in ("cls", "patch"):
        r = load_recipe("mlp_patch", [f"tokens.name={name}"])
        assert (r.tokens.name, r.tokens.params()) == (name, {})


def test_expand_ids_seeds_and_generic_axes():
    specs = expand({"projector": ["linear", "mlp"], "stages.instruct.lr": [1e-3, 3e-4]}, [0, 1], num_patches=64)
    assert len(specs) == 8 and len({s.id for s in specs}) == 8
    s = specs[0]
    assert s.id == "projector-linear_lr-0.001_seed-0"
    assert "stages.instruct.lr=0.001" in s.overrides and "train.seed=0" in s.overrides


def test_feature_cache_gives_same_losses(tiny_toy_world, tmp_path, monkeypatch):
    from vlkit.cache import FeatureCache
    from vlkit.train import train

    monkeypatch.setenv("VLKIT_CACHE_DIR", str(tmp_path / "cache"))
    r = load_recipe("mlp_patch", QUICK + ["stages.instruct.eval_data=null", "train.stages=[align, instruct]",
                                          "stages.align.max_steps=2", "stages.align.batch_size=4",
                                          "stages.align.eval_data=null"])
    train(r, tmp_path / "plain")
    cache = FeatureCache(tmp_path / "cache")
    train(r, tmp_path / "cached", features=cache)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert all(abs(x[2] - y[2]) < 1e-5 for x, y in zip(a, b)), (a, b)
    keys = list((tmp_path / "cache").iterdir())
    from vlkit.model import build_model

    # only what the run draws is encoded: 2 steps x 4 samples per stage, not the 600-image data file
    cached = cache.for_model(build_model(r), torch.device("cpu")).rows
    assert 4 <= len(cached) <= 16, len(cached)
    # a different layer is a different key: nothing is reused

    m2 = build_model(load_recipe("mlp_patch", ["encoder.layer=-1"]))
    bound = cache.for_model(m2, torch.device("cpu"))
    assert bound.dir not in keys and not bound.rows


def test_ablate_runs_reruns_missing_and_reports(tiny_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "abl"
    args = ["ablate", "mlp_patch", *QUICK, "--projector", "linear,mlp", "--grid",
            f"stages.instruct.data=toy:data/instruct_train.json,{tmp_path / 'missing.json'}", "--seeds", "1",
            "--out", str(out), "--workers", "1"]
    dry = vlkit(*args, "--dry-run")
    assert "plan: 4 runs" in dry.stdout and not (out / "runs").exists()
    vlkit(*args)
    rows = list(csv.DictReader(open(out / "results.csv")))
    status = {r["run"]: r["status"] for r in rows}
    assert sorted(status.values()) == ["failed", "failed", "finished", "finished"], status
    failed = [r for r in rows if r["status"] == "failed"][0]
    assert "missing.json" in failed["error"]
    ok = [r for r in rows if r["status"] == "finished"]
    assert all(r["image_tokens"] == "16" and int(r["trainable_params"]) > 0 and r["accuracy"] != "" for r in ok)
    report = (out / "report.md").read_text()
    assert "mean ± 95% CI" in report and "Paired comparisons" in report
    # the references of the same questions beside every arm: blind, position-blind reader, arm minus reader
    assert "## References" in report and "| relation ◆ |" in report and "| position_of_object ◆ | " in report
    assert all(float(r["ref/position_blind/position_of_object"]) == pytest.approx(1 / 9, abs=1e-4) for r in ok)
    assert all("relation" in r["spatial_types"] for r in ok)
    # where each run's time went: the phases are measured parts of the process's own wall time
    for r in ok:
        phases = [float(r[k]) for k in ("t_build", "t_checks", "t_cache", "t_train", "t_eval")]
        assert all(v >= 0 for v in phases) and float(r["t_train"]) > 0 and float(r["t_eval"]) > 0
        assert sum(phases) < float(r["t_run"])
    assert "## Where the time went" in report and "| training steps" in report
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000 and (out / "loss_curves.png").exists()
    # simulate a run killed midway: only it runs again
    done = [r["run"] for r in ok]
    os.remove(out / "runs" / done[1] / "summary.json")
    before = (out / "runs" / done[0] / "summary.json").stat().st_mtime
    again = vlkit(*args)
    assert (out / "runs" / done[0] / "summary.json").stat().st_mtime == before
    assert json.loads((out / "runs" / done[1] / "summary.json").read_text())["status"] == "finished"
    assert "running 3 run(s)" in again.stdout  # the incomplete one plus the two failed ones
    # the report regenerates from the run directories alone
    os.remove(out / "report.md")
    vlkit("report", str(out))
    assert (out / "report.md").exists()


@pytest.mark.slow
def test_cluster_executor_local_mode_same_layout(tiny_toy_world, tmp_path, monkeypatch):
    """The Slurm path (submitit) run through submitit's local executor gives the same report layout."""
    monkeypatch.setenv("VLKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "abl"
    vlkit("ablate", "mlp_patch", *QUICK, "--projector", "linear,mlp", "--seeds", "1", "--out", str(out),
          "--executor", "submitit-local")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert {"report.md", "results.json", "accuracy_vs_tokens.png", "plan.json"} <= {p.name for p in out.iterdir()}
    assert any((out / "submitit").rglob("*_submitted.pkl"))  # really went through submitit


def test_report_orders_numeric_axis_values_numerically():
    from vlkit.ablate.report import axis_order

    assert sorted([64, 9, 16, 1, 4], key=axis_order) == [1, 4, 9, 16, 64]
    assert sorted(["mlp", 2, "linear", None], key=axis_order) == [2, None, "linear", "mlp"]  # numbers, then by text
    # numbers read back as text (results.csv) still sort as numbers, in the results and the references tables alike
    assert sorted(["64", "9", "16", "1", "4", "1e-3"], key=axis_order) == ["1e-3", "1", "4", "9", "16", "64"]

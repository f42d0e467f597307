"""Recipes: loading, base inheritance, overrides, and error messages naming file, key path and suggestion."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlkit.config import ConfigError, RECIPES_DIR, find_recipe, load_recipe

SHIPPED = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.train.stages and all(s in r.stages for s in r.train.stages)


def test_real_scale_recipe_has_llava15_settings():
    r = load_recipe("llava15_qwen2.5-1.5b_clip-l336")
    assert r.encoder.params()["model"] == "openai/clip-vit-large-patch14-336"
    assert r.encoder.params()["layer"] == -2
    assert r.llm.params()["model"] == "Qwen/Qwen2.5-1.5B-Instruct"
    align, instruct = r.stages["align"], r.stages["instruct"]
    assert (align.lr, align.batch_size, align.epochs, align.llm) == (1e-3, 256, 1, "frozen")
    assert (instruct.lr_llm, instruct.batch_size, instruct.lora.r, instruct.lora.alpha) == (2e-4, 128, 128, 256)
    assert r.projector.name == "mlp" and r.projector.params()["depth"] == 2


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
name: t
encoder: {name: hf_clip, model: some/dir}
llm: {name: hf, model: some/lm}
stages:
  align: {data: a.json}
train: {stages: [align]}
"""


def test_typo_key_names_file_path_and_suggestion(tmp_path):
    p = write(tmp_path, "r.yaml", BASE + "data: {max_lenght: 10}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert str(p) in msg and "data.max_lenght" in msg and "Did you mean 'max_length'" in msg


def test_all_errors_reported_at_once(tmp_path):
    p = write(tmp_path, "r.yaml", BASE.replace("align: {data: a.json}", "align: {data: a.json, lr: -1, bach_size: 3}")
              + "trian: {}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(p)
    errs = info.value.errors
    assert len(errs) == 3
    text = "\n".join(errs)
    assert "stages.align.lr" in text and "stages.align.bach_size" in text and "'batch_size'" in text
    assert "trian" in text and "Did you mean 'train'" in text


def test_component_name_and_params_checked(tmp_path):
    p = write(tmp_path, "r.yaml", BASE + "projector: {name: mpl}\ntokens: {name: pooled, num_tokns: 4}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(p)
    text = "\n".join(info.value.errors)
    assert "projector.name" in text and "Did you mean 'mlp'" in text
    assert "num_tokns" in text and "Did you mean 'num_tokens'" in text


def test_overrides_and_base(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    p = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\nprojector: {name: linear}\n")
    r = load_recipe(p, ["projector.name=cross_attention", "projector.num_tokens=4", "stages.align.lr=3e-4",
                        "train.stages=[align]"])
    assert r.name == "child" and r.projector.name == "cross_attention"
    assert r.projector.params() == {"num_tokens": 4}
    assert r.stages["align"].lr == 3e-4
    # switching component drops the old component's parameters
    r2 = load_recipe(p, ["projector.name=mlp", "projector.depth=3"])
    assert r2.projector.params() == {"depth": 3}
    # the recipe's own name is not a component choice: renaming a run keeps the whole recipe
    r3 = load_recipe(p, ["name=renamed", "stages.align.lr=3e-4"])
    assert r3.name == "renamed" and r3.projector.name == "linear" and r3.stages["align"].lr == 3e-4


def test_choosing_another_projector_keeps_its_out_norm(tmp_path):
    """out_norm belongs to the projector family: swapping mlp for linear (override, grid or a recipe's own section)
    keeps it, so a projector study compares projectors at one output norm; setting it beside the name still wins."""
    write(tmp_path, "base.yaml", BASE + "projector: {name: mlp, depth: 2, out_norm: text}\n")
    p = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\nprojector: {name: linear}\n")
    r = load_recipe(p)
    assert r.projector.name == "linear" and r.projector.params() == {"out_norm": "text"}  # depth (mlp's) dropped
    r = load_recipe(tmp_path / "base.yaml", ["projector.name=cross_attention", "projector.num_tokens=4"])
    assert r.projector.params() == {"out_norm": "text", "num_tokens": 4}
    r = load_recipe(tmp_path / "base.yaml", ["projector.name=linear", "projector.out_norm=null"])
    assert r.projector.params() == {"out_norm": None}
    # other families keep nothing: tokens.name=cls must not inherit the pooled strategy's count
    r = load_recipe("mlp_patch", ["tokens.name=cls"])
    assert r.tokens.params() == {} and r.projector.params()["out_norm"] == "text"


def test_override_typo_is_reported_as_command_line(tmp_path):
    p = write(tmp_path, "r.yaml", BASE)
    with pytest.raises(ConfigError, match=r"stages.align.lrr \(set on the command line\): unknown key. Did you mean 'lr'"):
        load_recipe(p, ["stages.align.lrr=1"])


def test_unknown_stage_and_base_cycle(tmp_path):
    p = write(tmp_path, "r.yaml", BASE)
    with pytest.raises(ConfigError, match=r"train.stages names stage 'algn'.*Did you mean 'align'"):
        load_recipe(p, ["train.stages=[algn]"])
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_find_recipe_by_short_name():
    assert find_recipe("mlp_patch") == RECIPES_DIR / "mlp_patch.yaml"
    with pytest.raises(FileNotFoundError, match="nope"):
        find_recipe("nope.yaml")


def test_identity_changes_with_config():
    a = load_recipe("mlp_patch")
    b = load_recipe("mlp_patch", ["stages.align.lr=0.5"])
    assert a.identity() != b.identity() and a.identity() == load_recipe("mlp_patch").identity()


def test_schedule_default_keeps_identity_and_other_schedules_change_it():
    """A stage on the default cosine schedule dumps (and hashes) without the schedule keys, as before they existed,
    so finished runs keep their identity; wsd or another decay_ratio is a different run."""
    import json
    import hashlib

    recipe = load_recipe("mlp_patch", ["stages.align.schedule=cosine"])
    assert "schedule" not in recipe.to_dict()["stages"]["instruct"]
    data = recipe.model_dump(mode="json")
    for stage in data["stages"].values():
        del stage["schedule"], stage["decay_ratio"]
    for key in ("distributed", "deepspeed"):
        data["train"].pop(key)
    data.pop("expect", None)
    assert recipe.identity() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    # decay_ratio shapes only wsd: on the other schedules it leaves the identity alone
    assert (load_recipe("mlp_patch", ["stages.instruct.decay_ratio=0.5"]).identity()
            == load_recipe("mlp_patch").identity())
    assert "decay_ratio" not in load_recipe("mlp_patch", ["stages.instruct.schedule=constant"]).to_dict()["stages"]["instruct"]
    wsd = load_recipe("mlp_patch", ["stages.align.schedule=wsd"])
    assert wsd.to_dict()["stages"]["align"]["schedule"] == "wsd"
    assert len({recipe.identity(), wsd.identity(),
                load_recipe("mlp_patch", ["stages.align.schedule=wsd", "stages.align.decay_ratio=0.5"]).identity()}) == 3


def test_schedule_typo_names_key():
    with pytest.raises(ConfigError, match=r"stages\.align\.schedule"):
        load_recipe("mlp_patch", ["stages.align.schedule=cosin"])

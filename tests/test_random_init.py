"""``random_init``: real shapes from a published config with random weights, only when asked, and said on every line."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import FAST, vlkit
from vlkit.registry import ENCODERS, LLMS
from vlkit.toyworld import resolve_toy


@pytest.fixture()
def config_only_dirs(tmp_path) -> tuple[str, str]:
    """The shipped toy-clip / toy-lm configs alone (config.json, no weights): what random_init needs."""
    out = []
    for spec, name in (("toy:clip", "clip"), ("toy:lm", "lm")):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(Path(resolve_toy(spec)) / "config.json", d / "config.json")
        out.append(str(d))
    return out[0], out[1]


def test_missing_weights_are_an_error_and_random_only_when_asked(config_only_dirs):
    clip_dir, lm_dir = config_only_dirs
    with pytest.raises(OSError):
        ENCODERS.create("hf_clip", model=clip_dir, layer=-2)
    with pytest.raises(OSError):
        LLMS.create("hf", model=lm_dir, tokenizer="toy:tokenizer")
    enc = ENCODERS.create("hf_clip", model=clip_dir, layer=-2, random_init=True)
    cfg = json.loads((Path(clip_dir) / "config.json").read_text())
    vision = cfg.get("vision_config", cfg)
    assert enc.random_weights is True and enc.embed_dim == vision["hidden_size"]
    llm = LLMS.create("hf", model=lm_dir, tokenizer=resolve_toy("toy:tokenizer"), random_init=True)
    assert llm.random_weights is True
    assert llm.model.get_input_embeddings().num_embeddings == json.loads((Path(lm_dir) / "config.json").read_text())[
        "vocab_size"]


def test_published_configs_give_the_real_recipe_shapes():
    """The real recipe's models from the built-in table of published configs, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from vlkit.random_init import published_config

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(published_config("Qwen/Qwen2.5-1.5B-Instruct"))
        clip = CLIPVisionModel._from_config(published_config("openai/clip-vit-large-patch14-336"))
    assert sum(p.numel() for p in lm.parameters()) == 1_543_714_304  # Qwen2.5-1.5B, tied embeddings
    assert lm.config.num_hidden_layers == 28 and lm.config.vocab_size == 151936
    assert sum(p.numel() for p in clip.parameters()) == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert (clip.config.image_size // clip.config.patch_size) ** 2 == 576
    with pytest.raises(ValueError, match="no config for 'nobody/no-such-model'"):
        published_config("nobody/no-such-model")


def test_train_and_inspect_say_random_weights_on_every_result_line(tiny_toy_world, tmp_path, config_only_dirs):
    clip_dir, lm_dir = config_only_dirs
    over = [f"encoder.model={clip_dir}", "encoder.random_init=true", f"llm.model={lm_dir}", "llm.random_init=true",
            "llm.tokenizer=toy:tokenizer"]
    res = vlkit("inspect", "recipes/mlp_patch.yaml", *over)
    assert "hf_clip (RANDOM WEIGHTS)" in res.stdout and "hf (RANDOM WEIGHTS)" in res.stdout
    res = vlkit("train", "recipes/mlp_patch.yaml", *FAST, *over, "--dry-run", "--run-dir", str(tmp_path / "dry"))
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    results = [line for line in lines if "pre-flight" in line or "dry run: one step done" in line
               or line.startswith("[RANDOM") and "stage align" in line]
    assert len(results) >= 2, res.stdout
    for line in results:
        assert line.startswith("[RANDOM WEIGHTS: encoder, llm]"), line


@pytest.mark.slow
def test_a_random_weight_run_evaluates_with_the_same_weights_and_says_so(tiny_toy_world, tmp_path, config_only_dirs):
    """The random weights are a function of the config: vlkit eval rebuilds the ones the run trained with."""
    clip_dir, lm_dir = config_only_dirs
    over = [f"encoder.model={clip_dir}", "encoder.random_init=true", f"llm.model={lm_dir}", "llm.random_init=true",
            "llm.tokenizer=toy:tokenizer"]
    run = tmp_path / "run"
    vlkit("train", "recipes/mlp_patch.yaml", *FAST, *over, "stages.align.max_steps=1", "stages.instruct.max_steps=1",
          "train.stages=[instruct]", "--run-dir", str(run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["random_weights"] == ["encoder", "llm"]
    res = vlkit("eval", str(run), "--data", "toy:data/instruct_val.json", "--max-samples", "8", "--batch-size", "8")
    rows = [line for line in res.stdout.splitlines() if "val loss" in line or "│ all" in line]
    assert rows and all(line.startswith("[RANDOM WEIGHTS: encoder, llm]") or "│ all" in line for line in rows)
    assert "[RANDOM WEIGHTS: encoder, llm]" in res.stdout.split("│ all")[0]
    val_loss = float(re.search(r"val loss ([0-9.]+)", res.stdout).group(1))
    trained = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert val_loss == pytest.approx(next(r["val_loss"] for r in trained if "val_loss" in r), rel=1e-4)

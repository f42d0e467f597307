"""tools/shape_probe.py: the shape probe docs/toyworld.md cites (toy-clip's layer -2), on the tiny world."""
from __future__ import annotations

from pathlib import Path

import torch

from _tools import load_tool


def _tool():
    return load_tool("shape_probe")


def test_a_saved_toy_clip_and_its_checkpoint_give_the_same_probe(tiny_toy_world, tmp_path):
    from safetensors.torch import load_file

    from vlkit.data import toy

    tool = _tool()
    saved = tool.main([str(tiny_toy_world.clip_dir), "--n-train", "60", "--data", str(tiny_toy_world.data_dir)])
    n_val = sum(len(s["objects"]) for s in toy.load_scenes(tiny_toy_world.data_dir, "val"))
    assert saved["n_val_objects"] == n_val and saved["layer"] == -2
    assert set(saved["shape_probe"]) == {"cell_mean", "pooled_token"}
    assert all(0.0 <= v <= 1.0 for v in saved["shape_probe"].values())
    # a pretraining checkpoint holds the CLIPModel under "clip." beside the cell head: the head is left out
    weights = load_file(Path(tiny_toy_world.clip_dir) / "model.safetensors")
    state = {"model": {**{f"clip.{k}": v for k, v in weights.items()}, "cells.shape.weight": torch.zeros(6, 128)}}
    torch.save(state, tmp_path / "state.pt")
    ckpt = tool.main([str(tmp_path / "state.pt"), "--n-train", "60", "--data", str(tiny_toy_world.data_dir)])
    assert ckpt["shape_probe"] == saved["shape_probe"]

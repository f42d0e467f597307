"""Checkpoints that save only what trains, written atomically, loaded without unpickling arbitrary objects.

A checkpoint directory holds ``trainable.safetensors`` (every parameter that trains in the stage: projector,
LoRA adapters, unfrozen encoder blocks), ``optimizer.pt`` (tensors and numbers only, read with
``weights_only=True``), ``rng.safetensors`` and ``state.json`` (stage, step, data position, scheduler, Python RNG).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, path: Path, strict: bool = True) -> list[str]:
    """Copy tensors from ``path`` into the model's parameters of the same name; returns the names loaded."""
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing and strict:
        raise KeyError(f"checkpoint {path} has parameters the model lacks: {missing[:5]} "
                       f"({len(missing)} in all); was it written by another recipe?")
    with torch.no_grad():
        for n, t in tensors.items():
            if n in params:
                if params[n].shape != t.shape:
                    raise ValueError(f"checkpoint {path}: parameter {n} has shape {tuple(t.shape)}, "
                                     f"model has {tuple(params[n].shape)}")
                params[n].copy_(t.to(params[n].device, params[n].dtype))
    return list(tensors)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    extra = {"python": _jsonable(random.getstate()), "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                                    float(np_state[4])]}
    return tensors, extra


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuplify(extra["python"]))
    name, pos, has_gauss, cached = extra["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """Write a checkpoint directory atomically: build it in a temp dir beside ``path``, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        tensors, extra = rng_state()
        save_file(tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "rng": extra}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(path: Path) -> Path | None:
    """``path`` if complete; else a leftover ``.old`` copy from a swap interrupted by a crash."""
    path = Path(path)
    for cand in (path, path.with_name(f".{path.name}.old")):
        if (cand / "state.json").exists() and (cand / "trainable.safetensors").exists():
            return cand
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load weights (and optimizer and RNG); returns ``state.json``."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    load_trainable(model, path / "trainable.safetensors")
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    if restore_rng:
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state

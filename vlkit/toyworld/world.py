"""A user's toy world: the shipped (or, for small presets, freshly pretrained) weights plus the shapes data,
generated on first use into a cache directory named by the weights' config hash.

``resolve_toy("toy:clip")`` (and ``toy:lm``, ``toy:tokenizer``, ``toy:data``, ``toy:data/<path>``) returns a local
path. For the shipped ``default`` preset the model references point into the package after a hash check and
never build anything; ``toy:data`` generates the images on first use (seconds). Other presets (``tiny``) are
pretrained on first use into the cache directory as well, taking what they share with the shipped weights
(``vlkit toy pretrain --reuse``: ``v4`` takes toy-clip and trains only toy-lm).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit._locks import locked
from vlkit.data.toy import RECORDS_VERSION
from vlkit.toyworld import _runtime, shipped
from vlkit.toyworld.probes import add_lm_reference, answer_baselines
from vlkit.toyworld.pretraining import (SHIPPED_PRESET, SHIPPED_SEED, canonical_preset, generate_data, pretrain,
                                        pretrain_config, reusable_from)

ENV_DIR = "VLKIT_TOY_DIR"
ENV_PRESET = "VLKIT_TOY_PRESET"
MARKER = "build.json"


@dataclass
class ToyWorld:
    """Paths of a toy world and its report (the weights' manifest report plus the first-use times)."""

    root: Path
    data_dir: Path
    weights_dir: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_dir(self) -> Path:
        return self.weights_dir / "tokenizer"

    @property
    def clip_dir(self) -> Path:
        return self.weights_dir / "toy-clip"

    @property
    def lm_dir(self) -> Path:
        return self.weights_dir / "toy-lm"


def env_preset() -> str:
    """``$VLKIT_TOY_PRESET`` (``default``, or unset: the shipped preset)."""
    try:
        return canonical_preset(os.environ.get(ENV_PRESET))
    except ValueError as e:
        raise ValueError(f"${ENV_PRESET}: {e}") from None


def _preset(preset: str | None) -> str:
    return canonical_preset(preset) if preset else env_preset()


def _shipped(preset: str, seed: int) -> bool:
    return canonical_preset(preset) == SHIPPED_PRESET and seed == SHIPPED_SEED


_VERIFIED: dict[str, dict[str, Any]] = {}


def shipped_manifest() -> dict[str, Any]:
    """The package's weights, checked against their manifest (once per process)."""
    from vlkit.toyworld.pretraining import shipped_config_hash

    key = str(shipped.PACKAGE_WEIGHTS)
    if key not in _VERIFIED:
        _VERIFIED[key] = shipped.verify(shipped.PACKAGE_WEIGHTS, shipped_config_hash())
    return _VERIFIED[key]


def world_id(preset: str = SHIPPED_PRESET, seed: int = SHIPPED_SEED) -> str:
    """Names a world: the hash of its pretraining config (which holds the data config; ``default`` names the
    shipped preset, so both give one id)."""
    return shipped.config_hash(pretrain_config(preset, seed))


def toy_world_of(config: Any) -> str | None:
    """The world id a resolved config's ``toy:`` references stand for (``$VLKIT_TOY_PRESET`` picks the world, not
    the recipe, and a vlkit release may ship another), or None when it names nothing of the toy world. Recorded
    in every run's summary, so a study never mixes runs of two worlds."""
    def refs(value: Any) -> bool:
        if isinstance(value, str):
            return value.startswith("toy:")
        if isinstance(value, dict):
            return any(refs(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(refs(v) for v in value)
        return False

    return world_id(env_preset()) if refs(config) else None


def toy_cache_dir(preset: str | None = None, seed: int = SHIPPED_SEED) -> Path:
    """``$VLKIT_TOY_DIR`` if set, else ``~/.cache/vlkit/toyworld-<world id>`` (``toyworld-<preset>-<id>`` for
    presets other than the shipped one). A world of another config never has the same directory."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    preset = _preset(preset)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlkit"
    name = "toyworld-" + ("" if preset == SHIPPED_PRESET else f"{preset}-") + world_id(preset, seed)
    return base / name


def _marker(preset: str, seed: int) -> dict[str, Any]:
    return {"world": world_id(preset, seed), "preset": canonical_preset(preset), "seed": seed,
            "records": RECORDS_VERSION}


def is_built(root: str | os.PathLike, preset: str | None = None, seed: int = SHIPPED_SEED) -> bool:
    """Whether ``root`` holds this world's data (and, for non-shipped presets, weights), complete."""
    preset = _preset(preset)
    try:
        found = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return {k: found.get(k) for k in ("world", "preset", "seed", "records")} == _marker(preset, seed)


def _world_at(root: Path, preset: str, seed: int) -> ToyWorld:
    if _shipped(preset, seed):
        weights, manifest = shipped.PACKAGE_WEIGHTS, shipped_manifest()
    else:
        weights = root / "weights"
        manifest = shipped.verify(weights, world_id(preset, seed))
    marker = json.loads((root / MARKER).read_text())  # present and parsed: is_built() or the build checked it
    report = {**manifest.get("report", {}), "first_use_seconds": marker.get("seconds", {}),
              "answer_baselines": marker.get("answer_baselines", {})}
    return ToyWorld(root, root / "data", weights, report)


def build_toy_world(cache_dir: str | os.PathLike | None = None, *, preset: str | None = None, seed: int = SHIPPED_SEED,
                    force: bool = False, console: Any = None) -> ToyWorld:
    """The toy world in ``cache_dir`` (default ``toy_cache_dir(preset)``), made first if needed: the shipped
    preset checks its weights and generates the data; other presets also pretrain their weights. Everything is
    made in a temporary sibling directory and renamed into place, so an interrupted first use leaves nothing
    half-written behind."""
    preset = _preset(preset)
    root = Path(cache_dir) if cache_dir is not None else toy_cache_dir(preset, seed)
    if _shipped(preset, seed):
        shipped_manifest()  # a damaged install fails here, before any work
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.parent / f".{root.name}.lock"), _runtime.caller_rng_kept():
        if not force and is_built(root, preset, seed):
            return _world_at(root, preset, seed)
        for stale in [*root.parent.glob(f".{root.name}.building-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted first use (we hold the lock)
        console = console or _runtime.console()
        console.print(f"toy world (first use): generating the shapes data into {root}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        tmp.chmod(0o755)
        try:
            seconds = {}
            t = time.perf_counter()
            generate_data(tmp / "data", pretrain_config(preset, seed))
            seconds["data"] = round(time.perf_counter() - t, 1)
            if _shipped(preset, seed):
                report = shipped_manifest().get("report", {})
            else:
                t = time.perf_counter()
                # what the shipped weights share with this preset (v4's and v5's toy-clip) is taken
                reuse = (shipped.PACKAGE_WEIGHTS
                         if reusable_from(pretrain_config(preset, seed), shipped.PACKAGE_WEIGHTS) else None)
                report = pretrain(tmp / "weights", preset, seed, data_dir=tmp / "data", console=console,
                                  reuse=reuse)["report"]
                seconds["pretrain"] = round(time.perf_counter() - t, 1)
            add_lm_reference(tmp / "data", report)
            marker = {**_marker(preset, seed), "seconds": seconds,
                      "answer_baselines": answer_baselines(tmp / "data")}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            _runtime.replace_dir(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _world_at(root, preset, seed)


def ensure_toy_world(cache_dir: str | os.PathLike | None = None, *, preset: str | None = None,
                     console: Any = None) -> ToyWorld:
    """The toy world of ``preset`` (default ``$VLKIT_TOY_PRESET`` or the shipped one), made on first use."""
    preset = _preset(preset)
    root = Path(cache_dir) if cache_dir is not None else toy_cache_dir(preset)
    if is_built(root, preset):
        return _world_at(root, preset, SHIPPED_SEED)
    return build_toy_world(root, preset=preset, console=console)


_NAMES = {"clip": "clip_dir", "lm": "lm_dir", "tokenizer": "tokenizer_dir", "data": "data_dir"}


def _parse(spec: str) -> tuple[str, str]:
    head, _, rest = spec[len("toy:"):].partition("/")
    if head not in _NAMES or (rest and head != "data"):
        valid = ", ".join(f"toy:{n}" for n in _NAMES) + ", toy:data/<path>"
        raise ValueError(f"unknown toy world reference '{spec}'; valid: {valid}")
    return head, rest


def resolve_toy(spec: str) -> str:
    """``toy:clip|lm|tokenizer|data`` or ``toy:data/<relative path>`` -> a local path; any other string is
    returned unchanged. Shipped model references never build anything; ``toy:data`` makes the data on first use."""
    if not isinstance(spec, str) or not spec.startswith("toy:"):
        return spec
    head, rest = _parse(spec)
    preset = env_preset()
    if head != "data" and _shipped(preset, SHIPPED_SEED):
        shipped_manifest()
        return str(shipped.PACKAGE_WEIGHTS / {"clip": "toy-clip", "lm": "toy-lm", "tokenizer": "tokenizer"}[head])
    path = getattr(ensure_toy_world(), _NAMES[head])
    return str(path / rest) if rest else str(path)


def toy_path_if_available(spec: str) -> str | None:
    """A ``toy:`` reference resolved only when it needs no work (planning never builds anything)."""
    head, _ = _parse(spec)
    preset = env_preset()
    if (head != "data" and _shipped(preset, SHIPPED_SEED)) or is_built(toy_cache_dir(preset), preset):
        return resolve_toy(spec)
    return None

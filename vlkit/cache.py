"""Frozen-feature cache: encoder outputs computed once per (encoder identity + weights, layer, preprocessing, image).

Every run of a grid that shares a frozen encoder, and every epoch and stage of a run, reads the same features
from memory-mapped ``.npy`` shards instead of running the encoder. The key directory is a hash of the encoder's
identity (kind, model, layer, weights hash) and its preprocessing; any change gives a new directory. Shards are
written atomically under a file lock, so parallel runs of a grid can share one cache safely.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from vlkit._atomic import read_json, write_json_atomic
from vlkit._locks import locked
from vlkit.data.llava import ImageTransform, load_image, safe_image_path
from vlkit.types import EncoderOutput

DTYPES = {"float32": np.float32, "float16": np.float16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLKIT_CACHE_DIR", Path.home() / ".cache" / "vlkit" / "features"))


def encoder_identity(encoder: torch.nn.Module) -> str:
    """The encoder's own ``identity()`` when it has one, else its class plus a hash of its weights."""
    if hasattr(encoder, "identity"):
        return str(encoder.identity())
    h = hashlib.sha256(type(encoder).__qualname__.encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(encoder).__qualname__}:{h.hexdigest()[:16]}"


def cache_key(encoder: torch.nn.Module, dtype: str) -> str:
    prep = {"image_size": int(encoder.image_size), "mean": [float(x) for x in encoder.mean],
            "std": [float(x) for x in encoder.std], "resize": "bicubic-shortest-centercrop", "dtype": dtype,
            "layer": getattr(encoder, "layer", None), "encoder": encoder_identity(encoder)}
    return hashlib.sha256(json.dumps(prep, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """Configuration of a cache (directory, dtype); ``for_model`` binds it to a built model's encoder."""

    def __init__(self, root: Path | None = None, dtype: str = "float32", console: Console | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.root, self.dtype, self.console = Path(root or default_cache_dir()), dtype, console or Console()

    @classmethod
    def from_recipe(cls, recipe: Any, console: Console | None = None) -> "FeatureCache":
        return cls(Path(recipe.train.cache_dir) if recipe.train.cache_dir else None, console=console)

    def for_model(self, model: Any, device: torch.device) -> "BoundCache":
        return BoundCache(self, model.encoder, device)


class BoundCache:
    """Features of one encoder: ``prepare`` fills missing images, calling it on a batch returns EncoderOutput."""

    def __init__(self, cache: FeatureCache, encoder: torch.nn.Module, device: torch.device) -> None:
        self.cache, self.encoder, self.device = cache, encoder, device
        self.dir = cache.root / cache_key(encoder, cache.dtype)
        self.rows: dict[str, tuple[int, int]] = {}  # image key -> (shard, row)
        self.shards: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.grid: tuple[int, int] | None = None
        self.hits = self.computed = 0
        self._load_index()

    @staticmethod
    def image_key(root: Path | str, rel: str) -> str:
        return str(safe_image_path(root, rel))

    def _load_index(self) -> None:
        self.rows.clear()
        self.shards.clear()
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            return
        meta = read_json(meta_path, f"Delete the cache directory {self.dir}; it is filled again on the next run")
        self.grid = tuple(meta["grid"]) if meta["grid"] else None
        for s, name in enumerate(meta["shards"]):
            patches = np.load(self.dir / f"{name}.patches.npy", mmap_mode="r")
            cls_file = self.dir / f"{name}.cls.npy"
            cls = np.load(cls_file, mmap_mode="r") if cls_file.exists() else None
            self.shards.append((patches, cls))
            index = read_json(self.dir / f"{name}.index.json",
                              f"Delete the cache directory {self.dir}; it is filled again on the next run")
            for r, key in enumerate(index):
                self.rows[key] = (s, r)

    def prepare(self, images: Iterable[str], root: Path | str, transform: ImageTransform, batch_size: int = 64) -> None:
        """Compute and store features of every image not cached yet (estimating the size first)."""
        wanted = sorted({self.image_key(root, rel) for rel in images if rel})
        with locked(self.dir.parent / f"{self.dir.name}.lock"):
            self._load_index()  # another process may have added shards
            missing = [k for k in wanted if k not in self.rows]
            if not missing:
                self.cache.console.print(f"feature cache: all {len(wanted)} images cached in {self.dir}")
                return
            sample = self._encode([missing[0]], transform)
            n, d = sample.patches.shape[1:]
            item = DTYPES[self.cache.dtype](0).itemsize
            size = len(missing) * (n * d + (d if sample.cls is not None else 0)) * item
            self.cache.console.print(f"feature cache: computing {len(missing)} images ({n} tokens x {d}, "
                                     f"{self.cache.dtype}) ~{size / 2**20:.1f} MiB into {self.dir}")
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"shard{len(self.shards):04d}"
            tmp_p = self.dir / f".{name}.patches.npy.tmp"
            patches = np.lib.format.open_memmap(tmp_p, mode="w+", dtype=DTYPES[self.cache.dtype], shape=(len(missing), n, d))
            cls = None
            if sample.cls is not None:
                tmp_c = self.dir / f".{name}.cls.npy.tmp"
                cls = np.lib.format.open_memmap(tmp_c, mode="w+", dtype=DTYPES[self.cache.dtype], shape=(len(missing), d))
            with Progress(console=self.cache.console, transient=True) as progress:
                task = progress.add_task("encoding images", total=len(missing))
                for start in range(0, len(missing), batch_size):
                    chunk = missing[start:start + batch_size]
                    out = self._encode(chunk, transform)
                    patches[start:start + len(chunk)] = out.patches.cpu().numpy()
                    if cls is not None:
                        cls[start:start + len(chunk)] = out.cls.cpu().numpy()
                    progress.advance(task, len(chunk))
            patches.flush()
            del patches
            os.replace(tmp_p, self.dir / f"{name}.patches.npy")
            if cls is not None:
                cls.flush()
                del cls
                os.replace(tmp_c, self.dir / f"{name}.cls.npy")
            write_json_atomic(self.dir / f"{name}.index.json", missing, indent=None)
            meta_path = self.dir / "meta.json"
            meta = read_json(meta_path, f"Delete the cache directory {self.dir}; it is filled again on the next run") \
                if meta_path.exists() else {"shards": []}
            meta.update({"grid": list(sample.grid) if sample.grid else None, "dtype": self.cache.dtype,
                         "encoder": encoder_identity(self.encoder)})
            meta["shards"].append(name)
            write_json_atomic(meta_path, meta)
            self.computed += len(missing)
            self._load_index()

    @torch.no_grad()
    def _encode(self, keys: list[str], transform: ImageTransform) -> EncoderOutput:
        pixels = torch.stack([transform(load_image(Path(k))) for k in keys]).to(self.device)
        return self.encoder(pixels)

    def __call__(self, batch: dict[str, Any]) -> EncoderOutput | None:
        """The cached encoder output for the batch's images, in batch order (None for text-only batches)."""
        keys = [k for k in batch["image_keys"] if k is not None]
        if not keys:
            return None
        try:
            rows = [self.rows[k] for k in keys]
        except KeyError as exc:
            raise KeyError(f"image {exc} is not in the feature cache {self.dir}; call prepare() first") from None
        patches = torch.from_numpy(np.stack([self.shards[s][0][r] for s, r in rows]).astype(np.float32))
        cls = None
        if self.shards[rows[0][0]][1] is not None:
            cls = torch.from_numpy(np.stack([self.shards[s][1][r] for s, r in rows]).astype(np.float32))
        self.hits += len(keys)
        return EncoderOutput(patches=patches.to(self.device), cls=None if cls is None else cls.to(self.device),
                             grid=self.grid)

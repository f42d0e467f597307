"""The shipped weights: a manifest (sha256 and size of every file, the full pretraining config, its quality
report) beside the tokenizer, toy-clip and toy-lm directories. Every load checks the files against it.

Layout of a weights directory (the package's ``vlkit/toyworld/weights`` or a tiny world's ``<root>/weights``)::

    manifest.json          {"format", "config", "config_hash", "files": {relpath: {sha256, bytes}}, "report", ...}
    tokenizer/             toy tokenizer (ChatML template)
    toy-clip/              HF CLIPModel + CLIPImageProcessor (+ tokenizer for the text tower)
    toy-lm/                HF Qwen2ForCausalLM + tokenizer + generation config
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
COMPONENTS = ("tokenizer", "toy-clip", "toy-lm")
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"
REGENERATE = "vlkit toy pretrain"


class ToyWeightsError(RuntimeError):
    """The toy world's weights are missing, damaged, or from another version of vlkit."""


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able config (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(weights_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` of every file under the component directories."""
    table = {}
    for comp in COMPONENTS:
        for p in sorted((weights_dir / comp).rglob("*")):
            if p.is_file():
                table[p.relative_to(weights_dir).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def write_manifest(weights_dir: Path, config: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Hash the component files and write ``manifest.json`` (temp file + rename)."""
    import torch
    import transformers

    from vlkit import __version__

    manifest = {"format": MANIFEST_FORMAT, "config_hash": config_hash(config), "config": config,
                "files": file_table(weights_dir), "report": report,
                "written_by": {"vlkit": __version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "command": REGENERATE}}
    tmp = weights_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, weights_dir / MANIFEST)
    return manifest


def _fix(weights_dir: Path) -> str:
    if weights_dir == PACKAGE_WEIGHTS:
        return f"reinstall vlkit, or regenerate them with `{REGENERATE}` (about 6 CPU-hours on 2 cores)"
    return f"delete {weights_dir.parent} so that it is rebuilt"


def read_manifest(weights_dir: Path, expected_hash: str | None = None, fix: str | None = None) -> dict[str, Any]:
    """The manifest of ``weights_dir``; a missing or unreadable one, or one written for another pretraining config
    than ``expected_hash`` (another vlkit version), raises ``ToyWeightsError`` naming the file and the fix."""
    path = weights_dir / MANIFEST
    if not path.is_file():
        raise ToyWeightsError(f"toy world weights: {path} is missing; {fix or _fix(weights_dir)}")
    try:
        manifest = json.loads(path.read_text())
        files, config = manifest["files"], manifest["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ToyWeightsError(f"toy world weights: {path} is unreadable ({type(e).__name__}: {e}); "
                              f"{fix or _fix(weights_dir)}") from None
    if manifest.get("format") != MANIFEST_FORMAT or config_hash(config) != manifest.get("config_hash"):
        raise ToyWeightsError(f"toy world weights: {path} has format {manifest.get('format')!r} or a config that "
                              f"does not match its hash; {fix or _fix(weights_dir)}")
    if expected_hash is not None and manifest["config_hash"] != expected_hash:
        raise ToyWeightsError(
            f"toy world weights: {path} was written for pretraining config {manifest['config_hash']}, but this "
            f"version of vlkit expects {expected_hash} (weights from another version); {fix or _fix(weights_dir)}")
    if not isinstance(files, dict) or not files:
        raise ToyWeightsError(f"toy world weights: {path} lists no files; {fix or _fix(weights_dir)}")
    return manifest


def verify(weights_dir: Path, expected_hash: str | None = None, fix: str | None = None) -> dict[str, Any]:
    """Check every file listed in the manifest (present, same size, same sha256); returns the manifest. ``fix``:
    the way out an error names (default: reinstall, or rebuild the world directory)."""
    weights_dir = Path(weights_dir)
    manifest = read_manifest(weights_dir, expected_hash, fix)
    for rel, entry in manifest["files"].items():
        path = weights_dir / rel
        if not path.is_file():
            raise ToyWeightsError(f"toy world weights: {path} is missing; {fix or _fix(weights_dir)}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ToyWeightsError(f"toy world weights: {path} has {size} bytes, the manifest says {entry['bytes']} "
                                  f"(truncated or replaced); {fix or _fix(weights_dir)}")
        if sha256_file(path) != entry["sha256"]:
            raise ToyWeightsError(f"toy world weights: {path} does not match its sha256 in {weights_dir / MANIFEST} "
                                  f"(altered or corrupt); {fix or _fix(weights_dir)}")
    return manifest

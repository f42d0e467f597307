"""``vlkit toy build`` and ``vlkit toy pretrain``: the embedded default's weights and data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlkit.cli.common import console, friendly, toy_app


@toy_app.command("build")
@friendly
def toy_build_cmd(cache_dir: Optional[Path] = typer.Option(None, help="default: $VLKIT_TOY_DIR or ~/.cache/vlkit"),
                  preset: str = typer.Option("default", help="default (the shipped weights, preset v8), tiny "
                                                    "(tests), v7 (the previous world: toy-lm without its third stage), v6 (toy-clip "
                                                    "without the cell objective), v4 (no second toy-lm stage), v5, "
                                                    "v3; presets other than the shipped one "
                                                    "are pretrained here, taking what they share with it"),
                  force: bool = typer.Option(False, help="remake the data even if present")) -> None:
    """Check the shipped toy-clip / toy-lm weights and generate the shapes data (what a first run does)."""
    import time

    from vlkit.toyworld import build_toy_world

    t0 = time.time()
    world = build_toy_world(cache_dir, preset=preset, force=force, console=console)
    console.print(f"toy world: data in {world.data_dir}, weights in {world.weights_dir} "
                  f"(checked against their manifest; {time.time() - t0:.0f} s)")
    for k, v in (world.report or {}).items():
        console.print(f"  {k}: {v}", markup=False)


@toy_app.command("pretrain")
@friendly
def toy_pretrain_cmd(out: Optional[Path] = typer.Option(None, help="weights directory (default: the package's "
                                                                   "vlkit/toyworld/weights, replaced when done)"),
                     preset: str = typer.Option("default", help="default (= v8, the shipped one), v7, v6, v5, v4, v3 or tiny"),
                     seed: int = typer.Option(0),
                     restart: bool = typer.Option(False, "--restart", help="discard the checkpoints of an "
                                                  "interrupted pretraining and start over"),
                     reuse: Optional[Path] = typer.Option(None, help="an earlier pretraining's weights directory: "
                                                          "jobs made there with the same settings are taken, not "
                                                          "trained again")) -> None:
    """Maintainers: pretrain the toy tokenizer, toy-clip and toy-lm from a fixed seed and write the weights with
    their manifest (sha256 per file, config, quality report). The shipped preset takes about 6 CPU-hours (toy-lm's
    12 000 + 1 000 + 3 000 steps on one thread); an interrupted pretraining resumes from its
    checkpoints when the same command is run again, and ``--reuse`` takes what an earlier one made with the same
    settings."""
    from vlkit.toyworld import PACKAGE_WEIGHTS, pretrain

    target = out or PACKAGE_WEIGHTS
    manifest = pretrain(target, preset, seed, console=console, restart=restart, reuse=reuse)
    console.print(f"[bold green]done[/]: {target} (config {manifest['config_hash']}, "
                  f"{sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB in {len(manifest['files'])} files)")
    for k, v in manifest["report"].items():
        console.print(f"  {k}: {v}", markup=False)

"""``vlkit data check`` and ``vlkit data toy``: validate a LLaVA file before training; write the shapes world."""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from vlkit.cli.common import console, data_app, err_console, friendly


@data_app.command("check")
@friendly
def data_check_cmd(file: Path = typer.Argument(..., help="LLaVA-format JSON / JSONL file"),
                   image_root: Optional[Path] = typer.Option(None, "--image-root", help="folder image paths are relative to"),
                   recipe: Optional[str] = typer.Option(None, help="also template/length-check with this recipe's "
                                                                   "tokenizer and image span (image tokens and cell names)"),
                   overrides: Optional[list[str]] = typer.Argument(None, help="recipe overrides key.path=value"),
                   workers: int = typer.Option(os.cpu_count() or 1, min=1,
                                               help="processes decoding images (default: one per CPU core)"),
                   show: int = typer.Option(20, help="problems to list")) -> None:
    """Validate a data file before training on it; exits non-zero when anything would make training fail.

    Every image is decoded in full, as the training loader reads it, so a truncated file is named here."""
    from vlkit.data.llava import check_records, load_records

    records = load_records(file)
    tok, image_token_id, n_img, max_len = None, None, 1, 10**9
    if recipe:
        from vlkit.config import load_recipe
        from vlkit.model import image_span_for, load_tokenizer

        r = load_recipe(recipe, overrides or [])
        tok, image_token_id = load_tokenizer(r)
        n_img, max_len = image_span_for(r, tok, image_token_id), r.data.max_length  # with the cells' names
    with DecodeProgress() as progress:
        good, problems = check_records(records, image_root, tok, image_token_id, n_img, max_len, decode_images=True,
                                       workers=workers, on_images=progress.start, advance=progress.advance)
    if progress.n:
        secs = progress.end - progress.t0
        console.print(f"decoded {progress.n} images in {secs:.1f} s ({progress.n / max(secs, 1e-9):.0f} images/s, "
                      f"{workers} worker process(es))")
    console.print(check_table(file, records, len(good), problems, templated=bool(recipe)))
    for p in problems[:show]:
        console.print(f"  record {p.id} (#{p.index}) [{p.kind}]: {p.message}", markup=False, highlight=False)
    if len(problems) > show:
        console.print(f"  ... and {len(problems) - show} more")
    if problems:
        err_console.print(f"[bold red]{len(problems)} problem(s)[/] in {len(set(p.index for p in problems))} "
                          "record(s): training would stop before step 1 (or skip them with data.skip_bad=true)")
        raise typer.Exit(1)
    console.print("[bold green]ok[/]: every record is usable")


class DecodeProgress:
    """The bar of ``vlkit data check`` while it decodes every image: images/s and an ETA (``check_records`` calls
    :meth:`start` with the number of images, then :meth:`advance` as they are done)."""

    def __init__(self) -> None:
        columns = [TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]:.0f} images/s"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        self.progress = Progress(*columns, console=console, transient=False)
        self.t0 = self.end = time.perf_counter()
        self.n = 0

    def __enter__(self) -> "DecodeProgress":
        self.progress.__enter__()
        self.task = self.progress.add_task("decode", total=None, rate=0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start(self, n: int) -> None:
        self.t0, self.n = time.perf_counter(), n
        self.progress.update(self.task, total=n)

    def advance(self, k: int) -> None:
        done = self.progress.tasks[0].completed + k
        self.end = time.perf_counter()
        self.progress.update(self.task, completed=done, rate=done / max(self.end - self.t0, 1e-9))


def check_table(file: Path, records: list, usable: int, problems: list, templated: bool) -> Table:
    """One row per check with its count (red when any record fails it)."""
    table = Table(title=f"vlkit data check: {file}")
    table.add_column("check")
    table.add_column("count", justify="right")
    n_image = sum(1 for r in records if isinstance(r, dict) and r.get("image"))
    table.add_row("samples", str(len(records)))
    table.add_row("with image / text-only", f"{n_image} / {len(records) - n_image}")
    kinds = Counter(p.kind for p in problems)
    for kind in ("malformed", "path_escapes_root", "image_missing", "image_corrupt", "no_image_root",
                 "no_supervised_tokens", "too_long", "template"):
        table.add_row(kind.replace("_", " "), Text(str(kinds.get(kind, 0)), style="red" if kinds.get(kind) else "green"))
    table.add_row("usable", str(usable))
    if not templated:
        table.add_row("templating / length", "not checked (pass --recipe)")
    return table


@data_app.command("toy")
@friendly
def data_toy_cmd(out: Path = typer.Option(..., "--out", help="output folder"),
                 n_train: int = typer.Option(20000), n_val: int = typer.Option(1000), n_test: int = typer.Option(1000),
                 image_size: int = typer.Option(64), grid: int = typer.Option(3), max_objects: int = typer.Option(4),
                 seed: int = typer.Option(0)) -> None:
    """Write the procedural shapes world as LLaVA JSON + PNGs (align captions, instruction conversations)."""
    import time

    from vlkit.data.toy import generate_toy_data

    t0 = time.time()
    paths = generate_toy_data(out, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, grid=grid,
                              max_objects=max_objects, seed=seed)
    for k, v in paths.items():
        console.print(f"{k}: {v}")
    console.print(f"[bold green]done[/] in {time.time() - t0:.1f} s")

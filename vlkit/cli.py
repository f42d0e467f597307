"""The ``vlkit`` command line: parse, call one library function, print with rich."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build and compare LLaVA-style vision-language models.")
data_app = typer.Typer(no_args_is_help=True, help="Data tools: generate the toy world's data, check LLaVA files.")
toy_app = typer.Typer(no_args_is_help=True, help="The embedded default toy world.")
app.add_typer(data_app, name="data")
app.add_typer(toy_app, name="toy")

console = Console()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@app.callback()
def _quiet_libraries() -> None:
    """Library progress bars (weights loading) would interleave with vlkit's own rich progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
err_console = Console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known user errors become one clear message and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vlkit.config import ConfigError
        from vlkit.data.llava import DataError
        from vlkit.registry import RegistryError
        from vlkit.toyworld.shipped import ToyWeightsError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            err_console.print(f"[bold red]error:[/] {len(exc.errors)} problem(s) in recipe {exc.source}")
            for e in exc.errors:
                err_console.print(f"  - {e}", markup=False, highlight=False)
            raise typer.Exit(2)
        except (RegistryError, DataError, ToyWeightsError, FileNotFoundError, ValueError, TypeError) as exc:
            err_console.print(f"[bold red]error:[/] {type(exc).__name__}: ", end="")
            err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)  # paths stay whole
            if exc.__cause__ is not None:
                err_console.print(f"  caused by {type(exc.__cause__).__name__}: {exc.__cause__}", markup=False)
            raise typer.Exit(1)

    return wrapper


# ---- list / config / inspect ------------------------------------------------------------------------------------
@app.command("list")
@friendly
def list_cmd(family: Optional[str] = typer.Argument(None, help="encoders, token_strategies, projectors or llms"),
             pattern: str = typer.Option("*", help="glob over component names")) -> None:
    """Every registered component with its source (built-in, or plugin distribution + version)."""
    import fnmatch

    from vlkit.registry import FAMILIES, suggest

    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'.{suggest(family, FAMILIES)} Families: {', '.join(FAMILIES)}")
    table = Table(title="vlkit components")
    for col in ("family", "name", "source", "status"):
        table.add_column(col)
    for fam, reg in FAMILIES.items():
        if family and fam != family:
            continue
        for entry in reg.entries():
            if not fnmatch.fnmatch(entry.name, pattern):
                continue
            status = Text("ok", style="green") if entry.error is None else Text(entry.error, style="red")
            table.add_row(fam, entry.name, entry.source, status)
    console.print(table)


@app.command("config")
@friendly
def config_cmd(recipe: str = typer.Argument(..., help="recipe YAML"),
               overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ...")) -> None:
    """Print the resolved recipe (base merged, overrides applied, validated)."""
    from vlkit.config import dump_recipe, load_recipe

    r = load_recipe(recipe, overrides or [])
    console.print(dump_recipe(r), markup=False, highlight=False)


@app.command("inspect")
@friendly
def inspect_cmd(recipe: str = typer.Argument(..., help="recipe YAML"),
                overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ..."),
                stage: Optional[str] = typer.Option(None, help="stage whose data sample to show (default: first)")) -> None:
    """Build the model: parameters per component, image tokens, dims, one sample with its label mask."""
    from vlkit.config import load_recipe
    from vlkit.inspect import describe_model, sample_view

    r = load_recipe(recipe, overrides or [])
    info, model = describe_model(r)
    table = Table(title=f"{r.name}: components")
    for col in ("component", "name", "source", "trainable", "frozen"):
        table.add_column(col)
    for row in info["components"]:
        table.add_row(row["part"], row["name"], row["source"], f"{row['trainable']:,}", f"{row['frozen']:,}")
    console.print(table)
    for k, v in info["facts"].items():
        console.print(f"[bold]{k}[/]: {v}")
    console.print(sample_view(r, model, stage))


# ---- data / toy ---------------------------------------------------------------------------------------------------
@data_app.command("check")
@friendly
def data_check_cmd(file: Path = typer.Argument(..., help="LLaVA-format JSON / JSONL file"),
                   image_root: Optional[Path] = typer.Option(None, "--image-root", help="folder image paths are relative to"),
                   recipe: Optional[str] = typer.Option(None, help="also template/length-check with this recipe's "
                                                                   "tokenizer and image-token count"),
                   overrides: Optional[list[str]] = typer.Argument(None, help="recipe overrides key.path=value"),
                   workers: int = typer.Option(os.cpu_count() or 1, min=1,
                                               help="processes decoding images (default: one per CPU core)"),
                   show: int = typer.Option(20, help="problems to list")) -> None:
    """Validate a data file before training on it; exits non-zero when anything would make training fail.

    Every image is decoded in full, as the training loader reads it, so a truncated file is named here."""
    import time
    from collections import Counter

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from vlkit.data.llava import check_records, load_records

    records = load_records(file)
    tok, image_token_id, n_img, max_len = None, None, 1, 10**9
    if recipe:
        from vlkit.config import load_recipe
        from vlkit.model import count_image_tokens, load_tokenizer

        r = load_recipe(recipe, overrides or [])
        tok, image_token_id = load_tokenizer(r)
        n_img, max_len = count_image_tokens(r), r.data.max_length
    columns = [TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.0f} images/s"), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn()]
    timing = {"start": time.perf_counter(), "end": time.perf_counter(), "n": 0}
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("decode", total=None, rate=0.0)

        def on_images(n: int) -> None:
            timing.update(start=time.perf_counter(), n=n)
            progress.update(task, total=n)

        def advance(k: int) -> None:
            done = progress.tasks[0].completed + k
            timing["end"] = time.perf_counter()
            progress.update(task, completed=done, rate=done / max(timing["end"] - timing["start"], 1e-9))

        good, problems = check_records(records, image_root, tok, image_token_id, n_img, max_len,
                                       decode_images=True, workers=workers, on_images=on_images, advance=advance)
    if timing["n"]:
        secs = timing["end"] - timing["start"]
        console.print(f"decoded {timing['n']} images in {secs:.1f} s ({timing['n'] / max(secs, 1e-9):.0f} images/s, "
                      f"{workers} worker process(es))")
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
    table.add_row("usable", str(len(good)))
    if not recipe:
        table.add_row("templating / length", "not checked (pass --recipe)")
    console.print(table)
    for p in problems[:show]:
        console.print(f"  record {p.id} (#{p.index}) [{p.kind}]: {p.message}", markup=False, highlight=False)
    if len(problems) > show:
        console.print(f"  ... and {len(problems) - show} more")
    if problems:
        err_console.print(f"[bold red]{len(problems)} problem(s)[/] in {len(set(p.index for p in problems))} "
                          "record(s): training would stop before step 1 (or skip them with data.skip_bad=true)")
        raise typer.Exit(1)
    console.print("[bold green]ok[/]: every record is usable")


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


@toy_app.command("build")
@friendly
def toy_build_cmd(cache_dir: Optional[Path] = typer.Option(None, help="default: $VLKIT_TOY_DIR or ~/.cache/vlkit"),
                  preset: str = typer.Option("default", help="default (shipped weights) or tiny (pretrained here)"),
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
                     preset: str = typer.Option("default", help="default or tiny"),
                     seed: int = typer.Option(0),
                     restart: bool = typer.Option(False, "--restart", help="discard the checkpoints of an "
                                                  "interrupted pretraining and start over")) -> None:
    """Maintainers: pretrain the toy tokenizer, toy-clip and toy-lm from a fixed seed and write the weights with
    their manifest (sha256 per file, config, quality report). The default preset takes about an hour on 2 cores;
    an interrupted pretraining resumes from its checkpoints when the same command is run again."""
    from vlkit.toyworld import PACKAGE_WEIGHTS, pretrain

    target = out or PACKAGE_WEIGHTS
    manifest = pretrain(target, preset, seed, console=console, restart=restart)
    console.print(f"[bold green]done[/]: {target} (config {manifest['config_hash']}, "
                  f"{sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB in {len(manifest['files'])} files)")
    for k, v in manifest["report"].items():
        console.print(f"  {k}: {v}", markup=False)


# ---- train / eval / predict --------------------------------------------------------------------------------------
@app.command("train")
@friendly
def train_cmd(recipe: str = typer.Argument(..., help="recipe YAML (e.g. recipes/mlp_patch.yaml)"),
              overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ..."),
              run_dir: Optional[Path] = typer.Option(None, help="run directory (default: train.output_dir/<name>)"),
              dry_run: bool = typer.Option(False, "--dry-run", help="pre-flight checks plus one training step"),
              fresh: bool = typer.Option(False, "--fresh", help="delete the run directory's checkpoints first"),
              feature_cache: Optional[bool] = typer.Option(None, "--feature-cache/--no-feature-cache",
                                                          help="reuse frozen encoder features from disk")) -> None:
    """Run a recipe's stages (align -> instruct); resumes from the run directory's checkpoints."""
    import shutil

    from vlkit._locks import hold_run_dir, release_run
    from vlkit.config import load_recipe
    from vlkit.train import default_run_dir, prepare_run_dir, train

    r = load_recipe(recipe, overrides or [])
    if fresh and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 clears (the others wait in train())
        lock = hold_run_dir(default_run_dir(r, run_dir))  # never clears a directory another process trains
        try:
            d = prepare_run_dir(r, run_dir)
            for sub in ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard"):
                target = d / sub
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        finally:
            if lock is not None:
                release_run(lock)
    features = None
    if feature_cache if feature_cache is not None else r.train.feature_cache:
        from vlkit.cache import FeatureCache

        features = FeatureCache.from_recipe(r)
    summary = train(r, run_dir, console=console, dry_run=dry_run, features=features)
    if not dry_run:
        console.print(f"[bold green]done[/]: {summary.get('wall_time_s', 0):.0f} s; run directory "
                      f"{run_dir or Path(r.train.output_dir) / (r.train.run_name or r.name)}")


@app.command("eval")
@friendly
def eval_cmd(run: Path = typer.Argument(..., help="run directory"),
             data: str = typer.Option(..., "--data", help="LLaVA-format JSON file"),
             image_root: Optional[str] = typer.Option(None, help="image root (default: the run's data.image_root)"),
             max_samples: Optional[int] = typer.Option(None, help="evaluate the first N records"),
             batch_size: int = typer.Option(32), max_new_tokens: int = typer.Option(16)) -> None:
    """Validation loss and generation accuracy (per question type) of a trained run on any LLaVA file."""
    from vlkit.data.llava import ImageTransform, load_records
    from vlkit.evaluate import evaluate
    from vlkit.model import _resolve
    from vlkit.export import load_model as load_run
    from vlkit.random_init import results_say_random
    from vlkit.train import print_accuracy

    model, recipe, device = load_run(run)
    records = load_records(_resolve(data))[:max_samples]
    root = _resolve(image_root or recipe.data.image_root)
    t = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    m = evaluate(model, records, root, t, device, recipe.data.max_length, batch_size, max_new_tokens)
    with results_say_random(console, model):  # a run built with random_init says so on every line
        print_accuracy(console, str(run), m)


@app.command("predict")
@friendly
def predict_cmd(run: Path = typer.Argument(..., help="run directory"),
                image: Optional[Path] = typer.Option(None, help="image file"),
                prompt: Optional[str] = typer.Option(None, help="question; <image> is prepended when missing"),
                batch: Optional[Path] = typer.Option(None, help="LLaVA-format JSON: answer every record's first question"),
                image_root: Optional[str] = typer.Option(None, help="image root for --batch"),
                out: Optional[Path] = typer.Option(None, help="write --batch answers to this JSON file"),
                sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
                temperature: float = typer.Option(1.0), top_p: float = typer.Option(1.0),
                max_new_tokens: int = typer.Option(32)) -> None:
    """Answer a question about an image (or every record of a JSON file) with a trained run."""
    from vlkit.export import load_model as load_run
    from vlkit.predict import predict_records
    from vlkit.random_init import results_say_random

    model, recipe, device = load_run(run)
    gen = dict(do_sample=sample, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    if batch is not None:
        from vlkit.data.llava import load_records
        from vlkit.model import _resolve

        records = load_records(batch)
        answers = predict_records(model, records, _resolve(image_root or recipe.data.image_root), device, **gen)
        rows = [{"id": r.get("id"), "prediction": a} for r, a in zip(records, answers)]
        if out:
            from vlkit._atomic import write_json_atomic

            write_json_atomic(out, rows)
        with results_say_random(console, model):
            for row in rows[:20]:
                console.print(f"{row['id']}: {row['prediction']}", markup=False)
        return
    if image is None or prompt is None:
        raise ValueError("give --image and --prompt, or --batch FILE")
    text = prompt if "<image>" in prompt else "<image>\n" + prompt
    rec = {"id": "cli", "image": image.name, "conversations": [{"from": "human", "value": text},
                                                               {"from": "gpt", "value": ""}]}
    answer = predict_records(model, [rec], image.resolve().parent, device, **gen)[0]
    with results_say_random(console, model):
        console.print(answer, markup=False)


# ---- ablate / report -----------------------------------------------------------------------------------------------
@app.command("ablate")
@friendly
def ablate_cmd(recipe: str = typer.Argument("mlp_patch", help="base recipe (default: the embedded default)"),
               overrides: Optional[list[str]] = typer.Argument(None, help="base overrides key.path=value"),
               projector: Optional[str] = typer.Option(None, help="projectors, e.g. linear,mlp"),
               tokens: Optional[str] = typer.Option(None, help="token strategies, e.g. cls,patch"),
               num_image_tokens: Optional[str] = typer.Option(None, help="image token counts, e.g. 1,4,16,64"),
               seeds: Optional[str] = typer.Option(None, help="number of seeds (3) or a list (0,1,2)"),
               grid: Optional[list[str]] = typer.Option(None, help="generic axis key.path=a,b,c (repeatable)"),
               out: Optional[Path] = typer.Option(None, help="ablation directory (default: runs/ablate/<recipe>)"),
               executor: str = typer.Option("local", help="local, slurm or submitit-local"),
               workers: Optional[int] = typer.Option(None, help="parallel runs (default from cores and memory)"),
               feature_cache: bool = typer.Option(True, "--feature-cache/--no-feature-cache",
                                                  help="share frozen encoder features across runs"),
               dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and a time estimate, run nothing"),
               partition: Optional[str] = typer.Option(None, help="slurm partition"),
               gpus: int = typer.Option(1, help="slurm GPUs per run"),
               time_min: int = typer.Option(240, "--time", help="slurm time limit per run (minutes)"),
               compare: Optional[list[Path]] = typer.Option(None, help="another study's directory: the report sets "
                                                                        "its axes' spreads beside this one's "
                                                                        "(repeatable)")) -> None:
    """Run a declared grid (projector x tokens x N x seeds x any key) and write results and a report."""
    import shlex

    from vlkit.ablate.plan import make_plan, print_plan, estimate_time
    from vlkit.ablate.report import study_rows, write_report
    from vlkit.ablate.run import run_grid

    for other in compare or []:
        study_rows(other)  # a wrong --compare directory fails now, not after the grid has trained

    cli_axes: dict[str, str] = {}
    for name, value in (("projector", projector), ("tokens", tokens), ("num_image_tokens", num_image_tokens)):
        if value:
            cli_axes[name] = value
    for g in grid or []:
        key, sep, values = g.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid '{g}' is not of the form key.path=a,b,c")
        cli_axes[key.strip()] = values
    command = "vlkit ablate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    plan = make_plan(recipe, overrides or [], cli_axes, seeds, out, command)
    print_plan(console, plan)
    if dry_run:
        estimate_time(console, plan, workers)
        return
    slurm = {"partition": partition, "gpus": gpus, "time_min": time_min}
    run_grid(plan["recipe_path"], plan["specs"], plan["out"], executor, workers, feature_cache, console, slurm)
    result = write_report(plan["out"], compare=compare)
    print_summary(result, plan["axes"])
    console.print(f"[bold]report[/]: {plan['out'] / 'report.md'}, {plan['out'] / 'results.csv'}")


@app.command("report")
@friendly
def report_cmd(out: Path = typer.Argument(..., help="ablation directory"),
               compare: Optional[list[Path]] = typer.Option(None, help="another study's directory: set its axes' "
                                                                        "spreads beside this one's (repeatable)")) -> None:
    """Regenerate results.csv/json, report.md and plots from an ablation's run directories."""
    from vlkit.ablate.report import load_plan, study_rows, write_report

    plan, _ = load_plan(out)
    for other in compare or []:
        study_rows(other)
    result = write_report(out, compare=compare)
    print_summary(result, plan["axes"])
    console.print(f"[bold]report[/]: {out / 'report.md'}")


def print_summary(result: dict[str, Any], axes: list[str]) -> None:
    from vlkit.ablate.report import _fmt

    table = Table(title="ablation: mean ± 95% CI across seeds")
    for col in [*axes, "image tokens", "trainable", "seeds", "accuracy", "val loss"]:
        table.add_column(col)
    for a in result["aggregate"]:
        table.add_row(*[str(a.get(x)) for x in axes], str(a.get("image_tokens")), f"{a.get('trainable_params') or 0:,}",
                      str(a["seeds"]), _fmt(a.get("accuracy")), _fmt(a.get("val_loss")))
    console.print(table)


@app.command("export")
@friendly
def export_cmd(run: Path = typer.Argument(..., help="run directory"),
               out: Path = typer.Argument(..., help="output directory (new or empty)"),
               format: str = typer.Option("hf-llava", "--format",
                                          help="hf-llava (LlavaForConditionalGeneration + processor) or vlkit "
                                               "(recipe + trained weights; any model)"),
               dtype: Optional[str] = typer.Option(None, help="hf-llava weight dtype: float32, bfloat16 or float16 "
                                                              "(default: the LLM's)"),
               overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it is not empty")) -> None:
    """Export a trained run as a Hugging Face Llava model directory or a vlkit export."""
    from vlkit.export import export_run

    info = export_run(run, out, format=format, dtype=dtype, overwrite=overwrite)
    if not info.get("complete", True):
        err_console.print("[yellow]warning:[/] not every stage has finished; exported the latest checkpoints: "
                          + ", ".join(f"{k}:{v}" for k, v in info["stages"].items()))
    if info["format"] == "hf-llava":
        console.print(f"[bold green]exported[/] {run} -> {out} (LlavaForConditionalGeneration, "
                      f"{info['num_image_tokens']} image tokens, vision_feature_layer {info['vision_feature_layer']}, "
                      f"'{info['vision_feature_select_strategy']}', {info['dtype']}); load with "
                      "LlavaForConditionalGeneration.from_pretrained + AutoProcessor.from_pretrained")
    else:
        console.print(f"[bold green]exported[/] {run} -> {out} (vlkit format, {info['tensors']} trained tensors, "
                      f"{info['parameters']:,} parameters); load with vlkit.export.load_export")


@app.command("plan")
@friendly
def plan_cmd(recipe: str = typer.Argument(..., help="recipe YAML"),
             overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value ..."),
             gpus: int = typer.Option(1, help="data-parallel GPUs: each takes 1/gpus of a micro-batch; ZeRO "
                                              "shards across them"),
             zero: Optional[int] = typer.Option(None, help="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 "
                                                           "+weights (default: the recipe's train.deepspeed, else 0)"),
             gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="memory per GPU in GB (10^9 bytes)"),
             stage: Optional[str] = typer.Option(None, help="plan only this stage (default: train.stages)"),
             seq_len: Optional[int] = typer.Option(None, "--seq-len",
                                                   help="tokens per sample incl. image tokens (default data.max_length)"),
             supervised_frac: float = typer.Option(0.3, "--supervised-frac",
                                                   help="fraction of tokens with a label (they reach the LM head)"),
             micro_batch: Optional[int] = typer.Option(None, "--micro-batch",
                                                       help="samples per GPU per step (default batch_size/grad_accum)"),
             device: str = typer.Option("cuda", help="cuda (autocast per train.precision) or cpu (fp32)"),
             overhead_gb: Optional[float] = typer.Option(None, "--overhead-gb",
                                                         help="CUDA context/workspace allowance (default 1 on cuda)"),
             offline: bool = typer.Option(False, "--offline", help="never ask the hub for a config"),
             as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Estimate per-GPU training memory of each stage (weights, gradients, AdamW, activations) without downloading."""
    import json

    from vlkit.config import load_recipe
    from vlkit.plan import plan, print_plan

    r = load_recipe(recipe, overrides or [])
    p = plan(r, [stage] if stage else None, online=False if offline else None, gpus=gpus, zero=zero,
             gpu_memory_gb=gpu_memory, seq_len=seq_len, supervised_frac=supervised_frac, micro_batch=micro_batch,
             device=device, overhead_gb=overhead_gb)
    if as_json:
        print(json.dumps(p.to_dict(), indent=1))
        return
    print_plan(console, p)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""``vlkit train``, ``eval``, ``predict`` and ``export``: a run trained, evaluated, asked, exported."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from vlkit.cli.common import app, console, err_console, friendly


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
    from vlkit.config import load_recipe
    from vlkit.train import clear_run_dir, default_run_dir, train

    r = load_recipe(recipe, overrides or [])
    if fresh and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 clears (the others wait in train())
        clear_run_dir(r, run_dir)
    features = None
    if feature_cache if feature_cache is not None else r.train.feature_cache:
        from vlkit.cache import FeatureCache

        features = FeatureCache.from_recipe(r)
    summary = train(r, run_dir, console=console, dry_run=dry_run, features=features)
    if not dry_run:
        console.print(f"[bold green]done[/]: {summary.get('wall_time_s', 0):.0f} s; run directory "
                      f"{default_run_dir(r, run_dir)}")


@app.command("eval")
@friendly
def eval_cmd(run: Path = typer.Argument(..., help="run directory"),
             data: str = typer.Option(..., "--data", help="LLaVA-format JSON file"),
             image_root: Optional[str] = typer.Option(None, help="image root (default: the run's data.image_root)"),
             max_samples: Optional[int] = typer.Option(None, help="evaluate the first N records"),
             batch_size: int = typer.Option(32), max_new_tokens: int = typer.Option(16),
             predictions: Optional[Path] = typer.Option(None, help="JSON lines of the answers (default: "
                                                        "RUN/predictions_eval_<data file stem>.jsonl)")) -> None:
    """Validation loss and generation accuracy (per question type) of a trained run on any LLaVA file."""
    import contextlib

    from vlkit.predict import eval_predictions_path, evaluate_run
    from vlkit.random_init import tag_console
    from vlkit.train import print_accuracy

    out = predictions or eval_predictions_path(run, data)
    m = evaluate_run(run, data, image_root, max_samples, batch_size, max_new_tokens, out)
    with contextlib.ExitStack() as stack:
        tag_console(console, m.pop("random_weights"), stack)  # a run built with random_init says so on every line
        print_accuracy(console, str(run), m)
    console.print(f"answers: {out}")


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
    from vlkit.export import load_model
    from vlkit.predict import predict_records
    from vlkit.random_init import results_say_random

    model, recipe, device = load_model(run)
    gen = dict(do_sample=sample, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    if batch is not None:
        from vlkit.data.llava import load_records
        from vlkit.model import resolve_ref

        records = load_records(batch)
        answers = predict_records(model, records, resolve_ref(image_root or recipe.data.image_root), device, **gen)
        rows = [{"id": r.get("id"), "prediction": a} for r, a in zip(records, answers)]
        if out:
            from vlkit._atomic import write_json_atomic

            write_json_atomic(out, rows)
        with results_say_random(console, model):  # a run built with random_init says so on every line
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

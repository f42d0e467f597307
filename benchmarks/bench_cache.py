"""Wall time of an 8-run projector grid with vs without the frozen-feature cache, side by side.

The grid is ``projector in {linear, mlp} x stages.instruct.lr in {1e-3, 5e-4} x 2 seeds`` of the embedded default
recipe (``mlp_patch``: align then instruct with LoRA), run through the real CLI exactly as a user would::

    python -m vlkit.cli ablate mlp_patch <small-step overrides> --projector linear,mlp \\
        --grid stages.instruct.lr=1e-3,5e-4 --seeds 2 --out DIR --feature-cache | --no-feature-cache

Each mode gets a fresh, empty ``VLKIT_CACHE_DIR``: the cached grid pays for filling the cache inside its own wall
time. With ``--split projector`` (default) each grid is run as its two projector halves (4 runs each, together the
same 8 runs) in the order cache, no-cache, no-cache, cache, so that a change of machine load during the benchmark
hits both modes alike; the cached mode's second half reuses the features its first half computed. ``--split none``
runs each 8-run grid as one command. Each ablate command is timed in wall time and in CPU time (user + system of
the ablate process and every run it waited for, from ``getrusage(RUSAGE_CHILDREN)``); by default the grid runs
two single-threaded runs at a time (``--workers 2``), so the CPU time is the work done and is not inflated by other
processes on a shared machine: it is the headline ratio, the wall-time ratio is reported next to it.

Then, in-process, the per-step breakdown that explains the ratio: on a real toy batch of the same size, the time of
PNG loading + transform + collation, of the frozen encoder's forward, of reading the features from the cache, and
of the training step (align and instruct) with pixels vs with cached features, timed alternately (median).

    VLKIT_TOY_PRESET=tiny VLKIT_TOY_DIR=/tmp/vlkit-toy-tiny python benchmarks/bench_cache.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ROOT, environment, median, set_threads, table, timed, timed2, write_result  # noqa: E402

MODES = {"cache": "--feature-cache", "no_cache": "--no-feature-cache"}


def overrides(args) -> list[str]:
    ov = []
    for st in ("align", "instruct"):
        ov += [f"stages.{st}.max_steps={args.steps}", f"stages.{st}.batch_size={args.batch}",
               f"stages.{st}.eval_max_samples={args.eval_samples}", f"stages.{st}.eval_batch_size={args.eval_samples}",
               f"stages.{st}.save_every=100000", f"stages.{st}.max_new_tokens=8"]
    return ov


def grid_commands(args) -> list[tuple[str, str, list[str]]]:
    """(mode, part, ablate argv) in the order to run them."""
    base = [sys.executable, "-m", "vlkit.cli", "ablate", "mlp_patch", *overrides(args)]
    axes = ["--grid", "stages.instruct.lr=1e-3,5e-4", "--seeds", "2"] + (["--workers", str(args.workers)]
                                                                        if args.workers else [])
    if args.split == "none":
        parts = [("all", ["--projector", "linear,mlp"])]
        order = [("cache", 0), ("no_cache", 0)]
    else:
        parts = [("linear", ["--projector", "linear"]), ("mlp", ["--projector", "mlp"])]
        order = [("cache", 0), ("no_cache", 0), ("no_cache", 1), ("cache", 1)]
    return [(mode, parts[i][0], base + parts[i][1] + axes + [MODES[mode]]) for mode, i in order]


def run_grids(args, work: Path) -> dict[str, Any]:
    cache_dirs = {m: work / f"features-{m}" for m in MODES}
    out: dict[str, Any] = {m: {"wall_s": 0.0, "cpu_s": 0.0, "parts": []} for m in MODES}
    for mode, part, cmd in grid_commands(args):
        out_dir = work / f"ablate-{mode}-{part}"
        env = {**os.environ, "VLKIT_CACHE_DIR": str(cache_dirs[mode]), "COLUMNS": "160", "PYTHONWARNINGS": "ignore"}
        print(f"[{time.strftime('%H:%M:%S')}] {mode} / {part}: {' '.join(cmd[3:])} --out {out_dir}", flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t, res = timed(lambda: subprocess.run(cmd + ["--out", str(out_dir)], cwd=ROOT, env=env, capture_output=True,
                                              text=True))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ablate process and every run it waited for
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        (work / f"ablate-{mode}-{part}.log").write_text(res.stdout + res.stderr)
        runs = run_breakdown(out_dir)
        failed = [r["run"] for r in runs if r["status"] != "finished"]
        print(f"    {t:.0f} s wall, {cpu:.0f} s CPU, {len(runs)} runs, failed: {failed or 'none'}", flush=True)
        if res.returncode != 0 or failed or not runs:
            tail = "\n".join((res.stdout + res.stderr).splitlines()[-30:])
            raise SystemExit(f"grid {mode}/{part} failed (rc {res.returncode}, failed runs {failed}):\n{tail}\n"
                             f"see {work}")
        out[mode]["wall_s"] += t
        out[mode]["cpu_s"] += cpu
        out[mode]["parts"].append({"part": part, "wall_s": t, "cpu_s": cpu, "runs": runs})
    for mode in MODES:
        files = list(cache_dirs[mode].rglob("*.npy")) if cache_dirs[mode].exists() else []
        out[mode]["cache_files"] = len(files)
        out[mode]["cache_mib"] = sum(f.stat().st_size for f in files) / 2**20
    return out


def run_breakdown(out_dir: Path) -> list[dict[str, Any]]:
    """Per run: process wall (status.json), train() wall, training-loop walls per stage (summary.json)."""
    rows = []
    for rd in sorted((out_dir / "runs").glob("*")) if (out_dir / "runs").exists() else []:
        status = json.loads((rd / "status.json").read_text()) if (rd / "status.json").exists() else {}
        summ = json.loads((rd / "summary.json").read_text()) if (rd / "summary.json").exists() else {}
        loops = {k: v.get("wall_time_s", 0.0) for k, v in summ.get("stages", {}).items()}
        steps = sum(v.get("steps", 0) for v in summ.get("stages", {}).values())
        log = (rd / "train.log").read_text() if (rd / "train.log").exists() else ""
        rows.append({"run": rd.name, "status": status.get("status"), "process_wall_s": status.get("wall_time_s", 0.0),
                     "train_wall_s": summ.get("wall_time_s", 0.0), "loop_wall_s": loops, "steps": steps,
                     "cache_computed": "feature cache: computing" in log, "peak_rss_mb": summ.get("peak_rss_mb")})
    return rows


def summarize(mode: dict[str, Any]) -> dict[str, float]:
    """Totals over the runs of a mode. Runs may overlap (--workers > 1), so per-run times are summed as
    run-seconds and also given as a mean per run; the grid wall time is measured around the ablate commands."""
    runs = [r for p in mode["parts"] for r in p["runs"]]
    n = max(len(runs), 1)
    proc = sum(r["process_wall_s"] for r in runs)
    train = sum(r["train_wall_s"] for r in runs)
    loops = sum(sum(r["loop_wall_s"].values()) for r in runs)
    steps = sum(r["steps"] for r in runs)
    return {"runs": len(runs), "grid_wall_s": mode["wall_s"], "grid_cpu_s": mode["cpu_s"], "run_seconds": proc, "mean_run_wall_s": proc / n,
            "mean_process_start_s": (proc - train) / n,  # python + imports + recipe/plugins, before train()
            "mean_setup_eval_s": (train - loops) / n,  # build, data checks, cache fill/open, eval, checkpoints
            "mean_train_loops_s": loops / n, "loop_share_of_run": loops / max(proc, 1e-9),
            "steps": steps, "loop_wall_s_per_step": loops / max(steps, 1)}


def amdahl_ceiling(summary: dict[str, Any], breakdown: dict[str, Any]) -> dict[str, float]:
    """The best no-cache / cache ratio the grid could show: the cache removes only the encoder's forward and the
    PNG decoding, which are ``step_share`` of a training step (step-time weighted over the stages, which run the
    same number of steps), and steps are ``loop_share`` of a no-cache run."""
    full = {st: breakdown[st]["median_full_no_cache_s"] for st in ("align", "instruct")}
    step_share = sum(full[st] * breakdown[st]["encoder_plus_png_share_of_full_step"] for st in full) / sum(full.values())
    loop_share = summary["no_cache"]["loop_share_of_run"]
    return {"step_share": step_share, "loop_share": loop_share, "grid_ceiling": 1 / (1 - loop_share * step_share)}


# ---- per-step breakdown (in process) --------------------------------------------------------------------------
def step_breakdown(args, work: Path) -> dict[str, Any]:
    import torch

    from vlkit.cache import FeatureCache
    from vlkit.config import load_recipe
    from vlkit.data.collate import Collator, epoch_batches
    from vlkit.data.llava import ImageTransform, LlavaDataset, check_records, load_records
    from vlkit.model import build_model, resolve_ref
    from vlkit.train import param_groups, set_trainable

    recipe = load_recipe("mlp_patch", overrides(args))
    torch.manual_seed(0)
    model = build_model(recipe)
    root = Path(resolve_ref(recipe.data.image_root))
    transform = ImageTransform(model.encoder.image_size, model.encoder.mean, model.encoder.std)
    collator = Collator(model.tokenizer.pad_token_id)
    cache = FeatureCache(work / "features-breakdown").for_model(model, torch.device("cpu"))
    out: dict[str, Any] = {"batch_size": args.batch}
    for stage_name in ("align", "instruct"):
        stage = recipe.stages[stage_name]
        recs = load_records(resolve_ref(stage.data))
        n_img = getattr(model, "sequence_image_tokens", model.num_image_tokens)
        t_check, (examples, _) = timed(lambda: check_records(recs, root, model.tokenizer, model.image_token_id, n_img,
                                                             recipe.data.max_length))
        ds_px = LlavaDataset(examples, root, transform)
        ds_nopx = LlavaDataset(examples, root, transform, load_images=False)
        t_prep, _ = timed(lambda: cache.prepare([e.image for e in examples], root, transform))
        set_trainable(model, stage)
        opt = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999))
        params = [p for g in opt.param_groups for p in g["params"]]
        model.train()
        lengths, has_image = [e.length for e in examples], [e.image is not None for e in examples]
        batches = epoch_batches(lengths, has_image, args.batch, 0, 0, recipe.data.group_by_length)[: args.bd_batches]

        def step(b, feats):
            opt.zero_grad(set_to_none=True)
            n_total = int((b["labels"][:, 1:] != -100).sum())
            o = model(b["input_ids"], b["attention_mask"], b["labels"],
                      pixel_values=None if feats is not None else b["pixel_values"], features=feats,
                      image_index=b.get("image_index"))
            (o.loss_sum / n_total).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        def no_cache(idx):  # what a step costs without the cache: PNGs -> pixels -> encoder inside the step
            b = collator([ds_px[i] for i in idx])
            step(b, None)

        def with_cache(idx):  # with the cache: text-only collation + memory-mapped features
            b = collator([ds_nopx[i] for i in idx])
            step(b, cache(b))

        no_cache(batches[0]), with_cache(batches[0])  # warm-up
        t = {k: [] for k in ("load_pixels", "load_text_only", "encoder_forward", "cache_read", "step_pixels",
                             "step_features", "full_no_cache", "full_cache")}
        for r in range(args.bd_repeats):
            for j, idx in enumerate(batches):
                b_px = collator([ds_px[i] for i in idx])
                feats = cache(b_px)
                pair = [("full_no_cache", lambda: no_cache(idx)), ("full_cache", lambda: with_cache(idx)),
                        ("step_pixels", lambda: step(b_px, None)), ("step_features", lambda: step(b_px, feats))]
                if (r + j) % 2:
                    pair.reverse()
                for name, fn in pair:
                    t[name].append(timed2(fn))
                t["load_pixels"].append(timed2(lambda: collator([ds_px[i] for i in idx])))
                t["load_text_only"].append(timed2(lambda: collator([ds_nopx[i] for i in idx])))
                t["cache_read"].append(timed2(lambda: cache(b_px)))
                with torch.no_grad():
                    t["encoder_forward"].append(timed2(lambda: model.encoder(b_px["pixel_values"])))
        # CPU time of this (single-threaded) process is the headline: other processes taking the cores do not
        # inflate it; wall-time medians are kept next to it
        med = {k: median([x[1] for x in v]) for k, v in t.items()}
        med_wall = {k: median([x[0] for x in v]) for k, v in t.items()}
        out[stage_name] = {
            **{f"median_{k}_s": v for k, v in med.items()}, "wall": {f"median_{k}_s": v for k, v in med_wall.items()},
            "cache_prepare_s": t_prep, "check_records_s": t_check, "samples": len(examples),
            "encoder_share_of_step": med["encoder_forward"] / med["step_pixels"],
            "encoder_plus_png_share_of_full_step": (med["encoder_forward"] + med["load_pixels"] - med["load_text_only"])
            / med["full_no_cache"],
            "per_step_speedup": med["full_no_cache"] / med["full_cache"]}
        # Amdahl: the cache can at best remove the encoder and the PNG decoding from a step
        out[stage_name]["per_step_ceiling"] = 1 / (1 - out[stage_name]["encoder_plus_png_share_of_full_step"])
        print(f"  breakdown {stage_name}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15, help="max_steps of each stage of each run")
    ap.add_argument("--batch", type=int, default=8, help="batch_size of each stage")
    ap.add_argument("--eval-samples", type=int, default=8, help="eval_max_samples (and eval batch) per stage")
    ap.add_argument("--split", choices=["projector", "none"], default="projector")
    ap.add_argument("--workers", type=int, default=2,
                    help="ablate --workers (0 = vlkit's default: one run per 2 cores, with cores/workers threads "
                         "each). 2 by default: two 1-thread runs at a time; on a shared 2-core machine one run with "
                         "two OpenMP threads is 2-3x slower per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process breakdown")
    ap.add_argument("--bd-batches", type=int, default=3, help="batches in the per-step breakdown")
    ap.add_argument("--bd-repeats", type=int, default=2)
    ap.add_argument("--no-grid", action="store_true", help="only the per-step breakdown")
    ap.add_argument("--keep", action="store_true", help="keep the ablation directories")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    from vlkit.toyworld import ensure_toy_world

    t_start = time.time()
    env = environment()
    world = ensure_toy_world()
    preset = json.loads((world.root / "build.json").read_text())["preset"]
    print(f"toy world: {world.root} (preset {preset})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vlkit-bench-cache-"))
    try:
        grids = None if args.no_grid else run_grids(args, work)
        breakdown = step_breakdown(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = {m: summarize(grids[m]) for m in MODES} if grids else None
    ratio = summary["no_cache"]["grid_wall_s"] / summary["cache"]["grid_wall_s"] if summary else None
    ratio_cpu = summary["no_cache"]["grid_cpu_s"] / summary["cache"]["grid_cpu_s"] if summary else None
    loop_ratio = (summary["no_cache"]["loop_wall_s_per_step"] / summary["cache"]["loop_wall_s_per_step"]
                  if summary else None)
    ceiling = amdahl_ceiling(summary, breakdown) if summary else None
    payload = {"benchmark": "bench_cache", "amdahl": ceiling, "env": env, "toy_world": {"root": str(world.root), "preset": preset},
               "args": vars(args), "overrides": overrides(args),
               "commands": [" ".join(c[3:]) for c in grid_commands(args)],
               "ratio_no_cache_over_cache_wall": ratio, "ratio_no_cache_over_cache_cpu": ratio_cpu,
               "train_loop_ratio_wall": loop_ratio, "summary": summary, "grids": grids,
               "step_breakdown": breakdown, "work_dir": str(work) if args.keep else None,
               "wall_s": time.time() - t_start}
    path = write_result("bench_cache", payload, args.out)

    print()
    if summary:
        rows = []
        for m in MODES:
            s = summary[m]
            rows.append([m, s["runs"], f"{s['grid_cpu_s']:.0f}", f"{s['grid_wall_s']:.0f}", f"{s['mean_run_wall_s']:.1f}",
                         f"{s['mean_process_start_s']:.1f}", f"{s['mean_setup_eval_s']:.1f}",
                         f"{s['mean_train_loops_s']:.1f} ({s['loop_share_of_run']:.0%})",
                         f"{s['loop_wall_s_per_step'] * 1e3:.0f}"])
        print(f"toy world preset {preset}; {args.steps} align + {args.steps} instruct steps x batch {args.batch} per run, "
              f"eval on {args.eval_samples} samples per stage; ablate --workers {args.workers or 'default'}")
        print(table(["mode", "runs", "grid CPU s", "grid wall s", "mean run wall s", "process start s", "build+data+cache+eval s",
                     "training loops s (share)", "wall ms/step"], rows))
        print(f"\nratio no-cache / cache: grid CPU time **{ratio_cpu:.2f}x**, grid wall {ratio:.2f}x, "
              f"training loops only (wall) {loop_ratio:.2f}x")
        print(f"Amdahl ceiling of the grid: {ceiling['grid_ceiling']:.3f}x (training loops {ceiling['loop_share']:.0%} of "
              f"a no-cache run x encoder + PNG {ceiling['step_share']:.1%} of a step); grid CPU ratio / ceiling "
              f"**{ratio_cpu / ceiling['grid_ceiling']:.0%}**, share of the ideal saving realised "
              f"{(1 - 1 / ratio_cpu) / (1 - 1 / ceiling['grid_ceiling']):.0%}")
    rows = []
    for st in ("align", "instruct"):
        b = breakdown[st]
        rows.append([st, f"{b['median_load_pixels_s'] * 1e3:.0f} / {b['median_load_text_only_s'] * 1e3:.0f}",
                     f"{b['median_encoder_forward_s'] * 1e3:.0f}", f"{b['median_cache_read_s'] * 1e3:.1f}",
                     f"{b['median_step_pixels_s'] * 1e3:.0f} / {b['median_step_features_s'] * 1e3:.0f}",
                     f"{b['encoder_share_of_step']:.1%}",
                     f"{b['median_full_no_cache_s'] * 1e3:.0f} / {b['median_full_cache_s'] * 1e3:.0f}",
                     f"{b['per_step_speedup']:.2f}x (ceiling {b['per_step_ceiling']:.2f}x)"])
    print(f"\nper-step breakdown, batch {args.batch}, torch threads {args.threads} (medians of CPU time, ms)")
    print(table(["stage", "load+collate px / text", "encoder fwd", "cache read", "step px / feats",
                 "encoder share of step", "full step no-cache / cache", "per-step speedup"], rows))
    print("once per run and stage (not per step): " + "; ".join(
        f"{st}: check_records {breakdown[st]['check_records_s']:.1f} s for {breakdown[st]['samples']} records, "
        f"cache prepare {breakdown[st]['cache_prepare_s']:.1f} s" for st in ("align", "instruct")))
    print(f"\nwrote {path} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()

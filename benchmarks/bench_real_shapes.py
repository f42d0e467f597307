"""The real recipe at its real shapes on this CPU: one align step and one instruct step through ``vlkit train``,
with RANDOM WEIGHTS (``encoder.random_init=true llm.random_init=true``; no hub, no checkpoint), fp32.

    recipe   recipes/llava15_qwen2.5-1.5b_clip-l336.yaml (CLIP ViT-L/14-336 layer -2, 576 patch tokens, mlp2x_gelu,
             Qwen2.5-1.5B; instruct: LoRA r128/alpha256 all-linear, gradient checkpointing) + random_init on both
             models + the shipped ChatML toy tokenizer (435 tokens; the embedding keeps Qwen2.5's 151,936 rows, so
             weights and memory are the real model's) + ``llm.dtype=float32 train.precision=fp32 train.device=cpu``
             + ``data.num_workers=0`` (image loading in the measured process) + micro-batch ``--batch``, 1 step a stage
    data     LLaVA records over the photos matplotlib ships (and scikit-learn's, when installed), through vlkit's
             own checks, templating, dataset and collator (benchmarks/_real_shapes.py)

A fresh child process runs ``vlkit.train.train`` on both stages and measures, per stage: the batch the step saw
(samples, per-sample and padded lengths, image and supervised tokens; a forward pre-hook), the step's wall and CPU
time (from the hook to the end of the step, via metrics.jsonl's tokens/s), trainable parameters per component, and
the peak RSS of the stage (VmHWM, reset through /proc/self/clear_refs after each stage's pre-flight). ``vlkit plan``
is asked for the same stage at the batch's exact shape (``--device cpu --micro-batch B --seq-len T
--supervised-frac f``). Compared: peak RSS minus the RSS of the process before the model was built (Python, torch,
transformers: what no planner term holds) against the plan's total (weights + gradients + AdamW + activations).
The machine's fp32 matmul rate is measured in the same child at the same thread count.

    python benchmarks/bench_real_shapes.py --batch 2 --threads 2   # ~10 min on 2 busy cores; peak RSS 13.6 GB
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _real_shapes as RS  # noqa: E402
from _common import environment, table, write_result  # noqa: E402
from vlkit._proc import status_kb  # noqa: E402

NOTE = "RANDOM WEIGHTS"
MiB = 1024 * 1024


def overrides(data: dict[str, Any], batch: int, out: str, tiny_models: list[str]) -> list[str]:
    over = RS.data_overrides(data) + ["llm.dtype=float32", "train.precision=fp32", "train.device=cpu",
                                      "data.num_workers=0", f"train.output_dir={out}", "train.run_name=real_shapes"]
    for stage in ("align", "instruct"):
        over += [f"stages.{stage}.batch_size={batch}", f"stages.{stage}.grad_accum=1", f"stages.{stage}.max_steps=1",
                 f"stages.{stage}.save_every=100000"]
    return over + tiny_models


# ---- child: the two stages, measured --------------------------------------------------------------------------------
def _kb(field: str) -> int:
    kb = status_kb(field)
    return -1 if kb is None else kb


def child(over: list[str], threads: int) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(threads)
    rec: dict[str, Any] = {"stages": [], "threads": threads}
    # the runtime first (what no planner term holds): vlkit's training module, transformers' CLIP and Qwen2, peft
    import peft  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from rich.console import Console

    import vlkit.train as T
    import vlkit.train.run as T_run
    import vlkit.train.stage as T_stage
    from vlkit.model import parameter_counts

    gc.collect()
    rec["rss_before_build_kb"] = _kb("VmRSS")
    # this machine's fp32 matmul rate at this thread count (1024^2 and 2048^2), before any model exists
    rates = {}
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    rates["1024_1thread"] = 2 * 1024**3 / min(_timed(lambda: a @ b) for _ in range(5)) / 1e9
    torch.set_num_threads(threads)
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(5))
        rates[n] = 2 * n**3 / best / 1e9
    rec["matmul_gflops"] = rates
    del a, b
    gc.collect()

    # where train() looks them up: run.py builds the model, stage.py sets what trains and runs the pre-flight
    orig_build, orig_preflight, orig_set_trainable = T_run.build_model, T_stage.preflight, T_stage.set_trainable
    holder: dict[str, Any] = {}

    def build(recipe):
        t = time.time()
        model = orig_build(recipe)
        rec["build_s"] = time.time() - t

        def pre(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            mask = args[1] if len(args) > 1 else kwargs["attention_mask"]
            labels = args[2] if len(args) > 2 else kwargs.get("labels")
            if labels is None or not torch.is_grad_enabled():
                return  # generation / no-grad evaluation
            st = rec["stages"][-1]
            st["batches"].append({"B": int(ids.shape[0]), "T": int(ids.shape[1]),
                                  "lengths": [int(x) for x in mask.sum(1)],
                                  "real_tokens": int(mask.sum()),
                                  "image_tokens": int((ids == model.image_token_id).sum()),
                                  "supervised": int((labels[:, 1:] != -100).sum()),
                                  "t_start": time.time(), "cpu_start": time.process_time()})

        model.register_forward_pre_hook(pre, with_kwargs=True)
        holder["model"] = model
        return model

    def set_trainable(model, stage):
        orig_set_trainable(model, stage)
        counts = parameter_counts(model)
        holder["trainable"] = {k: v["trainable"] for k, v in counts.items()}

    def preflight(model, batch, console, tokenizer):
        out = orig_preflight(model, batch, console, tokenizer)
        if rec["stages"]:  # the previous stage ends here: its peak
            rec["stages"][-1]["rss_peak_kb"] = _kb("VmHWM")
        gc.collect()
        rec["stages"].append({"rss_after_preflight_kb": _kb("VmRSS"), "batches": [],
                              "trainable": dict(holder.get("trainable", {}))})
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return out

    T_run.build_model, T_stage.preflight, T_stage.set_trainable = build, preflight, set_trainable
    recipe = RS.load_real_recipe(over)
    console = Console(record=True, width=200)
    t0 = time.time()
    summary = T.train(recipe, console=console)
    rec["wall_s"] = time.time() - t0
    rec["stages"][-1]["rss_peak_kb"] = _kb("VmHWM")
    rec["summary"] = {k: summary.get(k) for k in ("random_weights", "num_image_tokens", "parameters", "peak_rss_mb")}
    rec["summary"]["stages"] = {s: {k: v for k, v in m.items() if k in ("trainable_params", "loss", "tokens_per_s",
                                                                          "final_loss")}
                                for s, m in summary["stages"].items()}
    run_dir = Path(recipe.train.output_dir) / "real_shapes"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rec["metrics"] = [r for r in rows if "loss" in r and "lr" in r]  # the optimizer steps
    rec["printed"] = console.export_text().splitlines()
    return rec


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- parent ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="micro-batch of both stages (grad_accum 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="toy-world configs instead of the real ones (a quick check)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.threads)))
        return

    work = Path(tempfile.mkdtemp(prefix="vlkit-real-shapes-"))
    data = RS.write_data(work / "data", n=max(args.batch, 8))
    tiny = RS.tiny_model_dirs(work / "models") if args.tiny else []
    over = overrides(data, args.batch, str(work / "runs"), tiny)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONUNBUFFERED": "1",
           "VLKIT_TOKENIZED_DIR": str(work / "tokenized")}
    print(f"[{NOTE}] running both stages of the real recipe in a child process ({args.batch} samples a step, "
          f"{args.threads} threads) ...", flush=True)
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(over), "--threads", str(args.threads)],
                         capture_output=True, text=True, env=env, cwd=RS.ROOT)
    if res.returncode != 0:
        raise SystemExit(f"child failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    rec = json.loads([line for line in res.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])

    recipe = RS.load_real_recipe(over)
    base_kb = rec["rss_before_build_kb"]
    rate = rec["matmul_gflops"]["1024"]
    results, rows = {}, []
    for name, st, m in zip(("align", "instruct"), rec["stages"], rec["metrics"]):
        b = st["batches"][0]
        facts = {"samples": b["B"], "padded_length": b["T"],
                 "supervised_fraction": b["supervised"] / (b["B"] * max(b["T"] - 1, 1))}
        sp = RS.planned(recipe, name, facts, "cpu")
        weights = sum(r.weights for r in sp.rows)
        measured = (st["rss_peak_kb"] - base_kb) * 1024
        dynamic = (st["rss_peak_kb"] - st["rss_after_preflight_kb"]) * 1024
        step_s = b["real_tokens"] / m["tokens_per_s"]
        results[name] = {
            "note": NOTE, "batch": {k: b[k] for k in ("B", "T", "lengths", "real_tokens", "image_tokens", "supervised")},
            "trainable_params": st["trainable"], "loss": m["loss"], "step_wall_s": step_s,
            "tokens_per_s": m["tokens_per_s"], "rss_before_build_mib": base_kb / 1024,
            "rss_after_preflight_mib": st["rss_after_preflight_kb"] / 1024, "rss_peak_mib": st["rss_peak_kb"] / 1024,
            "measured_mib": measured / MiB, "planned_total_mib": sp.total / MiB,
            "relative_error": (sp.total - measured) / measured,
            "measured_dynamic_mib": dynamic / MiB, "planned_dynamic_mib": (sp.total - weights) / MiB,
            "plan": RS.plan_summary(sp)}
        r = results[name]
        rows.append([f"{name} [{NOTE}]", f"{b['B']} x {b['T']}", f"{b['image_tokens']}", f"{b['supervised']}",
                     f"{sum(st['trainable'].values()):,}", f"{step_s:.1f}", f"{r['tokens_per_s']:.0f}",
                     f"{measured / MiB:,.0f}", f"{sp.total / MiB:,.0f}", f"{r['relative_error']:+.1%}",
                     f"{dynamic / MiB:,.0f} / {(sp.total - weights) / MiB:,.0f}"])
    payload = {"benchmark": "real_shapes", "note": f"{NOTE}: encoder and LLM built with random_init from the "
               "published configs", "recipe": str(RS.REAL_RECIPE.relative_to(RS.ROOT)), "overrides": RS.RANDOM + over,
               "photos": data["photos"], "environment": environment(), "threads": args.threads,
               "matmul_gflops_fp32": rec["matmul_gflops"], "build_s": rec["build_s"], "child_wall_s": rec["wall_s"],
               "image_tokens_per_image": rec["summary"]["num_image_tokens"],
               "random_weights": rec["summary"]["random_weights"], "parameters": rec["summary"]["parameters"],
               "stages": results, "printed_by_vlkit_train": rec["printed"]}
    path = write_result("real_shapes" + ("_tiny" if args.tiny else ""), payload, args.out)
    print(table(["stage", "B x T", "image tok", "supervised", "trainable", "step s", "tok/s",
                 "peak RSS - runtime MiB", "plan MiB", "plan error", "dynamic meas. / plan MiB"], rows))
    params = rec["summary"]["parameters"]
    print(f"[{NOTE}] image tokens per image {payload['image_tokens_per_image']}; parameters: "
          + ", ".join(f"{k} {v['total']:,}" for k, v in params.items() if v["total"]))
    print(f"[{NOTE}] runtime before the model (Python, torch, transformers) {base_kb / 1024:,.0f} MiB; build "
          f"{rec['build_s']:.0f} s; fp32 matmul {rate:.0f} GFLOP/s (1024^2), "
          f"{rec['matmul_gflops']['2048']:.0f} GFLOP/s (2048^2) on {args.threads} thread(s), "
          f"{rec['matmul_gflops']['1024_1thread']:.0f} GFLOP/s (1024^2) on one thread; written {path}")


if __name__ == "__main__":
    main()

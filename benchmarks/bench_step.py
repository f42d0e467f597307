"""One training step of vlkit vs transformers' LlavaForConditionalGeneration on the identical configuration.

Both models are built from the same saved weights (a random-init CLIP vision tower with the toy-clip dims and a
random-init Qwen2 with the toy-lm dims, or the toy world's own toy-clip/toy-lm with ``--weights toy``):

    vision   CLIP ViT, 64 px, patch 8 -> 64 patch tokens, hidden 128, 4 layers; features of layer -2, CLS dropped
             (vlkit: hf_clip layer=-2 + tokens=patch; HF: vision_feature_layer=-2, select_strategy="default")
    project  2-layer GELU MLP 128 -> 256 -> 256 (vlkit: projector=mlp depth 2; HF: LlavaMultiModalProjector)
    LLM      Qwen2, hidden 256, 4 layers, 4 heads, 2 kv heads, intermediate 688, vocab 1024, tied embeddings, sdpa
    trained  "align": projector only; "instruct": projector + LoRA r16/alpha32/dropout0.05 on every linear layer
             of the LLM (lm_head excluded), via peft on both sides
    step     zero_grad -> forward (loss) -> backward -> clip_grad_norm(1.0) -> AdamW step

The same batch (default 16 samples x 80..120 text tokens + 64 image tokens, right-padded, loss on ~10% of the
positions in two answer spans) goes to both. The two implementations are timed alternately in one process (the
order flips every repeat) and the HF/vlkit ratio is the median of the paired per-repeat ratios, so machine load
drifts cancel out. Each step is timed both in wall time and in process CPU time; with the default single torch
thread the CPU time is the work itself, unaffected by other processes taking the cores, and is the headline
number. Before timing, the losses of the two models are checked to agree (same weights, same math) and the
trainable parameter counts to be equal. A third row repeats "instruct" with a 32000-token vocabulary (LLaVA-1.5's
LLM), where applying the LM head only at supervised positions matters.

Also measured: matmul FLOPs per step (torch FlopCounterMode) vs this CPU's fp32 matmul rate (2048x2048), peak RSS
of each implementation (in a child process each), the data pipeline overhead of a vlkit step (PNG loading +
transform + collation through LlavaDataset + Collator, vs the step on pre-collated tensors, on the toy instruct
data) and the padding fraction with and without group_by_length on the toy instruct data.

    VLKIT_TOY_PRESET=tiny VLKIT_TOY_DIR=/tmp/vlkit-toy-tiny python benchmarks/bench_step.py

The measurements are in step_measure.py, the printed report in step_report.py; this file runs them in order.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import environment, median, set_threads, write_result  # noqa: E402
from step_measure import (CLIP_VISION, LORA, QWEN, batch_facts, child_rss, compare_setting, data_pipeline,  # noqa: E402
                          make_model_dirs, matmul_gflops, measure_rss, synthetic_batch, toy_world)
from step_report import print_report  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="align,instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--text-min", type=int, default=80)
    ap.add_argument("--text-max", type=int, default=120)
    ap.add_argument("--supervised", type=float, default=0.10, help="share of positions with a loss")
    ap.add_argument("--vocab", type=int, default=1024, help="LM vocabulary of the random-init LM")
    ap.add_argument("--big-vocab", type=int, default=32000,
                    help="also time 'instruct' with an LM of this vocabulary (LLaVA-1.5's 32000); 0 = skip")
    ap.add_argument("--weights", choices=["random", "toy"], default="random")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default). 1 by default: on a shared 2-core machine two OpenMP "
                         "threads per process stall on each other and make timings 2-3x slower and noisy")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per implementation per repeat")
    ap.add_argument("--data-batches", type=int, default=4)
    ap.add_argument("--data-repeats", type=int, default=2)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--_child"), ap.add_argument("--_setting"), ap.add_argument("--_clip"), ap.add_argument("--_lm")
    ap.add_argument("--_batch")
    return ap.parse_args()


def compare_settings(settings: list[str], clip_dir: Path, lm_dir: Path, world, tmp: Path, batch: dict[str, Any],
                     args: argparse.Namespace, matmul: list) -> tuple[list[dict[str, Any]], Any]:
    """Every setting side by side (and instruct at a big vocabulary); the instruct models for the data pipeline."""
    results, models = [], None
    for setting in settings:
        res = compare_setting(setting, clip_dir, lm_dir, batch, args, matmul, args.repeats)
        m = res.pop("_models")
        if setting == "instruct" or models is None:  # the data pipeline is measured on the instruct step
            models = m
        results.append(res)
    if args.big_vocab and args.weights == "random" and "instruct" in settings:
        _, big_lm = make_model_dirs(world, tmp / "big", "random", args.big_vocab)
        res = compare_setting("instruct", clip_dir, big_lm, batch, args, matmul, max(3, args.repeats // 2),
                              label=f"instruct, vocab {args.big_vocab}")
        res.pop("_models")
        results.append(res)
    peak_wall, peak_cpu = median([m[0] for m in matmul]), median([m[1] for m in matmul])
    for res in results:
        for v in res["impl"].values():
            v["share_of_matmul_rate_wall"] = v["gflops_per_wall_s"] / peak_wall
            v["share_of_matmul_rate_cpu"] = v["gflops_per_cpu_s"] / peak_cpu
    return results, models


def main() -> None:
    args = parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    threads = set_threads(args.threads)
    if args._child:
        print(json.dumps(child_rss(args._child, args._setting, Path(args._clip), Path(args._lm), Path(args._batch),
                                   steps=2)))
        return

    t_start = time.time()
    env = environment()
    world, preset = toy_world()
    settings = [s for s in args.settings.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="vlkit-bench-step-"))
    clip_dir, lm_dir = make_model_dirs(world, tmp, args.weights, args.vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vocab = json.loads((lm_dir / "config.json").read_text())["vocab_size"]
    n_image = (CLIP_VISION["image_size"] // CLIP_VISION["patch_size"]) ** 2
    batch = synthetic_batch(args.batch, args.text_min, args.text_max, args.supervised, image_token_id,
                            tok.pad_token_id, min(vocab, len(tok)), n_image, CLIP_VISION["image_size"])
    batch_file = tmp / "batch.pt"
    torch.save(batch, batch_file)
    facts = batch_facts(batch, image_token_id)
    print(f"toy world: {world.root} (preset {preset}); weights: {args.weights}; torch threads {threads}; "
          f"batch: {facts}", flush=True)

    matmul: list = [matmul_gflops()]
    results, models = compare_settings(settings, clip_dir, lm_dir, world, tmp, batch, args, matmul)
    pipeline = data_pipeline(world, *models, args) if models is not None else None
    del models
    rss = [] if args.no_rss else measure_rss(settings, clip_dir, lm_dir, batch_file, threads)

    payload = {"benchmark": "bench_step", "env": {**env, "torch_threads": threads},
               "toy_world": {"root": str(world.root), "preset": preset}, "weights": args.weights,
               "config": {"clip_vision": CLIP_VISION, "qwen2": {**QWEN, "vocab_size": vocab}, "lora": LORA,
                          "projector": "mlp2x_gelu"},
               "batch": facts, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "matmul_2048_fp32_gflops": {"per_wall_s": median([m[0] for m in matmul]),
                                           "per_cpu_s": median([m[1] for m in matmul]), "all": matmul},
               "settings": results, "peak_rss": rss, "data_pipeline": pipeline, "wall_s": time.time() - t_start}
    path = write_result("bench_step", payload, args.out)
    shutil.rmtree(tmp, ignore_errors=True)
    print_report(payload, args.batch)
    print(f"\nwrote {path} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()

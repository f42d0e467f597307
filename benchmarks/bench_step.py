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
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import (environment, iqr, median, peak_rss_mb, rss_mb, set_threads, table, timed, timed2,  # noqa: E402
                     write_result)  # noqa: E402

IGNORE = -100
CLIP_VISION = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4)
QWEN = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=688, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)
LORA = dict(r=16, alpha=32, dropout=0.05)
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- model files ---------------------------------------------------------------------------------------------
def toy_world():
    from vlkit.toyworld import ensure_toy_world

    world = ensure_toy_world()
    build = json.loads((world.root / "build.json").read_text())
    return world, build["config"]["preset"]


def make_model_dirs(world, out: Path, weights: str, vocab: int) -> tuple[Path, Path]:
    """(clip_dir, lm_dir): the toy world's own models, or random-init models with the same dims saved to ``out``."""
    if weights == "toy":
        return Path(world.clip_dir), Path(world.lm_dir)
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    clip_dir, lm_dir = out / "clip", out / "lm"
    CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)).save_pretrained(clip_dir)
    CLIPImageProcessor.from_pretrained(world.clip_dir).save_pretrained(clip_dir)
    tok = AutoTokenizer.from_pretrained(world.lm_dir)
    if vocab < len(tok):
        raise SystemExit(f"--vocab {vocab} is smaller than the toy tokenizer ({len(tok)} tokens)")
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **QWEN))
    lm.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    return clip_dir, lm_dir


# ---- the two implementations ----------------------------------------------------------------------------------
def stage_config(setting: str):
    from vlkit.config import LoraConfig, StageConfig

    return StageConfig(data="-", llm="lora" if setting == "instruct" else "frozen", train_projector=True, lr=1e-3,
                       lr_llm=1e-3, weight_decay=0.0, max_grad_norm=1.0,
                       lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                       target_modules="all-linear"))


def build_vlkit(clip_dir: Path, lm_dir: Path):
    from vlkit.model import VLM
    from vlkit.registry import ENCODERS, LLMS, PROJECTORS, TOKEN_STRATEGIES

    llm = LLMS.create("hf", model=str(lm_dir))
    encoder = ENCODERS.create("hf_clip", model=str(clip_dir), layer=-2)
    tokens = TOKEN_STRATEGIES.create("patch")
    projector = PROJECTORS.create("mlp", in_dim=int(encoder.embed_dim), out_dim=llm.hidden_size, depth=2)
    return VLM(encoder, tokens, projector, llm)


def prepare_vlkit(model, setting: str):
    """vlkit's own stage setup: set_trainable (peft LoRA via attach_lora) + param_groups + AdamW, as run_stage."""
    from vlkit.train import param_groups, set_trainable

    stage = stage_config(setting)
    set_trainable(model, stage)
    opt = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999))
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    return opt, params


def build_hf(clip_dir: Path, lm_dir: Path, image_token_id: int, like=None):
    """LlavaForConditionalGeneration with the same configs; weights copied from the vlkit model ``like``."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = CLIPVisionConfig.from_pretrained(clip_dir)
    tcfg = AutoConfig.from_pretrained(lm_dir)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=image_token_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
                      multimodal_projector_bias=True, tie_word_embeddings=bool(tcfg.tie_word_embeddings))
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    if like is not None:
        with torch.no_grad():
            model.model.vision_tower.load_state_dict(like.encoder.hf_model.state_dict())
            lm = like.llm.base()
            model.model.language_model.load_state_dict(lm.model.state_dict())
            model.lm_head.weight.copy_(lm.lm_head.weight)
            net = like.projector.net
            proj = model.model.multi_modal_projector
            for dst, src in ((proj.linear_1, net[0]), (proj.linear_2, net[2])):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
    model.requires_grad_(False)
    return model


def prepare_hf(model, setting: str):
    """The usual HF/peft recipe: LoRA on the language model's linear layers, projector trainable, AdamW."""
    if setting == "instruct":
        from peft import LoraConfig, get_peft_model

        target = r"model\.language_model\..*\.(" + "|".join(LLM_LINEARS) + ")"
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=target))
        llava = model.get_base_model()
    else:
        llava = model
    llava.model.multi_modal_projector.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()
    return model, opt, params


def vlkit_loss(model, b) -> torch.Tensor:
    n_total = int((b["labels"][:, 1:] != IGNORE).sum())
    out = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"],
                image_index=b.get("image_index"))
    return out.loss_sum / n_total  # token-weighted, as run_stage


def hf_loss(model, b) -> torch.Tensor:
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                 labels=b["labels"]).loss


def train_step(loss_fn, model, opt, params, b) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


# ---- the batch -----------------------------------------------------------------------------------------------
def synthetic_batch(batch: int, text_min: int, text_max: int, sup_frac: float, image_token_id: int, pad_id: int,
                    vocab: int, n_image: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    """LLaVA-like samples: 8 prompt tokens, the image's tokens, the rest text; two answer spans carry the loss."""
    from vlkit.data.collate import Collator

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    specials = {image_token_id, pad_id}
    usable = [i for i in range(4, vocab) if i not in specials]
    items = []
    for b in range(batch):
        n_text = rng.randint(text_min, text_max)
        ids = [rng.choice(usable) for _ in range(8)] + [image_token_id] * n_image + \
              [rng.choice(usable) for _ in range(n_text - 8)]
        labels = [IGNORE] * len(ids)
        n_sup = max(2, round(sup_frac * len(ids)))
        first = n_sup // 2
        mid = 8 + n_image + (n_text - 8) // 2
        for lo, n in ((mid - first, first), (len(ids) - (n_sup - first), n_sup - first)):
            labels[lo:lo + n] = ids[lo:lo + n]
        pixels = torch.randn(3, image_size, image_size, generator=gen)
        items.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "index": b, "image_key": f"img{b}"})
    return Collator(pad_id)(items)


def batch_facts(b: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    mask = b["attention_mask"].bool()
    return {"samples": int(b["input_ids"].shape[0]), "padded_length": int(b["input_ids"].shape[1]),
            "real_tokens": int(mask.sum()), "image_tokens": int((b["input_ids"] == image_token_id).sum()),
            "supervised_tokens": int((b["labels"][:, 1:] != IGNORE).sum()),
            "supervised_fraction": round(float((b["labels"] != IGNORE).sum() / mask.sum()), 4)}


# ---- measurements --------------------------------------------------------------------------------------------
def count_flops(loss_fn, model, b) -> int:
    """Matmul-class FLOPs (mm/bmm/addmm/conv/sdpa) of one forward + backward (the optimizer step is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        loss_fn(model, b).backward()
    for p in model.parameters():
        p.grad = None
    return int(fc.get_total_flops())


def matmul_gflops(n: int = 2048, reps: int = 3) -> tuple[float, float]:
    """This CPU's fp32 rate on an n x n matmul at the current thread count: (per wall second, per CPU second)."""
    a, c = torch.randn(n, n), torch.randn(n, n)
    a @ c
    ts = [timed2(lambda: a @ c) for _ in range(reps)]
    return 2 * n**3 / min(t[0] for t in ts) / 1e9, 2 * n**3 / min(t[1] for t in ts) / 1e9


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def compare_setting(setting: str, clip_dir: Path, lm_dir: Path, batch: dict[str, Any], args, matmul: list,
                    repeats: int, label: str | None = None) -> dict[str, Any]:
    label = label or setting
    torch.manual_seed(0)
    vlm = build_vlkit(clip_dir, lm_dir)
    llava = build_hf(clip_dir, lm_dir, vlm.image_token_id, like=vlm)
    # same weights + same math -> same loss (eval mode: no LoRA dropout; checked after LoRA is attached too)
    v_opt, v_params = prepare_vlkit(vlm, setting)
    h_model, h_opt, h_params = prepare_hf(llava, setting)
    vlm.eval(), h_model.eval()
    with torch.no_grad():
        lv, lh = float(vlkit_loss(vlm, batch)), float(hf_loss(h_model, batch))
    vlm.train(), h_model.train()
    if abs(lv - lh) > 1e-4 * max(1.0, abs(lv)):
        raise SystemExit(f"{label}: vlkit loss {lv:.6f} != HF Llava loss {lh:.6f}: the configurations differ")
    n_v, n_h = trainable(vlm), trainable(h_model)
    if n_v != n_h:
        raise SystemExit(f"{label}: trainable parameters differ: vlkit {n_v:,} vs HF {n_h:,}")

    impls = {"vlkit": (vlkit_loss, vlm, v_opt, v_params), "hf_llava": (hf_loss, h_model, h_opt, h_params)}
    flops = {k: count_flops(fn, m, batch) for k, (fn, m, _, _) in impls.items()}
    for name, (fn, m, opt, params) in impls.items():  # warm-up (allocator, lazy inits, peft hooks)
        for _ in range(args.warmup):
            train_step(fn, m, opt, params, batch)
    wall: dict[str, list[float]] = {k: [] for k in impls}
    cpu: dict[str, list[float]] = {k: [] for k in impls}
    rep_wall: dict[str, list[float]] = {k: [] for k in impls}
    rep_cpu: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(repeats):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        for name in order:
            fn, m, opt, params = impls[name]
            ts = [timed2(lambda: train_step(fn, m, opt, params, batch)) for _ in range(args.steps)]
            wall[name] += [t[0] for t in ts]
            cpu[name] += [t[1] for t in ts]
            rep_wall[name].append(median([t[0] for t in ts]))
            rep_cpu[name].append(median([t[1] for t in ts]))
        matmul.append(matmul_gflops())
        print(f"  {label} repeat {r + 1}/{repeats}: vlkit {rep_wall['vlkit'][-1] * 1e3:.0f} ms wall "
              f"({rep_cpu['vlkit'][-1] * 1e3:.0f} ms CPU), HF {rep_wall['hf_llava'][-1] * 1e3:.0f} ms wall "
              f"({rep_cpu['hf_llava'][-1] * 1e3:.0f} ms CPU)", flush=True)
    r_wall = [h / v for h, v in zip(rep_wall["hf_llava"], rep_wall["vlkit"])]
    r_cpu = [h / v for h, v in zip(rep_cpu["hf_llava"], rep_cpu["vlkit"])]
    out = {"setting": label, "stage": setting, "lm_dir": str(lm_dir), "loss_check": {"vlkit": lv, "hf_llava": lh},
           "trainable_params": n_v, "ratio_hf_over_vlkit_wall": median(r_wall), "ratio_wall_iqr": iqr(r_wall),
           "ratio_hf_over_vlkit_cpu": median(r_cpu), "ratio_cpu_iqr": iqr(r_cpu), "repeats": repeats, "impl": {}}
    for name in impls:
        out["impl"][name] = {"median_step_wall_s": median(wall[name]), "iqr_step_wall_s": iqr(wall[name]),
                             "median_step_cpu_s": median(cpu[name]), "iqr_step_cpu_s": iqr(cpu[name]),
                             "steps_timed": len(wall[name]), "flops_fwd_bwd": flops[name],
                             "gflops_per_wall_s": flops[name] / median(wall[name]) / 1e9,
                             "gflops_per_cpu_s": flops[name] / median(cpu[name]) / 1e9}
    out["_models"] = (vlm, v_opt, v_params)  # reused by the data-pipeline measurement (dropped before writing)
    return out


def child_rss(impl: str, setting: str, clip_dir: Path, lm_dir: Path, batch_file: Path, steps: int) -> dict[str, Any]:
    """Run in a fresh process: build one implementation, run a few steps, report RSS."""
    batch = torch.load(batch_file)
    base = rss_mb()
    torch.manual_seed(0)
    vlm = build_vlkit(clip_dir, lm_dir)
    if impl == "vlkit":
        opt, params = prepare_vlkit(vlm, setting)
        fn, model = vlkit_loss, vlm
    else:
        image_token_id = vlm.image_token_id
        del vlm
        model, opt, params = prepare_hf(build_hf(clip_dir, lm_dir, image_token_id), setting)
        fn = hf_loss
    built = rss_mb()
    for _ in range(steps):
        train_step(fn, model, opt, params, batch)
    return {"impl": impl, "setting": setting, "rss_after_imports_mb": base, "rss_after_build_mb": built,
            "peak_rss_mb": peak_rss_mb(), "step_peak_over_build_mb": peak_rss_mb() - built}


def measure_rss(settings: list[str], clip_dir: Path, lm_dir: Path, batch_file: Path, threads: int
                ) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        for impl in ("vlkit", "hf_llava"):
            cmd = [sys.executable, __file__, "--_child", impl, "--_setting", setting, "--_clip", str(clip_dir),
                   "--_lm", str(lm_dir), "--_batch", str(batch_file), "--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if res.returncode != 0:
                raise SystemExit(f"RSS child {impl}/{setting} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  peak RSS {setting}/{impl}: {rows[-1]['peak_rss_mb']:.0f} MiB", flush=True)
    return rows


def data_pipeline(world, vlm, opt, params, args) -> dict[str, Any]:
    """vlkit step incl. PNG load + transform + collation (LlavaDataset + Collator) vs on pre-collated tensors."""
    from vlkit.data.collate import Collator, epoch_batches, padding_fraction
    from vlkit.data.llava import ImageTransform, LlavaDataset, check_records, load_image, load_records

    recs = load_records(world.data_dir / "instruct_train.json")
    n_img = getattr(vlm, "sequence_image_tokens", vlm.num_image_tokens)
    t_check, (examples, problems) = timed(lambda: check_records(
        recs, world.data_dir / "images", vlm.tokenizer, vlm.image_token_id, n_img, 160))
    transform = ImageTransform(vlm.encoder.image_size, vlm.encoder.mean, vlm.encoder.std)
    ds = LlavaDataset(examples, world.data_dir / "images", transform)
    collator = Collator(vlm.tokenizer.pad_token_id)
    lengths, has_image = [e.length for e in examples], [e.image is not None for e in examples]

    pad = {}
    for bs in sorted({args.batch, 32}):
        for grouped in (True, False):
            fr = [padding_fraction(lengths, epoch_batches(lengths, has_image, bs, 0, ep, grouped)) for ep in range(5)]
            pad[f"batch{bs}_{'grouped' if grouped else 'random'}"] = sum(fr) / len(fr)

    batches = epoch_batches(lengths, has_image, args.batch, 0, 0, True)[: args.data_batches]
    load = lambda idx: collator([ds[i] for i in idx])  # noqa: E731
    pre = [load(idx) for idx in batches]
    step = lambda b: train_step(vlkit_loss, vlm, opt, params, b)  # noqa: E731
    step(pre[0])
    t = {k: [] for k in ("load", "pre", "full")}
    for r in range(args.data_repeats):
        for j, idx in enumerate(batches):
            pair = [("full", lambda: step(load(idx))), ("pre", lambda: step(pre[j]))]
            for name, fn in (pair if (r + j) % 2 == 0 else pair[::-1]):
                t[name].append(timed2(fn))
            t["load"].append(timed2(lambda: load(idx)))
    w = {k: median([x[0] for x in v]) for k, v in t.items()}
    c = {k: median([x[1] for x in v]) for k, v in t.items()}
    one_image = median([timed(lambda: transform(load_image(world.data_dir / "images" / examples[k].image)))[0]
                        for k in range(min(64, len(examples)))])
    return {"data": str(world.data_dir / "instruct_train.json"), "samples": len(examples), "batch_size": args.batch,
            "median_length": median(lengths), "tokenize_and_check_s": t_check,
            "median_one_image_load_transform_s": one_image,
            "wall": {"load_collate_s": w["load"], "step_precollated_s": w["pre"], "step_full_s": w["full"]},
            "cpu": {"load_collate_s": c["load"], "step_precollated_s": c["pre"], "step_full_s": c["full"]},
            "overhead_load_over_step_cpu": c["load"] / c["pre"], "overhead_load_over_step_wall": w["load"] / w["pre"],
            "overhead_full_vs_precollated_cpu": c["full"] / c["pre"] - 1,
            "overhead_full_vs_precollated_wall": w["full"] / w["pre"] - 1,
            "padding_fraction": pad}


def main() -> None:
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
    args = ap.parse_args()

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

    pipeline = None
    if models is not None:
        vlm, opt, params = models
        pipeline = data_pipeline(world, vlm, opt, params, args)
        del vlm, opt, params, models
    rss = [] if args.no_rss else measure_rss(settings, clip_dir, lm_dir, batch_file, threads)

    payload = {"benchmark": "bench_step", "env": {**env, "torch_threads": threads},
               "toy_world": {"root": str(world.root), "preset": preset}, "weights": args.weights,
               "config": {"clip_vision": CLIP_VISION, "qwen2": {**QWEN, "vocab_size": vocab}, "lora": LORA,
                          "projector": "mlp2x_gelu"},
               "batch": facts, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "matmul_2048_fp32_gflops": {"per_wall_s": peak_wall, "per_cpu_s": peak_cpu, "all": matmul},
               "settings": results, "peak_rss": rss, "data_pipeline": pipeline, "wall_s": time.time() - t_start}
    path = write_result("bench_step", payload, args.out)
    shutil.rmtree(tmp, ignore_errors=True)

    rss_of = {(r["impl"], r["setting"]): (r["peak_rss_mb"], r["step_peak_over_build_mb"]) for r in rss}
    rows = []
    for res in results:
        v, h = res["impl"]["vlkit"], res["impl"]["hf_llava"]
        key_v, key_h = ("vlkit", res["setting"]), ("hf_llava", res["setting"])
        mem = (f"{rss_of[key_v][0]:.0f} / {rss_of[key_h][0]:.0f} (+{rss_of[key_v][1]:.0f} / +{rss_of[key_h][1]:.0f})"
               if key_v in rss_of else "-")
        rows.append([res["setting"], f"{res['trainable_params']:,}",
                     f"{v['median_step_cpu_s'] * 1e3:.0f} / {h['median_step_cpu_s'] * 1e3:.0f}",
                     f"**{res['ratio_hf_over_vlkit_cpu']:.2f}x**",
                     f"{v['median_step_wall_s'] * 1e3:.0f} / {h['median_step_wall_s'] * 1e3:.0f}",
                     f"{res['ratio_hf_over_vlkit_wall']:.2f}x",
                     f"{v['flops_fwd_bwd'] / 1e9:.1f} / {h['flops_fwd_bwd'] / 1e9:.1f}",
                     f"{v['gflops_per_cpu_s']:.0f} ({v['share_of_matmul_rate_cpu']:.0%}) / "
                     f"{h['gflops_per_cpu_s']:.0f} ({h['share_of_matmul_rate_cpu']:.0%})", mem])
    print()
    print(f"batch {facts['samples']} x {facts['padded_length']} padded ({facts['real_tokens']} real tokens, "
          f"{facts['image_tokens']} image tokens, {facts['supervised_tokens']} supervised); torch threads {threads}; "
          f"fp32 matmul 2048^2: {peak_cpu:.0f} GFLOP/s per CPU-second ({peak_wall:.0f} per wall-second)")
    print(table(["setting", "trainable", "CPU ms/step vlkit / HF", "HF/vlkit (CPU)", "wall ms/step vlkit / HF",
                 "HF/vlkit (wall)", "GFLOP/step vlkit / HF", "GFLOP/s vlkit / HF (% of matmul)",
                 "peak RSS MiB vlkit / HF (+ over built model)"], rows))
    if pipeline:
        p = pipeline
        print()
        print(table(["data pipeline (toy instruct data, vlkit instruct step)", "CPU", "wall"], [
            ["load PNGs + transform + collate, per batch", f"{p['cpu']['load_collate_s'] * 1e3:.1f} ms",
             f"{p['wall']['load_collate_s'] * 1e3:.1f} ms"],
            ["step on pre-collated tensors", f"{p['cpu']['step_precollated_s'] * 1e3:.0f} ms",
             f"{p['wall']['step_precollated_s'] * 1e3:.0f} ms"],
            ["step including loading", f"{p['cpu']['step_full_s'] * 1e3:.0f} ms",
             f"{p['wall']['step_full_s'] * 1e3:.0f} ms"],
            ["overhead = load / step", f"**{p['overhead_load_over_step_cpu']:.1%}**",
             f"{p['overhead_load_over_step_wall']:.1%}"],
            ["overhead = full / pre-collated - 1 (noisier)", f"{p['overhead_full_vs_precollated_cpu']:+.1%}",
             f"{p['overhead_full_vs_precollated_wall']:+.1%}"],
        ]))
        print()
        print(table(["padding fraction (toy instruct, mean of 5 epochs)", "group_by_length", "random batches"],
                    [[f"batch {bs}", f"{p['padding_fraction'][f'batch{bs}_grouped']:.1%}",
                      f"{p['padding_fraction'][f'batch{bs}_random']:.1%}"] for bs in sorted({args.batch, 32})]))
    print(f"\nwrote {path} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()

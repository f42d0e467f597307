"""bench_step's measurements: the two models built from the same weights, the shared batch, one training step of
each timed alternately, FLOPs, peak RSS in child processes, and the data pipeline. bench_step.py runs them and
step_report.py prints what they found."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import iqr, median, peak_rss_mb, rss_mb, timed, timed2  # noqa: E402


BENCH_STEP = Path(__file__).with_name("bench_step.py")  # the RSS children run its --_child mode
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
    return world, build["preset"]  # build.json holds the preset at its top level


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
            cmd = [sys.executable, str(BENCH_STEP), "--_child", impl, "--_setting", setting, "--_clip", str(clip_dir),
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

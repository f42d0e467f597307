"""The real recipe's training step on one GPU, in bf16, at its real shapes with random weights; one JSON out.

Run by benchmarks/gpu_check.sh on a lent GPU machine (under 5 minutes). Phases, each recorded in the JSON whatever
happens to the others (an error is stored as its string, with the traceback's last lines):

    environment   torch / transformers / GPU name / attention implementation (flash_attention_2 when the
                  flash_attn package imports, else sdpa)
    matmul_peak   a large bf16 matmul's rate, against the datasheet's dense bf16 peak (H200 SXM: 989 TFLOP/s)
    data          LLaVA records over the sample photos (benchmarks/_real_shapes.py) through vlkit's data path
    build         the real recipe (CLIP ViT-L/14-336, layer -2, 576 patch tokens; Qwen2.5-1.5B) with
                  ``random_init`` (RANDOM WEIGHTS), LLM in bf16 as the recipe says, encoder and projector fp32,
                  bf16 autocast as ``vlkit train`` uses on a GPU
    vlkit_<stage> align (projector only) and instruct (projector + LoRA r128 all-linear, gradient checkpointing),
                  at the recipe's micro-batch: step 1 counts FLOPs (torch FlopCounterMode, without recompute),
                  then steady-state steps are timed (CUDA-synchronised), tokens/s, model FLOPs utilisation against
                  the measured and the datasheet peak, torch.cuda.max_memory_allocated over the steady steps
                  against ``vlkit plan --gpus 1`` at the batch's exact shape
    hf_<stage>    the same steps with transformers' LlavaForConditionalGeneration built on the identical configs and
                  the vlkit model's initial weights (peft LoRA on the same linears); its first align loss is checked
                  against vlkit's; step-time ratio vlkit / HF

    python benchmarks/gpu_check.py --out gpu_check.json                  # on the GPU
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/x.json # the same code path in seconds on a CPU
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import _real_shapes as RS  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.5  # NVIDIA H200 SXM datasheet, bf16 tensor core, dense (1979 with sparsity)
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOTE = "RANDOM WEIGHTS (random_init): shapes and speed only"


class Checker:
    """Runs phases, records each one's result or error, rewrites the JSON after every phase, keeps to a budget."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.t0, self.budget = out, time.time(), budget_s
        self.result: dict[str, Any] = {"note": NOTE, "phases": {}, "errors": {}}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def phase(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        print(f"+ [{time.time() - self.t0:6.1f} s] phase {name} ({self.left():.0f} s left)", flush=True)
        if self.left() < need_s:
            self.result["phases"][name] = {"skipped": f"time guard: {self.left():.0f} s left, phase needs ~{need_s:.0f} s"}
            print(f"  skipped: {self.result['phases'][name]['skipped']}", flush=True)
            self.write()
            return None
        t = time.time()
        try:
            out = fn()
            self.result["phases"][name] = {"wall_s": round(time.time() - t, 2),
                                           **(out if isinstance(out, dict) else {})}
            print(f"  {name} ok in {time.time() - t:.1f} s: {_short(out)}", flush=True)
            return out
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON; the next phases still run
            tb = traceback.format_exc()
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.result["phases"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": tb[-3000:],
                                           "wall_s": round(time.time() - t, 2)}
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}\n{tb[-1500:]}", flush=True)
            return None
        finally:
            self.result["elapsed_s"] = round(time.time() - self.t0, 1)
            self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        tmp.replace(self.out)


def _short(out: Any) -> str:
    if not isinstance(out, dict):
        return str(out)[:200]
    keep = {k: v for k, v in out.items() if not isinstance(v, (dict, list))}
    return json.dumps(keep, default=str)[:400]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- phases -------------------------------------------------------------------------------------------------------
def environment(device: torch.device, attn: str) -> dict[str, Any]:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "attn_implementation": attn, "cpu_count": os.cpu_count(),
           "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=p.total_memory / 1e9, cuda=torch.version.cuda,
                   bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError as exc:
        env["peft"] = f"missing: {exc}"
    return env


def matmul_peak(device: torch.device, n: int, reps: int) -> dict[str, Any]:
    """bf16 (GPU) / fp32 (CPU) n x n matmul rate: the best of ``reps`` timed runs after warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / 10)
    tflops = 2 * n**3 / min(times) / 1e12
    out = {"n": n, "dtype": str(dtype), "measured_tflops": tflops, "best_ms": min(times) * 1e3}
    if device.type == "cuda":
        out.update(datasheet_bf16_dense_tflops=H200_BF16_DENSE_TFLOPS,
                   measured_over_datasheet=tflops / H200_BF16_DENSE_TFLOPS)
    return out


def count_flops(step_fn: Callable[[], float]) -> tuple[int, float]:
    """Matmul-class FLOPs (mm/bmm/addmm/conv/sdpa) of one training step and its loss."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        loss = step_fn()
    return int(fc.get_total_flops()), loss


def measure_steps(name: str, step_fn: Callable[[], float], device: torch.device, steps: int, batch: dict[str, Any],
                  peak_tflops: float | None, set_gc: Callable[[bool], None] | None) -> dict[str, Any]:
    """Step 1 counts FLOPs (gradient checkpointing off, so recompute is not counted as model FLOPs), step 2 warms
    up with the recipe's setting, then ``steps`` steady steps are timed and their peak memory read."""
    if set_gc is not None:
        set_gc(False)
    flops, loss1 = count_flops(step_fn)
    if set_gc is not None:
        set_gc(True)
    step_fn()
    sync(device)
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    times, losses = [], []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        losses.append(step_fn())
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    real = int(batch["attention_mask"].sum())
    out = {"impl": name, "step_s_median": med, "step_s_all": times, "loss_step1": loss1, "losses": losses,
           "model_flops_per_step": flops, "achieved_tflops": flops / med / 1e12, "tokens_per_s": real / med,
           "real_tokens_per_step": real}
    if peak_tflops:
        out["mfu_vs_measured_peak"] = flops / med / 1e12 / peak_tflops
    if device.type == "cuda":
        out["mfu_vs_datasheet"] = flops / med / 1e12 / H200_BF16_DENSE_TFLOPS
        out["memory_allocated_at_start_gb"] = start_alloc / 1e9
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["max_memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return out


# ---- vlkit ------------------------------------------------------------------------------------------------------
def build_vlkit(recipe, device: torch.device) -> Any:
    from vlkit.model import build_model

    torch.manual_seed(0)
    if device.type == "cuda":
        try:
            with torch.device(device):  # random init on the GPU: seconds instead of a minute of CPU init
                return build_model(recipe).to(device)
        except Exception as exc:  # noqa: BLE001 - said on stdout; built on the CPU instead (the same model)
            print(f"  building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU", flush=True)
            free(device)
            torch.manual_seed(0)
    return build_model(recipe).to(device)


def vlkit_stepper(model, recipe, stage_name: str, batch: dict[str, Any], amp: torch.dtype | None):
    """vlkit's own stage setup (set_trainable: LoRA via attach_lora, gradient checkpointing; param_groups; AdamW) and
    the step run_stage takes: token-weighted loss under autocast, backward, clip, AdamW."""
    from vlkit.train import param_groups, set_trainable

    stage = recipe.stages[stage_name]
    set_trainable(model, stage)
    opt = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999))
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    n_sup = int((batch["labels"][:, 1:] != RS.IGNORE).sum())
    dev = batch["input_ids"].device

    def loss() -> torch.Tensor:
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                    pixel_values=batch["pixel_values"], image_index=batch["image_index"])
        return out.loss_sum / n_sup

    step = _training_step(loss, opt, params, stage.max_grad_norm, dev.type, amp)
    set_gc = _checkpointing_switch(model.llm.base(), stage.gradient_checkpointing)

    trainable = {part: sum(p.numel() for p in getattr(model, part).parameters() if p.requires_grad)
                 for part in ("encoder", "tokens", "projector", "fusion", "llm")}
    return step, set_gc, opt, trainable


# ---- transformers' Llava ----------------------------------------------------------------------------------------
def snapshot(model) -> dict[str, dict[str, torch.Tensor]]:
    """The vlkit model's initial weights (before any stage), for the HF model (kept on the CPU)."""
    lm = model.llm.base()
    return {"vision": {k: v.detach().cpu().clone() for k, v in model.encoder.hf_model.state_dict().items()},
            "lm": {k: v.detach().cpu().clone() for k, v in lm.model.state_dict().items()},
            "lm_head": {"weight": lm.lm_head.weight.detach().cpu().clone()},
            "projector": {k: v.detach().cpu().clone() for k, v in model.projector.state_dict().items()}}


def build_hf(model_facts: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]], device: torch.device,
             attn: str) -> Any:
    """LlavaForConditionalGeneration on the identical configs (vision_feature_layer -2, CLS dropped, 2-layer GELU
    projector), the LLM in its dtype and the vision tower and projector in fp32 as vlkit keeps them."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vcfg, tcfg = model_facts["vision_config"], model_facts["text_config"]
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=model_facts["image_token_id"],
                      vision_feature_select_strategy="default", vision_feature_layer=model_facts["layer"],
                      projector_hidden_act="gelu", multimodal_projector_bias=True,
                      tie_word_embeddings=bool(tcfg.tie_word_embeddings))
    with torch.device(device):
        hf = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    with torch.no_grad():
        hf.model.vision_tower.load_state_dict(weights["vision"])
        hf.model.language_model.load_state_dict(weights["lm"])
        hf.lm_head.weight.copy_(weights["lm_head"]["weight"])
        proj = hf.model.multi_modal_projector
        p = weights["projector"]
        for dst, i in ((proj.linear_1, 0), (proj.linear_2, 2)):
            dst.weight.copy_(p[f"net.{i}.weight"])
            dst.bias.copy_(p[f"net.{i}.bias"])
    hf.model.language_model.to(model_facts["llm_dtype"])
    hf.lm_head.to(model_facts["llm_dtype"])
    hf.requires_grad_(False)
    return hf


def hf_stepper(hf, recipe, stage_name: str, batch: dict[str, Any], amp: torch.dtype | None):
    """The usual HF/peft recipe: projector trainable, LoRA (the stage's r/alpha/dropout) on the language model's
    linears, gradient checkpointing on the language model when the stage has it, AdamW."""
    stage = recipe.stages[stage_name]
    model = hf
    if stage.llm == "lora":
        from peft import LoraConfig, get_peft_model

        target = r"model\.language_model\..*\.(" + "|".join(LLM_LINEARS) + ")"
        model = get_peft_model(hf, LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha,
                                              lora_dropout=stage.lora.dropout, target_modules=target))
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    llava.model.multi_modal_projector.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()
    lm = llava.model.language_model

    def loss() -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    step = _training_step(loss, opt, params, stage.max_grad_norm, batch["input_ids"].device.type, amp)
    set_gc = _checkpointing_switch(lm, stage.gradient_checkpointing)

    return step, set_gc, opt, model, sum(p.numel() for p in params)


def _training_step(loss_fn: Callable[[], "torch.Tensor"], opt, params, max_grad_norm, device_type: str, amp):
    """One optimiser step of ``loss_fn`` under autocast, with the recipe's gradient clipping (vlkit's and HF Llava's
    steps differ only in the loss they compute); returns a function doing it that gives the loss."""
    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
            loss = loss_fn()
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        return float(loss.detach())
    return step


def _checkpointing_switch(lm, enabled: bool) -> Callable[[bool], None]:
    """Turns gradient checkpointing of ``lm`` on or off (a no-op when the stage does not use it)."""
    def set_gc(on: bool) -> None:
        if not enabled:
            return
        if on:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()
    return set_gc


def _flash_attn_imports() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or built for another torch: SDPA then
        return False
    return True


# ---- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy-world configs instead of the real ones (CPU test)")
    ap.add_argument("--steps", type=int, default=5, help="timed steady-state steps per stage and implementation")
    ap.add_argument("--align-batch", type=int, default=None, help="default: the recipe's micro-batch (32)")
    ap.add_argument("--instruct-batch", type=int, default=None, help="default: the recipe's micro-batch (16)")
    ap.add_argument("--budget", type=float, default=260.0, help="seconds; later phases are skipped past it")
    ap.add_argument("--matmul-n", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    ck = Checker(args.out, args.budget)
    attn = "flash_attention_2" if device.type == "cuda" and _flash_attn_imports() else "sdpa"
    amp = torch.bfloat16 if device.type == "cuda" else None
    llm_dtype = "bfloat16" if device.type == "cuda" else "float32"
    ck.result["args"] = {k: str(v) for k, v in vars(args).items()}
    ck.phase("environment", lambda: environment(device, attn))
    mm = ck.phase("matmul_peak", lambda: matmul_peak(device, args.matmul_n or (8192 if device.type == "cuda" else 512),
                                                     reps=5))
    peak = mm["measured_tflops"] if mm else None
    work = Path(tempfile.mkdtemp(prefix="vlkit-gpu-check-"))
    state: dict[str, Any] = {}

    def data_phase() -> dict[str, Any]:
        batches = {"align": args.align_batch, "instruct": args.instruct_batch}
        data = RS.write_data(work / "data", n=max(64, *(b or 0 for b in batches.values())))
        over = RS.data_overrides(data) + [f"llm.dtype={llm_dtype}", f"llm.attn_implementation={attn}",
                                          "train.precision=auto", f"train.device={args.device}"]
        if args.tiny:
            over += RS.tiny_model_dirs(work / "models")
        recipe = RS.load_real_recipe(over)
        state.update(recipe=recipe, overrides=over)
        return {"photos": data["photos"], "overrides": RS.RANDOM + over}

    ck.phase("data", data_phase)

    def build_phase() -> dict[str, Any]:
        from vlkit.model import parameter_counts
        from vlkit.random_init import random_weight_parts

        t = time.time()
        model = build_vlkit(state["recipe"], device)
        sync(device)
        state["model"] = model
        state["weights"] = snapshot(model) if not args.no_hf else None
        enc = model.encoder
        state["facts"] = {"vision_config": enc.hf_model.config, "text_config": model.llm.base().config,
                          "image_token_id": model.image_token_id, "layer": int(state["recipe"].encoder.params()["layer"]),
                          "llm_dtype": next(model.llm.parameters()).dtype}
        return {"build_s": time.time() - t, "random_weights": random_weight_parts(model),
                "image_tokens_per_image": model.num_image_tokens, "encoder_grid": list(enc.grid),
                "parameters": parameter_counts(model),
                "llm_dtype": str(state["facts"]["llm_dtype"]), "encoder_dtype": str(next(enc.parameters()).dtype),
                "memory_allocated_gb": torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None}

    if "recipe" in state:
        ck.phase("build", build_phase, need_s=30)

    results: dict[str, dict[str, Any]] = {}
    for stage in ("align", "instruct"):
        if "model" not in state:
            break

        def vlkit_phase(stage: str = stage) -> dict[str, Any]:
            recipe, model = state["recipe"], state["model"]
            st = recipe.stages[stage]
            micro = (args.align_batch if stage == "align" else args.instruct_batch) or st.batch_size // st.grad_accum
            batch = RS.make_batch(model, recipe, stage, micro)
            facts = RS.batch_facts(batch, model.image_token_id)
            batch = RS.to_device(batch, device)
            state[f"batch_{stage}"] = batch
            step, set_gc, opt, trainable = vlkit_stepper(model, recipe, stage, batch, amp)
            out = measure_steps("vlkit", step, device, args.steps, batch, peak, set_gc)
            del opt, step
            sp = RS.planned(recipe, stage, facts, "cuda" if device.type == "cuda" else "cpu")
            sp_default = RS.plan_summary(RS.planned(recipe, stage, {**facts, "padded_length": recipe.data.max_length,
                                                                    "supervised_fraction": 0.3},
                                                    "cuda" if device.type == "cuda" else "cpu"))
            out.update(batch=facts, trainable_params=trainable, gradient_checkpointing=st.gradient_checkpointing,
                       plan_at_batch_shape=RS.plan_summary(sp), plan_at_recipe_defaults=sp_default)
            if device.type == "cuda":
                planned_gb = sp.total / 1e9
                out["planned_total_gb"] = planned_gb
                out["max_allocated_over_planned"] = out["max_memory_allocated_gb"] / planned_gb
                out["max_reserved_over_planned"] = out["max_memory_reserved_gb"] / planned_gb
            results[f"vlkit_{stage}"] = out
            free(device)
            return out

        ck.phase(f"vlkit_{stage}", vlkit_phase, need_s=25)

    if not args.no_hf and state.get("weights") is not None:
        state.pop("model", None)  # vlkit's model goes: HF's memory is measured alone
        free(device)

        def hf_build_phase() -> dict[str, Any]:
            t = time.time()
            state["hf"] = build_hf(state["facts"], state["weights"], device, attn)
            sync(device)
            return {"build_s": time.time() - t,
                    "memory_allocated_gb": torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None}

        ck.phase("hf_build", hf_build_phase, need_s=40)
        for stage in ("align", "instruct"):
            if "hf" not in state or f"batch_{stage}" not in state:
                continue

            def hf_phase(stage: str = stage) -> dict[str, Any]:
                batch = state[f"batch_{stage}"]
                step, set_gc, opt, model, trainable = hf_stepper(state["hf"], state["recipe"], stage, batch, amp)
                state["hf"] = model  # LoRA stays attached after instruct (last stage)
                out = measure_steps("hf_llava", step, device, args.steps, batch, peak, set_gc)
                out["trainable_params"] = trainable
                mine = results.get(f"vlkit_{stage}")
                if mine:
                    out["step_time_ratio_vlkit_over_hf"] = mine["step_s_median"] / out["step_s_median"]
                    out["vlkit_trainable_params"] = sum(mine["trainable_params"].values())
                    if stage == "align":  # same weights, same batch: the first losses agree
                        out["loss_step1_vlkit"] = mine["loss_step1"]
                        out["loss_step1_rel_diff"] = abs(out["loss_step1"] - mine["loss_step1"]) / abs(mine["loss_step1"])
                del opt, step
                results[f"hf_{stage}"] = out
                free(device)
                return out

            ck.phase(f"hf_{stage}", hf_phase, need_s=30)

    summary = {}
    for stage in ("align", "instruct"):
        v, h = results.get(f"vlkit_{stage}"), results.get(f"hf_{stage}")
        if v:
            summary[stage] = {k: v.get(k) for k in ("step_s_median", "tokens_per_s", "achieved_tflops",
                                                     "mfu_vs_measured_peak", "mfu_vs_datasheet",
                                                     "max_memory_allocated_gb", "planned_total_gb",
                                                     "max_allocated_over_planned")}
            summary[stage]["batch"] = {k: v["batch"][k] for k in ("samples", "padded_length", "image_tokens",
                                                                  "supervised_tokens")}
        if v and h:
            summary[stage]["step_time_ratio_vlkit_over_hf"] = h.get("step_time_ratio_vlkit_over_hf")
            summary[stage]["hf_max_memory_allocated_gb"] = h.get("max_memory_allocated_gb")
    ck.result["summary"] = summary
    ck.result["elapsed_s"] = round(time.time() - ck.t0, 1)
    ck.write()
    print(f"+ done in {ck.result['elapsed_s']} s; errors: {list(ck.result['errors']) or 'none'}; {NOTE}", flush=True)
    print(json.dumps({"summary": summary, "errors": ck.result["errors"]}, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()

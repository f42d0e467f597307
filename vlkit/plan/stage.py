"""The plan: per-GPU memory of each stage (rows of weights, gradients, optimizer state and activations per
component, the peak phase, suggestions when it does not fit), from the model shapes and the memory terms."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlkit.config import Recipe, StageConfig
from vlkit.plan.configs import GB
from vlkit.plan.shapes import EncoderSpec, LLMSpec, VisionSpec, describe_encoder, describe_llm, describe_vision
from vlkit.plan.terms import _enc_block_bytes, _lora_linears, compute_bytes, llm_layer_terms
from vlkit.registry import suggest

# ---- the plan ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    component: str
    params: int = 0
    trainable: int = 0
    weights: float = 0.0  # bytes per GPU
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class StagePlan:
    stage: str
    micro_batch: int  # samples per GPU per forward/backward
    global_micro_batch: int
    seq_len: int
    image_tokens: int
    supervised_tokens: int
    gpus: int
    zero: int
    compute_bytes: int
    llm_mode: str
    gradient_checkpointing: bool
    rows: list[Row]
    peak_phase: str
    activation_terms: dict[str, float]
    gpu_memory_gb: float
    total: float = 0.0
    notes: list[str] = field(default_factory=list)
    suggestions: list[tuple[str, float]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GB

    def verdict(self) -> str:
        used, cap = self.total / GB, self.gpu_memory_gb
        if self.fits:
            return f"fits in {cap:g} GB ({used:.1f} GB per GPU, {cap - used:.1f} GB headroom)"
        tries = "; ".join(f"{what} -> {gb / GB:.1f} GB" for what, gb in self.suggestions) or \
            "gradient_checkpointing / zero 3 / smaller batch"
        return f"does not fit: {used - cap:.1f} GB over {cap:g} GB ({used:.1f} GB per GPU); try {tries}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "total": r.total} for r in self.rows]
        d["fits"] = self.fits
        d["verdict"] = self.verdict()
        return d


@dataclass
class Plan:
    recipe: str
    llm: LLMSpec
    encoder: EncoderSpec
    vision: VisionSpec
    stages: list[StagePlan]
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "device": self.device, "llm": asdict(self.llm),
                "encoder": asdict(self.encoder), "vision": asdict(self.vision),
                "stages": [s.to_dict() for s in self.stages]}


def recipe_zero(recipe: Recipe) -> int:
    """The ZeRO stage the recipe's launch settings imply: ``train.deepspeed`` (dict or JSON path) zero stage,
    ``train.distributed: fsdp`` as 3 (full sharding), else 0."""
    dist = getattr(recipe.train, "distributed", "auto")
    ds = getattr(recipe.train, "deepspeed", None)
    if dist == "fsdp":
        return 3
    if isinstance(ds, str):
        try:
            ds = json.loads(Path(ds).read_text())
        except (OSError, ValueError):
            return 0
    if isinstance(ds, dict) and dist in ("auto", "deepspeed"):
        zo = ds.get("zero_optimization")
        stage = ds.get("zero_stage", zo.get("stage") if isinstance(zo, dict) else None)
        return int(stage) if stage in (0, 1, 2, 3) else 0
    return 0


def plan_stage(recipe: Recipe, stage_name: str, llm: LLMSpec, enc: EncoderSpec, vision: VisionSpec, *,
               gpus: int = 1, zero: int | None = None, gpu_memory_gb: float = 80.0, seq_len: int | None = None,
               supervised_frac: float = 0.3, micro_batch: int | None = None, device: str = "cuda",
               overhead_gb: float | None = None, padding_mask: bool = True, images_per_sample: float = 1.0,
               gradient_checkpointing: bool | None = None, _suggest: bool = True) -> StagePlan:
    """One stage's per-GPU memory: the batch a GPU holds -> parameter rows (weights, gradients, AdamW state under
    the ZeRO stage) -> activation terms -> the peak phase and where its bytes sit -> gathered params and runtime."""
    if zero is None:
        zero = recipe_zero(recipe)
    _check_args(recipe, stage_name, zero, gpus, supervised_frac)
    shape = _shape(recipe, stage_name, vision, gpus, seq_len, supervised_frac, micro_batch, device,
                   images_per_sample, gradient_checkpointing)
    notes = _shape_notes(recipe, shape, seq_len, images_per_sample)
    tr = _trainable(recipe, shape.st, llm, enc, vision)
    rows = _param_rows(recipe, shape.st, llm, enc, vision, tr, zero, gpus, supervised_frac, notes)
    act = _activation_terms(shape, llm, enc, vision, tr, padding_mask, device)
    peak_phase, act_terms = _place_peak(rows, act, shape, tr, zero, gpus, notes)
    if overhead_gb is None:
        overhead_gb = 1.0 if device == "cuda" else 0.0
    all_rows = rows.all + _extra_rows(llm, enc, zero, gpus, overhead_gb)
    sp = StagePlan(stage=stage_name, micro_batch=shape.B, global_micro_batch=shape.global_micro, seq_len=shape.T,
                   image_tokens=shape.M, supervised_tokens=shape.S, gpus=gpus,
                   zero=zero, compute_bytes=shape.a, llm_mode=shape.st.llm, gradient_checkpointing=shape.gc,
                   rows=all_rows, peak_phase=peak_phase, activation_terms=act_terms, gpu_memory_gb=gpu_memory_gb,
                   notes=notes)
    sp.total = sum(r.total for r in all_rows)
    if _suggest and not sp.fits:
        kw = dict(gpus=gpus, zero=zero, gpu_memory_gb=gpu_memory_gb, seq_len=seq_len, supervised_frac=supervised_frac,
                  micro_batch=micro_batch, device=device, overhead_gb=overhead_gb, padding_mask=padding_mask,
                  images_per_sample=images_per_sample, gradient_checkpointing=shape.gc, _suggest=False)
        sp.suggestions = _suggestions(recipe, stage_name, llm, enc, vision, shape, kw)
    return sp


@dataclass
class _Shape:
    """What one GPU holds in a stage's forward/backward."""

    st: StageConfig
    gc: bool  # gradient checkpointing
    global_micro: int  # vlkit's micro-batch (batch_size / grad_accum), over all GPUs
    B: int  # samples per GPU
    T: int  # tokens per sample
    a: int  # bytes per element of matmul activations
    M: int  # image tokens per image
    n_img: float  # images per GPU micro-batch
    S: int  # supervised tokens per GPU micro-batch


@dataclass
class _Trainable:
    """Trainable parameters per component (and the encoder blocks that train)."""

    enc: int
    enc_blocks: int
    proj: int
    llm: int
    lora: int

    @property
    def total(self) -> int:
        return self.enc + self.proj + self.llm + self.lora


@dataclass
class _Rows:
    enc: Row
    proj: Row
    llm: Row
    head: Row
    all: list[Row]  # the above, the LoRA row when there is one, in the printed order


def _check_args(recipe: Recipe, stage_name: str, zero: int, gpus: int, supervised_frac: float) -> None:
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < supervised_frac <= 1:
        raise ValueError(f"--supervised-frac must be in (0, 1], got {supervised_frac}")
    if stage_name not in recipe.stages:
        raise ValueError(f"stage '{stage_name}' is not defined.{suggest(stage_name, recipe.stages)} "
                         f"Defined: {', '.join(recipe.stages)}")


def _shape(recipe: Recipe, stage_name: str, vision: VisionSpec, gpus: int, seq_len: int | None,
           supervised_frac: float, micro_batch: int | None, device: str, images_per_sample: float,
           gradient_checkpointing: bool | None) -> _Shape:
    st = recipe.stages[stage_name]
    gc = st.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    # vlkit's micro-batch (batch_size / grad_accum) is global: under DDP/ZeRO/FSDP each rank takes every gpus-th
    # sample of it (vlkit.distributed.shard_batch), so a GPU holds ceil(micro / gpus) samples
    global_micro = max(1, st.batch_size // st.grad_accum)
    B = micro_batch or math.ceil(global_micro / gpus)
    T = int(seq_len or recipe.data.max_length)
    S = int(round(supervised_frac * B * max(T - 1, 1)))
    return _Shape(st, gc, global_micro, B, T, compute_bytes(recipe, device), vision.image_tokens,
                  images_per_sample * B, S)


def _shape_notes(recipe: Recipe, shape: _Shape, seq_len: int | None, images_per_sample: float) -> list[str]:
    notes: list[str] = []
    if shape.M * images_per_sample > shape.T:
        notes.append(f"{shape.M} image tokens per sample exceed the sequence length {shape.T}")
    if seq_len is None:
        notes.append(f"every sample is taken as padded to data.max_length={shape.T} (an upper bound); pass --seq-len "
                     "with a typical padded batch length for a closer estimate")
    if recipe.fusion.name != "prefix":
        notes.append(f"fusion '{recipe.fusion.name}' is not modelled: only prefix fusion (image tokens in the "
                     "sequence) is; its own parameters and activations are not counted")
    return notes


def _trainable(recipe: Recipe, st: StageConfig, llm: LLMSpec, enc: EncoderSpec, vision: VisionSpec) -> _Trainable:
    lora_params = 0
    if st.llm == "lora":
        lora_params = llm.layers * sum(st.lora.r * (i + o) for _, i, o in _lora_linears(llm, st.lora.target_modules))
    llm_trainable = llm.params if st.llm == "full" else 0
    enc_trainable = 0
    if not enc.frozen:
        enc_trainable = enc.params - enc.unused_params
    elif st.unfreeze_encoder_blocks:
        if st.unfreeze_encoder_blocks > enc.used_blocks and enc.used_blocks:
            raise ValueError(f"unfreeze_encoder_blocks={st.unfreeze_encoder_blocks} but the encoder has "
                             f"{enc.used_blocks} blocks up to the selected layer")
        enc_trainable = st.unfreeze_encoder_blocks * enc.block_params
    enc_train_blocks = enc.used_blocks if not enc.frozen else st.unfreeze_encoder_blocks
    proj_trainable = vision.projector_params if st.train_projector else 0
    return _Trainable(enc_trainable, enc_train_blocks, proj_trainable, llm_trainable, lora_params)


def _param_rows(recipe: Recipe, st: StageConfig, llm: LLMSpec, enc: EncoderSpec, vision: VisionSpec, tr: _Trainable,
                zero: int, gpus: int, supervised_frac: float, notes: list[str]) -> _Rows:
    """Weights, gradients and AdamW state per component, each sharded as the ZeRO stage shards it."""
    w_shard = gpus if zero >= 3 else 1
    g_shard = gpus if zero >= 2 else 1
    o_shard = gpus if zero >= 1 else 1

    def param_row(name: str, total: int, trainable: int, dtype_bytes: int) -> Row:
        grad_b = dtype_bytes
        opt_b = 8 + (4 if dtype_bytes < 4 else 0)  # two fp32 moments (+ fp32 master copy of 16-bit weights)
        return Row(name, total, trainable, weights=total * dtype_bytes / w_shard,
                   grads=trainable * grad_b / g_shard, optimizer=trainable * opt_b / o_shard)

    enc_row = param_row(f"encoder ({enc.kind})", enc.params, tr.enc, enc.dtype_bytes)
    proj_row = param_row(f"projector ({recipe.projector.name}, {recipe.tokens.name} tokens)",
                         vision.projector_params + vision.tokens_params, tr.proj, 4)
    llm_row = param_row(f"llm ({st.llm})", llm.params, tr.llm, llm.dtype_bytes)
    rows = [enc_row, proj_row, llm_row]
    if st.llm == "lora":
        targets = st.lora.target_modules
        targets = targets if isinstance(targets, str) else ",".join(targets)
        rows.append(param_row(f"  lora r={st.lora.r} ({targets})", tr.lora, tr.lora, 4))
    if zero == 0 and gpus > 1:
        for r in rows:
            r.grads *= 2
        notes.append("DDP (ZeRO-0) keeps a second copy of the gradients in its all-reduce buckets (counted)")
    head_row = Row(f"lm head logits ({supervised_frac:.0%} supervised)")
    rows.append(head_row)
    return _Rows(enc_row, proj_row, llm_row, head_row, rows)


def _activation_terms(shape: _Shape, llm: LLMSpec, enc: EncoderSpec, vision: VisionSpec, tr: _Trainable,
                      padding_mask: bool, device: str) -> dict[str, Any]:
    """The activation bytes of the LLM's layers (stored or recomputed), its head, the projector and the encoder."""
    st, a, T, S, n_img = shape.st, shape.a, shape.T, shape.S, shape.n_img
    tokens = shape.B * T
    mode = st.llm if st.llm in ("lora", "full") else "input"
    per_layer = llm_layer_terms(llm, mode, a, T, padding_mask, st, device)
    layer_bytes = sum(per_layer.values()) * tokens
    resid = llm.dtype_bytes
    if shape.gc:
        stored_layers = llm.layers * resid * llm.hidden * tokens
        recompute = layer_bytes
    else:
        stored_layers = llm.layers * layer_bytes
        recompute = 0.0
    misc = tokens * (4 * llm.hidden + 2 * 4 * llm.head_dim + (T if padding_mask else 0))  # final norm, rope, bool mask
    if st.llm == "full":
        misc += S * a * llm.hidden
    # gradient buffers in flight while the last layer runs backward, net of the saved tensors they replace: about
    # one MLP-intermediate-size and two hidden-size gradients per token
    backward_ws = tokens * a * (llm.intermediate + 2 * llm.hidden)
    head = 12 * S * llm.vocab  # fp32 log-probs + grad + grad input at the supervised positions
    proj_act = vision.projector_saved_bytes_fp32 * n_img * (a / 4) if st.train_projector or tr.enc else 0.0
    patches_keep = n_img * enc.tokens * enc.hidden * enc.dtype_bytes  # the selected hidden state, projector input
    enc_stored = tr.enc_blocks * _enc_block_bytes(enc, a) * n_img * enc.tokens
    n_hidden = (enc.depth + 1) if enc.keeps_all_hidden else 2
    enc_work = n_img * enc.tokens * (4 * a * enc.hidden + 2 * a * enc.intermediate)
    enc_forward = n_hidden * n_img * enc.tokens * enc.hidden * enc.dtype_bytes + enc_work + enc_stored
    return {"tokens": tokens, "per_layer": per_layer, "layers_stored": stored_layers, "recompute_layer": recompute,
            "llm_misc": misc, "backward_workspace": backward_ws, "head": head, "projector": proj_act,
            "encoder_stored": enc_stored, "encoder_patches": patches_keep, "encoder_forward": enc_forward}


def _place_peak(rows: _Rows, act: dict[str, Any], shape: _Shape, tr: _Trainable, zero: int, gpus: int,
                notes: list[str]) -> tuple[str, dict[str, float]]:
    """The phase with the most bytes (LLM backward, encoder forward or optimizer step), its activations put on the
    rows; and every activation term by name."""
    o_shard = gpus if zero >= 1 else 1
    llm_phase = {
        "encoder": act["encoder_stored"] + act["encoder_patches"],
        "projector": act["projector"],
        "llm": act["layers_stored"] + act["recompute_layer"] + act["llm_misc"] + act["backward_workspace"],
        "head": act["head"],
    }
    opt_step = tr.total * 4 / o_shard  # foreach AdamW temporaries (after the backward pass)
    grads = sum(r.grads for r in rows.all)
    # Gradients outlive the activations when they accumulate over micro-batches, or when DDP/ZeRO keep gradient
    # buffers; otherwise (one process, grad_accum 1, zero_grad(set_to_none=True)) they are created during the
    # backward pass as the activations are freed, so they do not stack on the activation peak.
    persistent = shape.st.grad_accum > 1 or gpus > 1 or zero > 0
    on_top = grads if persistent else 0.0
    phase_totals = {"llm backward": sum(llm_phase.values()) + on_top, "encoder forward": act["encoder_forward"] + on_top,
                    "optimizer step": grads + opt_step}
    peak_phase = max(phase_totals, key=phase_totals.get)
    if peak_phase == "llm backward":
        rows.enc.activations = llm_phase["encoder"]
        rows.proj.activations = llm_phase["projector"]
        rows.llm.activations = llm_phase["llm"]
        rows.head.activations = llm_phase["head"]
    elif peak_phase == "encoder forward":
        rows.enc.activations = act["encoder_forward"]
    else:
        rows.llm.activations = opt_step
        notes.append("the optimizer step (gradients + AdamW temporaries) is the peak, not the activations")
    if peak_phase != "optimizer step" and not persistent and grads:
        for r in rows.all:
            r.grads = 0.0
        notes.append(f"gradients ({grads / GB:.2f} GB) are created during the backward pass as activations are "
                     "freed (grad_accum 1, one GPU): not part of the peak")
    act_terms = {f"per_layer.{k}": v * act["tokens"] for k, v in act["per_layer"].items()}
    act_terms.update({k: act[k] for k in ("layers_stored", "recompute_layer", "llm_misc", "backward_workspace",
                                          "head", "projector", "encoder_stored", "encoder_patches",
                                          "encoder_forward")})
    act_terms["optimizer_step"] = opt_step
    return peak_phase, act_terms


def _extra_rows(llm: LLMSpec, enc: EncoderSpec, zero: int, gpus: int, overhead_gb: float) -> list[Row]:
    """ZeRO-3's gathered parameters and the runtime's own memory."""
    rows = []
    if zero == 3 and gpus > 1:
        largest = max(llm.embed_params, llm.layer_params, enc.block_params) * llm.dtype_bytes
        rows.append(Row("zero-3 gathered params (largest module + 1 prefetched layer)",
                        weights=largest + llm.layer_params * llm.dtype_bytes))
    if overhead_gb:
        rows.append(Row("runtime (CUDA context, workspaces, allocator)", weights=overhead_gb * GB))
    return rows


def _suggestions(recipe: Recipe, stage_name: str, llm: LLMSpec, enc: EncoderSpec, vision: VisionSpec, shape: _Shape,
                 kw: dict[str, Any]) -> list[tuple[str, float]]:
    """What gradient checkpointing, ZeRO-3 or half the micro-batch would need, for a stage that does not fit."""
    out = []
    if not shape.gc:
        alt = plan_stage(recipe, stage_name, llm, enc, vision, **{**kw, "gradient_checkpointing": True})
        out.append((f"stages.{stage_name}.gradient_checkpointing=true", alt.total))
    if kw["zero"] < 3 and kw["gpus"] > 1:
        alt = plan_stage(recipe, stage_name, llm, enc, vision, **{**kw, "zero": 3})
        out.append(("--zero 3", alt.total))
    if shape.B > 1:
        half = max(1, shape.B // 2)
        alt = plan_stage(recipe, stage_name, llm, enc, vision, **{**kw, "micro_batch": half})
        out.append((f"smaller batch: micro-batch {half} per GPU "
                    f"(stages.{stage_name}.grad_accum={shape.st.grad_accum * 2})", alt.total))
    return out


def plan(recipe: Recipe, stages: list[str] | None = None, *, online: bool | None = None, **kwargs: Any) -> Plan:
    """Plan every stage of ``recipe.train.stages`` (or the given ones). ``kwargs`` go to :func:`plan_stage`."""
    device = kwargs.get("device", "cuda")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got '{device}'")
    llm = describe_llm(recipe, online)
    enc = describe_encoder(recipe, online)
    vision = describe_vision(recipe, enc, llm.hidden)
    names = stages or list(recipe.train.stages)
    return Plan(recipe=recipe.name, llm=llm, encoder=enc, vision=vision, device=device,
                stages=[plan_stage(recipe, s, llm, enc, vision, **kwargs) for s in names])

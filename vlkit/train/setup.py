"""What a stage sets up before its first step: seeds and threads, precision, what trains, the optimizer and its
learning-rate schedule."""
from __future__ import annotations

import os
from typing import Any

import torch
from rich.console import Console

from vlkit.config import StageConfig
from vlkit.model import VLM
from vlkit.runs import attach_lora


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def pin_threads(state: dict[str, Any], deterministic: bool, console: Console) -> None:
    """Resume with the intra-op thread count the checkpointed steps ran with (``train.deterministic``).

    Large matmuls and reductions split their sums over threads, so another count changes results in the last bits
    (measured on this CPU: a [64 x 20000] @ [20000 x 64] matmul and a 1e7-element sum differ between 1 and 2
    threads). A process's count comes from its cores and ``OMP_NUM_THREADS``, which differ when a run resumes on
    another machine or in a grid rerun (``vlkit ablate`` gives each run cores / workers threads)."""
    recorded = state.get("threads")
    if not deterministic or recorded is None or recorded == torch.get_num_threads():
        return
    console.print(f"[yellow]using {recorded} torch threads as the checkpointed steps did (this process had "
                  f"{torch.get_num_threads()}): bit-exact resume under train.deterministic=true[/]")
    torch.set_num_threads(int(recorded))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on GPUs: bf16/fp16 matmuls on CPUs are far slower than fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def set_trainable(model: VLM, stage: StageConfig) -> None:
    """Freeze everything, then unfreeze what this stage trains (LoRA is attached on first use)."""
    model.requires_grad_(False)
    if stage.train_projector:  # the connector: projector and any fusion layers
        model.projector.requires_grad_(True)
        model.fusion.requires_grad_(True)
    if stage.llm == "lora":
        attach_lora(model, stage)
        for n, p in model.llm.model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif stage.llm == "full":
        model.llm.requires_grad_(True)
    if stage.unfreeze_encoder_blocks:
        blocks = model.encoder.blocks() if hasattr(model.encoder, "blocks") else []
        if len(blocks) < stage.unfreeze_encoder_blocks:
            raise ValueError(f"unfreeze_encoder_blocks={stage.unfreeze_encoder_blocks} but the encoder exposes "
                             f"{len(blocks)} blocks")
        model.encoder.frozen = False
        for block in blocks[-stage.unfreeze_encoder_blocks:]:
            block.requires_grad_(True)
    if stage.gradient_checkpointing:
        model.llm.base().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(model: VLM, stage: StageConfig) -> list[dict[str, Any]]:
    """Per-module learning rates: projector ``lr``, LLM ``lr_llm``, encoder ``lr_encoder`` (default ``lr``)."""
    groups = []
    for part, lr in (("projector", stage.lr), ("fusion", stage.lr), ("llm", stage.lr_llm or stage.lr), ("encoder", stage.lr_encoder or stage.lr)):
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        if params:
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            groups.append({"name": part, "params": decay, "lr": lr, "weight_decay": stage.weight_decay})
            if no_decay:
                groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("this stage trains nothing: set train_projector, llm: lora|full or unfreeze_encoder_blocks")
    return groups


def build_optimizer(model: VLM, stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW over the stage's parameter groups (:func:`param_groups`)."""
    return torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup, max(total, 1))


def lr_schedule(optimizer: torch.optim.Optimizer, stage: StageConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's learning-rate schedule over ``total`` optimizer steps: linear warm-up over ``warmup_ratio`` of them,
    then ``stage.schedule`` (cosine to 0; wsd: held, cosine to 0 over the last ``decay_ratio``; constant)."""
    from transformers import get_constant_schedule_with_warmup, get_wsd_schedule

    total = max(total, 1)
    warmup = int(stage.warmup_ratio * total)
    if stage.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if stage.schedule == "wsd":
        decay = max(1, min(round(stage.decay_ratio * total), total - warmup))
        return get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total)
    return cosine_with_warmup(optimizer, warmup, total)

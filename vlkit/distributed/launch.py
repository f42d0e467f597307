"""Joining the job (:func:`setup`: the process group, this process's GPU, the strategy) and wrapping one stage's model
and optimizer under that strategy (:func:`make_engine`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vlkit.distributed.context import TIMEOUT, DistContext, DistributedError, _free_port, launch_env, resolve_mode
from vlkit.distributed.ddp import DDPEngine
from vlkit.distributed.deepspeed_zero import (DeepSpeedEngine, _quiet_deepspeed, deepspeed_config_for_stage,
                                             read_deepspeed_config)
from vlkit.distributed.engine import StageEngine
from vlkit.distributed.fsdp import FSDPEngine, fsdp_supported


def setup(recipe: Any, device: torch.device, console: Any = None) -> DistContext:
    """Resolve ``train.distributed``, start the process group if needed, pin this process to its GPU."""
    world, rank, local = launch_env()
    mode = resolve_mode(recipe.train.distributed, world, recipe.train.deepspeed)
    if mode == "none":
        if recipe.train.deepspeed is not None and console is not None:
            console.print("[yellow]train.deepspeed is ignored: train.distributed is not 'deepspeed'[/]")
        return DistContext(device=device)
    ds_cfg = None
    if mode == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise DistributedError("train.distributed=deepspeed needs the deepspeed package: "
                                   "pip install 'vlkit[deepspeed]'") from exc
        ds_cfg = read_deepspeed_config(recipe.train.deepspeed)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 1:  # the launcher gave each process its own GPU (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES)
            local_gpu = 0
        elif local < count:
            local_gpu = local
        else:
            raise DistributedError(f"LOCAL_RANK={local} but this node has {count} GPUs; start at most one process "
                                   "per GPU (--nproc_per_node)")
        device = torch.device("cuda", local_gpu)
        torch.cuda.set_device(device)
    owns = False
    if not torch.distributed.is_initialized():
        if world == 1:  # deepspeed / fsdp in a single process: a one-member group on this host
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
        if device.type == "cuda":
            kwargs["device_id"] = device
        torch.distributed.init_process_group(**kwargs)
        owns = True
    if torch.distributed.get_world_size() != world:
        raise DistributedError(f"the process group has {torch.distributed.get_world_size()} members but "
                               f"WORLD_SIZE={world}")
    if mode == "fsdp":
        fsdp_supported(device)
        import warnings

        # the projector's output is a view; vlkit never modifies it in place (masked_scatter / indexing copy it)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Projector\) returned a view",
                                category=UserWarning)
    if mode == "deepspeed":
        _quiet_deepspeed(device)
    return DistContext(mode, world, rank, local, device, owns, ds_cfg)


def make_engine(ctx: DistContext, model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer],
                stage: Any, micro: int, ckpt_dir: Path, find_unused: bool) -> StageEngine:
    """Wrap ``model`` for one stage (after its trainable parameters are set and any checkpoint weights loaded)."""
    if ctx.mode == "none":
        return StageEngine(ctx, model, make_optimizer())
    if ctx.mode == "ddp":
        return DDPEngine(ctx, model, make_optimizer(), find_unused)
    if ctx.mode == "deepspeed":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cfg = deepspeed_config_for_stage(ctx.deepspeed_config or {}, micro, stage.grad_accum, ctx.world_size,
                                         stage.max_grad_norm, trainable)
        return DeepSpeedEngine(ctx, model, make_optimizer(), cfg, ckpt_dir / "deepspeed")
    if ctx.mode == "fsdp":
        return FSDPEngine(ctx, model, make_optimizer)
    raise DistributedError(f"unknown strategy {ctx.mode}")

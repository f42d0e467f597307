"""DeepSpeed ZeRO (stages 0-3): its config as vlkit fills it for a stage, and the engine that DeepSpeed clips and
steps. Checkpoints: vlkit's ``trainable.safetensors`` + ``state.json``, with DeepSpeed's partitioned optimizer state
beside them (``checkpoints/<stage>/deepspeed/<tag>``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vlkit.deepspeed_config import deepspeed_config_problems
from vlkit.distributed.context import DistContext, DistributedError
from vlkit.distributed.engine import StageEngine, TrainableView


def read_deepspeed_config(value: Any) -> dict[str, Any]:
    """``train.deepspeed``: a DeepSpeed config dict or a path to its JSON file; ``zero_stage: N`` is a shorthand.

    Default (nothing given): ZeRO stage 2. vlkit fills the batch sizes, gradient accumulation and clipping from
    the stage; ``optimizer``/``scheduler`` sections are refused (vlkit builds AdamW and steps its schedule).
    """
    if value is None:
        cfg: dict[str, Any] = {}
    elif isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.exists():
            raise DistributedError(f"train.deepspeed: DeepSpeed config file '{value}' not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DistributedError(f"train.deepspeed: {path} is not valid JSON: {exc}") from exc
    else:
        cfg = json.loads(json.dumps(dict(value)))  # a deep copy
    problems = deepspeed_config_problems(cfg)
    if problems:
        raise DistributedError("train.deepspeed: " + "; ".join(problems))
    stage = cfg.pop("zero_stage", None)
    zero = cfg.setdefault("zero_optimization", {})
    if stage is not None:
        zero["stage"] = int(stage)
    zero.setdefault("stage", 2)
    return cfg


def deepspeed_config_for_stage(base: dict[str, Any], micro: int, grad_accum: int, world: int,
                               max_grad_norm: float | None, trainable: int) -> dict[str, Any]:
    """The DeepSpeed config of one stage: the recipe's config plus vlkit's batch/accumulation/clipping values.

    ``micro`` is the global micro-batch; DeepSpeed's per-GPU micro-batch is its share (the batch sizes are only
    DeepSpeed's bookkeeping: vlkit feeds the data). Explicit values that disagree with the stage are an error.
    Communication buckets default to the trainable size (capped at DeepSpeed's 5e8): a projector + LoRA stage
    would otherwise allocate 2 GB buckets for a few MB of gradients.
    """
    cfg = json.loads(json.dumps(base))
    per_gpu = max(1, micro // world)
    want = {"train_micro_batch_size_per_gpu": per_gpu, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": per_gpu * grad_accum * world, "gradient_clipping": float(max_grad_norm or 0.0)}
    for key, value in want.items():
        given = cfg.get(key, "auto")
        if given != "auto" and key in ("gradient_accumulation_steps", "gradient_clipping") and given != value:
            raise DistributedError(f"train.deepspeed sets {key}={given} but the stage needs {value} (vlkit sets it "
                                   "from the stage's grad_accum / max_grad_norm); remove it or write \"auto\"")
        cfg[key] = value
    zero = cfg.setdefault("zero_optimization", {})
    bucket = int(min(5e8, max(1e6, trainable)))
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if zero.get(key, "auto") == "auto":
            zero[key] = bucket
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def _quiet_deepspeed(device: torch.device) -> None:
    """DeepSpeed logs at WARNING only; on CPUs (tests) skip its JIT-built shared-memory all-reduce (a minutes-long
    compile on first use; gloo does the job)."""
    import logging
    import warnings

    import deepspeed.ops
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed still calls these (renamed in torch 2.14); the warning would repeat at every call site
    renamed = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=renamed, category=FutureWarning)
    if device.type == "cpu":
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False


class DeepSpeedEngine(StageEngine):
    """``deepspeed.initialize`` with vlkit's torch AdamW (param groups kept); DeepSpeed clips and steps."""

    optimizer_format = "deepspeed"

    def __init__(self, ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                 ckpt_root: Path) -> None:
        import deepspeed

        super().__init__(ctx, model, optimizer)
        self.ds_config, self.ckpt_root = ds_config, ckpt_root
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.forward = self.engine
        self.tag: str | None = None

    def backward(self, loss: torch.Tensor) -> None:
        # vlkit already divides by the global token count: no division by the accumulation steps
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # a no-op until the accumulation boundary (the last micro-batch of the step)

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes gradients after its step

    def step(self, max_grad_norm: float | None) -> float | None:
        norm = self.engine.get_global_grad_norm()  # before clipping, as clip_grad_norm_ reports it
        return None if norm is None else float(norm)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter, whole and on the CPU (ZeRO-3 gathers the partitions; a collective)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.ctx.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone().contiguous() for n, p in named}
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}

    def save(self, path: Path, state: dict[str, Any], with_optimizer: bool = True) -> None:
        from vlkit.checkpoint import save_checkpoint

        info = self.info()
        if with_optimizer:
            tag = f"step{int(state['step']):08d}"
            self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state={"vlkit_step": state["step"]},
                                        save_latest=False, exclude_frozen_parameters=True)
            info["deepspeed_tag"] = tag
            info["deepspeed_dir"] = self.ckpt_root.name
        else:
            info["optimizer"] = "none"
        tensors = self.trainable_tensors()
        if self.ctx.is_main:
            save_checkpoint(path, TrainableView(tensors), None, {**state, "distributed": info})
        self.ctx.barrier()
        if with_optimizer and self.ctx.is_main:  # older DeepSpeed tags are no longer referenced
            for old in self.ckpt_root.iterdir():
                if old.is_dir() and old.name != info["deepspeed_tag"]:
                    shutil.rmtree(old, ignore_errors=True)

    def load_optimizer(self, found: Path, state: dict[str, Any], warn: Callable[[str], None]) -> None:
        dist_info = state.get("distributed", {})
        tag = dist_info.get("deepspeed_tag")
        root = found.parent / dist_info.get("deepspeed_dir", self.ckpt_root.name)
        if dist_info.get("optimizer") != "deepspeed" or tag is None or not (root / tag).is_dir():
            warn(f"checkpoint {found} holds no DeepSpeed optimizer state: weights restored, optimizer state "
                 "starts fresh")
            return
        if dist_info.get("world_size") != self.ctx.world_size:
            warn(f"checkpoint {found} was written by {dist_info.get('world_size')} processes, this job has "
                 f"{self.ctx.world_size}: weights restored, DeepSpeed optimizer state starts fresh")
            return
        load_path, client = self.engine.load_checkpoint(str(root), tag=tag, load_module_strict=False,
                                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None or (client or {}).get("vlkit_step") != state["step"]:
            raise DistributedError(f"DeepSpeed checkpoint {root / tag} does not match {found} (step "
                                   f"{(client or {}).get('vlkit_step')} vs {state['step']})")

    def close(self) -> None:
        self.engine.destroy()  # removes DeepSpeed's hooks from the model
        self.forward = self.model
        del self.engine
        import gc

        gc.collect()

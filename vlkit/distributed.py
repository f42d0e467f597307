"""Multi-process training: DDP, DeepSpeed ZeRO (1/2/3) and FSDP2 behind one small interface used by ``run_stage``.

Launch ``vlkit train`` with ``torchrun``, the ``deepspeed`` launcher, or ``srun`` (setting RANK/WORLD_SIZE/LOCAL_RANK);
:func:`setup` reads those variables, starts the process group (NCCL on GPUs, gloo on CPUs) and puts each process on
``cuda:LOCAL_RANK``. The recipe picks the strategy with ``train.distributed`` (``auto``: DDP when launched with more
than one process, else a single process).

What stays the same as one process, by construction:

* **Data.** The sampler yields the same *global* micro-batches from (seed, epoch); rank r takes ``batch[r::world]``,
  so the union over ranks is the single-process micro-batch. A rank whose slice is empty (a global micro-batch
  smaller than the world) runs one sample with weight 0, so every rank takes part in every collective.
* **Loss.** Token-weighted over the global batch: the supervised-token count of the whole optimizer step (all
  micro-batches, all ranks) is all-reduced before the backward passes; each rank back-propagates
  ``world * loss_sum / N_global`` because DDP, ZeRO and FSDP *average* gradients over ranks. The logged loss is the
  all-reduced sum over N_global, i.e. the single-process number (up to float summation order).
* **Outputs.** Only rank 0 writes logs, ``metrics.jsonl``, summaries and checkpoints and shows progress; every rank
  loads checkpoints on resume. Evaluation runs on rank 0 while the others wait at a barrier.

Checkpoints. DDP and FSDP write vlkit's own format (``trainable.safetensors`` gathered on rank 0, ``optimizer.pt``:
the torch state for DDP, a full name-keyed state from ``torch.distributed.checkpoint.state_dict`` for FSDP).
DeepSpeed writes vlkit's ``trainable.safetensors`` + ``state.json`` (so ``predict``/``eval``/``export`` read any run
the same way) and keeps its partitioned optimizer state next to it with DeepSpeed's own ``save_checkpoint``
(``checkpoints/<stage>/deepspeed/<tag>``, the tag named in ``state.json``; resume needs the same number of
processes for it, else only the weights are restored, with a warning).

Sharded strategies (FSDP, ZeRO-3) leave the model's weights split across ranks; after such a stage the trainer
builds a fresh model and loads the finished stages' weights (:func:`vlkit.train.rebuild_model`), and the stage's
final evaluation runs on that copy (evaluation *during* such a stage, ``eval_every``, is skipped).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp", "deepspeed")
TIMEOUT = timedelta(minutes=60)  # collectives (barriers while rank 0 evaluates or saves) wait this long


class DistributedError(ValueError):
    """A launch or strategy setting that cannot work (reported as one clear message)."""


# ---- the process group ---------------------------------------------------------------------------------------------
def launch_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the launcher's variables (torchrun, deepspeed, or set by hand for srun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("LOCAL_PROCESS_RANK", "0")))
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"launcher variables are inconsistent: WORLD_SIZE={world}, RANK={rank}")
    return world, rank, local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistContext:
    """One process's place in the job; ``mode`` is the resolved strategy (none, ddp, fsdp, deepspeed)."""

    mode: str = "none"
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # vlkit started the process group (and ends it in close())
    deepspeed_config: dict[str, Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is in use (any mode but a plain single process)."""
        return self.mode != "none"

    @property
    def zero_stage(self) -> int:
        return int((self.deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0))

    @property
    def shards_weights(self) -> bool:
        """The model's weights are split across ranks while a stage trains (FSDP, ZeRO-3)."""
        return self.mode == "fsdp" or (self.mode == "deepspeed" and self.zero_stage == 3)

    def barrier(self) -> None:
        if self.active and torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over ranks (one all-reduce, float64)."""
        if not self.active or self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def on_main(self, fn: Callable[[], Any], default: Any = None) -> Any:
        """Run ``fn`` on rank 0 while the other ranks wait; returns its result on rank 0, ``default`` elsewhere."""
        out = fn() if self.is_main else default
        self.barrier()
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), then the others (which find it done)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def shard_batch(idx: Sequence[int], rank: int, world: int) -> tuple[list[int], bool]:
    """This rank's part of one global micro-batch: ``idx[rank::world]`` (the union over ranks is ``idx``).

    An empty part (fewer samples than ranks) becomes the batch's first sample flagged as a dummy: it runs forward and
    backward with weight 0 so that the rank joins the gradient collectives.
    """
    part = list(idx[rank::world])
    if part:
        return part, False
    return [idx[0]], True


def resolve_mode(requested: str, world: int, deepspeed_cfg: Any) -> str:
    if requested not in MODES:
        raise DistributedError(f"train.distributed must be one of {', '.join(MODES)}, got '{requested}'")
    if requested == "auto":
        return "ddp" if world > 1 else "none"
    if requested == "none" and world > 1:
        raise DistributedError(f"launched with WORLD_SIZE={world} (torchrun / deepspeed / srun) but "
                               "train.distributed=none; set train.distributed=ddp|fsdp|deepspeed (or auto)")
    if requested == "ddp" and world == 1:
        return "none"  # one process: nothing to synchronise
    return requested


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


def fsdp_supported(device: torch.device) -> None:
    """FSDP2 (``fully_shard``) needs all-gather and reduce-scatter from the backend: NCCL, or gloo in recent torch."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        raise DistributedError("train.distributed=fsdp needs torch>=2.6 (torch.distributed.fsdp.fully_shard)") from exc
    if device.type != "cuda" and not _gloo_reduce_scatter():
        raise DistributedError("train.distributed=fsdp needs CUDA GPUs with NCCL: this torch's gloo backend (CPU) "
                               "has no reduce_scatter; use train.distributed=ddp on CPUs")


def _gloo_reduce_scatter() -> bool:
    """Probe once whether the CPU backend can reduce-scatter (FSDP's gradient collective)."""
    dist = torch.distributed
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        reduce_scatter(torch.zeros(1), torch.ones(torch.distributed.get_world_size()))
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False


# ---- DeepSpeed config --------------------------------------------------------------------------------------------
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


def deepspeed_config_problems(cfg: dict[str, Any]) -> list[str]:
    """What vlkit cannot accept in a DeepSpeed config (also used by recipe validation)."""
    out = []
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            out.append(f"remove the '{key}' section: vlkit builds AdamW with the stage's per-module learning rates "
                       "and steps its cosine schedule itself")
    stage = cfg.get("zero_stage", cfg.get("zero_optimization", {}).get("stage") if isinstance(
        cfg.get("zero_optimization"), dict) else None)
    if stage is not None and stage not in (0, 1, 2, 3):
        out.append(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if "zero_stage" in cfg and isinstance(cfg.get("zero_optimization"), dict) \
            and "stage" in cfg["zero_optimization"] and cfg["zero_optimization"]["stage"] != cfg["zero_stage"]:
        out.append("zero_stage and zero_optimization.stage disagree")
    return out


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


# ---- one stage's model, optimizer and collectives -------------------------------------------------------------------
class TrainableView(nn.Module):
    """Named tensors presented as a module's trainable parameters (to reuse vlkit's checkpoint writer)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._tensors = tensors

    def named_parameters(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        for name, t in self._tensors.items():
            yield name, nn.Parameter(t, requires_grad=True)


class _StateDictView:
    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd


class StageEngine:
    """The model, optimizer and gradient collectives of one training stage under one strategy.

    Loop contract: ``zero_grad()``; for each micro-batch ``with sync(last): out = forward(...); backward(loss)``;
    then ``step(max_grad_norm)``. ``grad_scale`` multiplies the local loss (``world``: the strategies average
    gradients over ranks, vlkit wants the sum of per-rank token-weighted parts).
    """

    optimizer_format = "torch"

    def __init__(self, ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.ctx, self.model, self.optimizer = ctx, model, optimizer
        self.grad_scale = float(ctx.world_size) if ctx.active else 1.0
        self.forward: Callable[..., Any] = model

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, max_grad_norm: float | None) -> float | None:
        grad_norm = None
        if max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        self.optimizer.step()
        return grad_norm

    # checkpoints
    def info(self) -> dict[str, Any]:
        return {"mode": self.ctx.mode, "world_size": self.ctx.world_size, "optimizer": self.optimizer_format}

    def save(self, path: Path, state: dict[str, Any], with_optimizer: bool = True) -> None:
        from vlkit.checkpoint import save_checkpoint

        if not self.ctx.active:
            save_checkpoint(path, self.model, self.optimizer if with_optimizer else None, state)
            return
        if self.ctx.is_main:
            save_checkpoint(path, self.model, self.optimizer if with_optimizer else None,
                            {**state, "distributed": self.info()})
        self.ctx.barrier()

    def load_optimizer(self, found: Path, state: dict[str, Any], warn: Callable[[str], None]) -> None:
        """Restore optimizer state after :func:`load_weights` (called on every rank)."""
        fmt = state.get("distributed", {}).get("optimizer", "torch")
        if fmt != "torch" or not (found / "optimizer.pt").exists():
            warn(f"checkpoint {found} holds no torch optimizer state (written under "
                 f"{state.get('distributed', {}).get('mode', '?')}): weights restored, optimizer state starts fresh")
            return
        self.optimizer.load_state_dict(torch.load(found / "optimizer.pt", weights_only=True, map_location="cpu"))

    def close(self) -> None:
        pass


class DDPEngine(StageEngine):
    def __init__(self, ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                 find_unused: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(ctx, model, optimizer)
        # only the trainable parameters are synchronised (the frozen encoder / LLM are identical on every rank)
        ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in model.named_buffers()]
        if hasattr(DDP, "_set_params_and_buffers_to_ignore_for_model"):
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        self.ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                       find_unused_parameters=find_unused)
        self.forward = self.ddp

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            yield

    def close(self) -> None:
        self.forward = self.model
        del self.ddp
        import gc

        gc.collect()  # drop the reducer's gradient hooks before the next stage wraps the same parameters


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


class FSDPEngine(StageEngine):
    """FSDP2 ``fully_shard`` on each LLM decoder layer, the rest of the LLM, the projector, cross-attention fusion
    blocks and a trained encoder.

    The VLM itself stays unwrapped (its children carry the sharding), so after the stage the trainer can swap in a
    fresh unsharded model. The LLM wrapper's ``embed_tokens``/``hidden_states``/``logits`` are registered as FSDP
    forward methods (the VLM calls them rather than the LLM's ``forward``).
    """

    optimizer_format = "fsdp"

    def __init__(self, ctx: DistContext, model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer]) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        self.roots: list[nn.Module] = []
        llm = model.llm
        decoder = llm.base().get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise DistributedError(f"FSDP: the LLM's decoder ({type(decoder).__name__}) has no .layers to shard")
        for layer in layers:
            fully_shard(layer)
        fully_shard(llm)
        for name in ("embed_tokens", "hidden_states", "logits"):
            register_fsdp_forward_method(llm, name)
        self.roots.append(llm)
        if any(p.requires_grad for p in model.projector.parameters()):
            fully_shard(model.projector)
            self.roots.append(model.projector)
        fusion = getattr(model, "fusion", None)
        if fusion is not None and any(p.requires_grad for p in fusion.parameters()):
            # cross-attention fusion: its blocks are called (from the decoder layers' hooks), the module is not
            blocks = list(getattr(fusion, "blocks", []))
            inside = {id(p) for b in blocks for p in b.parameters()}
            if any(id(p) not in inside for p in fusion.parameters() if p.requires_grad):
                raise DistributedError(f"FSDP: fusion '{type(fusion).__name__}' trains parameters outside its "
                                       "'.blocks'; vlkit can shard only block-structured fusion modules")
            for block in blocks:
                fully_shard(block)
                self.roots.append(block)
        if any(p.requires_grad for p in model.encoder.parameters()):
            fully_shard(model.encoder)
            self.roots.append(model.encoder)
        super().__init__(ctx, model, make_optimizer())

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        for m in self.roots:
            m.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            for m in self.roots:
                m.set_requires_gradient_sync(True)

    def step(self, max_grad_norm: float | None) -> float | None:
        grad_norm = None
        if max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        return grad_norm

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                t = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective for DTensors
                out[n] = t.detach().cpu().clone().contiguous()
        return out

    def save(self, path: Path, state: dict[str, Any], with_optimizer: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from vlkit.checkpoint import save_checkpoint

        tensors = self.trainable_tensors()
        osd = None
        if with_optimizer:
            osd = get_optimizer_state_dict(self.model, self.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ctx.is_main:
            save_checkpoint(path, TrainableView(tensors), _StateDictView(osd) if osd is not None else None,
                            {**state, "distributed": self.info()})
        self.ctx.barrier()

    def load_optimizer(self, found: Path, state: dict[str, Any], warn: Callable[[str], None]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if state.get("distributed", {}).get("optimizer") != "fsdp" or not (found / "optimizer.pt").exists():
            warn(f"checkpoint {found} holds no FSDP optimizer state: weights restored, optimizer state starts fresh")
            return
        osd = torch.load(found / "optimizer.pt", weights_only=True, map_location="cpu")
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))


def check_same_modules(ctx: DistContext, has_image: Sequence[bool], group_by_length: bool) -> None:
    """DeepSpeed and FSDP gather/reduce per module: every rank must run the same modules in each micro-batch.

    Global micro-batches are image-only or text-only when batches are grouped by modality (``group_by_length``);
    otherwise a rank with text-only samples would skip the vision modules while another ran them (a hang).
    """
    mixed = any(has_image) and not all(has_image) and not group_by_length
    if mixed and ctx.mode in ("deepspeed", "fsdp"):
        raise DistributedError(f"train.distributed={ctx.mode} needs micro-batches that are all image or all text "
                               "(ranks must run the same modules): set data.group_by_length=true, or use ddp")


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

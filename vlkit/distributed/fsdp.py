"""FSDP2 (``fully_shard``): the LLM's decoder layers, the rest of the LLM and what trains are sharded over ranks."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vlkit.distributed.context import DistContext, DistributedError
from vlkit.distributed.engine import StageEngine, TrainableView, _StateDictView


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

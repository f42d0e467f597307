"""The interface ``run_stage`` trains through (:class:`StageEngine`), and its single-process implementation; the
strategies (ddp.py, fsdp.py, deepspeed_zero.py) override what they do differently."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vlkit.distributed.context import DistContext


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

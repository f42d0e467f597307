"""DistributedDataParallel: every rank holds the whole model; only the trainable parameters are synchronised."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vlkit.distributed.context import DistContext
from vlkit.distributed.engine import StageEngine


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

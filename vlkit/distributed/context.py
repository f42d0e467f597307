"""One process's place in a distributed job (:class:`DistContext`), read from the launcher's variables, and the
rules every strategy shares: how a global micro-batch is split over ranks, which strategy a recipe asks for."""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

MODES = ("auto", "none", "ddp", "fsdp", "deepspeed")


TIMEOUT = timedelta(minutes=60)  # collectives (barriers while rank 0 evaluates or saves) wait this long


class DistributedError(ValueError):
    """A launch or strategy setting that cannot work (reported as one clear message)."""


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


def check_same_modules(ctx: DistContext, has_image: Sequence[bool], group_by_length: bool) -> None:
    """DeepSpeed and FSDP gather/reduce per module: every rank must run the same modules in each micro-batch.

    Global micro-batches are image-only or text-only when batches are grouped by modality (``group_by_length``);
    otherwise a rank with text-only samples would skip the vision modules while another ran them (a hang).
    """
    mixed = any(has_image) and not all(has_image) and not group_by_length
    if mixed and ctx.mode in ("deepspeed", "fsdp"):
        raise DistributedError(f"train.distributed={ctx.mode} needs micro-batches that are all image or all text "
                               "(ranks must run the same modules): set data.group_by_length=true, or use ddp")

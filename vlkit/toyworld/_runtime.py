"""Process settings shared by every toy-world job: fixed torch threads, quiet transformers, malloc tuning."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

ENV_PARALLEL = "VLKIT_TOY_PARALLEL"


def console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def parallel_jobs() -> bool:
    """toy-clip and toy-lm train in two processes side by side unless ``$VLKIT_TOY_PARALLEL=0`` or one core."""
    return (os.cpu_count() or 1) >= 2 and os.environ.get(ENV_PARALLEL, "1") != "0"


def tune_malloc() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only). Small models re-allocate the
    same few-MB activations every step; on VMs where each fresh page costs a fault this is ~2-3x faster."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        return bool(ok and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def caller_rng_kept() -> Iterator[None]:
    """The caller's global RNG states (torch, Python, NumPy) as they were before: a toy world made on first use
    inside a run, after the run seeded them, must not change the run's numbers (measured: a tiny world pretrained
    in the run's own process moved its first loss from 3.4102 to 3.4218)."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def quiet_runtime(threads: int) -> Iterator[None]:
    """Fixed torch threads; transformers' progress bars and load reports off (restored afterwards)."""
    import torch
    from transformers.utils import logging as hf_logging

    old_threads, old_level = torch.get_num_threads(), hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        hf_logging.set_verbosity(old_level)
        if bars:
            hf_logging.enable_progress_bar()


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory ``new`` at ``target`` by renames (same file system), removing what was there:
    a reader sees the old directory or the new one, never a half-written one."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)

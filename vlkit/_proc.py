"""Facts about the running process, shared by the trainer, the toy-world build and the benchmarks."""
from __future__ import annotations


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in KiB; None where there is no such file
    (not Linux) or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size (VmRSS) in MiB; NaN where unknown."""
    kb = status_kb("VmRSS")
    return float("nan") if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB (VmHWM): ``ru_maxrss`` would inherit a larger parent's peak across
    fork + exec, and counts only the largest child for RUSAGE_CHILDREN."""
    kb = status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource  # not Linux: the kernel's figure, in KiB on Linux/BSD (bytes on macOS, not corrected here)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fp32_matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """This machine's fp32 matmul rate (GFLOP/s of wall time, best of ``reps`` n x n products) at torch's current
    thread count: the figure to state beside any time measured on it (machines of one kind differ ~2.5x)."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return round(2 * n**3 / best / 1e9, 1)

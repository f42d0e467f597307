"""Facts about the running process, shared by the trainer and the toy-world build."""
from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB (VmHWM): ``ru_maxrss`` would inherit a larger parent's peak across
    fork + exec, and counts only the largest child for RUSAGE_CHILDREN."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not Linux: the kernel's figure, in KiB on Linux/BSD (bytes on macOS, not corrected here)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""Peak-memory reading shared by the benchmarks."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS in MB. VmHWM belongs to the process's own address space, so unlike
    ru_maxrss it does not include the parent's memory at fork time."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

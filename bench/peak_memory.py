"""The peak memory of this process, as the benches report it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """The process's peak resident set since it started its program, in MB: the kernel's
    high-water mark (VmHWM), which exec resets. Not getrusage's ru_maxrss, which Linux
    carries over exec from the process that forked it: a bench's child started by a parent
    that had built a model would report at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB

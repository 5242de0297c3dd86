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


class LiveTensorPeak:
    """The peak of live tensor memory on CPU (bytes torch's allocator has handed out and not
    yet taken back) from `start()` to `stop()`: what a GPU's `max_memory_allocated` measures,
    without the C allocator's share that the resident set also holds (glibc keeps freed
    blocks in its heap; on a 2-core CPU that was as much again as the live tensors). Read
    from the profiler's memory events, so the run it watches is slower: time it apart."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def start(self) -> None:
        self._profile.start()

    def stop(self) -> float:
        """The peak, in MB, above what was live at `start()`."""
        self._profile.stop()
        events = self._profile.profiler.kineto_results.events()  # type: ignore[union-attr]
        changes = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type().name == "CPU"
        )
        live = peak = 0
        for _, nbytes in changes:
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20

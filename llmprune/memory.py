"""Process memory and wall-clock measurement."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        return peak_rss_mb()


@contextmanager
def stopwatch():
    """Yields a dict whose 'seconds' is filled in when the block ends."""
    result = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux), so `window_peak_rss_mb`
    measures one phase (e.g. training after a load that briefly held two copies). False where
    the platform cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_mb() -> float:
    """The RSS high-water mark since the last `reset_peak_rss` (VmHWM), in MiB; the process peak
    where /proc is missing."""
    hwm = _proc_kib("/proc/self/status", "VmHWM:")
    return hwm / 1024 if hwm is not None else peak_rss_mb()


def available_mb() -> float | None:
    """Memory the OS can give this process now (Linux MemAvailable), MiB; None where unknown."""
    available = _proc_kib("/proc/meminfo", "MemAvailable:")
    return available / 1024 if available is not None else None


def _proc_kib(path: str, key: str) -> int | None:
    """The kB value of `key` in a /proc file of `key value kB` lines (None without /proc)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's freed pages back to the OS (glibc `malloc_trim`):
    after a large model is dropped, glibc keeps much of its freed small-block memory mapped, and
    the next phase's peak would sit on top of it. A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

"""Give memory back to the system after a burst of sessions has ended.

Each session's buffers and zlib contexts are freed when it ends, but glibc keeps the freed
heap for reuse, so a node component's RSS would stay at its peak. When the live-session
count falls well below a recent high, collect cycles and call malloc_trim(0), at most
once per interval."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import resource
from collections.abc import Callable

log = logging.getLogger("crishim.memory")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
HEAP_KEEP = 32 * 1024 * 1024  # free heap glibc may keep at its top between trims
MMAP_ABOVE = 8 * 1024 * 1024  # allocations above this are mmap'd, below from the heap


def keep_heap_for_reads() -> bool:
    """Make glibc keep freed heap for the next read instead of returning it at once.

    Every read of up to 1 MiB (flow.READ_SIZE) becomes a new bytes object. With glibc's
    defaults (a dynamic mmap threshold, and the heap's top trimmed whenever more than
    twice that is free) a transfer that holds a few such reads at a time (HTTP/2 waiting
    for window) gave the top back and faulted it in again on every read: crishim
    port-forward over HTTP/2 took ~260 page faults per MiB uploaded (every page of every
    read) against ~17 over SPDY. Fixed thresholds keep up to HEAP_KEEP free at the top;
    MemoryReleaser's malloc_trim(0) still returns everything after a burst. False where
    the libc has no mallopt (musl, macOS): nothing changes there."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_ABOVE)
                and mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP))


def freeze_startup_objects() -> None:
    """Take what start-up made (modules, classes, functions, the gRPC stack, the config:
    ~47,000 objects in crishim port-forward) out of the cyclic garbage collector's sight.

    A full collection walks every tracked object; the interpreter runs one whenever enough
    objects have survived younger ones, which a burst of connections does. Each took
    26-34 ms in crishim port-forward (timed with gc.callbacks), and one falling inside a
    transfer stopped the bytes for that long: a 4 MiB SPDY-over-WebSocket download after
    a few short connections took 30-49 ms instead of 5-9. Frozen objects are never
    walked again; what connections create later is collected as before."""
    gc.collect()
    gc.freeze()


def rss_kib() -> int:
    """This process's resident set, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def release_memory() -> None:
    """Free unreachable cycles, then return free heap pages to the system."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


# with no session left, memory is released if RSS is this far above where the last
# release (or the start) left it
IDLE_RELEASE_ABOVE = 32 * 1024 * 1024


class MemoryReleaser:
    """Watches the live-session count (the stream server counts its connections without a
    token among them); after min_drop sessions have ended since the last
    high and at most a quarter of that high is left, or when the last session has ended
    with RSS well above where the last release left it (a few heavy sessions: 20 sessions
    of 9,000 unpaired streams each left 247 MiB, kept for good), releases memory
    (rate-limited)."""

    def __init__(self, min_drop: int = 64, interval: float = 10.0) -> None:
        self.min_drop = min_drop
        self.interval = interval
        self.high = 0
        self._last = -interval
        self._timer: asyncio.TimerHandle | None = None
        self._floor_kib = rss_kib()

    def sessions_changed(self, live: int) -> None:
        if live > self.high:
            self.high = live
            return
        if self.min_drop <= 0 or self._timer is not None:
            return
        burst = self.high - live >= self.min_drop and live <= self.high // 4
        if burst or (live == 0 and self.high
                     and rss_kib() - self._floor_kib > IDLE_RELEASE_ABOVE >> 10):
            loop = asyncio.get_running_loop()
            delay = max(0.5, self._last + self.interval - loop.time())
            self._timer = loop.call_later(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        before = rss_kib()
        release_memory()
        self._floor_kib = rss_kib()
        log.info("released memory after a burst of %d sessions (and connections without a "
                 "token): RSS %d -> %d MiB",
                 self.high, before >> 10, self._floor_kib >> 10)
        self.high = 0  # the next burst is measured from here

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

import asyncio
import subprocess
import sys

from crishim.memory import MemoryReleaser, release_memory, rss_kib

# reads of ~1 MiB as new bytes, a few alive at a time, as a transfer makes them
_READS = '''
import resource, sys
from collections import deque
if sys.argv[1] == "keep":
    from crishim.memory import keep_heap_for_reads
    assert keep_heap_for_reads()
view = memoryview(bytearray(1 << 20))
held = deque(maxlen=4)
for i in range(550):
    if i == 50:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held.append(view[: (1 << 20) - (i % 7) * 4096].tobytes())
    if i % 3 == 0:
        held.clear()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 500)
'''


def _faults_per_read(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _READS, mode], capture_output=True,
                         text=True, timeout=60, check=True)
    return float(out.stdout)


def test_release_is_scheduled_once_after_a_burst_ends():
    async def go() -> tuple[bool, bool, int]:
        releaser = MemoryReleaser(min_drop=10, interval=60.0)
        for live in range(1, 41):
            releaser.sessions_changed(live)
        releaser.sessions_changed(35)  # 5 ended: not yet
        not_yet = releaser._timer is None
        releaser.sessions_changed(9)  # 31 ended, under a quarter of 40 left
        scheduled = releaser._timer is not None
        releaser.close()
        return not_yet, scheduled, releaser.high

    not_yet, scheduled, high = asyncio.run(go())
    assert not_yet and scheduled and high == 40


def test_disabled_with_zero():
    async def go() -> bool:
        releaser = MemoryReleaser(min_drop=0)
        releaser.sessions_changed(500)
        releaser.sessions_changed(0)
        return releaser._timer is None

    assert asyncio.run(go())


def test_release_memory_runs_and_rss_is_read():
    release_memory()
    assert rss_kib() > 0


def test_kept_heap_stops_every_read_faulting_its_pages_in_again():
    """With glibc's defaults each 1 MiB read faults in most of its 256 pages (the heap top
    is given back between reads); with keep_heap_for_reads() the freed heap is reused."""
    default, kept = _faults_per_read("default"), _faults_per_read("keep")
    assert default > 100, default  # the pattern reproduces glibc's trimming here
    assert kept < 10, kept


# objects made at start-up are frozen: a full collection no longer walks them; cyclic
# garbage made afterwards (a connection's protocol <-> transport cycles) is still collected
_FREEZE = '''
import gc, weakref
from crishim.memory import freeze_startup_objects
class Node:
    pass
startup = [Node() for _ in range(10000)]
freeze_startup_objects()
walked = {id(o) for o in gc.get_objects()}
a, b = Node(), Node()
a.other, b.other = b, a
gone = []
ref = weakref.ref(a, lambda _: gone.append(1))
del a, b
gc.collect()
print(gc.get_freeze_count(), sum(id(o) in walked for o in startup), len(gone))
'''


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    out = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True,
                         timeout=60, check=True)
    frozen, startup_walked, collected = map(int, out.stdout.split())
    assert frozen >= 10000  # the start-up objects (and the interpreter's own)
    assert startup_walked == 0  # not among what a collection walks
    assert collected == 1  # a cycle made afterwards is still freed


def test_the_last_session_ending_releases_memory_only_if_rss_grew_well():
    """A few heavy sessions are no burst of min_drop, but once none is left and RSS is
    more than 32 MiB above where the start (or the last release) left it, memory is
    released; with RSS where it was, nothing is scheduled."""
    async def go() -> tuple[bool, bool]:
        releaser = MemoryReleaser(min_drop=64, interval=60.0)
        for live in (1, 2, 3, 2, 1, 0):
            releaser.sessions_changed(live)
        quiet = releaser._timer is None
        grown = bytearray(64 << 20)  # pages written: RSS +64 MiB
        for live in (1, 2, 1, 0):
            releaser.sessions_changed(live)
        scheduled = releaser._timer is not None
        releaser.close()
        del grown
        return quiet, scheduled

    quiet, scheduled = asyncio.run(go())
    assert quiet and scheduled

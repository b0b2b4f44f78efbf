"""The per-connection lines `crishim port-forward` prints, as kubectl does."""

from __future__ import annotations

import asyncio
import sys

# "Handling connection for N" lines are flushed together, this long after the first one
# unflushed: a flush is a write(2) that wakes whoever reads the pipe, ~50-100 us a line
# here, which a connection's first byte and a burst of connects waited for. A terminal
# still shows each line at once (stdout is line-buffered there).
ANNOUNCE_FLUSH_DELAY = 0.005
_announce_flush: asyncio.TimerHandle | None = None
_flush_loop: asyncio.AbstractEventLoop | None = None


def announce(line: str) -> None:
    """Print a per-connection line, as kubectl does, without a write per line on a pipe."""
    global _announce_flush, _flush_loop
    loop = asyncio.get_running_loop()
    if _announce_flush is not None and _flush_loop is not loop:  # left by an ended loop
        _flush_announcements()
    sys.stdout.write(line + "\n")
    if _announce_flush is None:
        _flush_loop = loop
        _announce_flush = loop.call_later(ANNOUNCE_FLUSH_DELAY, _flush_announcements)


def _flush_announcements() -> None:
    global _announce_flush
    if _announce_flush is not None:
        _announce_flush.cancel()
        _announce_flush = None
    sys.stdout.flush()

"""`crishim port-forward`'s per-connection lines: every line is printed, in order, and on
a pipe a burst of them costs one flush (one write that wakes the reader), not one each."""

from __future__ import annotations

import asyncio
import io
import sys

from crishim.client import announce as announce_module
from crishim.client.announce import ANNOUNCE_FLUSH_DELAY, announce


class CountingPipe(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.seen_at_flush: list[str] = []

    def flush(self) -> None:
        self.flushes += 1
        self.seen_at_flush.append(self.getvalue())


def test_a_burst_of_lines_is_flushed_once_soon_after(monkeypatch):
    pipe = CountingPipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    lines = [f"Handling connection for {5000 + i}" for i in range(200)]

    async def burst() -> tuple[int, int]:
        for line in lines:
            announce(line)
        before = pipe.flushes
        await asyncio.sleep(ANNOUNCE_FLUSH_DELAY * 4)
        announce("Handling connection for 6000")  # a later one: flushed on its own
        await asyncio.sleep(ANNOUNCE_FLUSH_DELAY * 4)
        return before, pipe.flushes

    before, after = asyncio.run(burst())
    assert before == 0 and after == 2
    assert pipe.seen_at_flush[0] == "".join(line + "\n" for line in lines)
    assert pipe.getvalue().endswith("Handling connection for 6000\n")
    assert announce_module._announce_flush is None


def test_a_line_left_unflushed_by_an_ended_loop_is_flushed_by_the_next(monkeypatch):
    pipe = CountingPipe()
    monkeypatch.setattr(sys, "stdout", pipe)

    async def one(line: str) -> None:
        announce(line)  # the loop ends before the flush is due

    asyncio.run(one("Handling connection for 1"))
    assert pipe.flushes == 0
    asyncio.run(one("Handling connection for 2"))
    assert pipe.seen_at_flush == ["Handling connection for 1\n"]
    announce_module._flush_announcements()
    assert pipe.getvalue() == "Handling connection for 1\nHandling connection for 2\n"
    assert announce_module._announce_flush is None

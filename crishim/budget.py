"""Per-session budgets against floods: a token bucket shared by every transport, and the
limits the stream server gives each session (config: control_frames_per_second, ...)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from crishim.logs import traceback_once


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `take` spends one (or n)."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, n: int = 1) -> bool:
        """Spend n tokens if there are that many; False (nothing spent) when there are not.
        Refilled at every call: refilled only once short, the time the bucket sat full
        counted as accrual, and after an idle spell a burst came twice over."""
        now = time.monotonic()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < n:
            self._tokens = tokens
            return False
        self._tokens = tokens - n
        return True


class CappedLines:
    """At most `lines` lines from one source (a session's protocol errors, its failed
    streams); past them the lines are only counted, for one line of their own when the
    source ends."""

    __slots__ = ("left", "suppressed")

    def __init__(self, lines: int) -> None:
        self.left = lines
        self.suppressed = 0

    def take(self) -> bool:
        """True while a line may be written; False (and counted) past the cap."""
        if self.left > 0:
            self.left -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """The count of lines not written, reset."""
        count, self.suppressed = self.suppressed, 0
        return count


class LogBudget:
    """Lines one source may write (a session's per-connection lines, the stream server's
    refusals): `rate` a second, bursts of 10 x rate; past it they are counted, and the
    count is written as one line of its own a second later and when the source ends
    (`flush`). rate 0: every line. A client opening thousands of connections a second
    to a closed port, or connecting without a token, wrote a line each: 4,000-5,500
    lines (16-18 MB) a second."""

    __slots__ = ("logger", "summary", "_bucket", "suppressed", "_timer")

    def __init__(self, logger: logging.Logger, rate: float, summary: str) -> None:
        self.logger = logger
        self.summary = summary  # % the count, e.g. "%d connection lines not logged"
        self._bucket = TokenBucket(rate, max(1, int(10 * rate))) if rate > 0 else None
        self.suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args: object,
            traceback_of: BaseException | None = None, **kwargs: Any) -> None:
        """`traceback_of`: an unexpected exception, whose traceback the line carries if it
        is the first of its type written in this process (traceback_once: decided only
        for a line that is written, so a line the budget drops takes no traceback's turn)."""
        if not self.logger.isEnabledFor(level):
            return
        if self._bucket is None or self._bucket.take():
            if traceback_of is not None:
                kwargs["exc_info"] = traceback_once(traceback_of)
            self.logger.log(level, msg, *args, **kwargs)
            return
        self.suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # counted; written by the next flush
            self._timer = loop.call_later(1.0, self.flush)

    def flush(self) -> None:
        """Write the count of lines not logged, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.suppressed:
            self.logger.info(self.summary + " (log_lines_per_second)", self.suppressed)
            self.suppressed = 0


@dataclass(frozen=True)
class FloodLimits:
    """What one client may cost crishim besides the bytes it forwards."""

    # frames that make crishim answer or work without forwarding a byte: PING, SETTINGS,
    # PRIORITY, a reset of a stream not carrying a live connection, a frame refused or
    # answered with RST_STREAM (DATA for an unknown stream, a bad stream, empty DATA)
    control_frames_per_second: float = 100.0
    control_frame_burst: int = 1000
    # a load test through port-forward opens 2,000 connections at once, again and again
    # (4,000 streams a second and more); every stream pair is bounded by
    # max_connections_per_session besides, and rapid reset by the control budget
    stream_opens_per_second: float = 10000.0
    stream_open_burst: int = 20000
    # protocol-error lines one session writes before it only counts them
    protocol_error_log_lines: int = 10
    # per-connection lines one session writes a second (bursts of 10x) before it counts
    log_lines_per_second: float = 100.0
    # bytes towards pods one HTTP/2 connection may hold (its receive window) ...
    session_buffer_size: int = 16 * 1024 * 1024
    # ... and all of them together: a session's window is taken from this
    buffer_budget: int = 512 * 1024 * 1024
    # CPU one session's input may take before the others get theirs: one event loop
    # serves every session, and a read of tiny frames (1 MiB of 9-byte SPDY frames is
    # 0.2 s of decoding) would otherwise hold all of them up; the session's reads shrink
    # until one fits in a turn, and grow back while they are cheap (bulk data)
    read_turn: float = 0.005

    def control_budget(self) -> TokenBucket:
        return TokenBucket(self.control_frames_per_second, self.control_frame_burst)

    def stream_open_budget(self) -> TokenBucket:
        return TokenBucket(self.stream_opens_per_second, self.stream_open_burst)

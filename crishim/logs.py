"""Log lines as text or JSON lines (setting log_format)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# control characters in a message (peer input: a requestid, a header value) are written
# escaped: a newline in one forged whole log lines ("...\n<time> ERROR crishim: ...")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


class TextFormatter(logging.Formatter):
    """One line per record: the message's control characters escaped (a traceback, which
    is crishim's own, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escaped, record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


# library loggers never below INFO, whatever --log-level says
_CAPPED_AT_INFO = ("grpc", "hpack", "h2")


class PeerEncodingErrors(logging.Filter):
    """grpc's Cython layer logs ERROR and a traceback for every metadata value a CRI
    client (or the upstream) sends that is not UTF-8, one to three per call: peer input,
    not a fault of crishim's. Such records become one warning line without the traceback,
    at most `burst` per `period` seconds (then counted, and the count given with the
    next line let through)."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Invalid encoding"):
            return True
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self._suppressed += 1
            return False
        self._in_window += 1
        value = record.getMessage()[len("Invalid encoding on "):][:40]
        more = f" ({self._suppressed} more suppressed)" if self._suppressed else ""
        self._suppressed = 0
        record.msg = f"a gRPC metadata value that is not UTF-8 was refused: %s{more}"
        record.args = (value,)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


# exception types whose traceback this process has logged: a bug's first occurrence can be
# diagnosed, a client reaching it again and again cannot flood the log with tracebacks
_TRACED: set[type[BaseException]] = set()


def traceback_once(error: BaseException) -> BaseException | None:
    """`exc_info` for the line that logs an unexpected exception: the exception the first
    time its type is logged in this process, None (the line alone) after that."""
    kind = type(error)
    if kind in _TRACED:
        return None
    _TRACED.add(kind)
    return error


def setup(log_format: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # their debug is per-call (grpc) or per-header-field (hpack, h2) noise, and hpack's
    # and h2's write every decoded header, the token in :path among them (docs §1.2)
    for name in _CAPPED_AT_INFO:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    cygrpc.filters[:] = [f for f in cygrpc.filters if not isinstance(f, PeerEncodingErrors)]
    cygrpc.addFilter(PeerEncodingErrors())

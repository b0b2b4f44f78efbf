"""A bug reached while handling a client's input is ours, not the client's: one ERROR
line per event (not charged to the session's protocol-error lines), the traceback once
per exception type per process (a client reaching the bug again cannot flood the log
with tracebacks), and only the stream it hit is reset: the session and its other
streams go on."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest
from h2.errors import ErrorCodes

from crishim import logs
from crishim.budget import FloodLimits, LogBudget
from crishim.config import Config
from crishim.forward import ForwardContext
from crishim.protocols import spdy
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from crishim.stream import server as server_module
from crishim.stream.admission import Request
from crishim.stream.portforward_h2 import H2PortForwardSession
from crishim.stream.portforward_spdy import SpdyPortForwardSession
from crishim.stream.server import StreamServer
from crishim.stream.session import PairedStreamSession, SessionSettings
from crishim.tokens import TokenStore


@pytest.fixture(autouse=True)
def _no_type_traced_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_TRACED", set())


@dataclass
class _Event:
    stream_id: int


class _Codec:
    """A codec stand-in: every read is the same events; resets are recorded."""

    backlogged = False
    terminated = False

    def __init__(self, events: list[_Event]) -> None:
        self.events = events
        self.resets: list[tuple[int, int]] = []

    def receive_data(self, data: bytes, lent: bool = False) -> list[_Event]:
        return list(self.events)

    def reset_stream(self, stream_id: int, code: int) -> None:
        self.resets.append((stream_id, code))

    def take_output(self) -> list[bytes]:
        return []


def _buggy_on(session: PairedStreamSession, broken: set[int]) -> list[int]:
    """Handling an event of a `broken` stream raises; the others are recorded."""
    handled: list[int] = []

    def handle(event: _Event) -> bool:
        if event.stream_id in broken:
            raise RuntimeError(f"a bug reached on stream {event.stream_id}")
        handled.append(event.stream_id)
        return True

    session._handle = handle  # type: ignore[assignment,method-assign]
    return handled


def _failures(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == logger and "failed, resetting it" in r.getMessage()]


def test_a_bug_on_one_spdy_stream_resets_it_and_the_session_goes_on(caplog):
    async def run() -> tuple[SpdyPortForwardSession, _Codec, list[int]]:
        session = SpdyPortForwardSession(
            ForwardContext(NamedNetnsRuntime(Config())), Sandbox("sb", "/nonexistent"),
            5.0, 0.0, lambda chunks: None, lambda: None)
        codec = _Codec([_Event(1), _Event(3), _Event(5)])
        session.codec = codec  # type: ignore[assignment]
        handled = _buggy_on(session, {1, 3})
        session._error_lines.left = 0  # the client's protocol-error lines are spent
        session.receive(b"two reads")
        session.receive(b"of the same events")
        return session, codec, handled

    with caplog.at_level(logging.ERROR):
        session, codec, handled = asyncio.run(run())
    assert handled == [5, 5]  # the other stream's events, in both reads
    assert not session.closing
    assert codec.resets == [(1, spdy.INTERNAL_ERROR), (3, spdy.INTERNAL_ERROR)] * 2
    lines = _failures(caplog, "crishim.spdy")
    assert [r.getMessage() for r in lines[:2]] == [
        "spdy sandbox=sb: stream 1 failed, resetting it: RuntimeError: a bug reached on "
        "stream 1",
        "spdy sandbox=sb: stream 3 failed, resetting it: RuntimeError: a bug reached on "
        "stream 3"]
    assert len(lines) == 4 and all(r.levelno == logging.ERROR for r in lines)
    assert session._error_lines.suppressed == 0  # not charged to the client's budget
    assert [r.exc_info is not None for r in lines] == [True, False, False, False]


def test_a_bug_on_one_http2_stream_resets_it_and_the_session_goes_on(caplog):
    async def run() -> tuple[H2PortForwardSession, _Codec, list[int]]:
        ctx = ForwardContext(NamedNetnsRuntime(Config()))
        settings = SessionSettings(ctx, 5.0, 0.0, LogBudget(logging.getLogger("t"), 0, "%d"))
        session = H2PortForwardSession(settings, lambda chunks: None, lambda: None,
                                       sandbox=Sandbox("sb", "/nonexistent"),
                                       path="/portforward/x")
        codec = _Codec([])
        session.codec = codec  # type: ignore[assignment]
        handled = _buggy_on(session, {1})
        session._dispatch([_Event(1), _Event(3), _Event(1)])  # type: ignore[list-item]
        return session, codec, handled

    with caplog.at_level(logging.ERROR):
        session, codec, handled = asyncio.run(run())
    assert handled == [3] and not session.closing
    assert codec.resets == [(1, ErrorCodes.INTERNAL_ERROR)] * 2
    lines = _failures(caplog, "crishim.h2")
    assert len(lines) == 2
    assert lines[0].getMessage().startswith("h2 sandbox=sb: stream 1 failed")
    assert lines[0].exc_info is not None and lines[1].exc_info is None


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def test_a_failed_request_is_a_budgeted_line_with_one_traceback(caplog, monkeypatch):
    def broken_starter(upgrade: object) -> None:
        raise KeyError("a bug in a starter")

    monkeypatch.setitem(server_module.UPGRADES, "broken", broken_starter)

    async def run(requests: int) -> list[_Transport]:
        server = StreamServer(TokenStore(), ForwardContext(NamedNetnsRuntime(Config())))

        async def admitted(method: str, target: str) -> object:
            return object()

        server.admission = admitted  # type: ignore[assignment]
        transports = []
        for _ in range(requests):
            transport = _Transport()
            await server.dispatch(transport,  # type: ignore[arg-type]
                                  Request("GET", "/portforward/secret-token-value",
                                          [(b"upgrade", b"broken")]), b"")
            transports.append(transport)
        server.refusal_log.flush()
        return transports

    with caplog.at_level(logging.INFO, logger="crishim.stream"):
        transports = asyncio.run(run(2000))
    assert all(t.closed and t.written.startswith(b"HTTP/1.1 500 ") for t in transports)
    lines = [r for r in caplog.records if "failed: KeyError" in r.getMessage()]
    assert lines[0].getMessage() == ("stream request GET /portforward/secr… failed: "
                                     "KeyError: 'a bug in a starter'")
    assert lines[0].exc_info is not None
    assert all(r.exc_info is None for r in lines[1:])
    assert len(lines) < 2000  # within the refusal budget; the rest counted
    assert any("not logged" in r.getMessage() for r in caplog.records)


def test_failed_stream_lines_are_as_many_as_protocol_error_log_lines(caplog):
    """A client that finds a bug may trigger it on every frame: a session logs
    protocol_error_log_lines of them, the rest counted in one line as it ends (with
    log_lines_per_second as the bound instead, 5,000 such frames wrote 1,001 lines)."""
    async def run() -> SpdyPortForwardSession:
        session = SpdyPortForwardSession(
            ForwardContext(NamedNetnsRuntime(Config()), flood=FloodLimits(
                protocol_error_log_lines=3)), Sandbox("sb", "/nonexistent"),
            5.0, 0.0, lambda chunks: None, lambda: None)
        session.codec = _Codec([_Event(2 * i + 1) for i in range(50)])  # type: ignore[assignment]
        _buggy_on(session, {2 * i + 1 for i in range(50)})
        session.receive(b"fifty events, each hitting the bug")
        session.end(close_transport=False)
        return session

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert len(_failures(caplog, "crishim.spdy")) == 3
    assert [r.getMessage() for r in caplog.records if "not logged" in r.getMessage()] == [
        "spdy sandbox=sb: 47 more failed streams not logged (protocol_error_log_lines)"]


def test_a_traceback_is_not_spent_on_a_line_the_budget_drops(caplog):
    """traceback_once was asked before the budget decided: a first failure whose line was
    dropped (the refusal budget spent by a client's bad tokens) took its type's only
    traceback with it."""
    budget = LogBudget(logging.getLogger("crishim.t"), 1, "%d more")
    with caplog.at_level(logging.INFO, logger="crishim.t"):
        for _ in range(10):
            budget.log(logging.INFO, "spend the burst")
        budget.log(logging.ERROR, "dropped", traceback_of=KeyError("first"))
        budget._bucket = None  # type: ignore[assignment]  # the budget has room again
        budget.log(logging.ERROR, "written", traceback_of=KeyError("second"))
    written = [r for r in caplog.records if r.getMessage() == "written"]
    assert len(written) == 1 and written[0].exc_info is not None
    assert not [r for r in caplog.records if r.getMessage() == "dropped"]

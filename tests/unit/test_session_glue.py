"""The asyncio glue under every server session: an exception that escapes a session's
handling of one client's bytes ends that session with one logged line, never the loop's
fatal-error path (a traceback and whatever asyncio then does to the transport)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from crishim import logs
from crishim.budget import LogBudget
from crishim.config import Config
from crishim.forward import ForwardContext
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from crishim.stream.portforward_h2 import H2PortForwardSession
from crishim.stream.portforward_spdy import SpdyPortForwardSession
from crishim.stream.session import ServerSession, SessionProtocol, SessionSettings


class _Exploding:
    """A codec stand-in for one input that hits a bug."""

    def receive_data(self, data: bytes, lent: bool = False) -> list[object]:
        raise ValueError("a bug reached by this input")

    def take_output(self) -> list[bytes]:
        return []

    def goaway(self, code: int) -> None:
        pass


async def _explode(make_session: Callable[[ForwardContext, asyncio.Transport], ServerSession],
                   codec: object, data: bytes) -> tuple[bool, bool, bytes]:
    """A session on one end of a socket pair, its codec one that raises on any input, fed
    `data` through the glue: (the session closed, its transport closing, what the other
    end then read)."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    session = make_session(ForwardContext(NamedNetnsRuntime(Config())), transport)
    closed: list[bool] = []
    session.on_closed = lambda: closed.append(True)
    session.codec = codec  # type: ignore[attr-defined]
    protocol = SessionProtocol(session, transport)
    transport.set_protocol(protocol)
    protocol.data_received(data)  # must not raise
    await asyncio.sleep(0.05)
    eof = await loop.sock_recv(theirs, 100)  # the session closed its transport
    theirs.close()
    return bool(closed), transport.is_closing(), eof


def test_an_exception_from_a_sessions_input_ends_only_that_session(caplog, monkeypatch):
    """One line per session ended; the traceback with the first of its type only."""
    monkeypatch.setattr(logs, "_TRACED", set())

    def spdy(ctx: ForwardContext, transport: asyncio.Transport) -> ServerSession:
        return SpdyPortForwardSession(ctx, Sandbox("sb", "/nonexistent"), 5.0, 0.0,
                                      transport.writelines, transport.close)

    with caplog.at_level(logging.ERROR, logger="crishim.stream"):
        for _ in range(2):
            closed, closing, eof = asyncio.run(_explode(spdy, _Exploding(),
                                                        b"\x80\x03\x00\x01"))
            assert closed and closing and eof == b""
    lines = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(lines) == 2 and "a bug reached by this input" in lines[0].getMessage()
    assert lines[0].exc_info is not None and lines[0].exc_info[0] is ValueError
    assert lines[1].exc_info is None  # the same type again: the line alone


class _ExplodingH2(_Exploding):
    highest_inbound_stream_id = 0


def test_an_exception_before_an_http2_token_is_redeemed_ends_only_that_session(caplog):
    """By prior knowledge an HTTP/2 session has no sandbox until its first stream's token
    is redeemed: the error line says so rather than failing on the missing sandbox."""
    async def admit(method: str, path: str, methods: object) -> object:
        raise AssertionError("never reached")

    def h2(ctx: ForwardContext, transport: asyncio.Transport) -> ServerSession:
        settings = SessionSettings(ctx, 5.0, 0.0, LogBudget(logging.getLogger("t"), 0, "%d"))
        session = H2PortForwardSession(settings, transport.writelines,
                                       transport.close, admit=admit)  # type: ignore[arg-type]
        assert session.sandbox is None
        return session

    with caplog.at_level(logging.ERROR, logger="crishim.stream"):
        closed, _, _ = asyncio.run(_explode(h2, _ExplodingH2(),
                                            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    assert closed
    lines = [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()]
    assert lines == ["h2 sandbox=?: ending the session after an unexpected error: ValueError: "
                     "a bug reached by this input"]

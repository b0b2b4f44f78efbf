"""Client sessions against stream servers that hang up at once: every attempt is one
SessionError with a message, on the event loop crishim runs (uvloop), never a
RuntimeError from a transport that closed meanwhile nor asyncio's "never retrieved"."""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest
import uvloop

from crishim.client.transports import TRANSPORTS, SessionError, open_session
from tests.support.fake_servers import FakeServer

TRIALS = 20


class AcceptAndClose(FakeServer):
    """A listening socket whose every connection is closed as soon as it is accepted."""

    def __init__(self) -> None:
        super().__init__(backlog=128)

    def handle(self, conn: socket.socket) -> None:
        conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stream_server_that_accepts_and_closes_is_a_session_error_every_time(transport):
    server = AcceptAndClose()
    unhandled: list[str] = []

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unhandled.append(context["message"]))
        messages = []
        for _ in range(TRIALS):
            with pytest.raises(SessionError) as e:
                await open_session(f"http://127.0.0.1:{server.port}/portforward/x",
                                   transport, [80], ping_interval=0, timeout=10)
            messages.append(str(e.value))
        gc.collect()  # futures with an exception nobody retrieved say so when collected
        await asyncio.sleep(0.1)
        return messages

    try:
        messages = uvloop.run(main())
    finally:
        server.close()
    assert all("closed the connection" in m for m in messages), set(messages)
    assert not unhandled, unhandled


def test_h2_without_settings_in_time_is_one_error_and_no_unretrieved_future():
    """A server that accepts and says nothing: the h2 handshake times out, and the
    connection's close afterwards fails the SETTINGS wait nobody awaits any more;
    asyncio must not print 'Future exception was never retrieved' for it."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    unhandled: list[str] = []

    async def main() -> str:
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: unhandled.append(context["message"]))
        try:
            await open_session(f"http://127.0.0.1:{port}/portforward/x", "h2",
                               ping_interval=0, timeout=0.5)
        except SessionError as e:
            message = str(e)  # and the traceback, which holds the session, let go
        else:
            raise AssertionError("the h2 handshake with a silent server succeeded")
        await asyncio.sleep(0.1)  # the aborted connection's connection_lost
        gc.collect()
        await asyncio.sleep(0.1)
        return message

    try:
        message = uvloop.run(main())
    finally:
        silent.close()
    assert message == f"no HTTP/2 SETTINGS from 127.0.0.1:{port} in 0.5s"
    assert not unhandled, unhandled

"""2,000 forwarded connections at once on one session of crishim's own client, over every
transport that multiplexes: none refused, every echo intact, the session survives."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from crishim.client.transports import open_session
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT

COUNT = 2000


async def _echo_all(url: str, transport: str) -> tuple[list[int], float]:
    session = await open_session(url, transport)
    writers = []

    async def one(i: int) -> bool:
        reader, writer = await session.open_stream(ECHO_PORT)
        writers.append(writer)
        message = b"%d\n" % i * 64
        writer.write(message)
        return await asyncio.wait_for(reader.readexactly(len(message)), 120) == message

    try:
        results = await asyncio.gather(*(one(i) for i in range(COUNT)),
                                       return_exceptions=True)
        bad = [i for i, ok in enumerate(results) if ok is not True]
        # all are still open; the session still answers
        rtt = await session.ping(30)
    finally:
        for writer in writers:
            writer.close()
        session.close()
    return bad, rtt


@pytest.mark.parametrize("transport", ["spdy", "spdy-over-websocket", "h2"])
def test_2000_concurrent_forwards_on_one_client_session(podnet, transport):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--log-level", "warning") as proc:
        bad, rtt = uvloop.run(_echo_all(proc.port_forward_url("sb"), transport))
        assert bad == [], (len(bad), bad[:10], proc.log()[-2000:])
        assert rtt > 0
        assert "Traceback" not in proc.log()


async def _open_echoes(url: str, count: int) -> tuple[list[str], int, bool]:
    """count connections on one h2 session: what each got, the server's advertised
    MAX_CONCURRENT_STREAMS, and whether the session still carries a new connection after
    the refusals."""
    session = await open_session(url, "h2")
    writers = []

    async def one(i: int) -> str:
        reader, writer = await session.open_stream(ECHO_PORT)
        writers.append(writer)
        writer.write(b"+")
        try:
            return (await asyncio.wait_for(reader.read(1), 30)).decode() or "eof"
        except Exception as e:  # the refusal, as the client reports it
            return type(e).__name__

    try:
        got = list(await asyncio.gather(*(one(i) for i in range(count))))
        advertised = session.codec.remote_settings.max_concurrent_streams
        for writer in writers[:2]:
            writer.close()
        await asyncio.sleep(0.5)
        again = await one(count)
    finally:
        session.close()
    return got, advertised, again == "+"


def test_h2_session_limit_is_max_connections_per_session(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}",
                        "--max-connections-per-session", "8") as proc:
        got, advertised, again = uvloop.run(_open_echoes(proc.port_forward_url("sb"), 12))
        log = proc.log()
    assert advertised == 2 * 8 + 8
    assert got.count("+") == 8, got
    assert again  # a finished connection frees a place; the session was never ended
    assert "max_connections_per_session" in log
    assert "Traceback" not in log

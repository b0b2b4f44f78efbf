"""Hostile ports: a port header or query value that is not 1 to 5 ASCII digits ('²' passes
str.isdigit() and fails int(); Arabic-Indic and fullwidth digits pass int()) refuses that
stream only; the session, its live connections and the server carry on."""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

import pytest

from tests.support import SANDBOX, peers
from tests.support.h2_pf_client import H2Client
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient

# SPDY header values are latin-1 on the wire: superscripts are the non-ASCII digits it carries
BAD_PORTS = ["²", "8¹", "0x50", "+80", " 80", "080000", "99999", ""]
PROTOCOL_ERROR = 1


def _new_log(proc, offset: int) -> str:
    return proc.log()[offset:]


def _echo_ok(client: SpdyPortForwardClient) -> None:
    fwd = client.roundtrip(ECHO_PORT, b"still here")
    assert bytes(fwd.received) == b"still here", fwd.error_text


@pytest.mark.parametrize("bad", BAD_PORTS)
def test_spdy_bad_port_refuses_only_that_stream(crishim, bad):
    offset = len(crishim.log())
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX)) as client:
        live = client.forward(ECHO_PORT)
        live.send(b"before ")
        assert client.wait(lambda: bytes(live.received) == b"before ")
        refused = client.forward(bad)  # type: ignore[arg-type]
        assert client.wait(lambda: refused.reset_status is not None
                           and refused.error_reset_status is not None)
        assert refused.reset_status == PROTOCOL_ERROR
        # the sibling's connection still works, and the session takes new ones
        live.send(b"after")
        assert client.wait(lambda: bytes(live.received) == b"before after")
        assert not client.closed and not client.terminated_reason
        _echo_ok(client)
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX)) as other:
        _echo_ok(other)
    log = _new_log(crishim, offset)
    assert "Traceback" not in log
    assert "invalid port" in log


@pytest.mark.parametrize("bad", ["²", "٨٠", "８０", "65536", "0"])
def test_h2_bad_port_refuses_only_that_stream(crishim, bad):
    offset = len(crishim.log())

    async def go() -> None:
        client = await H2Client.connect(crishim.port_forward_url(SANDBOX), "prior")
        try:
            live = await client.forward(ECHO_PORT)
            await live.write(b"before ")
            assert (await live.read_until(b"before ")) == b"before "
            sid = client.open_stream(client.request_headers(
                streamtype="data", port=bad, requestid="hostile"))
            await asyncio.wait_for(client.streams[sid].ended.wait(), 30)
            assert client.streams[sid].status == 400
            assert b"invalid port" in client.streams[sid].body()
            await live.write(b"after", end_stream=True)
            assert (await live.read_all(30)) == b"before after"
            again = await client.forward(ECHO_PORT)
            await again.write(b"x", end_stream=True)
            assert (await again.read_all(30)) == b"x"
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(go(), 120))
    log = _new_log(crishim, offset)
    assert "Traceback" not in log


@pytest.mark.parametrize("query", ["port=%C2%B2", "port=%D9%A8%D9%A0", "port=%EF%BC%98",
                                   "ports=80,%C2%B2"])
def test_websocket_bad_port_query_is_400_naming_it(crishim, query):
    offset = len(crishim.log())
    u = urlsplit(crishim.port_forward_url(SANDBOX))
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {u.path}?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n".encode())
        answer = peers.recv_all(s)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"invalid port" in answer
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX)) as other:
        _echo_ok(other)
    assert "Traceback" not in _new_log(crishim, offset)

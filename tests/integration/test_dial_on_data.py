"""Pairs opened ahead (`dial: on-data`, portforward.crishim.dev/v1, docs/protocol.md 8.5):
crishim serve answers such a pair and dials its pod only when the data stream's first DATA
frame (an empty one too) or its end comes; crishim's client opens a port's next pair that
way and its next connection takes it. The pod side is a server that greets every
connection it accepts, so a dial shows as a greeting on the data stream and in its count."""

from __future__ import annotations

import asyncio
import time

import pytest

from crishim.client.transports import open_session
from crishim.protocols import spdy
from crishim.protocols.constants import PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL
from tests.support import SANDBOX, until
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient

GREETER_PORT = 9110
V1 = (PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL)
ON_DATA = {"dial": "on-data"}


class _Greeter(asyncio.Protocol):
    """Counts the connections it accepts, greets each, then echoes."""

    accepted = 0

    def connection_made(self, transport):
        type(self).accepted += 1
        self.transport = transport
        transport.write(b"hello\n")

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.close()


@pytest.fixture(scope="module")
def greeter(podnet):
    podnet.listen_extra("127.0.0.1", GREETER_PORT, _Greeter)
    return _Greeter


def _quiet(client: SpdyPortForwardClient, seconds: float) -> None:
    """Read what comes for `seconds` (nothing should)."""
    client.wait(lambda: False, timeout=seconds)


def test_a_pair_opened_ahead_is_dialled_by_its_first_data_frame_not_before(crishim, greeter):
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX), versions=V1) as client:
        before = greeter.accepted
        fwd = client.forward(GREETER_PORT, data_headers=ON_DATA)
        assert client.wait(lambda: len(fwd.replied) == 2)
        assert fwd.reply_headers[fwd.data_sid].get("dial") == "on-data"  # acknowledged
        assert fwd.reply_headers[fwd.error_sid].get("dial") is None
        _quiet(client, 0.3)
        assert greeter.accepted == before and fwd.received == b""  # nothing dialled
        fwd.send(b"")  # an empty DATA frame: go
        assert client.wait(lambda: fwd.received == b"hello\n")
        assert greeter.accepted == before + 1
        fwd.send(b"ping")
        fwd.close_write()
        assert client.wait(fwd.finished)
        assert fwd.received == b"hello\nping" and fwd.error_text == ""


def test_a_pair_opened_ahead_and_half_closed_is_dialled_then_half_closed(crishim, greeter):
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX), versions=V1) as client:
        before = greeter.accepted
        fwd = client.forward(GREETER_PORT, data_headers=ON_DATA)
        fwd.close_write()  # no data at all: the end alone dials
        assert client.wait(fwd.finished)
        assert fwd.received == b"hello\n" and fwd.data_fin
        assert greeter.accepted == before + 1


def test_a_pair_opened_ahead_and_reset_is_never_dialled(crishim, greeter):
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX), versions=V1) as client:
        before = greeter.accepted
        fwd = client.forward(GREETER_PORT, data_headers=ON_DATA)
        assert client.wait(lambda: len(fwd.replied) == 2)
        fwd.reset()
        _quiet(client, 0.3)
        assert greeter.accepted == before
        assert client.roundtrip(ECHO_PORT, b"still here").received == b"still here"


def test_dial_on_data_is_crishims_version_only(crishim, greeter):
    """Under portforward.k8s.io the header is an unknown one: dialled at once, no answer."""
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX)) as client:
        fwd = client.forward(GREETER_PORT, data_headers=ON_DATA)
        assert client.wait(lambda: fwd.received == b"hello\n")  # without sending anything
        assert "dial" not in fwd.reply_headers[fwd.data_sid]


def test_an_unknown_dial_is_refused_alone(crishim, greeter):
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX), versions=V1) as client:
        fwd = client.forward(GREETER_PORT, data_headers={"dial": "later"})
        assert client.wait(lambda: fwd.reset_status is not None)
        assert fwd.reset_status == spdy.PROTOCOL_ERROR
        assert client.roundtrip(ECHO_PORT, b"still here").received == b"still here"


@pytest.mark.parametrize("transport", ["spdy", "h2", "spdy-over-websocket"])
def test_the_client_opens_a_ports_next_pair_ahead_and_its_next_connection_takes_it(
        crishim, greeter, transport):
    async def main() -> None:
        session = await open_session(crishim.port_forward_url(SANDBOX), transport)
        try:
            before = greeter.accepted
            reader, writer = await session.open_stream(GREETER_PORT)
            assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
            first = writer.transport
            assert not first.opened_ahead
            await until(lambda: GREETER_PORT in session._ahead)  # after the first bytes
            ahead = session._ahead[GREETER_PORT]
            await asyncio.sleep(0.3)
            assert greeter.accepted == before + 1  # opened, not dialled
            reader2, writer2 = await session.open_stream(GREETER_PORT)
            assert writer2.transport is ahead and GREETER_PORT not in session._ahead
            # the local side sent nothing: the empty DATA frame had the server dial
            assert await asyncio.wait_for(reader2.readline(), 10) == b"hello\n"
            assert greeter.accepted == before + 2
            writer2.write(b"ping")
            writer2.write_eof()
            assert await asyncio.wait_for(reader2.read(), 10) == b"ping"
            writer.close()
            # the second connection's reply opened the next pair ahead in turn
            await until(lambda: GREETER_PORT in session._ahead)
            assert session._ahead[GREETER_PORT] is not ahead
        finally:
            session.close()
            await session.wait_closed()
        await asyncio.sleep(0.3)
        assert greeter.accepted == before + 2  # the unused pair never reached the pod

    asyncio.run(main())


def test_the_client_opens_nothing_ahead_where_the_server_speaks_upstream_only(crishim,
                                                                              greeter):
    async def main() -> None:
        session = await open_session(crishim.port_forward_url(SANDBOX), "spdy",
                                     offer_udp=False)  # offers portforward.k8s.io alone
        try:
            reader, writer = await session.open_stream(GREETER_PORT)
            assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                assert not session._ahead and not session._opening_ahead
                await asyncio.sleep(0.02)
            writer.close()
        finally:
            session.close()
            await session.wait_closed()

    asyncio.run(main())

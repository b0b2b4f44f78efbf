"""Pairs opened ahead (`dial: on-data`, portforward.crishim.dev/v1, docs/protocol.md 8.5):
crishim serve answers such a pair and dials its pod only when the data stream's first DATA
frame (an empty one too) or its end comes; crishim's client opens a port's next pair that
way and its next connection takes it. The pod side is a server that greets every
connection it accepts, so a dial shows as a greeting on the data stream and in its count."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from crishim.client.cri import CriClient
from crishim.client.portforward import cri_opener
from crishim.client.transports import open_session
from crishim.protocols import spdy
from crishim.protocols import websocket as ws
from crishim.protocols.constants import PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL
from tests.support import SANDBOX, until
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT, SINK_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient
from tests.support.ws_channel_client import RawChannelClient

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


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_a_pair_dialled_by_an_empty_frame_then_carries_more_than_its_window(crishim,
                                                                          transport):
    """The empty DATA frame that dials a pair opened ahead acknowledges nothing: it must
    not leave the stream's window withheld (HTTP/2 held it for good, and an upload past
    the first window stalled)."""
    size = 40 << 20  # beyond crishim serve's HTTP/2 stream window (16 MiB)

    async def main() -> None:
        session = await open_session(crishim.port_forward_url(SANDBOX), transport)
        try:
            reader, writer = await session.open_stream(SINK_PORT)
            writer.write_eof()
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"0 ")
            await until(lambda: SINK_PORT in session._ahead)
            reader, writer = await session.open_stream(SINK_PORT)
            assert writer.transport.opened_ahead
            await asyncio.sleep(0.2)  # the empty frame has dialled by now
            block = bytes(1 << 20)

            async def upload() -> None:
                for _ in range(size >> 20):
                    writer.write(block)
                    await writer.drain()
                writer.write_eof()
            await asyncio.wait_for(upload(), 30)
            answer = await asyncio.wait_for(reader.readline(), 30)
            assert answer.split()[0] == str(size).encode()
        finally:
            session.close()
            await session.wait_closed()

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


# --------------------------------------------------------------------------- WebSocket channels


def test_a_channel_session_opened_ahead_dials_at_its_first_message(crishim, greeter):
    """Crishim-Dial: on-data on the channel protocol's upgrade: the 101 says so, and the
    port prefaces and the dial wait for the client's first message (an empty one too)."""
    url = crishim.port_forward_url(SANDBOX, [GREETER_PORT])
    before = greeter.accepted
    ahead = RawChannelClient(url, [GREETER_PORT], [ws.CHANNEL_BINARY],
                             headers=[(b"Crishim-Dial", b"on-data")])
    try:
        assert ahead.response.status == 101
        assert dict(ahead.response.headers).get(b"crishim-dial") == b"on-data"
        with pytest.raises(TimeoutError):
            ahead.pump(lambda: ahead.events, timeout=0.3)
        assert ahead.events == [] and greeter.accepted == before  # nothing dialled
        ahead.codec.send_empty(0)
        ahead.sock.sendall(ahead.codec.data_to_send())
        ahead.pump(lambda: ahead.data(0) == b"hello\n")
        assert ahead.prefaces() == [(0, GREETER_PORT, False), (0, GREETER_PORT, True)]
        assert greeter.accepted == before + 1
    finally:
        ahead.close()
    plain = RawChannelClient(crishim.port_forward_url(SANDBOX, [GREETER_PORT]),
                             [GREETER_PORT], [ws.CHANNEL_BINARY])
    try:  # without the header: at once, and the 101 says so
        assert dict(plain.response.headers).get(b"crishim-dial") == b"at-once"
        plain.pump(lambda: plain.data(0) == b"hello\n")
    finally:
        plain.close()
    bad = RawChannelClient(crishim.port_forward_url(SANDBOX, [GREETER_PORT]),
                           [GREETER_PORT], [ws.CHANNEL_BINARY],
                           headers=[(b"Crishim-Dial", b"later")])
    assert bad.response.status == 400 and b"Crishim-Dial" in bad.body()
    bad.close()


def test_port_forward_over_channels_takes_a_session_opened_ahead(crishim, greeter):
    """crishim port-forward's channel connections after the first find their session
    open (Crishim-Dial: on-data): the pod sees each connection when it is made locally."""

    async def main() -> None:
        cri = CriClient(f"unix://{crishim.socket}")
        opener = cri_opener(cri, SANDBOX)
        before = greeter.accepted
        try:
            first = await opener("websocket", [GREETER_PORT], 0)
            assert first.dial == "at-once"  # crishim serve: it may ask
            reader, writer = await first.open_stream(GREETER_PORT)
            assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
            await until(lambda: any(f.done() for _, f in opener._spares.values()))
            _, spare = opener._spares[(GREETER_PORT,)]
            ahead = spare.result()
            assert ahead.dial == "on-data"
            await asyncio.sleep(0.3)
            assert greeter.accepted == before + 1  # open, not dialled
            second = await opener("websocket", [GREETER_PORT], 0)
            assert second is ahead
            reader2, writer2 = await second.open_stream(GREETER_PORT)
            # the local side sent nothing: the empty message had the server dial
            assert await asyncio.wait_for(reader2.readline(), 10) == b"hello\n"
            assert greeter.accepted == before + 2
            writer2.write(b"ping")
            assert await asyncio.wait_for(reader2.readexactly(4), 10) == b"ping"
            # a spare the server closed meanwhile is replaced by a fresh session
            await until(lambda: any(f.done() for _, f in opener._spares.values()))
            _, spare = opener._spares[(GREETER_PORT,)]
            spare.result().close()
            third = await opener("websocket", [GREETER_PORT], 0)
            assert third is not spare.result()
            reader3, _ = await third.open_stream(GREETER_PORT)
            assert await asyncio.wait_for(reader3.readline(), 10) == b"hello\n"
            for s in (first, second, third):
                s.close()
            await until(lambda: any(f.done() for _, f in opener._spares.values()))
            _, spare = opener._spares[(GREETER_PORT,)]
            unused = spare.result()
        finally:
            opener.close()
            cri.close()
        await until(lambda: unused.closed.done())  # close() ends the unused one
        await asyncio.sleep(0.3)
        assert greeter.accepted == before + 3  # and it never reached the pod

    asyncio.run(main())


def test_pairs_opened_ahead_meet_the_connection_limits(podnet, greeter):
    """A pair opened ahead holds a place among its session's connections
    (max_connections_per_session refuses the one past it, at its opening); the node's
    max_connections counts it from its first data, and refuses it then."""
    # 4 on the node, 2 per session (no session may hold more than half)
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--max-connections-per-session", "2", "--max-connections", "4") as proc:
        url = proc.port_forward_url
        with SpdyPortForwardClient(url(SANDBOX), versions=V1) as client, \
                SpdyPortForwardClient(url(SANDBOX)) as other1, \
                SpdyPortForwardClient(url(SANDBOX)) as other2:
            before = greeter.accepted
            ahead = [client.forward(GREETER_PORT, data_headers=ON_DATA) for _ in range(3)]
            assert client.wait(lambda: ahead[2].reset_status is not None)
            assert ahead[2].reset_status == spdy.CANCEL
            assert client.wait(lambda: all(len(f.replied) == 2 for f in ahead[:2]))
            assert all(f.reset_status is None for f in ahead[:2])
            # the node's four connections, taken by two other sessions
            live = [o.forward(GREETER_PORT) for o in (other1, other2) for _ in range(2)]
            for fwd in live:
                assert fwd.client.wait(lambda f=fwd: f.received == b"hello\n")
            assert greeter.accepted == before + 4  # the pairs ahead dialled nothing
            ahead[0].send(b"")  # no room on the node: refused now, alone
            assert client.wait(lambda: ahead[0].reset_status is not None)
            assert ahead[0].reset_status == spdy.CANCEL and greeter.accepted == before + 4
            live[0].close_write()
            assert other1.wait(live[0].finished)
            ahead[1].send(b"")  # room again
            assert client.wait(lambda: ahead[1].received == b"hello\n")
            live[3].send(b"still")  # the other sessions' connections go on
            assert other2.wait(lambda: live[3].received == b"hello\nstill")
        log = proc.log()
    assert "max_connections_per_session" in log and "max_connections)" in log
    assert "Traceback" not in log


def test_a_drain_ends_what_was_opened_ahead_and_nothing_else(podnet, greeter):
    """SIGTERM: pairs and channel sessions opened ahead would be new connections, so the
    drain ends them at once (RST_STREAM CANCEL; close 1001); live connections go on."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "60s")
    with proc:
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX), versions=V1)
        live = client.forward(GREETER_PORT)
        assert client.wait(lambda: live.received == b"hello\n")
        ahead = client.forward(GREETER_PORT, data_headers=ON_DATA)
        assert client.wait(lambda: len(ahead.replied) == 2)
        channel = RawChannelClient(proc.port_forward_url(SANDBOX, [GREETER_PORT]),
                                   [GREETER_PORT], [ws.CHANNEL_BINARY],
                                   headers=[(b"Crishim-Dial", b"on-data")])
        before = greeter.accepted
        proc.proc.send_signal(signal.SIGTERM)
        assert client.wait(lambda: client.goaway and ahead.reset_status is not None)
        assert ahead.reset_status == spdy.CANCEL and ahead.received == b""
        channel.pump(lambda: False)  # until its close
        assert channel.closed is not None and channel.closed.code == ws.CLOSE_GOING_AWAY
        assert channel.events == []
        channel.close()
        live.send(b"still")  # the live connection goes on through the drain
        assert client.wait(lambda: live.received == b"hello\nstill")
        assert greeter.accepted == before
        client.close()
        assert proc.proc.wait(30) == 0
    assert "Traceback" not in proc.log()


def test_a_drain_resets_an_http2_pair_opened_ahead(podnet, greeter):
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "60s")
    with proc:
        async def main() -> None:
            session = await open_session(proc.port_forward_url(SANDBOX), "h2")
            reader, writer = await session.open_stream(GREETER_PORT)
            assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
            await until(lambda: GREETER_PORT in session._ahead)
            ahead = session._ahead[GREETER_PORT]
            before = greeter.accepted
            proc.proc.send_signal(signal.SIGTERM)
            await until(lambda: ahead.done.done())  # reset by the drain
            assert GREETER_PORT not in session._ahead
            writer.write(b"still")  # the live connection goes on
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"still"
            assert greeter.accepted == before
            session.close()
            await session.wait_closed()

        asyncio.run(main())
        assert proc.proc.wait(30) == 0
    assert "Traceback" not in proc.log()

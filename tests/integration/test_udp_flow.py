"""The server side of a forwarded UDP flow (crishim/forward_udp.py) against a real UDP
echo in a real netns; the transport channel is a recorder, the rest is real."""

import asyncio
import socket
import time

import pytest

from crishim.config import Config
from crishim.forward import ForwardContext
from crishim.forward_udp import ForwardedFlow
from crishim.netns import bind_udp_in_netns, dial_udp_localhost, forget_udp_listeners
from crishim.protocols.datagram import DatagramDecoder, encode_datagram, encode_datagrams
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from tests.support import until
from tests.support.podnet import UDP_CLOSED_PORT, UDP_ECHO_PORT

CHECK_SIZES = (1, 512, 1472, 8192, 65507)


class RecordingChannel:
    def __init__(self) -> None:
        self.decoder = DatagramDecoder()
        self.datagrams: list[bytes] = []
        self.eof = self.aborted = False
        self.finished: list[str | None] = []
        self.arrived = asyncio.Event()

    def send(self, data: bytes) -> None:
        self.datagrams += self.decoder.receive_data(data)
        self.arrived.set()

    def send_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def finish(self, error: str | None) -> None:
        self.finished.append(error)
        self.arrived.set()


class OneSession:
    writing_paused = False

    def __init__(self) -> None:
        self.ended: list = []

    def connection_finished(self, conn) -> None:
        self.ended.append(conn)

    def pause_client_reading(self, key) -> None:
        pass

    def resume_client_reading(self, key) -> None:
        pass


def _flow(podnet, port, **ctx_kw):
    plugin = NamedNetnsRuntime(Config())
    ctx = ForwardContext(plugin, **ctx_kw)
    channel, session = RecordingChannel(), OneSession()
    flow = ForwardedFlow(ctx, session, Sandbox("sb", netns_path=podnet.path), port, channel,
                         "test")
    return flow, channel, session


def test_flow_echoes_datagrams_of_every_size_with_boundaries_kept(podnet):
    async def go():
        flow, channel, session = _flow(podnet, UDP_ECHO_PORT)
        flow.start()
        payloads = [bytes([n % 251]) * n for n in CHECK_SIZES]
        wire = encode_datagrams(payloads)
        flow.client_data(wire[:3])  # before the dial completes: held, then sent
        flow.client_data(wire[3:])
        await until(lambda: len(channel.datagrams) == len(payloads))
        assert sorted(channel.datagrams, key=len) == payloads
        flow.client_eof()
        assert channel.eof and channel.finished == [None] and not channel.aborted
        assert session.ended == [flow] and flow.sock is None
        assert (flow.datagrams_up, flow.datagrams_down) == (5, 5)
    asyncio.run(go())


def test_icmp_port_unreachable_ends_only_that_flow_quietly(podnet):
    async def go():
        flow, channel, session = _flow(podnet, UDP_CLOSED_PORT)
        flow.start()
        flow.client_data(encode_datagram(b"anyone?"))
        await until(lambda: flow.done)
        assert channel.aborted and channel.finished == [None]  # quiet policy: no text
        assert "ICMP port unreachable" in flow.reason
    asyncio.run(go())


def test_icmp_port_unreachable_is_written_under_the_verbose_policy(podnet):
    async def go():
        flow, channel, _ = _flow(podnet, UDP_CLOSED_PORT, error_policy="verbose")
        flow.start()
        flow.client_data(encode_datagram(b"anyone?"))
        await until(lambda: flow.done)
        assert "Connection refused" in channel.finished[0]
    asyncio.run(go())


def test_idle_flow_ends_with_eof(podnet):
    async def go():
        flow, channel, _ = _flow(podnet, UDP_ECHO_PORT, udp_idle_timeout=0.2)
        flow.start()
        flow.client_data(encode_datagram(b"ping"))
        await until(lambda: flow.done)
        assert channel.datagrams == [b"ping"]
        assert channel.eof and channel.finished == [None] and not channel.aborted
        assert flow.reason == "idle for 0.2s"
    asyncio.run(go())


def test_a_length_beyond_udp_resets_the_flow(podnet):
    async def go():
        flow, channel, _ = _flow(podnet, UDP_ECHO_PORT)
        flow.start()
        flow.client_data(b"\xff\xf0" + b"x" * 100)
        assert flow.done and channel.aborted and channel.finished == [None]
        assert "65520 bytes" in flow.reason
    asyncio.run(go())


def test_client_reset_closes_the_pod_socket(podnet):
    async def go():
        flow, channel, session = _flow(podnet, UDP_ECHO_PORT)
        flow.start()
        await asyncio.sleep(0)
        await until(lambda: flow.sock is not None)
        sock = flow.sock
        flow.client_reset()
        assert sock.fileno() == -1 and session.ended == [flow] and not channel.eof
    asyncio.run(go())


class Counted:
    """The metrics a flow's dial reports."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.dials: list[float] = []

    def connection_ended(self, transport, up, down) -> None:
        pass

    def failure(self, kind: str) -> None:
        self.failures.append(kind)

    def dial_seconds(self, seconds: float) -> None:
        self.dials.append(seconds)


class UnansweredUdp(NamedNetnsRuntime):
    """A plugin whose UDP dial never answers (a helper or runtime that hangs)."""

    def __init__(self) -> None:
        super().__init__(Config())
        self.cancelled = False

    async def dial_udp(self, sandbox, port):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_a_udp_dial_is_counted_and_given_up_at_dial_timeout_as_a_tcp_dial_is(podnet):
    async def go():
        plugin, metrics = UnansweredUdp(), Counted()
        ctx = ForwardContext(plugin, metrics=metrics, dial_timeout=0.3)
        channel, session = RecordingChannel(), OneSession()
        flow = ForwardedFlow(ctx, session, Sandbox("sb", netns_path=podnet.path),
                             UDP_ECHO_PORT, channel, "test")
        flow.start()
        flow.client_data(encode_datagram(b"anyone?"))
        await asyncio.sleep(0.05)
        assert ctx.dialling == 1  # its netns descriptor counts against the fd budget
        await until(lambda: flow.done, timeout=5)
        assert plugin.cancelled and ctx.dialling == 0 and ctx.live_connections == 0
        assert flow.reason == f"udp port {UDP_ECHO_PORT}: no answer after 0.3 s"
        assert metrics.failures == ["dial_timeout"] and metrics.dials == []
        assert channel.aborted and channel.finished == [None]  # quiet policy: no text
        assert session.ended == [flow]
    asyncio.run(go())


def test_a_udp_dial_is_timed_in_the_dial_metrics(podnet):
    async def go():
        metrics = Counted()
        flow, channel, _ = _flow(podnet, UDP_ECHO_PORT, metrics=metrics)
        flow.start()
        flow.client_data(encode_datagram(b"ping"))
        await until(lambda: channel.datagrams == [b"ping"])
        assert len(metrics.dials) == 1 and 0 <= metrics.dials[0] < 5
        assert flow.ctx.dialling == 0
        flow.client_eof()
    asyncio.run(go())


def test_dial_prefers_the_address_a_server_is_bound_to(podnet):
    sock = dial_udp_localhost(podnet.path, UDP_ECHO_PORT)
    assert sock.getpeername() == ("127.0.0.1", UDP_ECHO_PORT)
    sock.close()
    try:
        v6 = bind_udp_in_netns(podnet.path, "::1", 0)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback in the test netns: {e}")
    port = v6.getsockname()[1]
    try:
        sock = dial_udp_localhost(podnet.path, port)
        assert sock.getpeername()[:2] == ("::1", port)
        sock.close()
        # nobody bound anywhere: 127.0.0.1, whose ICMP refusal ends the flow
        free = bind_udp_in_netns(podnet.path, "127.0.0.1", 0)
        free_port = free.getsockname()[1]
        free.close()
        sock = dial_udp_localhost(podnet.path, free_port)
        assert sock.getpeername() == ("127.0.0.1", free_port)
        sock.send(b"x")
        import select
        select.select([sock], [], [], 5)
        with pytest.raises(ConnectionRefusedError):
            sock.recv(10)
        sock.close()
    finally:
        v6.close()


def test_dial_in_the_netns_not_the_host(podnet):
    host_only = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host_only.bind(("127.0.0.1", 0))
    port = host_only.getsockname()[1]
    try:
        sock = dial_udp_localhost(podnet.path, port)  # the host's socket is not seen
        sock.send(b"x")
        import select
        select.select([sock], [], [], 5)
        with pytest.raises(ConnectionRefusedError):
            sock.recv(10)
        sock.close()
        host_only.settimeout(0.2)
        with pytest.raises(TimeoutError):
            host_only.recv(10)
    finally:
        host_only.close()


def test_a_burst_of_dials_reads_the_listener_tables_once(podnet):
    """Which address a UDP server listens on is read from the netns's /proc tables, which
    hold every UDP socket there (each flow's own too): within a while of one dial, the
    next dials to that port take the same answer rather than reading them again;
    forget_udp_listeners reads them afresh."""
    try:
        v6 = bind_udp_in_netns(podnet.path, "::1", 0)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback in the test netns: {e}")
    port = v6.getsockname()[1]
    forget_udp_listeners()
    flows = []
    try:
        flows = [dial_udp_localhost(podnet.path, port) for _ in range(50)]
        assert {sock.getpeername()[0] for sock in flows} == {"::1"}
        v6.close()
        v4 = bind_udp_in_netns(podnet.path, "127.0.0.1", port)
        try:
            again = dial_udp_localhost(podnet.path, port)  # as read before
            assert again.getpeername()[0] == "::1"
            again.close()
            forget_udp_listeners()
            fresh = dial_udp_localhost(podnet.path, port)
            assert fresh.getpeername() == ("127.0.0.1", port)
            fresh.close()
        finally:
            v4.close()
    finally:
        v6.close()
        for sock in flows:
            sock.close()
        forget_udp_listeners()


def test_a_pod_datagram_past_what_a_flow_forwards_is_dropped_not_cut(podnet):
    """IPv6 carries UDP payloads of up to 65,527 bytes; a flow forwards 65,507. One of
    65,509 bytes was read into the 65,508-byte buffer and sent on cut, counted as
    delivered."""
    try:
        pod = bind_udp_in_netns(podnet.path, "::1", 0)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback in the test netns: {e}")

    async def go():
        flow, channel, _ = _flow(podnet, pod.getsockname()[1])
        flow.start()
        flow.client_data(encode_datagram(b"hello"))
        await until(lambda: flow.sock is not None)
        pod.settimeout(5)
        _, peer = pod.recvfrom(100)
        for size in (65509, 65527, 100):
            pod.sendto(b"z" * size, peer)
        await until(lambda: len(channel.datagrams) == 1)
        await asyncio.sleep(0.1)
        assert [len(d) for d in channel.datagrams] == [100]
        assert flow.dropped == 2 and flow.datagrams_down == 1
        flow.close("test over")
    try:
        asyncio.run(go())
    finally:
        pod.close()


def test_dials_to_many_ports_read_the_listener_tables_once_per_netns(podnet, monkeypatch):
    """The tables were read once per port: with 4,000 flows parked in the netns each read
    took 16-23 ms, and 2,000 flows to distinct ports held the event loop 31 s. Now one read
    answers every port for a while; a port with no server in it is read again while the
    netns's re-read budget lasts (a server started since is found at once)."""
    import crishim.netns as netns

    reads = []
    real = netns._read_udp_listeners

    def counted(*args):
        reads.append(1)
        return real(*args)

    monkeypatch.setattr(netns, "_read_udp_listeners", counted)
    forget_udp_listeners()
    socks = []
    try:
        start = time.monotonic()
        socks = [dial_udp_localhost(podnet.path, port) for port in range(20000, 20300)]
        elapsed = time.monotonic() - start
        # the first read, the burst of re-reads, and what the rate refilled meanwhile
        allowed = 1 + netns._REREAD_BURST + int(elapsed * netns._REREADS_PER_SECOND) + 1
        assert len(reads) <= allowed, (len(reads), elapsed)
    finally:
        for sock in socks:
            sock.close()
        forget_udp_listeners()

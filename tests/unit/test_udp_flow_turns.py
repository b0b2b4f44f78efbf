"""ForwardedFlow's side towards the pod, on real UDP sockets (no netns: a plugin that
dials loopback): datagrams go out at most SENDS_PER_TURN per turn of the event loop, and
what the client sent before ending the flow is sent before it ends."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import SimpleNamespace

from crishim.budget import LogBudget
from crishim.forward_udp import MAX_QUEUED, SENDS_PER_TURN, ForwardedFlow
from crishim.protocols.datagram import encode_datagrams
from crishim.runtime import Sandbox


class _Channel:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.eof = False
        self.finished: list[str | None] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        pass

    def finish(self, error: str | None) -> None:
        self.finished.append(error)


class _Plugin:
    """Dials a UDP socket connected to `pod`, after `delay` (a dial still in progress)."""

    name = "test"

    def __init__(self, pod: socket.socket, delay: float = 0.0) -> None:
        self.pod, self.delay = pod, delay

    async def dial_udp(self, sandbox: Sandbox, port: int) -> socket.socket:
        await asyncio.sleep(self.delay)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(self.pod.getsockname())
        return sock


def _flow(pod: socket.socket, delay: float = 0.0) -> tuple[ForwardedFlow, _Channel]:
    ctx = SimpleNamespace(verbose_errors=False, udp_idle_timeout=60.0, live_connections=0,
                          dialling=0, dial_timeout=20.0, plugin=_Plugin(pod, delay),
                          metrics=None)
    holds: set[object] = set()
    session = SimpleNamespace(writing_paused=False,
                              connection_log=LogBudget(logging.getLogger("test"), 0, "%d"),
                              connection_finished=lambda conn: None, holds=holds,
                              pause_client_reading=holds.add,
                              resume_client_reading=holds.discard)
    channel = _Channel()
    flow = ForwardedFlow(ctx, session, Sandbox("sb", netns_path="/proc/self/ns/net"), 9,
                         channel, "test")  # type: ignore[arg-type]
    return flow, channel


def _pod() -> socket.socket:
    pod = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pod.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    pod.bind(("127.0.0.1", 0))
    pod.setblocking(False)
    return pod


async def _dialled() -> tuple[socket.socket, ForwardedFlow]:
    """A pod socket and a started flow to it whose socket is dialled."""
    pod = _pod()
    flow, _ = _flow(pod)
    flow.start()
    await asyncio.sleep(0.05)
    assert flow.sock is not None
    return pod, flow


def _received(pod: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(pod.recv(65536))
        except BlockingIOError:
            return out


def test_a_frame_of_tiny_datagrams_is_sent_a_turn_at_a_time():
    """32,768 empty datagrams fit one 64 KiB frame: they were 32,768 send() calls in one
    callback (up to 184 ms in which no other session ran)."""
    async def main() -> None:
        pod, flow = await _dialled()
        count = 3000
        flow.client_data(encode_datagrams([b""] * count))
        first_turn = len(_received(pod))
        assert first_turn == SENDS_PER_TURN, first_turn
        # the session's reading waits for the queue, as for a pod that does not keep up
        assert flow.session.holds == {flow}
        got = first_turn
        for _ in range(100):
            await asyncio.sleep(0)
            got += len(_received(pod))
        assert got == count and flow.dropped == 0, (got, flow.dropped)
        assert flow.session.holds == set()
        flow.close("test over")
        pod.close()

    asyncio.run(main())


def test_past_max_queued_datagrams_are_dropped_and_counted():
    async def main() -> None:
        pod, flow = await _dialled()
        count = SENDS_PER_TURN + MAX_QUEUED + 100
        flow.client_data(encode_datagrams([b"x"] * count))
        got = len(_received(pod))
        for _ in range(200):  # read each turn: the pod's socket buffer holds ~10,000
            await asyncio.sleep(0)
            got += len(_received(pod))
        assert got == SENDS_PER_TURN + MAX_QUEUED
        assert flow.dropped == 100 and flow.datagrams_up == count
        flow.close("test over")
        pod.close()

    asyncio.run(main())


def test_datagrams_sent_before_the_end_go_out_while_the_socket_is_dialled():
    """A flow that sends and ends at once (dns-style): client_eof came while the socket was
    being dialled, and the flow ended with the datagrams it held unsent."""
    async def main() -> None:
        pod = _pod()
        flow, channel = _flow(pod, delay=0.05)
        flow.start()
        flow.client_data(encode_datagrams([b"query one", b"query two"]))
        flow.client_eof()
        assert not flow.done  # still dialling: the end waits for the datagrams
        for _ in range(50):
            await asyncio.sleep(0.01)
            if flow.done:
                break
        assert flow.done and channel.eof and channel.finished == [None]
        assert _received(pod) == [b"query one", b"query two"]
        pod.close()

    asyncio.run(main())


def test_datagrams_still_queued_when_the_flow_ends_are_counted_as_dropped():
    async def main() -> None:
        pod, flow = await _dialled()
        flow.client_data(encode_datagrams([b"x"] * 3000))
        flow.client_reset()  # before the queue's next turn
        assert flow.datagrams_up == 3000 and flow.bytes_up == SENDS_PER_TURN
        assert flow.dropped == 3000 - SENDS_PER_TURN
        assert flow.session.holds == set()  # the session reads again
        pod.close()

    asyncio.run(main())


def test_the_pod_socket_is_read_every_64_datagrams_sent_whatever_the_frames():
    """Between sends the flow reads the pod's answers, or a burst fills its socket's
    receive buffer first: counted per call, frames of fewer than 64 datagrams (what
    crishim port-forward sends) never read in between, and unpaced bursts lost twice as
    many."""
    async def main() -> None:
        pod, flow = await _dialled()
        reads = []
        flow._readable = lambda: reads.append(flow.datagrams_up)  # type: ignore[method-assign]
        for _ in range(13):  # 130 datagrams in frames of 10, no loop turn between
            flow.client_data(encode_datagrams([b"q"] * 10))
        assert reads == [70, 130], reads  # after the 64th and the 128th sent
        flow.close("test over")
        pod.close()

    asyncio.run(main())

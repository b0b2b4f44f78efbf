"""The first bytes of a connection take the short way, and arrive whole and in order; its
last frames leave together.

crishim port-forward reads what a local client sent before its connection was accepted
at once (`_read_now`), so that it leaves in the same write as the streams' opening frames;
crishim serve sends what arrived while a connection dialled with the connection, before
the pod's transport exists (`ForwardedConnection._send_pending_now`). Real TCP sockets on
127.0.0.1 (a host-network sandbox), unprivileged."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from crishim.client.portforward import _read_now
from crishim.config import Config
from crishim.forward import ForwardContext, ForwardedConnection, SessionBase
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from tests.support import RecordingChannel, until

HOST = Sandbox("web", host_network=True)  # dials 127.0.0.1 in this process's netns


def _context() -> ForwardContext:
    return ForwardContext(NamedNetnsRuntime(Config(sandboxes={})))


def _pod_listener(rcvbuf: int) -> socket.socket:
    """A pod that does not accept yet; its connections' receive buffer is `rcvbuf`."""
    pod = socket.socket()
    pod.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    pod.bind(("127.0.0.1", 0))
    pod.listen(8)
    pod.setblocking(False)
    return pod


def _dialling(rcvbuf: int) -> tuple[socket.socket, SessionBase, RecordingChannel,
                                    ForwardedConnection]:
    """A connection dialling a pod listener (_pod_listener(rcvbuf)) from a session of
    its own, its channel recording what the client would get; on a running loop."""
    pod = _pod_listener(rcvbuf)
    session = SessionBase(_context(), HOST)
    channel = RecordingChannel()
    return pod, session, channel, session.open_connection(pod.getsockname()[1], channel)


def test_bytes_sent_while_dialling_reach_the_pod_whole_when_its_socket_takes_part():
    """64 pieces (16 MiB) and the half-close arrive while the connection dials; the pod's
    small receive window takes only part of them in the early send(2), the transport the
    rest, in order, then the EOF; the session's count of held bytes returns to zero and
    its client reading to unpaused."""
    pieces = [bytes([i]) * 256 * 1024 for i in range(64)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pod, session, channel, conn = _dialling(4096)
        for piece in pieces:  # the dial runs on the loop's next turn: all of it is held
            conn.client_data(piece)
        conn.client_eof()
        assert session.pending_up == sum(map(len, pieces))
        assert session.read_gate.paused  # more than buffer_size held: the client paused
        await until(lambda: conn.dialled, 2.0)
        assert not conn.done
        accepted, _ = await loop.sock_accept(pod)
        got = bytearray()
        while data := await asyncio.wait_for(loop.sock_recv(accepted, 1 << 20), 10):
            got += data
        assert len(got) == len(b"".join(pieces)) and bytes(got) == b"".join(pieces)
        assert session.pending_up == 0
        # the transport's buffer drains, then the client reads again
        await until(lambda: not session.read_gate.paused, 1.0)
        await loop.sock_sendall(accepted, b"answer")
        await until(lambda: channel.down, 1.0)
        assert bytes(channel.down) == b"answer" and channel.ended is None
        conn.close("test over")
        accepted.close()
        pod.close()

    uvloop.run(main())


def test_a_connection_that_takes_everything_early_goes_on_as_usual():
    """The common case: one small piece, sent with the connection; the pod's answer comes
    back and the client's half-close reaches the pod after the early bytes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pod, session, channel, conn = _dialling(1 << 20)
        conn.client_data(b"GET / HTTP/1.0\r\n\r\n")
        conn.client_eof()
        accepted, _ = await loop.sock_accept(pod)
        got = bytearray()
        while data := await asyncio.wait_for(loop.sock_recv(accepted, 4096), 10):
            got += data
        assert bytes(got) == b"GET / HTTP/1.0\r\n\r\n"  # then EOF: the half-close came after
        assert session.pending_up == 0 and not session.read_gate.paused
        await loop.sock_sendall(accepted, b"HTTP/1.0 200 OK\r\n\r\n")
        accepted.close()
        await until(lambda: channel.ended is not None, 1.0)
        assert bytes(channel.down) == b"HTTP/1.0 200 OK\r\n\r\n"
        assert channel.ended == "" and not channel.aborted
        pod.close()

    uvloop.run(main())


def test_read_now_takes_what_came_before_accept_and_the_transport_reads_on():
    """What the client sent before its connection was accepted comes from _read_now in
    connection_made; the transport then delivers the rest and the EOF, nothing twice."""

    class Local(asyncio.Protocol):
        def __init__(self, done: asyncio.Future[tuple[bytes, bytes]]) -> None:
            self.done = done
            self.early = b""
            self.rest = bytearray()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.early = _read_now(transport)  # type: ignore[arg-type]
            self.made.set_result(None)

        def data_received(self, data: bytes) -> None:
            self.rest += data

        def eof_received(self) -> bool:
            self.done.set_result((self.early, bytes(self.rest)))
            return False

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        made: asyncio.Future[None] = loop.create_future()

        def factory() -> Local:
            proto = Local(done)
            proto.made = made  # type: ignore[attr-defined]
            return proto

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # connect and speak first while the loop has not run: the kernel completes the
        # handshake from the listen queue, the loop accepts only when this yields
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"first")
        await asyncio.wait_for(made, 10)
        client.sendall(b"second")
        client.shutdown(socket.SHUT_WR)
        early, rest = await asyncio.wait_for(done, 10)
        assert (early, rest) == (b"first", b"second")
        client.close()
        server.close()

    uvloop.run(main())


def test_read_now_with_nothing_sent_yet_returns_nothing():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        results: list[bytes] = []

        class Local(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                results.append(_read_now(transport))  # type: ignore[arg-type]

        server = await loop.create_server(Local, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname()[:2])
        await until(lambda: results, 1.0)
        assert results == [b""]
        client.close()
        server.close()

    uvloop.run(main())


def test_the_pods_eof_ends_both_streams_in_one_write():
    """When the pod closes its side, the data stream's FIN and the error stream's (which
    client-go waits for) leave in one write to the client, not one each."""
    from crishim.protocols import spdy
    from crishim.protocols.constants import (
        HEADER_PORT,
        HEADER_REQUEST_ID,
        HEADER_STREAM_TYPE,
        STREAM_TYPE_DATA,
        STREAM_TYPE_ERROR,
    )
    from crishim.stream.portforward_spdy import SpdyPortForwardSession

    async def main() -> list[list[tuple[int, bool]]]:
        loop = asyncio.get_running_loop()
        pod = _pod_listener(1 << 16)
        writes: list[list[bytes]] = []
        session = SpdyPortForwardSession(
            _context(), HOST, 5.0, 0.0,
            lambda chunks: writes.append([bytes(c) for c in chunks]), lambda: None)
        client = spdy.SpdyConnection(spdy.SpdyConfig(client=True))
        headers = {HEADER_STREAM_TYPE: STREAM_TYPE_ERROR,
                   HEADER_PORT: str(pod.getsockname()[1]), HEADER_REQUEST_ID: "0"}
        client.end_stream(client.open_stream(headers))
        headers[HEADER_STREAM_TYPE] = STREAM_TYPE_DATA
        client.open_stream(headers)
        session.receive(b"".join(bytes(c) for c in client.take_output()))
        accepted, _ = await loop.sock_accept(pod)
        writes.clear()  # the replies
        accepted.shutdown(socket.SHUT_WR)  # the pod is done sending
        await until(lambda: writes, 1.0)
        await asyncio.sleep(0.05)  # a second write, if any, would have come by now
        ends = []
        for chunks in writes:  # the FINs each write carried: (stream id, fin)
            ends.append([(e.stream_id, e.fin) for e in client.receive_data(b"".join(chunks))
                         if isinstance(e, spdy.DataReceived)])
        accepted.close()
        pod.close()
        session.close("test over")
        return ends

    ends = uvloop.run(main())
    assert len(ends) == 1, ends  # one write
    assert sorted(sid for sid, fin in ends[0] if fin) == [1, 3]  # both streams ended


def test_tiny_pieces_sent_while_dialling_are_held_as_one_buffer_and_arrive_in_order():
    """A flood of 1-byte frames while the pod is dialled is held as one buffer per run of
    small pieces (a byte each), not an object per piece (~40 bytes each); a big piece in
    between is kept as it came; the pod gets every byte, in order."""
    small = bytes(i % 251 for i in range(100_000))
    big = b"B" * (64 * 1024)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pod, session, channel, conn = _dialling(1 << 20)
        for i in range(len(small)):
            conn.client_data(memoryview(small)[i:i + 1])  # views, as of a lent read
            if i == len(small) // 2:
                conn.client_data(big)
        conn.client_eof()
        held = conn._pending
        assert [len(piece) for piece in held] == [len(small) // 2 + 1, len(big),
                                                  len(small) - len(small) // 2 - 1]
        assert session.pending_up == len(small) + len(big)
        accepted, _ = await loop.sock_accept(pod)
        got = bytearray()
        while data := await asyncio.wait_for(loop.sock_recv(accepted, 1 << 20), 10):
            got += data
        half = len(small) // 2 + 1
        assert bytes(got) == small[:half] + big + small[half:]
        assert session.pending_up == 0
        conn.close("test over")
        accepted.close()
        pod.close()

    uvloop.run(main())

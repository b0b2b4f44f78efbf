"""The pod side of `crishim check`: small TCP servers (and a UDP echo) started inside the
sandbox's netns.

The end-to-end tests run the same servers in their own netns (tests/support/podnet.py), so a
byte the checker verifies and a byte a test verifies come from one definition.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from typing import cast

from crishim.netns import bind_udp_in_netns, listen_in_netns, serve_in_netns

SOURCE_CHUNK = 1 << 20
SOURCE_WRITE_HIGH_WATER = 4 << 20
FIN_MARK = b"<pod saw EOF>"


_SOURCE_BLOCK = 32 * 64  # one SHA-256 digest, 64 times
# the largest N a sink or source takes (a typo's "1 TiB" built 1 TiB in memory)
MAX_SIZED = 1 << 40


def source_piece(start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the endless source: block k is SHA-256(k) x 64."""
    first, last = start // _SOURCE_BLOCK, (start + length - 1) // _SOURCE_BLOCK
    blocks = b"".join(hashlib.sha256(struct.pack(">Q", k)).digest() * 64
                      for k in range(first, last + 1))
    skip = start - first * _SOURCE_BLOCK
    return blocks[skip:skip + length]


def source_bytes(n: int) -> bytes:
    """What Source sends for n (deterministic, incompressible)."""
    return source_piece(0, n) if n > 0 else b""


def _size_line(head: bytes) -> int | None:
    """N from a sink's or source's first line "N\n"; None if it is not a size (the
    server closes: any process in the sandbox may connect)."""
    line = head.split(b"\n", 1)[0].strip() or b"0"
    if not (line.isdigit() and len(line) <= 13):  # bytes: ASCII digits only
        return None
    n = int(line)
    return n if n <= MAX_SIZED else None


def _stream(transport: asyncio.BaseTransport) -> asyncio.Transport:
    # a TCP connection's transport; uvloop's does not subclass asyncio.Transport
    return cast(asyncio.Transport, transport)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = _stream(transport)

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def eof_received(self) -> bool:
        return False  # half-close: our write side closes after the echo is flushed


class FinEcho(Echo):
    """Echoes, and on EOF says so before closing: proof that the half-close reached it."""

    def eof_received(self) -> bool:
        self.t.write(FIN_MARK)
        return False


class SizedSink(asyncio.Protocol):
    """Reads "N\\n" then N bytes and answers "<N> <sha256>\\n": no half-close needed, so
    upload integrity is checked apart from half-close (runtimes differ on that)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t, self.h, self.n, self.want, self.head = _stream(transport), hashlib.sha256(), 0, \
            -1, b""

    def data_received(self, data: bytes) -> None:
        if self.want < 0:
            self.head += data
            if b"\n" not in self.head and len(self.head) <= 64:
                return
            want = _size_line(self.head)
            if want is None:
                self.t.close()
                return
            data = self.head.split(b"\n", 1)[1]
            self.want = want
        take = data[: self.want - self.n]
        self.h.update(take)
        self.n += len(take)
        if self.n == self.want:
            self.t.write(f"{self.n} {self.h.hexdigest()}\n".encode())

    def eof_received(self) -> bool:
        return False


class Source(asyncio.Protocol):
    """Reads "N\\n", sends source_bytes(N) as fast as the reader takes it, then closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = _stream(transport)
        self.head = b""
        self.total = -1  # bytes to send, once the request line is read
        self.sent = 0
        self.paused = False
        self.t.set_write_buffer_limits(high=SOURCE_WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.total >= 0:
            return
        self.head += data
        if b"\n" in self.head or len(self.head) > 64:
            total = _size_line(self.head)
            if total is None:
                self.t.close()
                return
            self.total = total
            self._fill()

    def _fill(self) -> None:
        # made a chunk at a time as the reader takes them: writes stop at the high-water
        # mark, so the transport holds at most a few MiB
        while self.sent < self.total and not self.paused:
            n = min(SOURCE_CHUNK, self.total - self.sent)
            self.t.write(source_piece(self.sent, n))
            self.sent += n
        if self.sent >= self.total:
            self.t.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()


class Reset(asyncio.Protocol):
    """Resets the connection (RST, not FIN) on the first byte."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = _stream(transport)

    def data_received(self, data: bytes) -> None:
        sock = self.t.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.t.abort()


class UdpEcho:
    """Sends every datagram back to its sender, boundaries as received. Reads its socket
    directly: asyncio's datagram transport would not send an empty datagram back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams = 0
        self._buffer = bytearray(65536)
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        view = memoryview(self._buffer)
        for _ in range(64):
            try:
                n, addr = self.sock.recvfrom_into(self._buffer)
                self.datagrams += 1
                self.sock.sendto(view[:n], addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP for a sender that went away, or a full send buffer: drop

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def serve_udp_echo(netns: str, host: str = "127.0.0.1", port: int = 0
                         ) -> tuple[UdpEcho, int]:
    """A UdpEcho bound inside the netns, and its port."""
    sock = bind_udp_in_netns(netns, host, port)
    return UdpEcho(sock), sock.getsockname()[1]


class Peers:
    """Servers inside the sandbox netns, on free ports."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: UdpEcho | None = None

    async def start(self) -> None:
        for name, proto in (("echo", Echo), ("sink", SizedSink), ("source", Source),
                            ("reset", Reset), ("fin", FinEcho)):
            server = await serve_in_netns(self.netns, "127.0.0.1", 0, proto)
            self.ports[name] = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        sock = listen_in_netns(self.netns, "127.0.0.1", 0)
        self.ports["closed"] = sock.getsockname()[1]
        sock.close()
        self._udp, self.ports["udp_echo"] = await serve_udp_echo(self.netns)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._udp is not None:
            self._udp.close()

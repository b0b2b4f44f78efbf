"""Real test peers: a network namespace of the test's own with TCP servers inside it,
run on an asyncio loop in a background thread of the test process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading

from crishim.netns import create_named_netns, delete_named_netns, listen_in_netns

HTTP_PORT = 8080
ECHO_PORT = 9000
SINK_PORT = 9001  # reads to EOF, answers "<count> <sha256>\n"
SOURCE_PORT = 9002  # reads "N\n", sends N deterministic bytes, closes
RESET_PORT = 9003  # reads a little, then resets the connection
CLOSED_PORT = 9999  # nothing listens
HTTP_BODY = b"hello from inside the sandbox netns\n"


def source_bytes(n: int) -> bytes:
    """The bytes SOURCE_PORT sends for n (deterministic, incompressible)."""
    out = bytearray()
    block = 0
    while len(out) < n:
        out += hashlib.sha256(struct.pack(">Q", block)).digest() * 64
        block += 1
    return bytes(out[:n])


class _Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(HTTP_BODY), HTTP_BODY))

    def eof_received(self):
        return False


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        return False  # half-close: our write side closes after the echo is flushed


class _Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.h = hashlib.sha256()
        self.n = 0

    def data_received(self, data):
        self.h.update(data)
        self.n += len(data)

    def eof_received(self):
        self.t.write(f"{self.n} {self.h.hexdigest()}\n".encode())
        return False


class _Source(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        if b"\n" in self.buf:
            n = int(self.buf.split(b"\n", 1)[0])
            self.buf = b""
            asyncio.get_running_loop().create_task(self._send(n))

    async def _send(self, n):
        data = source_bytes(n)
        view = memoryview(data)
        for i in range(0, n, 1 << 20):
            self.t.write(view[i:i + (1 << 20)])
            while self.t.get_write_buffer_size() > (4 << 20):
                await asyncio.sleep(0.001)
        self.t.close()


class _Reset(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        sock = self.t.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.t.abort()


class PodNetwork:
    """A named netns with the test servers above listening on 127.0.0.1 (and ::1)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"crishim-test-{os.getpid()}"
        self.path = ""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._servers: list = []

    def start(self) -> PodNetwork:
        delete_named_netns(self.name)
        self.path = create_named_netns(self.name)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        fut.result(10)
        return self

    async def _serve(self) -> None:
        for port, proto in ((HTTP_PORT, _Http), (ECHO_PORT, _Echo), (SINK_PORT, _Sink),
                            (SOURCE_PORT, _Source), (RESET_PORT, _Reset)):
            sock = listen_in_netns(self.path, "127.0.0.1", port)
            self._servers.append(await self.loop.create_server(proto, sock=sock))

    def listen_extra(self, host: str, port: int, proto_factory) -> None:
        async def go():
            sock = listen_in_netns(self.path, host, port)
            self._servers.append(await self.loop.create_server(proto_factory, sock=sock))
        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        async def shut():
            for s in self._servers:
                s.close()
        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            delete_named_netns(self.name)

    def __enter__(self) -> PodNetwork:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

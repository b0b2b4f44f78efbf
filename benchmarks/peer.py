"""The benchmark's pod side: sink, source and echo servers inside a netns, in a process of
their own so that they do not share a GIL with the measuring client.

    python -m benchmarks.peer NETNS_PATH   prints "ready" once listening."""

from __future__ import annotations

import asyncio
import sys

import uvloop

from crishim.netns import serve_in_netns

SINK, SOURCE, ECHO = 7001, 7002, 7003
_BLOCK = bytes(range(256)) * 4096  # 1 MiB


class Sink(asyncio.BufferedProtocol):
    """Counts what arrives; at EOF answers the count."""

    def connection_made(self, transport):
        self.t = transport
        self.n = 0
        self.buf = bytearray(1 << 20)

    def get_buffer(self, hint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.n += nbytes

    def eof_received(self):
        self.t.write(b"%d\n" % self.n)
        return False


class Source(asyncio.Protocol):
    """Reads "N\\n", sends N bytes as fast as the socket takes them, closes."""

    def connection_made(self, transport):
        self.t = transport
        self.left = 0
        self.head = b""
        transport.set_write_buffer_limits(high=4 << 20)

    def data_received(self, data):
        self.head += data
        if b"\n" in self.head and not self.left:
            self.left = int(self.head.split(b"\n", 1)[0])
            self._fill()

    def _fill(self):
        while self.left and not self.paused():
            n = min(self.left, len(_BLOCK))
            self.t.write(_BLOCK[:n] if n < len(_BLOCK) else _BLOCK)
            self.left -= n
        if not self.left:
            self.t.close()

    def paused(self):
        return self.t.get_write_buffer_size() > (4 << 20)

    def pause_writing(self):
        pass

    def resume_writing(self):
        if self.left:
            self._fill()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        return False


async def main(path: str) -> None:
    loop = asyncio.get_running_loop()
    for port, proto in ((SINK, Sink), (SOURCE, Source), (ECHO, Echo)):
        await serve_in_netns(path, "127.0.0.1", port, proto)
    print("ready", flush=True)
    await loop.create_future()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))

"""Real test peers: a network namespace of the test's own with TCP servers inside it,
run on an asyncio loop in a background thread of the test process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

from crishim.client.podservers import Echo, Reset, Source, serve_udp_echo
from crishim.client.podservers import source_bytes as source_bytes  # what SOURCE_PORT sends
from crishim.netns import (
    bind_udp_in_netns,
    create_named_netns,
    delete_named_netns,
    serve_in_netns,
)
from tests.support.udp_peers import DnsResponder

HTTP_PORT = 8080
ECHO_PORT = 9000
SINK_PORT = 9001  # reads to EOF, answers "<count> <sha256>\n"
SOURCE_PORT = 9002  # reads "N\n", sends N deterministic bytes, closes
RESET_PORT = 9003  # reads a little, then resets the connection
CLOSED_PORT = 9999  # nothing listens
UDP_ECHO_PORT = 5353  # UDP: every datagram sent back as it came
UDP_DNS_PORT = 5354  # UDP: a DNS-style responder (tests/support/udp_peers.py)
UDP_CLOSED_PORT = 5399  # UDP: nothing bound (ICMP port unreachable)
HTTP_BODY = b"hello from inside the sandbox netns\n"


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


class PodNetwork:
    """A named netns with the test servers above listening on 127.0.0.1."""

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
        for port, proto in ((HTTP_PORT, _Http), (ECHO_PORT, Echo), (SINK_PORT, _Sink),
                            (SOURCE_PORT, Source), (RESET_PORT, Reset)):
            self._servers.append(await serve_in_netns(self.path, "127.0.0.1", port, proto))
        self._servers.append((await serve_udp_echo(self.path, "127.0.0.1", UDP_ECHO_PORT))[0])
        dns, _ = await self.loop.create_datagram_endpoint(
            DnsResponder, sock=bind_udp_in_netns(self.path, "127.0.0.1", UDP_DNS_PORT))
        self._servers.append(dns)

    def listen_extra(self, host: str, port: int, proto_factory) -> None:
        async def go():
            self._servers.append(await serve_in_netns(self.path, host, port, proto_factory))
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

"""Demo mode: a sandbox netns with a small HTTP server and a UDP echo server inside,
registered as sandbox `demo`."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from typing import cast

from crishim.client.podservers import UdpEcho, serve_udp_echo
from crishim.config import Config
from crishim.netns import create_named_netns, delete_named_netns, serve_in_netns
from crishim.sandboxes import NamedNetnsRuntime

log = logging.getLogger("crishim.demo")

DEMO_NETNS = "crishim-demo"
DEMO_SANDBOX = "demo"
DEMO_PORT = 8080
DEMO_UDP_PORT = 5353  # UDP echo: `crishim port-forward demo 15353:5353/udp`
MAX_REQUEST_HEAD = 64 * 1024  # a client that never ends its request head is cut off here


class DemoAlreadyRunning(Exception):
    pass


class _DemoHttp(asyncio.Protocol):
    """Answers every request with a short page; enough for curl and browsers."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's: a Transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            body = (f"hello from the crishim demo sandbox (netns {DEMO_NETNS})\n"
                    f"you asked: {line}\n").encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if len(self.buffer) > MAX_REQUEST_HEAD:
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
            self.buffer = b""

    def eof_received(self) -> None:
        self.transport.close()


class Demo:
    """Owns the demo netns for the life of one `crishim serve --demo`."""

    def __init__(self, run_dir: str = "/run/crishim", netns_name: str = DEMO_NETNS) -> None:
        self.run_dir = run_dir
        self.netns_name = netns_name
        self.lock_fd = -1
        self.netns_path = ""
        self.server: asyncio.Server | None = None
        self.udp_echo: UdpEcho | None = None

    def acquire(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        lock_path = os.path.join(self.run_dir, f"{self.netns_name}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DemoAlreadyRunning(
                f"a crishim demo is already running (pid {owner}); stop it first, or run "
                "without --demo") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    async def start(self) -> str:
        """Create the netns (replacing one left by a crashed demo) and serve HTTP and UDP echo
        in it."""
        self.acquire()
        delete_named_netns(self.netns_name)  # left by a demo that was killed
        self.netns_path = create_named_netns(self.netns_name)
        self.server = await serve_in_netns(self.netns_path, "127.0.0.1", DEMO_PORT, _DemoHttp)
        self.udp_echo, _ = await serve_udp_echo(self.netns_path, "127.0.0.1", DEMO_UDP_PORT)
        return self.netns_path

    def runtime(self, config: Config) -> NamedNetnsRuntime:
        """The runtime plugin `crishim serve --demo` uses while this demo runs: named netns
        and the `sandboxes` map, as the netns plugin, plus sandbox `demo`."""
        return NamedNetnsRuntime(config, {DEMO_SANDBOX: self.netns_path})

    async def stop(self) -> None:
        """Stop serving and delete the netns; OSError (path, errno) if it cannot be deleted."""
        try:
            if self.server is not None:
                self.server.close()
                self.server = None
            if self.udp_echo is not None:
                self.udp_echo.close()
                self.udp_echo = None
            if self.netns_path:
                try:
                    delete_named_netns(self.netns_name)
                except OSError as e:
                    log.error("demo netns left behind: %s", e)
                    raise
                self.netns_path = ""
        finally:
            if self.lock_fd >= 0:
                os.close(self.lock_fd)
                self.lock_fd = -1



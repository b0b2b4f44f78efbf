"""`crishim port-forward` as a user runs it: the real CLI as a subprocess against a real
`crishim serve`, real sockets on the host, real servers in the pod netns."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

import tests.support.podnet as podnet_module
from crishim.cri import api_pb2
from crishim.netns import delete_named_netns
from tests.support import SANDBOX, peers, until
from tests.support.crishim_proc import CrishimProcess
from tests.support.fake_servers import FakeServer
from tests.support.podnet import (
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_BODY,
    HTTP_PORT,
    RESET_PORT,
    SINK_PORT,
    SOURCE_PORT,
    UDP_ECHO_PORT,
    source_bytes,
)
from tests.support.udp_peers import exchange

TRANSPORTS = ["spdy", "websocket", "spdy-over-websocket", "h2"]
MIB8 = 8 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket(socket.AF_INET6) as s:  # and free on ::1 too, or pick again
        try:
            s.bind(("::1", port))
        except OSError:
            return free_port()
    return port


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class PortForwardCLI:
    def __init__(self, crishim, *specs: str, transport: str = "spdy", extra=(),
                 env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crishim", "port-forward", SANDBOX, *specs,
             "--runtime-endpoint", f"unix://{crishim.socket}", "--transport", transport,
             *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False),
                         daemon=True).start()

    def _pump(self, pipe, into: list[str], queue_it: bool) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))
            if queue_it:
                self.lines.put(line.rstrip("\n"))

    def read_lines(self, n: int, timeout: float = 20.0) -> list[str]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"got {out} then nothing; stderr: {self.stderr}, "
                                     f"exit {self.proc.poll()}") from None
        return out

    def forwarding(self, n_specs: int) -> list[str]:
        return self.read_lines(n_specs * (2 if ipv6_loopback() else 1))

    def wait_stderr(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr:
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no stderr line matching {pattern!r}: {self.stderr}")

    def interrupt(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PortForwardCLI:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def expected_forwarding(local: int, remote: int) -> list[str]:
    lines = [f"Forwarding from 127.0.0.1:{local} -> {remote}"]
    if ipv6_loopback():
        lines.append(f"Forwarding from [::1]:{local} -> {remote}")
    return lines


def echo(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=20) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        sender.join()
    return bytes(got)


def download(port: int, n: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"{n}\n".encode())
        got = bytearray()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    return bytes(got)


def upload(port: int, payload: bytes) -> bytes:
    """The sink's answer line, read to its end (it may come in pieces: an HTTP/2 stream
    sends what its window allows, and a busy download on the same session shares the
    connection's)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return peers.recv_line(s)


# --------------------------------------------------------------------------- per transport


def _same_numbered_pod_ports(podnet) -> tuple[int, int]:
    """Two port numbers free on this host, with an HTTP and an echo server listening on
    them inside the pod netns: specs like `5000 6000` bind the same numbers locally."""
    global _SAME_PORTS
    if _SAME_PORTS is None:
        http_port, echo_port = free_port(), free_port()
        while echo_port == http_port:
            echo_port = free_port()
        podnet.listen_extra("127.0.0.1", http_port, podnet_module._Http)
        podnet.listen_extra("127.0.0.1", echo_port, podnet_module.Echo)
        _SAME_PORTS = (http_port, echo_port)
    return _SAME_PORTS


_SAME_PORTS: tuple[int, int] | None = None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_plain_specs_forward_same_numbered_ports(crishim, podnet, transport):
    """The seeds' `5000 6000`: two specs, each local port equal to its remote port."""
    http_port, echo_port = _same_numbered_pod_ports(podnet)
    with PortForwardCLI(crishim, str(http_port), str(echo_port), transport=transport) as cli:
        assert cli.forwarding(2) == (expected_forwarding(http_port, http_port)
                                     + expected_forwarding(echo_port, echo_port))
        assert peers.http_get(http_port).endswith(HTTP_BODY)
        if ipv6_loopback():
            assert peers.http_get(http_port, "::1").endswith(HTTP_BODY)
        payload = os.urandom(1 << 20)
        assert echo(echo_port, payload) == payload
        handled = cli.read_lines(3 if ipv6_loopback() else 2)
        assert sorted(handled) == sorted(
            [f"Handling connection for {http_port}"] * (2 if ipv6_loopback() else 1)
            + [f"Handling connection for {echo_port}"])
        assert cli.interrupt() == 0
        assert not cli.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_local_colon_remote_moves_8_mib_both_ways_intact(crishim, transport):
    """The seeds' `8888:5000`: SHA-256 of 8 MiB up (sink) and down (source)."""
    source_local, other_local = free_port(), free_port()
    remote_up = SINK_PORT if transport != "websocket" else ECHO_PORT
    with PortForwardCLI(crishim, f"{source_local}:{SOURCE_PORT}", f"{other_local}:{remote_up}",
                        transport=transport) as cli:
        assert cli.forwarding(2) == (expected_forwarding(source_local, SOURCE_PORT)
                                     + expected_forwarding(other_local, remote_up))
        got = download(source_local, MIB8)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(source_bytes(MIB8)).hexdigest()
        payload = os.urandom(MIB8)
        if transport == "websocket":
            # The channel protocol has no half-close: check the upload through the echo.
            assert hashlib.sha256(echo(other_local, payload)).digest() == \
                hashlib.sha256(payload).digest()
        else:
            answer = upload(other_local, payload)
            assert answer == f"{MIB8} {hashlib.sha256(payload).hexdigest()}\n".encode()
        assert cli.read_lines(2) == [f"Handling connection for {source_local}",
                                     f"Handling connection for {other_local}"]
        assert cli.interrupt() == 0


class _StallingSink(podnet_module._Sink):
    """A sink that stops reading for a moment after every 256 KiB: its socket fills, so
    crishim serve's writes towards it are often partial."""

    def data_received(self, data):
        super().data_received(data)
        self.since = getattr(self, "since", 0) + len(data)
        if self.since >= 256 << 10:
            self.since = 0
            self.t.pause_reading()
            asyncio.get_running_loop().call_later(0.005, self.t.resume_reading)


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_uploads_to_a_stalling_pod_and_a_fast_one_beside_a_download_arrive_intact(
        crishim, podnet, transport):
    """Two uploads interleaved on one session, one to a pod that keeps stalling (crishim
    serve's writes towards it are partial and wait in its transport), while a download
    reads into the same per-thread read buffer (flow.read_buffer): each arrives byte for
    byte. Handing a pod's transport views of that buffer instead of copies fails here
    (both sessions borrow their reads)."""
    stalling = free_port()
    podnet.listen_extra("127.0.0.1", stalling, _StallingSink)
    slow_local, fast_local, down_local = free_port(), free_port(), free_port()
    size = 32 << 20
    payloads = {slow_local: os.urandom(size), fast_local: os.urandom(size)}
    answers: dict[int, bytes] = {}
    with PortForwardCLI(crishim, f"{slow_local}:{stalling}", f"{fast_local}:{SINK_PORT}",
                        f"{down_local}:{SOURCE_PORT}", transport=transport) as cli:
        cli.forwarding(3)
        threads = [threading.Thread(target=lambda p=p: answers.__setitem__(
            p, upload(p, payloads[p]))) for p in payloads]
        threads.append(threading.Thread(target=lambda: answers.__setitem__(
            down_local, download(down_local, 4 * size))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert cli.interrupt() == 0
    for port, payload in payloads.items():
        assert answers.get(port) == f"{size} {hashlib.sha256(payload).hexdigest()}\n".encode()
    assert hashlib.sha256(answers[down_local]).digest() == \
        hashlib.sha256(source_bytes(4 * size)).digest()


def _slow_download(port: int, n: int) -> bytes:
    """Read like a slow consumer: a pause after every 256 KiB, so crishim port-forward's
    writes to this connection are often partial."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(f"{n}\n".encode())
        got = bytearray()
        since = 0
        while True:
            chunk = s.recv(64 << 10)
            if not chunk:
                break
            got += chunk
            since += len(chunk)
            if since >= 256 << 10:
                since = 0
                time.sleep(0.005)
    return bytes(got)


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_downloads_to_a_slow_reader_and_a_fast_one_beside_an_upload_arrive_intact(crishim,
                                                                                  transport):
    """Two downloads on one session, one read slowly (crishim port-forward's writes to it
    are partial and wait in its transport), while an upload reads into the same per-thread
    read buffer: each arrives byte for byte. Handing the local transports views of that
    buffer instead of copies fails here; so does a session read in place (SPDY's, HTTP/2's:
    ClientSession.reads_lent) whose views a local transport keeps."""
    size = 32 << 20
    payload = os.urandom(2 * size)
    ports = free_port(), free_port(), free_port()
    with PortForwardCLI(crishim, *_slow_fast_and_sink(ports), transport=transport) as cli:
        _assert_intact(_slow_fast_and_upload(cli, ports, size, payload), size, payload)


def _slow_fast_and_sink(ports: tuple[int, int, int]) -> list[str]:
    """Port specs for _slow_fast_and_upload: two to the pod's source, one to its sink."""
    slow, fast, up = ports
    return [f"{slow}:{SOURCE_PORT}", f"{fast}:{SOURCE_PORT}", f"{up}:{SINK_PORT}"]


def _slow_fast_and_upload(cli: PortForwardCLI, ports: tuple[int, int, int], size: int,
                          payload: bytes, meanwhile=lambda: None) -> dict[str, bytes]:
    """On one session: a download of size read slowly, one read at once, and an upload of
    payload, all at the same time (and `meanwhile` while they run); what each got, and the
    command's exit (0) checked."""
    slow, fast, up = ports
    cli.forwarding(3)
    got: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=lambda: got.__setitem__("slow", _slow_download(slow, size))),
        threading.Thread(target=lambda: got.__setitem__("fast", download(fast, size))),
        threading.Thread(target=lambda: got.__setitem__("up", upload(up, payload))),
    ]
    for t in threads:
        t.start()
    meanwhile()
    for t in threads:
        t.join(60)
    assert cli.interrupt() == 0
    return got


def _assert_intact(got: dict[str, bytes], size: int, payload: bytes) -> None:
    want = hashlib.sha256(source_bytes(size)).digest()
    assert hashlib.sha256(got["slow"]).digest() == want
    assert hashlib.sha256(got["fast"]).digest() == want
    assert got["up"] == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def _stop_and_go(pid: int, times: int = 40) -> None:
    """Stop a process we started (SIGSTOP) for 20 ms in every 30, `times` times: its peer's
    writes to it fill the socket between them."""
    for _ in range(times):
        time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.02)
        finally:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_an_upload_that_fills_the_session_socket_arrives_intact(podnet, transport):
    """crishim port-forward sends a local connection's read straight from its read buffer
    (ForwardStream.write_view): what the session's socket does not take must be copied,
    as the next read overwrites that buffer. A crishim serve stopped (SIGSTOP) in the
    middle of an upload fills the socket; the upload arrives byte for byte. Handing the
    transport the views fails here."""
    payload = os.urandom(128 << 20)
    got: dict[str, bytes] = {}
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}") as server:
        assert server.proc is not None
        with PortForwardCLI(server, f"{(local := free_port())}:{SINK_PORT}",
                            transport=transport) as cli:
            cli.forwarding(1)
            sender = threading.Thread(target=lambda: got.__setitem__(
                "up", upload(local, payload)))
            sender.start()
            _stop_and_go(server.proc.pid)  # the upload takes 0.2-1 s here
            sender.join(60)
            assert cli.interrupt() == 0
    assert got["up"] == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_downloads_that_fill_the_session_socket_and_windows_arrive_intact(crishim, transport):
    """crishim serve sends a pod's read straight from its read buffer (SessionBase.lending):
    what the session's socket does not take, and what waits for the client's window, must
    be copied, as the next read (any pod's, or the client's own) overwrites that buffer.
    A crishim port-forward stopped (SIGSTOP) again and again fills the session's socket,
    and a local reader that keeps pausing runs its stream's window out; three downloads
    on the one session arrive byte for byte. Keeping the views that wait for a window
    (WindowedSends._queue_more without its copy) fails here."""
    slow_local, fast_local, other_local = free_port(), free_port(), free_port()
    sizes = {"slow": 48 << 20, "fast": 32 << 20, "other": 32 << 20}
    got: dict[str, bytes] = {}
    with PortForwardCLI(crishim, f"{slow_local}:{SOURCE_PORT}", f"{fast_local}:{SOURCE_PORT}",
                        f"{other_local}:{SOURCE_PORT}", transport=transport) as cli:
        cli.forwarding(3)
        threads = [
            threading.Thread(target=lambda: got.__setitem__("slow", _slow_download(
                slow_local, sizes["slow"]))),
            threading.Thread(target=lambda: got.__setitem__("fast", download(
                fast_local, sizes["fast"]))),
            threading.Thread(target=lambda: got.__setitem__("other", download(
                other_local, sizes["other"]))),
        ]
        for t in threads:
            t.start()
        _stop_and_go(cli.proc.pid)
        for t in threads:
            t.join(60)
        assert cli.interrupt() == 0
    for name, size in sizes.items():
        assert len(got[name]) == size, name
        assert hashlib.sha256(got[name]).digest() == \
            hashlib.sha256(source_bytes(size)).digest(), name


SCRIBBLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "support", "scribble")


@pytest.mark.parametrize("transport", ["spdy", "h2", "spdy-over-websocket"])
def test_no_view_of_a_read_buffer_outlives_its_read(podnet, transport):
    """crishim serve and crishim port-forward read into one buffer per thread and send from
    it where they can (flow.write_lent): nothing may keep a view of it past the read's
    callback. Here both overwrite each read's bytes once its callback returns
    (tests/support/scribble), so a view kept anywhere (a transport's buffer, a window's
    queue, a codec's output) carries 0xEE on: an upload and two downloads, one read slowly,
    with each process stopped and continued by turns (full sockets, windows run out),
    arrive byte for byte."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [SCRIBBLE,
                                                       os.environ.get("PYTHONPATH")])),
           "CRISHIM_TEST_SCRIBBLE": "1"}
    size = 32 << 20
    payload = os.urandom(4 * size)
    ports = free_port(), free_port(), free_port()
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", env=env) as server:
        assert server.proc is not None
        with PortForwardCLI(server, *_slow_fast_and_sink(ports), transport=transport,
                            env=env) as cli:
            def by_turns() -> None:
                assert server.proc is not None
                for pid, times in ((server.proc.pid, 30), (cli.proc.pid, 15),
                                   (server.proc.pid, 15)):
                    _stop_and_go(pid, times)

            got = _slow_fast_and_upload(cli, ports, size, payload, by_turns)
    _assert_intact(got, size, payload)


@pytest.mark.parametrize("transport", ["h2", "spdy", "spdy-over-websocket"])
def test_a_connection_that_is_not_read_holds_back_only_itself(crishim, transport):
    """A local client that stops reading its download: over HTTP/2, and over SPDY where
    crishim serve honours the windows crishim's client asks for (docs/protocol.md 8.6),
    only that stream's window is held back, and the session's other connections go on
    (the whole session paused before: an echo beside it waited forever). Once it reads
    again it gets every byte."""
    stalled_local, echo_local = free_port(), free_port()
    size = 64 << 20
    with PortForwardCLI(crishim, f"{stalled_local}:{SOURCE_PORT}", f"{echo_local}:{ECHO_PORT}",
                        transport=transport) as cli:
        cli.forwarding(2)
        with socket.create_connection(("127.0.0.1", stalled_local), timeout=30) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            stalled.sendall(f"{size}\n".encode())
            got = bytearray(stalled.recv(65536))
            time.sleep(1.0)  # the server sends until this stream's window is spent
            for n in range(5):
                payload = b"beside it %d " % n * 100
                assert echo(echo_local, payload) == payload
            while len(got) < size:  # then read it all: nothing was lost meanwhile
                chunk = stalled.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(source_bytes(size)).digest()
        assert cli.interrupt() == 0


@pytest.mark.parametrize("spec_prefix", [":", "0:"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_free_local_port_is_chosen_and_printed(crishim, transport, spec_prefix):
    """The seeds' `:5000` and `0:5000`: one free port, the same on both listeners."""
    with PortForwardCLI(crishim, f"{spec_prefix}{HTTP_PORT}", transport=transport) as cli:
        lines = cli.forwarding(1)
        m = re.fullmatch(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", lines[0])
        assert m, lines
        local = int(m.group(1))
        assert local != 0
        assert lines == expected_forwarding(local, HTTP_PORT)
        assert peers.http_get(local).endswith(HTTP_BODY)
        assert cli.read_lines(1) == [f"Handling connection for {local}"]
        assert cli.interrupt() == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reset_from_pod_is_reported_and_next_connection_works(crishim, transport):
    reset_local, http_local = free_port(), free_port()
    with PortForwardCLI(crishim, f"{reset_local}:{RESET_PORT}", f"{http_local}:{HTTP_PORT}",
                        transport=transport) as cli:
        cli.forwarding(2)
        with socket.create_connection(("127.0.0.1", reset_local), timeout=10) as s:
            s.sendall(b"hello")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        line = cli.wait_stderr(rf"error forwarding port {reset_local} -> {RESET_PORT}")
        assert line.startswith("E"), line
        assert cli.proc.poll() is None, "one failed connection must not end the session"
        assert peers.http_get(http_local).endswith(HTTP_BODY)
        assert cli.interrupt() == 0
        assert not any("Traceback" in line for line in cli.stderr)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigterm_ends_cleanly(crishim, transport):
    with PortForwardCLI(crishim, f"{free_port()}:{HTTP_PORT}", transport=transport) as cli:
        cli.forwarding(1)
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.proc.wait(15) == 0


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _wait_for_goaway(cli: PortForwardCLI, local: int) -> None:
    """New local connections until one is refused for the server's GOAWAY (those made
    before it reached the client are refused by the draining server instead)."""
    deadline = time.monotonic() + 15
    while not any("takes no new connections" in line for line in cli.stderr):
        assert time.monotonic() < deadline, cli.stderr
        assert cli.proc.poll() is None, cli.stderr
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            s.sendall(b"x")
            try:
                s.recv(10)
            except OSError:
                pass
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["spdy", "spdy-over-websocket"])
def test_a_live_connection_outlives_the_servers_goaway_until_the_drain_deadline(
        podnet, transport):
    """crishim serve draining (SIGTERM) sends GOAWAY: as spdystream (kubectl), the live
    connection goes on, new ones are refused with an E line, and the server's close at
    its drain deadline ends the command as a lost session."""
    server = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                            "--drain-timeout", "4s").start()
    local = free_port()
    try:
        with PortForwardCLI(server, f"{local}:{ECHO_PORT}", transport=transport) as cli:
            cli.forwarding(1)
            with socket.create_connection(("127.0.0.1", local), timeout=20) as live:
                assert _roundtrip(live, b"before") == b"before"
                server.proc.send_signal(signal.SIGTERM)
                _wait_for_goaway(cli, local)
                line = cli.wait_stderr(r"takes no new connections")
                assert line.startswith("E") and f"error forwarding port {local} -> " \
                    f"{ECHO_PORT}: the server sent GOAWAY" in line, line
                for i in range(3):  # still carried while the server drains
                    assert _roundtrip(live, b"during %d" % i) == b"during %d" % i
                    assert cli.proc.poll() is None, cli.stderr
                assert cli.proc.wait(20) == 1  # the drain deadline closed the session
            # the deadline resets the live stream (the session then ends on its GOAWAY)
            # and closes the session, in either order; the tunnel's close said "(1000 )"
            ended = {"the server sent GOAWAY (status 0)",
                     {"spdy": "the server closed the connection",
                      "spdy-over-websocket": "the server closed the WebSocket (1000)"}[
                          transport]}
            assert cli.stderr[-1] in {f"error: lost connection to pod ({reason})"
                                      for reason in ended}, cli.stderr
            assert not any("Traceback" in line for line in cli.stderr)
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("transport, reason", [
    ("spdy", "the server sent GOAWAY (status 0)"),
    ("spdy-over-websocket", "the server sent GOAWAY (status 0)"),
    # HTTP/2 sends its GOAWAY at the drain deadline: tests/unit/test_client_transports.py
])
def test_after_goaway_the_last_connection_ending_ends_port_forward(podnet, transport, reason):
    """The session ends with its last live connection once the server sent GOAWAY (it
    takes no new ones): the command ends as on a lost session, without waiting for the
    server's drain deadline."""
    server = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                            "--drain-timeout", "60s").start()
    local = free_port()
    try:
        with PortForwardCLI(server, f"{local}:{ECHO_PORT}", transport=transport) as cli:
            cli.forwarding(1)
            with socket.create_connection(("127.0.0.1", local), timeout=20) as live:
                assert _roundtrip(live, b"before") == b"before"
                server.proc.send_signal(signal.SIGTERM)
                _wait_for_goaway(cli, local)
                assert _roundtrip(live, b"still") == b"still"
            assert cli.proc.wait(20) == 1
            assert cli.stderr[-1] == f"error: lost connection to pod ({reason})", cli.stderr
        assert server.proc.wait(20) == 0  # its last session ended with the client's
    finally:
        server.stop()


FATAL_EVENTS = ["netns-deleted", "server-draining", "server-killed"]


@contextlib.contextmanager
def doomed_pod(*server_args: str):
    """A pod netns of its own (the podnet servers in it) and a crishim serve for it, for a
    test that deletes the one or stops the other."""
    name = f"crishim-doomed-{os.getpid()}"
    with podnet_module.PodNetwork(name) as net:
        server = CrishimProcess("--sandboxes", f"{SANDBOX}={net.path}", *server_args).start()
        try:
            yield name, server
        finally:
            server.stop(signal.SIGKILL)


def make_fatal(event: str, netns: str, server: CrishimProcess) -> None:
    if event == "netns-deleted":
        assert delete_named_netns(netns)
    elif event == "server-draining":
        server.proc.send_signal(signal.SIGTERM)
    else:
        server.proc.kill()


def connect_until_it_ends(cli: PortForwardCLI, port: int, payload: bytes,
                          limit: float = 30.0) -> None:
    """Local connections, one after another, until the command ends; fails after `limit`
    seconds of forwarding on."""
    deadline = time.monotonic() + limit
    while cli.proc.poll() is None:
        assert time.monotonic() < deadline, f"still forwarding: {cli.stderr[-5:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(payload)
                s.recv(100)
        except OSError:
            pass
        time.sleep(0.1)


@pytest.mark.parametrize("event", FATAL_EVENTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_fatal_condition_ends_port_forward_with_exit_1_on_every_transport(transport, event):
    """The sandbox's netns deleted, crishim serve draining or killed: every transport ends
    the command with exit 1 and kubectl's `error: lost connection to pod` (SPDY, HTTP/2:
    on the error text, the GOAWAY or the session's end; HTTP/2 refuses new streams until
    the drain deadline). The channel WebSocket, where every failure is error text and
    each connection a WebSocket of its own, forwarded on and printed an E line per
    connection; now the runtime, asked, says the sandbox is lost (NOT_FOUND,
    UNAVAILABLE), and it ends the same way."""
    with doomed_pod("--drain-timeout", "4s") as (netns, server):
        port = free_port()
        with PortForwardCLI(server, f"{port}:{HTTP_PORT}", transport=transport) as cli:
            cli.forwarding(1)
            assert peers.http_get(port).endswith(HTTP_BODY)
            if transport == "websocket":
                # the next connection's WebSocket, opened ahead (the GET's, this one): the
                # netns case then meets the error text on its channel
                deadline = time.monotonic() + 20
                while server.log().count("session started: transport=websocket") < 2:
                    assert time.monotonic() < deadline, server.log()[-2000:]
                    time.sleep(0.05)
            make_fatal(event, netns, server)
            connect_until_it_ends(cli, port, b"GET / HTTP/1.0\r\n\r\n")
            assert cli.proc.wait(10) == 1
            last = cli.wait_stderr(r"^error: ")
    assert last.startswith("error: lost connection to pod"), cli.stderr
    assert cli.stderr[-1] == last, cli.stderr
    assert not any("Traceback" in line for line in cli.stderr)
    if event == "netns-deleted" or transport == "websocket":
        # kubectl's two lines: the connection's error, then the session lost
        assert last == "error: lost connection to pod", cli.stderr
        fatal = [line for line in cli.stderr if "an error occurred forwarding" in line]
        assert len(fatal) == 1 and fatal[0].startswith("E"), cli.stderr
        assert f"portforward] an error occurred forwarding {port} -> {HTTP_PORT}: " \
            in fatal[0], fatal
        if event == "netns-deleted":
            assert "no longer exists" in fatal[0], fatal


@pytest.mark.parametrize("failure", ["refused", "reset"])
def test_websocket_failures_of_one_connection_leave_forwarding_on(crishim, failure):
    """A refused port or a reset from the pod is error text on the channel protocol too:
    the runtime, asked, still has the sandbox, so that connection's E line, and forwarding
    goes on."""
    local, http_local = free_port(), free_port()
    remote = CLOSED_PORT if failure == "refused" else RESET_PORT
    with PortForwardCLI(crishim, f"{local}:{remote}", f"{http_local}:{HTTP_PORT}",
                        transport="websocket") as cli:
        cli.forwarding(2)
        for _ in range(3):
            assert peers.reset_by_pod(local) == b""
        deadline = time.monotonic() + 20
        while sum(f"error forwarding port {local} -> {remote}" in line
                  for line in cli.stderr) < 3:
            assert time.monotonic() < deadline, cli.stderr
            time.sleep(0.05)
        assert peers.http_get(http_local).endswith(HTTP_BODY)
        assert cli.proc.poll() is None, cli.stderr
        assert cli.interrupt() == 0
    assert not any("an error occurred" in line for line in cli.stderr), cli.stderr


# --------------------------------------------------------------------------- errors


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crishim", "port-forward", *args],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--context", "x"], "--context needs --kubeconfig"),
    (["-n", "x"], "--namespace needs --kubeconfig"),
    (["--context", "x", "-n", "y"], "--context and --namespace need --kubeconfig"),
    # silently ignored: nothing waits for a pod without a cluster to ask
    (["--pod-running-timeout", "5s"], "--pod-running-timeout needs --kubeconfig"),
])
def test_cluster_flags_without_kubeconfig_are_refused(crishim, flags, message):
    r = run_cli(SANDBOX, "8080", "--runtime-endpoint", crishim.socket, *flags)
    assert r.returncode == 1
    assert r.stderr == f"error: {message}\n" and r.stdout == ""


@pytest.mark.parametrize("spec,pattern", [
    ("abc", r"invalid port spec 'abc'"),
    ("1:2:3", r"invalid port spec"),
    ("70000:80", r"local port 70000"),
    ("5000:0", r"remote port 0"),
    (":", r"invalid port spec"),
    ("٨٠٨٠", r"local port '٨٠٨٠' is not a number"),
])
def test_bad_spec_is_one_line_and_nonzero(crishim, spec, pattern):
    r = run_cli(SANDBOX, spec, "--runtime-endpoint", crishim.socket)
    assert_one_error_line(r, pattern)
    assert r.stdout == ""


def test_a_local_port_given_twice_is_refused_before_forwarding(crishim):
    port = free_port()
    r = run_cli(SANDBOX, f"{port}:{HTTP_PORT}", f"{port}:{ECHO_PORT}", "--runtime-endpoint",
                crishim.socket)
    assert_one_error_line(r, rf"^error: invalid port specs '{port}:{HTTP_PORT}' and "
                             rf"'{port}:{ECHO_PORT}': local port {port} is given twice$")
    assert r.stdout == ""  # no 'Forwarding from' for the first one


def _taken(host: str, port: int, protocol: str) -> socket.socket:
    """A socket of this test's holding `port` on `host` (listening, for TCP)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if protocol == "tcp":
        sock.listen(1)
    return sock


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_local_port_in_use_on_every_address_is_one_line_and_nonzero(crishim, protocol):
    """kubectl fails a local port only when none of localhost's addresses can be bound."""
    port = free_port()
    suffix = "/udp" if protocol == "udp" else ""
    hosts = ["127.0.0.1", "::1"] if ipv6_loopback() else ["127.0.0.1"]
    held = [_taken(host, port, protocol) for host in hosts]
    try:
        r = run_cli(SANDBOX, f"{port}:{HTTP_PORT}{suffix}", "--runtime-endpoint",
                    crishim.socket)
    finally:
        for sock in held:
            sock.close()
    assert_one_error_line(r, rf"^error: unable to listen on 127\.0\.0\.1:{port}{suffix}: "
                             r".*in use")
    if len(hosts) == 2:
        assert re.search(rf"; \[::1\]:{port}{suffix}: .*in use$", r.stderr.strip()), r.stderr
    assert r.stdout == ""


def test_a_port_that_cannot_listen_beside_one_that_can_is_a_line_and_the_other_forwards(
        crishim):
    """kubectl (client-go ForwardPorts) prints `Unable to listen on port N: ...` for a
    port spec none of whose addresses can be bound and forwards the others; crishim ended
    at the first such spec, forwarding none."""
    busy, free = free_port(), free_port()
    hosts = ["127.0.0.1", "::1"] if ipv6_loopback() else ["127.0.0.1"]
    held = [_taken(host, busy, "tcp") for host in hosts]
    try:
        with PortForwardCLI(crishim, f"{busy}:{HTTP_PORT}", f"{free}:{HTTP_PORT}") as cli:
            assert cli.read_lines(len(hosts)) == [
                f"Forwarding from {'[::1]' if ':' in host else host}:{free} -> {HTTP_PORT}"
                for host in hosts]
            assert peers.http_get(free, "127.0.0.1").endswith(HTTP_BODY)
            assert cli.interrupt() == 0
    finally:
        for sock in held:
            sock.close()
    assert len(cli.stderr) == 1, cli.stderr
    assert re.fullmatch(rf"Unable to listen on port {busy}: 127\.0\.0\.1:{busy}: .*in use"
                        + (rf"; \[::1\]:{busy}: .*in use" if len(hosts) == 2 else ""),
                        cli.stderr[0]), cli.stderr


def test_no_port_that_can_listen_is_an_error_naming_each(crishim):
    """As kubectl: a line for each port spec, then `unable to listen on any of the
    requested ports`, exit 1."""
    ports = [free_port(), free_port()]
    held = [_taken("127.0.0.1", port, "tcp") for port in ports]
    try:
        r = run_cli(SANDBOX, f"{ports[0]}:{HTTP_PORT}", f"{ports[1]}:{HTTP_PORT}",
                    "--runtime-endpoint", crishim.socket, "--address", "127.0.0.1",
                    timeout=15)
    finally:
        for sock in held:
            sock.close()
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 3, r.stderr
    for line, port in zip(lines, ports):
        assert re.fullmatch(rf"Unable to listen on port {port}: 127\.0\.0\.1:{port}: .*in use",
                            line), r.stderr
    assert lines[2] == (f"error: unable to listen on any of the requested ports: "
                        f"{ports[0]}:{HTTP_PORT}, {ports[1]}:{HTTP_PORT}")
    assert r.stdout == ""


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize("busy", ["127.0.0.1", "::1"])
def test_one_busy_localhost_address_leaves_the_other_forwarding(crishim, busy, protocol):
    """kubectl 1.27 and 1.32 (client-go listenOnPort): where one of localhost's two
    addresses is taken for the local port, the other forwards alone, with its Forwarding
    line only and nothing on stderr; crishim exited 1."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this host: localhost is 127.0.0.1 alone")
    free = "::1" if busy == "127.0.0.1" else "127.0.0.1"
    shown_free = f"[{free}]" if ":" in free else free
    port = free_port()
    remote = UDP_ECHO_PORT if protocol == "udp" else HTTP_PORT
    remote_text = f"{remote}/udp" if protocol == "udp" else str(remote)
    with _taken(busy, port, protocol), \
            PortForwardCLI(crishim, f"{port}:{remote_text}") as cli:
        assert cli.read_lines(1) == [f"Forwarding from {shown_free}:{port} -> {remote_text}"]
        if protocol == "udp":
            assert exchange(port, [b"over " + free.encode()], host=free) == \
                [b"over " + free.encode()]
        else:
            assert peers.http_get(port, free).endswith(HTTP_BODY)
        handled = f"Handling connection for {port}" + ("/udp" if protocol == "udp" else "")
        assert cli.read_lines(1) == [handled]
        assert cli.interrupt() == 0
    assert cli.stdout == [f"Forwarding from {shown_free}:{port} -> {remote_text}", handled]
    assert cli.stderr == []


@pytest.mark.parametrize("address, shown", [
    ("[::1]", "[::1]"),  # crishim took the brackets off
    ("LOCALHOST", "LOCALHOST"),  # and resolved names: Forwarding from LOCALHOST:...
    ("ip6-localhost", "ip6-localhost"),
    ("fe80::1%lo", "fe80::1%lo"),  # a zone: Python's ipaddress takes it, kubectl does not
    ("127.0.0.1,", ""),  # an empty item of a list
])
def test_an_address_that_is_not_localhost_or_an_ip_is_refused_as_kubectl(crishim, address,
                                                                         shown):
    r = run_cli(SANDBOX, f"{free_port()}:{HTTP_PORT}", "--runtime-endpoint", crishim.socket,
                "--address", address, timeout=15)
    assert r.returncode == 1
    assert r.stderr == f"error: {shown} is not a valid IP\n"
    assert r.stdout == ""


def test_no_address_at_all_is_refused_as_kubectl(crishim):
    r = run_cli(SANDBOX, f"{free_port()}:{HTTP_PORT}", "--runtime-endpoint", crishim.socket,
                "--address", "", timeout=15)
    assert r.returncode == 1
    assert r.stderr == "error: you must specify at least 1 address\n"


def test_an_ipv4_mapped_address_listens_on_its_ipv4_address_as_kubectl(crishim):
    """kubectl binds ::ffff:127.0.0.1 as tcp4 (127.0.0.1) and shows it as given; crishim
    set IPV6_V6ONLY on an IPv6 socket for it and the bind failed (EINVAL)."""
    port = free_port()
    with PortForwardCLI(crishim, f"{port}:{HTTP_PORT}",
                        extra=("--address", "::ffff:127.0.0.1")) as cli:
        assert cli.read_lines(1) == [f"Forwarding from [::ffff:127.0.0.1]:{port} -> "
                                     f"{HTTP_PORT}"]
        assert peers.http_get(port, "127.0.0.1").endswith(HTTP_BODY)
        assert cli.interrupt() == 0
    assert not cli.stderr


def test_explicit_addresses_are_listened_on_in_kubectls_order(crishim):
    """kubectl sorts its addresses: `--address ::1,127.0.0.1` lists 127.0.0.1 first."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this host")
    port = free_port()
    with PortForwardCLI(crishim, f"{port}:{HTTP_PORT}", extra=("--address", "::1,127.0.0.1")
                        ) as cli:
        assert cli.read_lines(2) == expected_forwarding(port, HTTP_PORT)
        assert cli.interrupt() == 0


def test_unreachable_endpoint_is_one_line_and_nonzero(tmp_path):
    r = run_cli(SANDBOX, "8080", "--runtime-endpoint", f"unix://{tmp_path}/none.sock")
    assert_one_error_line(r, rf"cannot reach the runtime at unix://{tmp_path}/none\.sock")


def test_a_socket_nobody_listens_on_is_unreachable_in_one_line(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # bound, closed: the file stays
        stale.bind(str(path))
    r = run_cli(SANDBOX, "8080", "--runtime-endpoint", str(path))
    assert_one_error_line(r, rf"^error: cannot reach the runtime at unix://{path}: .*"
                             r"Connection refused")


def test_an_endpoint_that_is_no_socket_is_named_so(tmp_path):
    """A regular file (a mistyped path to the runtime's config) gave gRPC's "connect
    failed ... Connection refused"."""
    path = tmp_path / "containerd.toml"
    path.write_text("version = 2\n")
    r = run_cli(SANDBOX, "8080", "--runtime-endpoint", str(path))
    assert_one_error_line(r, rf"^error: cannot reach the runtime at unix://{path}: {path} "
                             r"is not a socket$")


def test_a_runtime_that_answers_unavailable_is_not_called_unreachable(tmp_path):
    """crishim serve answered, its upstream runtime is down: the answer is the runtime's
    UNAVAILABLE, said as such; it was `cannot reach the runtime at <the socket that
    answered>`."""
    with CrishimProcess("--upstream-endpoint", f"unix://{tmp_path}/upstream.sock") as server:
        r = run_cli("pod-1", "8080", "--runtime-endpoint", server.socket)
    assert_one_error_line(r, rf"^error: the runtime at unix://{server.socket} is "
                             rf"unavailable: PodSandboxStatus\(pod-1\) at "
                             rf"unix://{tmp_path}/upstream\.sock: UNAVAILABLE")
    assert "cannot reach" not in r.stderr


def test_unknown_sandbox_is_one_line_and_nonzero(crishim):
    r = run_cli("no-such-sandbox", "8080", "--runtime-endpoint", crishim.socket)
    assert_one_error_line(r, r"sandbox 'no-such-sandbox' not found")
    assert r.stderr.count("not found") == 1, r.stderr  # not the server's words twice


def test_a_gone_sandbox_is_said_once(crishim):
    """The crishim fixture's sandbox 'gone' names a netns that does not exist: the server's
    own line, not "sandbox 'gone' not found: sandbox 'gone': ... is gone"."""
    r = run_cli("gone", "8080", "--runtime-endpoint", crishim.socket)
    assert_one_error_line(r, r"^error: sandbox 'gone': network namespace /var/run/netns/none "
                             r"is gone")
    assert r.stderr.count("sandbox 'gone'") == 1, r.stderr


_NO_PROTOCOL = b"no stream protocol in common\n"
_NOT_FOUND_STATUS = (
    b'{"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", '
    b'"message": "sandbox \'nosuch\' not found (no /var/run/netns/nosuch)", '
    b'"reason": "InternalError", "code": 500}')


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
@pytest.mark.parametrize("answer, expected", [
    # a runtime speaking another protocol
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
     % (len(_NO_PROTOCOL), _NO_PROTOCOL),
     "error upgrading connection: unable to upgrade connection: 403: no stream protocol in "
     "common"),
    # a Content-Length of Latin-1 '²' passed str.isdigit() and int() raised: a traceback
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: \xb2\r\n\r\nnope",
     "error upgrading connection: unable to upgrade connection: 404: nope"),
    # a status of 5,000 digits: int() refuses more than 4,300
    (b"HTTP/1.1 " + b"4" * 5000 + b" Odd\r\n\r\n", "HTTP"),
    # an API server's refusal is a Kubernetes Status: its message, not the JSON
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
     b"Content-Length: %d\r\n\r\n%s" % (len(_NOT_FOUND_STATUS), _NOT_FOUND_STATUS),
     "error upgrading connection: sandbox 'nosuch' not found (no /var/run/netns/nosuch)"),
    # JSON of another kind is shown as it came
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 17\r\n\r\n{\"kind\": \"Other\"}",
     'error upgrading connection: unable to upgrade connection: 500: {"kind": "Other"}'),
], ids=["refused", "latin1-length", "long-status", "kubernetes-status", "other-json"])
def test_refused_upgrade_is_one_line_and_nonzero(transport, answer, expected):
    """A stream server that refuses the upgrade, or answers what is not HTTP: one clear
    error, never an exception of another kind."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    from crishim.client.transports import SessionError, UpgradeRefused, open_session

    async def go():
        with pytest.raises((UpgradeRefused, SessionError)) as e:
            await open_session(f"http://127.0.0.1:{port}/portforward/x", transport, [80])
        return str(e.value)

    message = asyncio.run(go())
    listener.close()
    if expected == "HTTP":
        assert "did not answer with HTTP" in message or "malformed status line" in message, \
            message
        assert len(message) < 300
    else:
        assert message == expected


@pytest.mark.parametrize("transport", ["spdy", "websocket", "spdy-over-websocket"])
def test_a_refusal_with_an_endless_body_keeps_4_kib_of_it_and_hangs_up(transport):
    """A stream server that answers 500 and streams its body: the message shows the
    body's first 4 KiB, says it is cut, and the client closes rather than read on."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    port = listener.getsockname()[1]
    most = 64 << 20  # what the server sends at most (the client read it all: the bug)
    sent = [0]
    hung_up = threading.Event()

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\n"
                         b"Content-Type: text/plain\r\n\r\n")
            chunk = b"A" * (1 << 20)
            end = time.monotonic() + 10
            try:
                while sent[0] < most and time.monotonic() < end:
                    conn.sendall(chunk)
                    sent[0] += len(chunk)
            except ConnectionError:  # reset or broken pipe: the client closed
                hung_up.set()

    t = threading.Thread(target=answer, daemon=True)
    t.start()

    from crishim.client.transports import UpgradeRefused, open_session

    async def go():
        with pytest.raises(UpgradeRefused) as e:
            await open_session(f"http://127.0.0.1:{port}/portforward/x", transport, [80])
        return str(e.value)

    message = asyncio.run(go())
    t.join(15)
    listener.close()
    assert message.startswith("error upgrading connection: unable to upgrade connection: "
                              "500: AAAA")
    assert message.endswith("A… (the body's first 4096 bytes)"), message[-80:]
    assert message.count("A") == 4096
    assert hung_up.is_set() and sent[0] < most, sent[0]


class UrlRuntime:
    """A CRI runtime on a unix socket whose PortForward answers `url`, whatever it is."""

    def __init__(self, path: str, url: str) -> None:
        self.url = url
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((self,))
        self.server.add_insecure_port("unix://" + path)
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails):
        if not details.method.endswith("/PortForward"):
            return None
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: api_pb2.PortForwardResponse(url=self.url),
            request_deserializer=api_pb2.PortForwardRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())


@pytest.mark.parametrize("url,pattern", [
    ("http://127.0.0.1:99999/x", r"Port out of range"),
    ("http://[zz/x", r"Invalid IPv6 URL"),
    ("http://127.0.0.1:1\r\nX: y/x", r"Port could not be cast"),
    ("http://" + "a" * 300 + "/x", r"bad host name: .*label too long"),
    ("http://user:secret@127.0.0.1:99999/x", r"Port out of range"),
    ("http://user:secret@127.0.0.1:1/x?a@b", r"it carries user information"),
], ids=["port-over-65535", "unclosed-ipv6", "crlf-in-port", "300-char-label",
        "credentials-and-bad-port", "credentials"])
def test_a_malformed_stream_url_from_the_runtime_is_one_line_and_nonzero(tmp_path, url,
                                                                          pattern):
    """What urlsplit and the resolver raise for the runtime's URL (ValueError, UnicodeError)
    is a bad URL like any other, not a traceback."""
    runtime = UrlRuntime(str(tmp_path / "cri.sock"), url)
    try:
        r = run_cli(SANDBOX, ":80", "--runtime-endpoint", f"unix://{tmp_path}/cri.sock")
    finally:
        runtime.server.stop(0)
    assert r.returncode == 1
    assert_one_error_line(r, r"^error: cannot use stream URL '.+: " + pattern)
    assert len(r.stderr) < 300, r.stderr
    assert "secret" not in r.stderr  # a URL's credentials are never shown


class HangingUp(FakeServer):
    """A stream server that closes every connection as soon as it has accepted it."""

    def handle(self, conn: socket.socket) -> None:
        conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stream_server_that_hangs_up_at_once_is_one_line_every_time(tmp_path, transport):
    """It accepts and closes: however the close races the connect (uvloop's transport is
    closed by the time the connect returns, or not), one line and exit 1. With
    --transport websocket nothing is upgraded before a local client connects (an upgrade
    dials the pod on most servers): that connection's E line, and forwarding goes on."""
    listener = HangingUp()
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         f"http://127.0.0.1:{listener.port}/portforward/x")
    try:
        if transport == "websocket":
            port = free_port()
            with PortForwardCLI(SimpleNamespace(socket=tmp_path / "cri.sock"),
                                f"{port}:80", transport=transport) as cli:
                cli.forwarding(1)
                for _ in range(3):
                    assert peers.reset_by_pod(port) == b""
                cli.wait_stderr(r"^E.* portforward\] error forwarding port "
                                rf"{port} -> 80: the server closed the connection before")
                assert cli.interrupt() == 0
            assert not any("Traceback" in line for line in cli.stderr), cli.stderr
            return
        for _ in range(3):
            r = run_cli(SANDBOX, ":80", "--runtime-endpoint", f"unix://{tmp_path}/cri.sock",
                        "--transport", transport)
            assert r.returncode == 1
            assert_one_error_line(r, r"^error: the server closed the connection before")
    finally:
        runtime.server.stop(0)
        listener.close()


class SilentListener(FakeServer):
    """A listening socket (unix or TCP) that accepts and never answers; `accepted` is set
    once a client connected."""

    def __init__(self, unix_path: str | None = None) -> None:
        super().__init__(unix_path=unix_path)

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("waiting_for", ["cri-call", "upgrade"])
def test_a_signal_while_starting_ends_port_forward_with_0(tmp_path, sig, waiting_for):
    """Ctrl-C or SIGTERM while the CRI PortForward or the upgrade is unanswered (with
    --timeout 60) ends the command at once, as it does once forwarding."""
    if waiting_for == "cri-call":
        silent = SilentListener(str(tmp_path / "cri.sock"))
        runtime = None
    else:
        silent = SilentListener()
        runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                             f"http://127.0.0.1:{silent.sock.getsockname()[1]}/portforward/x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "crishim", "port-forward", SANDBOX, f"{free_port()}:80",
         "--runtime-endpoint", str(tmp_path / "cri.sock"), "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert silent.accepted.wait(20), "port-forward never connected"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)  # not the 60 s --timeout
        assert (proc.returncode, out, err) == (0, "", "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        silent.close()
        if runtime is not None:
            runtime.server.stop(0)


class SettingsOnlyH2(FakeServer):
    """An HTTP/2 stream server that sends its SETTINGS and answers no stream."""

    def handle(self, conn: socket.socket) -> None:
        import h2.config
        import h2.connection

        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2conn.initiate_connection()
        try:
            with conn:
                conn.sendall(h2conn.data_to_send())
                while data := conn.recv(65536):
                    h2conn.receive_data(data)  # SETTINGS acknowledged, no answers
                    conn.sendall(h2conn.data_to_send())
        except Exception:  # noqa: BLE001, S110 - the client hung up or broke the protocol
            pass


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_bounds_the_wait_for_the_upgrade_answer(tmp_path, transport):
    """--timeout governs the upgrade as it does the CRI call (it was always 10 s). With
    --transport websocket the first upgrade is the first local connection's."""
    silent = SilentListener()
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         f"http://127.0.0.1:{silent.sock.getsockname()[1]}/portforward/x")
    try:
        if transport == "websocket":
            port = free_port()
            with PortForwardCLI(SimpleNamespace(socket=tmp_path / "cri.sock"),
                                f"{port}:80", transport=transport,
                                extra=("--timeout", "0.5")) as cli:
                cli.forwarding(1)
                assert peers.reset_by_pod(port) == b""
                cli.wait_stderr(rf"error forwarding port {port} -> 80: no answer to the "
                                r"upgrade from 127\.0\.0\.1:\d+ in 0\.5s$")
                assert cli.interrupt() == 0
            return
        r = run_cli(SANDBOX, f"{free_port()}:80", "--runtime-endpoint",
                    str(tmp_path / "cri.sock"), "--transport", transport, "--timeout", "0.5")
    finally:
        runtime.server.stop(0)
        silent.close()
    if transport == "h2":
        assert_one_error_line(r, r"^error: no HTTP/2 SETTINGS from 127\.0\.0\.1:\d+ in 0\.5s$")
    else:
        assert_one_error_line(r, r"^error: no answer to the upgrade from 127\.0\.0\.1:\d+ "
                                 r"in 0\.5s$")


def test_timeout_bounds_h2_stream_version_negotiation(tmp_path):
    """A UDP spec on h2 asks the server its stream protocol version: --timeout bounds the
    wait for the answer too."""
    server = SettingsOnlyH2()
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         f"http://127.0.0.1:{server.port}/portforward/x")
    try:
        r = run_cli(SANDBOX, f"{free_port()}:53/udp", "--runtime-endpoint",
                    str(tmp_path / "cri.sock"), "--transport", "h2", "--timeout", "0.5")
    finally:
        runtime.server.stop(0)
        server.close()
    assert_one_error_line(r, r"^error: cannot learn the server's stream protocol version: "
                             r"no answer in 0\.5s$")


def bad_ca_bundles(tmp_path) -> dict[str, tuple[str, str]]:
    """--certificate-authority values that cannot be loaded, and why, by case."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"missing": (str(tmp_path / "none.pem"), "No such file or directory"),
            "directory": (str(tmp_path), "Is a directory"),
            "garbage": (str(garbage), r"not a PEM CA bundle \(no certificate or crl found\)")}


@pytest.mark.parametrize("case", ["missing", "directory", "garbage"])
@pytest.mark.parametrize("through", ["cri", "kubeconfig"])
def test_an_unusable_certificate_authority_is_one_line(tmp_path, case, through):
    path, why = bad_ca_bundles(tmp_path)[case]
    runtime = UrlRuntime(str(tmp_path / "cri.sock"), "https://127.0.0.1:1/portforward/x")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "users: [{name: u, user: {token: t}}]\n")
    target = ["--kubeconfig", str(kubeconfig)] if through == "kubeconfig" else \
        ["--runtime-endpoint", str(tmp_path / "cri.sock")]
    try:
        r = run_cli(SANDBOX, f"{free_port()}:80", *target, "--certificate-authority", path)
    finally:
        runtime.server.stop(0)
    assert r.returncode == 1
    assert_one_error_line(r, f"^error: --certificate-authority {re.escape(path)}: {why}$")
    assert r.stdout == ""


class StalledAfterUpgrade(FakeServer):
    """A stream server that accepts the upgrade (SPDY's or the WebSocket's 101, HTTP/2's
    SETTINGS) and then reads on but never writes again: a stopped or wedged server."""

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)
        threading.Thread(target=self._upgrade_then_stall, args=(conn,), daemon=True).start()

    @staticmethod
    def _upgrade_then_stall(conn: socket.socket) -> None:
        import base64
        import hashlib

        try:
            head = conn.recv(65536)
            if head.startswith(b"PRI * HTTP/2.0"):
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
            elif key := re.search(rb"(?i)sec-websocket-key:\s*(\S+)", head):
                accept = base64.b64encode(hashlib.sha1(
                    key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                             b"\r\nSec-WebSocket-Protocol: SPDY/3.1+portforward.k8s.io"
                             b"\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: SPDY/3.1\r\n"
                             b"X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
            while conn.recv(65536):
                pass
        except OSError:
            return


@pytest.mark.parametrize("transport", ["spdy", "spdy-over-websocket", "h2"])
def test_a_server_that_stalls_after_the_upgrade_ends_the_session_after_a_ping(tmp_path,
                                                                             transport):
    """It never answers the keepalive PING, nor sends anything else: the session is lost
    once --timeout has passed after a PING (new connections hung without an error)."""
    server = StalledAfterUpgrade()
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         f"http://127.0.0.1:{server.port}/portforward/x")
    local = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "crishim", "port-forward", SANDBOX, f"{local}:80",
         "--runtime-endpoint", str(tmp_path / "cri.sock"), "--transport", transport,
         "--ping-interval", "0.5", "--timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)  # it ends by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        runtime.server.stop(0)
        server.close()
    assert proc.returncode == 1
    assert out.startswith(f"Forwarding from 127.0.0.1:{local} -> 80\n"), out
    assert err == "error: lost connection to pod (the server answered no PING in 1s)\n", err


def test_a_paused_local_reader_does_not_make_a_busy_session_look_stalled(crishim):
    """A download whose local reader stops for a while pauses the session's reading, and
    the server's PING answers wait unread behind its data: that is not a stalled server
    (bytes wait in the socket), and the session goes on with short --timeout pings."""
    local = free_port()
    size = 64 << 20
    with PortForwardCLI(crishim, f"{local}:{SOURCE_PORT}",
                        extra=("--ping-interval", "0.2", "--timeout", "0.5")) as cli:
        cli.forwarding(1)
        with socket.create_connection(("127.0.0.1", local), timeout=20) as s:
            s.sendall(f"{size}\n".encode())
            got = bytearray(s.recv(1 << 20))
            time.sleep(3)  # not reading: many PING intervals and timeouts pass
            while chunk := s.recv(1 << 20):
                got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(source_bytes(size)).digest()
        assert cli.proc.poll() is None, cli.stderr
        assert cli.interrupt() == 0
        assert not cli.stderr


def test_websocket_connections_use_a_session_opened_after_the_last_opened(crishim):
    # the channel protocol takes a session per connection: the next one is opened ahead
    # (Crishim-Dial: on-data) once a connection's bytes came back, from a URL fetched
    # then; one that is refused (its URL spent: 404) is replaced, not reported
    import asyncio

    from crishim.client.cri import CriClient
    from crishim.client.portforward import cri_opener

    class RecordingCri(CriClient):
        def __init__(self, endpoint: str) -> None:
            super().__init__(endpoint)
            self.urls: list[str] = []

        def port_forward(self, sandbox_id: str, ports=()) -> str:
            url = super().port_forward(sandbox_id, ports)
            self.urls.append(url)
            return url

    async def echo(opener, payload: bytes):
        session = await opener("websocket", [ECHO_PORT], 0)
        try:
            reader, writer = await session.open_stream(ECHO_PORT)
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        finally:
            session.close()
        return session

    async def main() -> None:
        cri = RecordingCri(f"unix://{crishim.socket}")
        opener = cri_opener(cri, SANDBOX)
        first = await echo(opener, b"one")
        second = await echo(opener, b"two")
        assert first.dial == "at-once" and second.dial == "on-data"  # opened ahead
        await asyncio.sleep(0.5)  # the spare for a third connection is open
        assert len(cri.urls) == 3  # one on demand, then one ahead per connection
        # its URL refused: the next spare's CRI call answers with a spent token
        spent = cri.urls[-1]
        real = cri.port_forward
        cri.port_forward = lambda sandbox_id, ports=(): (cri.urls.append(spent), spent)[1]
        await echo(opener, b"three")  # takes the open spare
        await asyncio.sleep(0.5)  # the next spare is refused (404)
        cri.port_forward = real
        fourth = await echo(opener, b"four")  # so a fresh URL on demand works
        assert fourth.dial == "at-once"
        await asyncio.sleep(0.5)
        assert len(cri.urls) == 6  # and the next spare
        opener.close()
        cri.close()

    asyncio.run(main())


def test_websocket_spare_url_is_asked_for_once_the_first_bytes_came_back(crishim,
                                                                          monkeypatch):
    # the spare's CRI call (and crishim serve's answer to it) took the GIL from the first
    # byte's way: it waits for the connection's reply, its end or SPARE_FETCH_DELAY
    import asyncio

    from crishim.client import portforward
    from crishim.client.cri import CriClient

    class CountingCri(CriClient):
        calls = 0

        def port_forward(self, sandbox_id: str, ports=()) -> str:
            CountingCri.calls += 1
            return super().port_forward(sandbox_id, ports)

    async def main() -> None:
        cri = CountingCri(f"unix://{crishim.socket}")
        opener = portforward.cri_opener(cri, SANDBOX)
        monkeypatch.setattr(portforward, "SPARE_FETCH_DELAY", 60.0)
        session = await opener("websocket", [ECHO_PORT], 0)
        reader, writer = await session.open_stream(ECHO_PORT)
        await asyncio.sleep(0.3)
        assert CountingCri.calls == 1  # nothing came back yet: no spare asked for
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        await until(lambda: CountingCri.calls == 2)  # the reply: now
        session.close()
        # a connection that never hears back gets its spare after the delay
        monkeypatch.setattr(portforward, "SPARE_FETCH_DELAY", 0.2)
        quiet = await opener("websocket", [ECHO_PORT], 0)  # takes the spare
        await quiet.open_stream(ECHO_PORT)
        assert CountingCri.calls == 2
        await until(lambda: CountingCri.calls == 3)
        # a connection that comes before its spare was asked for asks at once, and works
        monkeypatch.setattr(portforward, "SPARE_FETCH_DELAY", 60.0)
        first = await opener("websocket", [ECHO_PORT], 0)  # takes the third URL
        second = await opener("websocket", [ECHO_PORT], 0)
        assert CountingCri.calls == 4
        reader, writer = await second.open_stream(ECHO_PORT)
        writer.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"pong"
        for s in (quiet, first, second):
            s.close()
        cri.close()

    asyncio.run(main())


def test_websocket_spares_of_connections_that_came_together_are_never_left_open(
        crishim, monkeypatch):
    """Connections that come together each ask for the next one's spare: a spare asked
    for replaced the one waiting, which was never closed, so each such session stayed
    open on the server (679 of 2,000 connections ten at a time: as many descriptors held
    on both ends until the idle timeout). A spare waiting now serves, and one replaced
    is closed."""
    import asyncio

    from crishim.client import portforward
    from crishim.client.cri import CriClient

    sessions = []
    real = portforward.open_session

    async def recording(*args, **kwargs):
        session = await real(*args, **kwargs)
        sessions.append(session)
        return session

    monkeypatch.setattr(portforward, "open_session", recording)

    async def one(opener, n: int) -> None:
        session = await opener("websocket", [ECHO_PORT], 0)
        try:
            reader, writer = await session.open_stream(ECHO_PORT)
            writer.write(b"%03d" % n)
            assert await asyncio.wait_for(reader.readexactly(3), 10) == b"%03d" % n
        finally:
            session.close()

    async def main() -> None:
        cri = CriClient(f"unix://{crishim.socket}")
        opener = portforward.cri_opener(cri, SANDBOX)
        for round_ in range(10):
            await asyncio.gather(*(one(opener, 10 * round_ + i) for i in range(10)))
        await asyncio.sleep(1)  # the last connections' spares are asked for
        live = [s for s in sessions if not s.closed.done()]
        assert len(sessions) > 100 and len(live) <= 1, (len(sessions), len(live))
        opener.close()
        await until(lambda: all(s.closed.done() for s in sessions))
        cri.close()

    asyncio.run(main())


def test_local_listeners_take_a_burst_of_connects(crishim):
    """The local listener's accept queue is as deep as the kernel allows (as kubectl's Go
    listeners are): asyncio's default of 100 dropped SYNs in a burst of 200 connects, each
    then waiting a second for the retransmission."""
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    with PortForwardCLI(crishim, f"0:{ECHO_PORT}") as cli:
        local = int(re.search(r":(\d+) ->", cli.forwarding(1)[0]).group(1))
        out = subprocess.run(["ss", "-ltnH", f"sport = :{local}"], capture_output=True,
                             text=True, check=True).stdout.split("\n")
        backlogs = {int(line.split()[2]) for line in out if line.strip()}
        assert backlogs == {min(4096, somaxconn)}, out
        # a burst of connects, all accepted and all forwarded
        socks = [socket.create_connection(("127.0.0.1", local), timeout=30)
                 for _ in range(300)]
        try:
            for i, s in enumerate(socks):
                s.sendall(b"%d\n" % i)
            for i, s in enumerate(socks):
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(16)
                    assert chunk, (i, got)
                    got += chunk
                assert got == b"%d\n" % i
        finally:
            for s in socks:
                s.close()
        assert cli.interrupt() == 0


class _PausingSink(podnet_module._Sink):
    """Takes 1 MiB, then reads nothing for 4 s, then the rest."""

    paused = False

    def data_received(self, data):
        super().data_received(data)
        if not self.paused and self.n >= 1 << 20:
            self.paused = True
            self.t.pause_reading()
            asyncio.get_running_loop().call_later(4.0, self.t.resume_reading)


class _HeldSink(podnet_module._Sink):
    """Takes 1 MiB, then reads nothing until the test lets it (release)."""

    held: list[_HeldSink] = []

    def data_received(self, data):
        super().data_received(data)
        if self.n >= 1 << 20 and self not in self.held:
            self.held.append(self)
            self.t.pause_reading()

    @classmethod
    def release(cls, podnet) -> None:
        podnet.loop.call_soon_threadsafe(lambda: [s.t.resume_reading() for s in cls.held])


@pytest.mark.parametrize("transport", ["h2", "spdy", "spdy-over-websocket"])
def test_an_upload_to_a_pod_that_stops_reading_holds_back_only_itself(crishim, podnet,
                                                                      transport):
    """A pod that stops reading its upload: over HTTP/2, and over SPDY where both ends
    have windows (docs/protocol.md 8.6), only that stream's window is withheld, and the
    session's other connections go on: an echo, and a 48 MiB download that needs the
    client's window updates read. On SPDY crishim serve stopped reading the whole session
    (the echo waited for the pod). Once the pod reads again, the upload completes."""
    port = free_port()
    _HeldSink.held.clear()
    podnet.listen_extra("127.0.0.1", port, _HeldSink)
    up_local, echo_local, down_local = free_port(), free_port(), free_port()
    payload = os.urandom(32 << 20)
    got: dict[str, bytes] = {}
    with PortForwardCLI(crishim, f"{up_local}:{port}", f"{echo_local}:{ECHO_PORT}",
                        f"{down_local}:{SOURCE_PORT}", transport=transport) as cli:
        cli.forwarding(3)
        uploader = threading.Thread(target=lambda: got.__setitem__("up", upload(up_local,
                                                                                payload)))
        uploader.start()
        try:
            _wait_held()
            time.sleep(0.5)  # the upload fills its window meanwhile
            for n in range(3):
                line = b"beside a held upload %d\n" % n
                assert echo(echo_local, line) == line
            size = 48 << 20
            assert hashlib.sha256(download(down_local, size)).digest() == \
                hashlib.sha256(source_bytes(size)).digest()
            assert uploader.is_alive()  # still held by the pod
        finally:
            _HeldSink.release(podnet)
            uploader.join(60)
        assert cli.interrupt() == 0
    assert got["up"] == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_with_the_buffer_budget_spent_a_stalled_pod_holds_back_only_itself(podnet,
                                                                           transport):
    """With buffer_budget spent, a session's window stays 64 KiB: a stream's 4 MiB (SPDY)
    or 64 KiB (HTTP/2) let one pod that stopped reading take all of it, and an echo
    beside it waited. A stream's window is now a quarter of its session's: HTTP/2
    announces it at admission, after the SETTINGS it opened the connection with."""
    server = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                            "--buffer-budget", "1").start()
    port = free_port()
    _HeldSink.held.clear()
    podnet.listen_extra("127.0.0.1", port, _HeldSink)
    up_local, echo_local = free_port(), free_port()
    got: dict[str, bytes] = {}
    payload = os.urandom(32 << 20)  # past what the stalled pod's socket buffers take
    try:
        with PortForwardCLI(server, f"{up_local}:{port}", f"{echo_local}:{ECHO_PORT}",
                            transport=transport) as cli:
            cli.forwarding(2)
            uploader = threading.Thread(target=lambda: got.__setitem__(
                "up", upload(up_local, payload)))
            uploader.start()
            try:
                _wait_held()
                time.sleep(0.5)  # the upload takes the window it is given meanwhile
                assert echo(echo_local, b"beside it\n") == b"beside it\n"
            finally:
                _HeldSink.release(podnet)
                uploader.join(60)
            assert cli.interrupt() == 0
    finally:
        server.stop()
    assert got["up"] == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def _wait_held() -> None:
    deadline = time.monotonic() + 20
    while not _HeldSink.held:
        assert time.monotonic() < deadline, "the pod never held the upload"
        time.sleep(0.05)


class _NeverReads(asyncio.Protocol):
    def connection_made(self, transport):
        transport.pause_reading()


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_a_local_reset_while_its_stream_waits_for_a_window_ends_it(crishim, podnet,
                                                                  transport):
    """A local connection whose stream is out of the server's window (its pod stopped
    reading) is not read, so its reset went unseen: the stream, the pod's connection and
    the window it held stayed for the life of the session. It is now asked of its
    socket."""
    port = free_port()
    podnet.listen_extra("127.0.0.1", port, _NeverReads)
    local = free_port()
    with PortForwardCLI(crishim, f"{local}:{port}", transport=transport) as cli:
        cli.forwarding(1)
        offset = len(crishim.log())
        sock = socket.create_connection(("127.0.0.1", local), timeout=20)
        sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 20
        chunk = b"x" * (1 << 20)
        while time.monotonic() < deadline:  # until the local socket takes no more
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.5)
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    break
        assert sent > 4 << 20, sent  # past the stream's window: the stream waits
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        deadline = time.monotonic() + 15
        while f"port={port} transport" not in crishim.log()[offset:]:
            assert time.monotonic() < deadline, "the server never heard of the reset"
            time.sleep(0.1)
        assert cli.proc.poll() is None
        assert cli.interrupt() == 0


@pytest.mark.parametrize("transport", ["spdy", "spdy-over-websocket", "h2"])
def test_an_upload_to_a_pod_that_pauses_is_no_stalled_server(crishim, podnet, transport):
    """On SPDY a pod that does not read pauses crishim serve's reading of the whole
    session (docs/protocol.md 2.5): the keepalive PING waits behind the upload, unanswered
    for many --timeouts. The server has not taken our bytes: not a stall, and the upload
    goes on (it was reset: 'the server answered no PING in 1s')."""
    port = free_port()
    podnet.listen_extra("127.0.0.1", port, _PausingSink)
    local = free_port()
    payload = os.urandom(64 << 20)
    with PortForwardCLI(crishim, f"{local}:{port}", transport=transport,
                        extra=("--ping-interval", "0.5", "--timeout", "1")) as cli:
        cli.forwarding(1)
        answer = upload(local, payload)
        assert cli.proc.poll() is None, cli.stderr
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    assert not [line for line in cli.stderr if "answered no PING" in line], cli.stderr


@pytest.mark.parametrize("transport", ["h2", "spdy"])
def test_a_server_that_sends_and_never_reads_ends_the_session_not_the_memory(transport,
                                                                            monkeypatch):
    """A stream server that floods PINGs and reads nothing: every PING was answered into
    the session's write buffer (100 MiB of PINGs grew the client by 100-140 MiB). Past
    MAX_UNSENT (lowered here) unsent, the session ends as lost."""
    import crishim.client.transports.base as base
    from crishim.client.transports import open_session
    from crishim.protocols import spdy as spdy_codec

    monkeypatch.setattr(base, "MAX_UNSENT", 1 << 20)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def h2_frame(kind: int, flags: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags, 0, 0, 0, 0]) + payload

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            head = conn.recv(65536)  # the upgrade (SPDY) or the preface (h2); never again
            if transport == "h2":
                conn.sendall(h2_frame(4, 0, b"") + h2_frame(4, 1, b""))
                unit = h2_frame(6, 0, b"12345678") * 4000
            else:
                assert head.startswith(b"POST ") or head.startswith(b"GET ")
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: "
                             b"portforward.k8s.io\r\n\r\n")
                server = spdy_codec.SpdyConnection(spdy_codec.SpdyConfig(client=False))
                for n in range(4000):
                    server.ping(2 * n + 2)
                unit = server.data_to_send()
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.sendall(unit)
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> str:
        session = await open_session(f"http://127.0.0.1:{port}/portforward/x", transport,
                                     [80], timeout=5)
        return await asyncio.wait_for(session.closed, 30)

    try:
        reason = asyncio.run(main())
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert "does not read what this session sends" in reason, reason


GREETING_PORT = 9014  # sends 1 MiB to whoever connects, counting them


class _Greeter(asyncio.Protocol):
    accepted = 0

    def connection_made(self, transport):
        type(self).accepted += 1
        transport.write(b"g" * (1 << 20))


def test_websocket_port_forward_connects_to_nothing_in_the_pod_before_a_local_client(
        crishim, podnet):
    """kubectl connects to the pod when a local client connects, not before. The WebSocket
    channel protocol's start-up check was an upgrade, which crishim serve answers by
    dialling the pod: a pod that sends on connect sent 200 MiB to nobody. Now the start
    asks the runtime for the sandbox only; the first connection still works."""
    podnet.listen_extra("127.0.0.1", GREETING_PORT, _Greeter)
    port = free_port()
    with PortForwardCLI(crishim, f"{port}:{GREETING_PORT}", transport="websocket") as cli:
        assert cli.forwarding(1) == expected_forwarding(port, GREETING_PORT)
        time.sleep(1.0)  # what a dial at start-up would have needed to reach the pod
        assert _Greeter.accepted == 0, crishim.log()[-2000:]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            got = 0
            while got < 1 << 20:
                chunk = s.recv(1 << 16)
                assert chunk, got
                got += len(chunk)
        assert _Greeter.accepted == 1
        assert cli.interrupt() == 0
    assert not any("Traceback" in line for line in cli.stderr), cli.stderr


def test_websocket_port_forward_reports_an_unknown_sandbox_before_listening(crishim):
    """The start-up check left: the runtime's answer for the sandbox, before any
    Forwarding line."""
    r = run_cli("nosuch", "0:8080", "--runtime-endpoint", f"unix://{crishim.socket}",
                "--transport", "websocket")
    assert r.returncode == 1, r
    assert "Forwarding" not in r.stdout, r
    assert r.stderr.startswith("error: ") and "nosuch" in r.stderr, r.stderr


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_a_closed_stdout_stops_the_lines_not_the_forwarding(crishim, transport):
    """`crishim port-forward ... | head -1`: the reader gone, a BrokenPipeError was a
    traceback (the next Forwarding line) or an `Exception in callback` per connection
    (its Handling line). Now nothing more is printed and forwarding goes on."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "crishim", "port-forward", SANDBOX, f"{port}:{HTTP_PORT}",
         "--runtime-endpoint", f"unix://{crishim.socket}", "--transport", transport],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith(b"Forwarding from")
        proc.stdout.close()
        for _ in range(3):
            assert peers.http_get(port).endswith(HTTP_BODY)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert stderr == "", stderr

"""A minimal blocking SPDY/3.1 port-forward client for tests, built on crishim's own codec.

It speaks to any CRI stream server URL (crishim's, containerd's) the way client-go
does: ``POST`` upgrade, then per forwarded connection an error stream (write side
closed at once) and a data stream sharing a ``requestid``.

    with SpdyPortForwardClient(url) as client:
        fwd = client.forward(8080)
        fwd.send(b"hello"); fwd.close_write()
        client.wait(fwd.finished, timeout=10)
        fwd.received, fwd.error_text, fwd.reset_status
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from crishim.protocols.spdy import (
    DataReceived,
    GoAwayReceived,
    SessionTerminated,
    SpdyConfig,
    SpdyConnection,
    StreamReplied,
    StreamReset,
)


class UpgradeRefused(Exception):
    def __init__(self, status: int, head: str, body: bytes) -> None:
        super().__init__(f"upgrade refused: {status} {body[:200]!r}")
        self.status = status
        self.head = head
        self.body = body


@dataclass
class Forward:
    """One forwarded connection: its error and data streams and what arrived on them."""

    client: SpdyPortForwardClient
    port: int
    request_id: int
    error_sid: int
    data_sid: int
    received: bytearray = field(default_factory=bytearray)
    error: bytearray = field(default_factory=bytearray)
    data_fin: bool = False
    error_fin: bool = False
    reset_status: int | None = None
    error_reset_status: int | None = None
    replied: set[int] = field(default_factory=set)
    reply_headers: dict[int, dict[str, str]] = field(default_factory=dict)

    @property
    def error_text(self) -> str:
        return self.error.decode(errors="replace")

    def data_done(self) -> bool:
        return self.data_fin or self.reset_status is not None

    def error_done(self) -> bool:
        return self.error_fin or self.error_reset_status is not None

    def finished(self) -> bool:
        return (self.data_done() and self.error_done()) or self.client.closed

    def send(self, data: bytes) -> None:
        self.client.session.send_data(self.data_sid, data)
        self.client.flush()

    def close_write(self) -> None:
        self.client.session.end_stream(self.data_sid)
        self.client.flush()

    def reset(self) -> None:
        self.client.session.reset_stream(self.data_sid)
        self.client.flush()


class SpdyPortForwardClient:
    def __init__(self, url: str, timeout: float = 10.0,
                 versions: tuple[str, ...] = ("portforward.k8s.io",)) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = u.path + (f"?{u.query}" if u.query else "")
        head = (f"POST {target} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\n"
                "Upgrade: SPDY/3.1\r\n"
                + "".join(f"X-Stream-Protocol-Version: {v}\r\n" for v in versions)
                + "Content-Length: 0\r\n\r\n")
        self.sock.sendall(head.encode())
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        raw_head, _, rest = buf.partition(b"\r\n\r\n")
        self.head = raw_head.decode(errors="replace")
        status = int(self.head.split()[1]) if self.head.startswith("HTTP/") else 0
        if status != 101:
            self.sock.close()
            raise UpgradeRefused(status, self.head, rest)
        self.session = SpdyConnection(SpdyConfig(client=True))
        self.closed = False
        self.goaway = False
        self.terminated_reason = ""
        self._by_sid: dict[int, tuple[Forward, str]] = {}
        self._next_request = 0
        if rest:
            self._feed(rest)

    # --- streams ------------------------------------------------------------------------
    def forward(self, port: int, request_id: int | None = None,
                error_headers: dict[str, str] | None = None,
                data_headers: dict[str, str] | None = None) -> Forward:
        """A stream pair; *_headers are added to one stream's (crishim's `protocol`)."""
        if request_id is None:
            request_id = self._next_request
            self._next_request += 1
        headers = {"streamtype": "error", "port": str(port), "requestid": str(request_id)}
        error_sid = self.session.open_stream(dict(headers, **(error_headers or {})))
        self.session.end_stream(error_sid)  # as client-go: the error stream is read-only
        data_sid = self.session.open_stream(dict(headers, streamtype="data",
                                                 **(data_headers or {})))
        fwd = Forward(self, port, request_id, error_sid, data_sid)
        self._by_sid[error_sid] = (fwd, "error")
        self._by_sid[data_sid] = (fwd, "data")
        self.flush()
        return fwd

    def roundtrip(self, port: int, payload: bytes, timeout: float = 20.0) -> Forward:
        """Send payload, half-close, and wait until both streams end."""
        fwd = self.forward(port)
        if payload:
            fwd.send(payload)
        fwd.close_write()
        self.wait(fwd.finished, timeout)
        return fwd

    # --- I/O ----------------------------------------------------------------------------
    def flush(self) -> None:
        out = self.session.data_to_send()
        if out and not self.closed:
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed = True

    def _feed(self, data: bytes) -> None:
        for ev in self.session.receive_data(data):
            if isinstance(ev, DataReceived):
                entry = self._by_sid.get(ev.stream_id)
                if entry is None:
                    continue
                fwd, kind = entry
                (fwd.received if kind == "data" else fwd.error).extend(ev.data)
                if ev.fin:
                    if kind == "data":
                        fwd.data_fin = True
                    else:
                        fwd.error_fin = True
            elif isinstance(ev, StreamReplied):
                entry = self._by_sid.get(ev.stream_id)
                if entry is not None:
                    entry[0].replied.add(ev.stream_id)
                    entry[0].reply_headers[ev.stream_id] = dict(ev.headers)
                    if ev.fin:
                        if entry[1] == "data":
                            entry[0].data_fin = True
                        else:
                            entry[0].error_fin = True
            elif isinstance(ev, StreamReset):
                entry = self._by_sid.get(ev.stream_id)
                if entry is not None:
                    if entry[1] == "data":
                        entry[0].reset_status = ev.status
                    else:
                        entry[0].error_reset_status = ev.status
            elif isinstance(ev, GoAwayReceived):
                self.goaway = True
            elif isinstance(ev, SessionTerminated):
                self.terminated_reason = ev.reason
        self.flush()  # PING echoes, WINDOW_UPDATEs

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Read and handle frames until condition() holds, the connection closes or time
        runs out; returns condition()."""
        deadline = time.monotonic() + timeout
        while not condition() and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            self._feed(data)
        return condition()

    def close(self) -> None:
        if not self.closed:
            self.session.goaway()
            self.flush()  # a peer that is already gone only sets self.closed
        self.closed = True
        self.sock.close()

    def __enter__(self) -> SpdyPortForwardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

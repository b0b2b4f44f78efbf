"""A raw client of the WebSocket channel protocol (v4.channel.k8s.io) for tests, built from
crishim.protocols.websocket's client side over a blocking socket."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from crishim.protocols import websocket as ws


class RawChannelClient:
    """A channel-protocol client built from crishim.protocols.websocket's client side."""

    def __init__(self, url: str, ports: list[int], subprotocols: list[str], query: str = "",
                 base64_mode: bool = False,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        target = u.path + (f"?{query}" if query else "")
        request, accept = ws.client_handshake_request(u.netloc, target, subprotocols,
                                                      extra_headers=headers)
        self.sock.sendall(request)
        buf = b""
        response = None
        while response is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed during the handshake: {buf!r}")
            buf += data
            response = ws.parse_handshake_response(buf, accept, subprotocols)
        self.response = response
        self.events: list = []
        self.closed: ws.Closed | None = None
        if response.status == 101:
            self.codec = ws.ChannelCodec(ports, base64_mode, client=True)
            if response.leftover:
                self._feed(response.leftover)

    def body(self) -> bytes:
        data = self.response.leftover
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def _feed(self, data: bytes) -> None:
        for event in self.codec.receive_data(data):
            if isinstance(event, ws.Closed):
                self.closed = event
            else:
                self.events.append(event)
        out = self.codec.data_to_send()
        if out:
            try:
                self.sock.sendall(out)
            except OSError:
                pass

    def pump(self, until, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not until() and self.closed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"events so far: {self.events[-5:]}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            self._feed(data)

    def send(self, index: int, data: bytes) -> None:
        self.codec.send_data(index, data)
        self.sock.sendall(self.codec.data_to_send())

    def data(self, index: int) -> bytes:
        return b"".join(e.data for e in self.events
                        if isinstance(e, ws.ChannelData) and e.index == index)

    def errors(self, index: int) -> str:
        return "".join(e.text for e in self.events
                       if isinstance(e, ws.ChannelError) and e.index == index)

    def prefaces(self) -> list[tuple[int, int, bool]]:
        return [(e.index, e.port, e.error_channel) for e in self.events
                if isinstance(e, ws.PortPreface)]

    def close(self) -> None:
        self.sock.close()

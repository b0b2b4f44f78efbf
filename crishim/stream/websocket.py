"""Sans-IO WebSocket pieces for port-forward (PROTOCOL.md sections 4 and 5).

Nothing here touches a socket: every object takes received bytes and returns
events, and queues outgoing bytes for ``data_to_send()``.

* ``accept_handshake`` / ``client_handshake_request`` / ``parse_handshake_response``:
  the RFC 6455 opening handshake, server and client side.
* ``WebSocketFraming``: a thin wrapper over ``wsproto.Connection`` after the
  handshake that reassembles whole messages, bounds their size, answers pings and
  turns every kind of peer misbehaviour into a queued close frame plus a
  ``Closed`` event (never an exception).
* ``ChannelCodec``: the Kubernetes channel protocol (``v4.channel.k8s.io``,
  ``v4.base64.channel.k8s.io`` or no subprotocol) on top of the framing.
* ``ByteStreamTunnel``: ``SPDY/3.1+portforward.k8s.io``, a WebSocket carrying one
  raw byte stream in binary messages whose boundaries mean nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass

from wsproto.connection import CLIENT, SERVER, Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

__all__ = [
    "CHANNEL_BASE64",
    "CHANNEL_BINARY",
    "MAX_MESSAGE_PAYLOAD",
    "SPDY_TUNNEL",
    "ByteStreamTunnel",
    "ChannelCodec",
    "ChannelData",
    "ChannelError",
    "Closed",
    "HandshakeError",
    "HandshakeResponse",
    "Message",
    "PingReceived",
    "PortPreface",
    "ProtocolViolation",
    "TunnelData",
    "WebSocketFraming",
    "accept_handshake",
    "client_handshake_request",
    "is_websocket_upgrade",
    "parse_handshake_response",
    "websocket_accept_value",
]

CHANNEL_BINARY = "v4.channel.k8s.io"
CHANNEL_BASE64 = "v4.base64.channel.k8s.io"
SPDY_TUNNEL = "SPDY/3.1+portforward.k8s.io"

# Outgoing payloads are cut into messages of at most this many bytes (channel byte and
# base64 inflation included). Measured in memory, server to client: 16 KiB 500 MB/s,
# 64 KiB 640, 256 KiB 800, 1 MiB 800; so 256 KiB is where per-message cost stops
# mattering, while one busy port still cannot hold the socket for long and every known
# peer accepts it (x/net/websocket: 32 MiB, gorilla and python websocket-client: unbounded).
MAX_MESSAGE_PAYLOAD = 256 * 1024

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_RESPONSE_HEAD = 64 * 1024

# RFC 6455 section 7.4.1 close codes used here.
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_MESSAGE_TOO_BIG = 1009


# --------------------------------------------------------------------------- handshake


class HandshakeError(Exception):
    """The opening handshake cannot succeed.

    Server side: ``status`` is 400 (malformed upgrade) or 403 (no acceptable
    subprotocol) and ``to_response()`` renders the HTTP rejection. Client side:
    ``status`` is the status the server answered with (or 101 when a 101 response
    was itself unacceptable).
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def to_response(self) -> bytes:
        """A complete ``HTTP/1.1 4xx`` response with the reason as a text body."""
        phrase = {400: "Bad Request", 403: "Forbidden"}.get(self.status, "Error")
        body = (self.reason + "\n").encode("utf-8", "replace")
        lines = [f"HTTP/1.1 {self.status} {phrase}".encode("ascii")]
        lines += [name + b": " + value for name, value in self.headers]
        lines += [
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: " + str(len(body)).encode("ascii"),
            b"Connection: close",
        ]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """Comma-separated tokens of every header called ``name``, in order, stripped."""
    tokens = []
    for value in _header_values(headers, name):
        for part in value.split(b","):
            part = part.strip()
            if part:
                tokens.append(part.decode("latin-1"))
    return tokens


def websocket_accept_value(key: str | bytes) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key.strip() + _ACCEPT_GUID).digest()).decode("ascii")


def is_websocket_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """True if the request asks to upgrade to WebSocket (``Upgrade`` + ``Connection``)."""
    upgrade = {t.lower() for t in _header_tokens(headers, b"upgrade")}
    connection = {t.lower() for t in _header_tokens(headers, b"connection")}
    return "websocket" in upgrade and "upgrade" in connection


def accept_handshake(
    headers: list[tuple[bytes, bytes]], supported: list[str]
) -> tuple[bytes, str | None]:
    """Validate a client's upgrade request and build the ``101`` response.

    Returns the raw response bytes and the chosen subprotocol: the first one the
    client offered that is in ``supported``, or None when the client offered none
    (the caller decides what that means; for the channel protocol it is binary mode).
    Raises HandshakeError (400 malformed, 403 no acceptable subprotocol).
    """
    if not is_websocket_upgrade(headers):
        raise HandshakeError(400, "not a WebSocket upgrade: need 'Upgrade: websocket' "
                                  "and 'Connection: Upgrade'")
    versions = _header_tokens(headers, b"sec-websocket-version")
    if versions != ["13"]:
        raise HandshakeError(
            400,
            f"unsupported Sec-WebSocket-Version {versions or 'missing'}; only 13 is supported",
            [(b"Sec-WebSocket-Version", b"13")],
        )
    keys = _header_values(headers, b"sec-websocket-key")
    if len(keys) != 1:
        raise HandshakeError(400, "need exactly one Sec-WebSocket-Key header")
    key = keys[0].strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not a base64-encoded 16-byte nonce")

    offered = _header_tokens(headers, b"sec-websocket-protocol")
    chosen: str | None = None
    if offered:
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            raise HandshakeError(
                403,
                f"none of the requested subprotocols {offered} is supported; "
                f"supported: {supported}",
            )

    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + websocket_accept_value(key).encode("ascii"),
    ]
    if chosen is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + chosen.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n", chosen


def client_handshake_request(
    host: str,
    target: str,
    subprotocols: list[str],
    key: str | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, str]:
    """Raw ``GET`` upgrade request bytes and the ``Sec-WebSocket-Accept`` to expect."""
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [
        f"GET {target} HTTP/1.1".encode("ascii"),
        b"Host: " + host.encode("idna"),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key.encode("ascii"),
        b"Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(subprotocols).encode("latin-1"))
    lines += [name + b": " + value for name, value in extra_headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n", websocket_accept_value(key)


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    subprotocol: str | None
    leftover: bytes  # bytes after the response head: WebSocket frames (101) or body


def parse_handshake_response(
    data: bytes,
    expected_accept: str | None = None,
    offered: list[str] | None = None,
) -> HandshakeResponse | None:
    """Parse the server's answer to ``client_handshake_request``.

    Returns None while the response head is incomplete. For a ``101`` response,
    checks the ``Sec-WebSocket-Accept`` (if ``expected_accept`` is given), the
    upgrade headers and that the chosen subprotocol was ``offered``; a failed check
    raises HandshakeError. Non-101 answers are returned as they are for the caller
    to report.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > _MAX_RESPONSE_HEAD:
            raise HandshakeError(0, "handshake response head is larger than 64 KiB")
        return None
    head, leftover = data[:end], bytes(data[end + 4:])
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HandshakeError(0, f"malformed status line {status_line[:100]!r}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HandshakeError(status, f"malformed header line {line[:100]!r}")
        headers.append((name.strip().lower(), value.strip()))
    protocols = _header_tokens(headers, b"sec-websocket-protocol")
    subprotocol = protocols[0] if protocols else None
    if status != 101:
        return HandshakeResponse(status, reason, headers, subprotocol, leftover)
    if not is_websocket_upgrade(headers):
        raise HandshakeError(101, "101 response without 'Upgrade: websocket'")
    accepts = _header_values(headers, b"sec-websocket-accept")
    if expected_accept is not None and accepts != [expected_accept.encode("ascii")]:
        raise HandshakeError(101, f"Sec-WebSocket-Accept {accepts} does not match the key sent")
    if len(protocols) > 1 or (subprotocol is not None and subprotocol not in (offered or [])):
        raise HandshakeError(101, f"server chose subprotocol {protocols} that was not offered")
    return HandshakeResponse(status, reason, headers, subprotocol, leftover)


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class Message:
    """One whole WebSocket message. Text messages arrive UTF-8 encoded."""

    data: bytes
    binary: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """The WebSocket is finished: the close handshake completed, the peer broke the
    protocol (``code`` is what we sent), or the transport ended (1006). Flush
    ``data_to_send()`` and close the transport."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the pong is already queued."""

    payload: bytes


FramingEvent = Message | Closed | PingReceived


class WebSocketFraming:
    """Message framing over an established WebSocket (after the handshake).

    ``receive_data(b"")`` means the transport reached EOF. Outgoing messages
    offered after a close frame was sent are discarded: the peer can no longer
    accept them.
    """

    def __init__(self, client: bool, max_message_size: int = 16 * 1024 * 1024) -> None:
        self.client = client
        self.max_message_size = max_message_size
        self._conn = Connection(CLIENT if client else SERVER)
        self._out: list[bytes | bytearray] = []
        self._parts: list[bytes | str] = []
        self._size = 0
        self.closed = False

    @property
    def closing(self) -> bool:
        """A close frame has been sent or received; no more messages go out."""
        return self.closed or self._conn.state is not ConnectionState.OPEN

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[FramingEvent]:
        if self.closed:
            return []
        if not data:
            self._conn.receive_data(None)
            self.closed = True
            return [Closed(CLOSE_ABNORMAL, "transport closed without a close frame")]
        conn = self._conn
        conn.receive_data(data)
        events: list[FramingEvent] = []
        for event in conn.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                message = self._reassemble(event)
                if message is not None:
                    events.append(message)
                elif self.closed:
                    events.append(Closed(CLOSE_MESSAGE_TOO_BIG, "message too big"))
                    break
            elif isinstance(event, Ping):
                if conn.state is ConnectionState.OPEN:
                    self._out.append(conn.send(event.response()))
                events.append(PingReceived(bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                events.append(self._on_close(event))
                break
            # Pongs need no action: we never ping unprompted through this object.
        return events

    def _reassemble(self, event: BytesMessage | TextMessage) -> Message | None:
        chunk = event.data
        self._size += len(chunk)
        if self._size > self.max_message_size:
            self._parts.clear()
            self._fail(CLOSE_MESSAGE_TOO_BIG, f"message larger than {self.max_message_size} bytes")
            return None
        if not event.message_finished:
            self._parts.append(chunk)
            return None
        if self._parts:
            self._parts.append(chunk)
            chunk = chunk[:0].join(self._parts)  # type: ignore[arg-type]
            self._parts.clear()
        self._size = 0
        if isinstance(chunk, str):
            return Message(chunk.encode("utf-8"), False)
        return Message(chunk if type(chunk) is bytes else bytes(chunk), True)

    def _on_close(self, event: CloseConnection) -> Closed:
        state = self._conn.state
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer started the close handshake: echo its code.
            self._out.append(self._conn.send(event.response()))
        elif state is ConnectionState.OPEN:
            # wsproto reports bytes it cannot parse as a close event without a state
            # change: fail the connection with the code it suggests.
            self._out.append(self._conn.send(CloseConnection(event.code, event.reason)))
        # CLOSED: the peer answered our close. LOCAL_CLOSING: garbage after our close.
        self.closed = True
        return Closed(int(event.code), event.reason or "")

    def _fail(self, code: int, reason: str) -> None:
        if self._conn.state is ConnectionState.OPEN:
            self._out.append(self._conn.send(CloseConnection(code, reason)))
        self.closed = True

    def send_message(self, data: bytes | bytearray | memoryview | str, binary: bool = True) -> None:
        """Queue one message (not fragmented). ``binary=False`` sends a text message;
        bytes given for a text message must be UTF-8."""
        if self.closing:
            return
        if not binary and not isinstance(data, str):
            data = bytes(data).decode("utf-8")
        elif binary and isinstance(data, str):
            data = data.encode("utf-8")
        event = BytesMessage(data) if binary else TextMessage(data)  # type: ignore[arg-type]
        self._out.append(self._conn.send(event))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the close handshake (no-op if already closing)."""
        if self._conn.state is ConnectionState.OPEN and not self.closed:
            self._out.append(self._conn.send(CloseConnection(code, reason)))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return bytes(data) if type(data) is not bytes else data


# --------------------------------------------------------------------------- channels


@dataclass(frozen=True, slots=True)
class ChannelData:
    """Bytes on port ``index``'s data channel (channel ``2 * index``)."""

    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ChannelError:
    """Error text the server wrote on port ``index``'s error channel (client side)."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class PortPreface:
    """The server's first message on a channel: the port it belongs to (client side)."""

    index: int
    port: int
    error_channel: bool


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the channel protocol; a close frame with ``code`` is queued and a
    ``Closed`` event follows."""

    reason: str
    code: int = CLOSE_PROTOCOL_ERROR


ChannelEvent = ChannelData | ChannelError | PortPreface | ProtocolViolation | Closed | PingReceived

_B64_DIGITS = b"0123456789"


class ChannelCodec:
    """The Kubernetes WebSocket channel protocol for port-forward (PROTOCOL.md section 4).

    Port ``i`` owns channel ``2i`` (data, both ways) and ``2i+1`` (errors, server to
    client). Each message starts with its channel: one byte in binary mode, the
    ASCII character ``'0' + channel`` in base64 mode, where the rest is standard
    base64 and messages are text. The server's first message on every channel is
    the port, 2 bytes little-endian.
    """

    def __init__(
        self,
        ports: list[int],
        base64: bool,
        client: bool = False,
        max_message_size: int = 16 * 1024 * 1024,
        max_send_payload: int = MAX_MESSAGE_PAYLOAD,
    ) -> None:
        # Base64 mode spells the channel as one ASCII character from '0'.
        max_ports = 40 if base64 else 127
        if not 0 < len(ports) <= max_ports:
            raise ValueError(f"need 1 to {max_ports} ports on one WebSocket, got {len(ports)}")
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is outside 1-65535")
        self.ports = list(ports)
        self.base64 = base64
        self.client = client
        self.framing = WebSocketFraming(client, max_message_size)
        self._channels = 2 * len(ports)
        self._awaiting_preface = [client] * self._channels
        if base64:
            # Raw bytes per message such that '0'+ch plus the encoding fits the limit.
            self._send_chunk = max(3, (max_send_payload - 1) // 4 * 3)
        else:
            self._send_chunk = max(1, max_send_payload - 1)

    @property
    def closed(self) -> bool:
        return self.framing.closed

    def start(self) -> None:
        """Server: queue the port preface on every data and error channel."""
        if self.client:
            raise ValueError("only the server sends port prefaces")
        for index, port in enumerate(self.ports):
            preface = struct.pack("<H", port)
            self._send(2 * index, preface)
            self._send(2 * index + 1, preface)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ChannelEvent]:
        events: list[ChannelEvent] = []
        for event in self.framing.receive_data(data):
            if isinstance(event, Message):
                decoded = self._decode(event)
                if decoded is None:
                    continue
                events.append(decoded)
                if isinstance(decoded, ProtocolViolation):
                    events.append(Closed(decoded.code, decoded.reason))
                    break
            else:
                events.append(event)
        return events

    def _violation(self, reason: str, code: int = CLOSE_PROTOCOL_ERROR) -> ProtocolViolation:
        self.framing._fail(code, reason)
        return ProtocolViolation(reason, code)

    def _decode(self, message: Message) -> ChannelEvent | None:
        payload = message.data
        if not payload:
            return self._violation("message without a channel number")
        channel = payload[0]
        if self.base64:
            channel -= 0x30
            if not 0 <= channel < self._channels:
                return self._violation(f"message for unknown channel {chr(payload[0])!r}")
            try:
                data = (binascii.a2b_base64(payload[1:], strict_mode=True)
                        if len(payload) > 1 else b"")
            except binascii.Error as exc:
                return self._violation(
                    f"invalid base64 on channel {channel}: {exc}", CLOSE_INVALID_PAYLOAD
                )
        else:
            if channel >= self._channels:
                return self._violation(f"message for unknown channel {channel}")
            data = payload[1:]
        index, is_error = divmod(channel, 2)
        if not self.client:
            if is_error:
                return self._violation(f"client wrote to error channel {channel}")
            return ChannelData(index, data) if data else None
        if self._awaiting_preface[channel]:
            self._awaiting_preface[channel] = False
            if len(data) != 2:
                return self._violation(
                    f"port preface on channel {channel} is {len(data)} bytes, expected 2"
                )
            port = data[0] | data[1] << 8
            if port != self.ports[index]:
                return self._violation(
                    f"channel {channel} announced port {port}, expected {self.ports[index]}"
                )
            return PortPreface(index, port, bool(is_error))
        if is_error:
            return ChannelError(index, data.decode("utf-8", "replace"))
        return ChannelData(index, data) if data else None

    def _send(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        framing = self.framing
        if self.base64:
            prefix = _B64_DIGITS[channel:channel + 1] if channel < 10 else bytes([0x30 + channel])
            framing.send_message(
                (prefix + binascii.b2a_base64(data, newline=False)).decode("ascii"), binary=False
            )
        else:
            framing.send_message(b"%c%b" % (channel, data), binary=True)

    def send_data(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for port ``index``'s data channel, cut into bounded messages."""
        self._check_index(index)
        chunk = self._send_chunk
        if len(data) <= chunk:
            if data:
                self._send(2 * index, data)
            return
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            self._send(2 * index, view[start:start + chunk])

    def send_error(self, index: int, text: str) -> None:
        """Server: queue error text for port ``index``'s error channel."""
        if self.client:
            raise ValueError("only the server writes to error channels")
        self._check_index(index)
        view = memoryview(text.encode("utf-8"))
        chunk = self._send_chunk
        for start in range(0, len(view), chunk):
            self._send(2 * index + 1, view[start:start + chunk])

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.ports):
            raise IndexError(f"port index {index} out of range for {len(self.ports)} ports")

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        self.framing.close(code, reason)

    def data_to_send(self) -> bytes:
        return self.framing.data_to_send()


# --------------------------------------------------------------------------- SPDY tunnel


@dataclass(frozen=True, slots=True)
class TunnelData:
    """The next piece of the tunnelled byte stream."""

    data: bytes


TunnelEvent = TunnelData | ProtocolViolation | Closed | PingReceived


class ByteStreamTunnel:
    """A raw byte stream carried in binary WebSocket messages (PROTOCOL.md section 5).

    Message boundaries carry no meaning; a text message is a protocol violation
    (client-go's tunnelling connection rejects them too).
    """

    def __init__(
        self,
        client: bool = False,
        max_message_size: int = 16 * 1024 * 1024,
        max_send_payload: int = MAX_MESSAGE_PAYLOAD,
    ) -> None:
        self.framing = WebSocketFraming(client, max_message_size)
        self._send_chunk = max(1, max_send_payload)

    @property
    def closed(self) -> bool:
        return self.framing.closed

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[TunnelEvent]:
        events: list[TunnelEvent] = []
        for event in self.framing.receive_data(data):
            if isinstance(event, Message):
                if not event.binary:
                    self.framing._fail(CLOSE_UNSUPPORTED_DATA, "text message in a byte tunnel")
                    events.append(ProtocolViolation("text message in a byte tunnel",
                                                    CLOSE_UNSUPPORTED_DATA))
                    events.append(Closed(CLOSE_UNSUPPORTED_DATA, "text message in a byte tunnel"))
                    break
                if event.data:
                    events.append(TunnelData(event.data))
            else:
                events.append(event)
        return events

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue stream bytes, cut into bounded binary messages."""
        size = len(data)
        chunk = self._send_chunk
        if size <= chunk:
            if size:
                self.framing.send_message(data)
            return
        view = memoryview(data)
        for start in range(0, size, chunk):
            self.framing.send_message(view[start:start + chunk])

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        self.framing.close(code, reason)

    def data_to_send(self) -> bytes:
        return self.framing.data_to_send()


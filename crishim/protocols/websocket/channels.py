"""What rides on the framing: the Kubernetes channel protocol (``v4.channel.k8s.io``,
``v4.base64.channel.k8s.io`` or no subprotocol, docs/protocol.md §3.3) and the
``SPDY/3.1+portforward.k8s.io`` byte-stream tunnel (section 5)."""

from __future__ import annotations

import binascii
import struct
from collections.abc import Iterable

from ..constants import PORTFORWARD_PROTOCOL
from .events import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    ChannelData,
    ChannelError,
    ChannelEvent,
    Closed,
    FrameIgnored,
    Message,
    PingReceived,
    PortPreface,
    ProtocolViolation,
    TunnelData,
    TunnelEvent,
)
from .framing import OP_BINARY, OP_TEXT, WebSocketFraming

CHANNEL_BINARY = "v4.channel.k8s.io"
CHANNEL_BASE64 = "v4.base64.channel.k8s.io"
SPDY_TUNNEL = "SPDY/3.1+" + PORTFORWARD_PROTOCOL

# Outgoing payloads are cut into messages of at most this many bytes (channel byte and
# base64 inflation included). Measured in memory, server to client: 16 KiB 500 MB/s,
# 64 KiB 640, 256 KiB 800, 1 MiB 800; so 256 KiB is where per-message cost stops
# mattering, while one busy port still cannot hold the socket for long and every known
# peer accepts it (x/net/websocket: 32 MiB, gorilla and python websocket-client: unbounded).
MAX_MESSAGE_PAYLOAD = 256 * 1024



_CHANNEL_BYTES = [bytes((channel,)) for channel in range(256)]


def max_channel_ports(base64: bool) -> int:
    """How many ports one WebSocket carries: each takes two channels, and a channel is one
    byte (binary mode) or one ASCII character from '0' (base64 mode)."""
    return 40 if base64 else 127


class ChannelCodec:
    """The Kubernetes WebSocket channel protocol for port-forward (docs/protocol.md §3.3).

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
        max_ports = max_channel_ports(base64)
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
            self._send_message(2 * index, preface)
            self._send_message(2 * index + 1, preface)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ChannelEvent]:
        events: list[ChannelEvent] = []
        for event in self.framing.receive_data(data):
            match event:
                case Message():
                    decoded = self._decode(event)
                    if decoded is None:
                        continue
                    events.append(decoded)
                    if isinstance(decoded, ProtocolViolation):
                        events.append(Closed(decoded.code, decoded.reason))
                        break
                case Closed() | PingReceived() | FrameIgnored() | ProtocolViolation():
                    events.append(event)
                case TunnelData():
                    pass  # only a stream-mode framing hands these out
        return events

    def _violation(self, reason: str, code: int = CLOSE_PROTOCOL_ERROR) -> ProtocolViolation:
        self.framing.fail(code, reason)
        return ProtocolViolation(reason, code)

    def _decode(self, message: Message) -> ChannelEvent | None:
        payload = message.data
        if not payload:
            return self._violation("message without a channel number")
        channel = payload[0]
        data: bytes | memoryview
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
            # A view, not a copy: the payload is an immutable bytes object.
            data = memoryview(payload)[1:] if len(payload) > 4096 else payload[1:]
        index, is_error = divmod(channel, 2)
        if not self.client:
            if is_error:
                return self._violation(f"client wrote to error channel {channel}")
            # an empty message is an event too: it dials a session opened ahead
            return ChannelData(index, data)
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
            return ChannelError(index, bytes(data).decode("utf-8", "replace"))
        return ChannelData(index, data) if data else None

    def _send(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` on ``channel``, cut into messages of at most ``_send_chunk``."""
        chunk = self._send_chunk
        if len(data) <= chunk:
            if data:
                self._send_message(channel, data)
            return
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            self._send_message(channel, view[start:start + chunk])

    def _send_message(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        framing = self.framing
        if framing.closing:
            return
        if self.base64:
            framing._queue_frame(OP_TEXT, binascii.b2a_base64(data, newline=False),
                                 _CHANNEL_BYTES[0x30 + channel])
        else:
            framing._queue_frame(OP_BINARY, data, _CHANNEL_BYTES[channel])

    def send_data(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for port ``index``'s data channel, cut into bounded messages."""
        self._check_index(index)
        self._send(2 * index, data)

    def send_empty(self, index: int) -> None:
        """Client: an empty message on port ``index``'s data channel (the channel byte
        alone): what has a session opened ahead (Crishim-Dial: on-data) dial its ports
        when there are no bytes to send yet."""
        if not self.client:
            raise ValueError("only a client opens sessions ahead")
        self._check_index(index)
        self._send_message(2 * index, b"")

    def send_error(self, index: int, text: str) -> None:
        """Server: queue error text for port ``index``'s error channel."""
        if self.client:
            raise ValueError("only the server writes to error channels")
        self._check_index(index)
        self._send(2 * index + 1, text.encode("utf-8"))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.ports):
            raise IndexError(f"port index {index} out of range for {len(self.ports)} ports")

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        self.framing.close(code, reason)

    def data_to_send(self) -> bytes:
        return self.framing.data_to_send()

    def take_output(self) -> list[bytes | bytearray | memoryview]:
        """Queued frames as a list of buffers for ``transport.writelines``."""
        return self.framing.take_output()



# --------------------------------------------------------------------------- SPDY tunnel




class ByteStreamTunnel:
    """A raw byte stream carried in binary WebSocket messages (docs/protocol.md §4).

    Message boundaries carry no meaning, so received payload is handed on as it arrives
    (``TunnelData``, not reassembled into messages); a text message is a protocol
    violation (client-go's tunnelling connection rejects them too).
    """

    def __init__(
        self,
        client: bool = False,
        max_message_size: int = 16 * 1024 * 1024,
        max_send_payload: int = MAX_MESSAGE_PAYLOAD,
    ) -> None:
        self.framing = WebSocketFraming(client, max_message_size, stream=True)
        self._send_chunk = max(1, max_send_payload)

    @property
    def closed(self) -> bool:
        return self.framing.closed

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[TunnelEvent]:
        return self.framing.receive_data(data)  # type: ignore[return-value]

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue stream bytes, cut into bounded binary messages."""
        if data:
            self.send_buffers([data])

    def send_buffers(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue stream bytes given as several buffers (``SpdyConnection.take_output()``):
        they share binary messages of at most ``max_send_payload`` bytes, uncopied."""
        framing = self.framing
        if framing.closing:
            return
        limit = self._send_chunk
        batch: list[bytes | bytearray | memoryview] = []
        size = 0
        for buf in buffers:
            n = len(buf)
            if size + n <= limit:
                if n:
                    batch.append(buf)
                    size += n
                continue
            view = memoryview(buf)
            offset = 0
            while offset < n:
                take = min(n - offset, limit - size)
                batch.append(view[offset:offset + take])
                size += take
                offset += take
                if size == limit:
                    framing._queue_buffers(OP_BINARY, batch, size)
                    batch = []
                    size = 0
        if batch:
            framing._queue_buffers(OP_BINARY, batch, size)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        self.framing.close(code, reason)

    def data_to_send(self) -> bytes:
        return self.framing.data_to_send()

    def take_output(self) -> list[bytes | bytearray | memoryview]:
        """Queued frames as a list of buffers for ``transport.writelines``."""
        return self.framing.take_output()

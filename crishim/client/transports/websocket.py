"""The WebSocket transports: the Kubernetes channel protocol (v4.channel.k8s.io, ports
fixed at connect time) and the SPDY-over-WebSocket tunnel (SPDY/3.1+portforward.k8s.io,
a SpdyClientSession whose bytes travel in binary messages)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from crishim.client.transports.base import (
    Buffer,
    ClientSession,
    ForwardStream,
    SessionClosed,
    Target,
    UdpNotSupported,
    UpgradeAnswer,
    UpgradeProtocol,
    UpgradeRefused,
    read_upgrade_answer,
)
from crishim.client.transports.spdy import SpdyClientSession
from crishim.protocols import websocket as ws
from crishim.protocols.constants import (
    DIAL_ON_DATA,
    HEADER_CRISHIM_DIAL,
    PORTFORWARD_PROTOCOL,
)
from crishim.protocols.negotiation import TCP, version_of_subprotocol, websocket_subprotocol

MAX_EARLY_BYTES = 1024 * 1024  # kept for WebSocket channel ports not opened yet


class ChannelClientSession(ClientSession):
    """The Kubernetes WebSocket channel protocol: ports fixed at connect time, one
    forwarded connection per port for the life of the WebSocket. The error channel's text
    ends only that port; the client's close frame is the half-close of every port."""

    transport_name = "websocket"
    error_text_is_fatal = False

    def __init__(self, ports: list[int]) -> None:
        super().__init__()
        self.codec = ws.ChannelCodec(list(ports), base64=False, client=True)
        self._used: set[int] = set()
        # What arrived for a port before the caller opened it: a refused port's error text
        # and the close can come in the same read as the 101. Replayed when it is opened.
        self._early: dict[int, list[ws.ChannelEvent]] = {}
        self._early_size = 0
        self._close_event: ws.Closed | None = None
        self._sent = False

    def _free_index(self, port: int) -> int | None:
        for index, p in enumerate(self.codec.ports):
            if p == port and index not in self._used:
                return index
        return None

    def _new_stream(self, port: int, ip_protocol: str = TCP, on_data: bool = False
                    ) -> ForwardStream:
        index = self._free_index(port)
        if index is None:
            raise SessionClosed(f"port {port} is not (or no longer) available on this "
                                f"WebSocket: its ports are {self.codec.ports}, one connection "
                                "each")
        self._used.add(index)
        stream = ForwardStream(self, port, index)
        # opened ahead: its first bytes (or an empty message, _send_go) dial the ports
        stream.opened_ahead = stream.ahead = self.dial == DIAL_ON_DATA and not self._sent
        self.streams[index] = stream
        return stream

    def open_connection_nowait(self, port: int,
                               protocol_factory: Callable[[], asyncio.Protocol],
                               ip_protocol: str = TCP) -> tuple[ForwardStream, asyncio.Protocol]:
        if ip_protocol != TCP:  # a channel has no stream headers to ask for UDP with
            raise UdpNotSupported(None, "websocket")
        index = self._free_index(port)
        early = self._early.pop(index, None) if index is not None else None
        if early is None:
            return super().open_connection_nowait(port, protocol_factory)
        # the port's fate arrived before it was opened: open it, then hand it over
        stream = self._new_stream(port)
        protocol = protocol_factory()
        stream.protocol = protocol
        protocol.connection_made(stream)
        for event in early:
            self._deliver(stream, event)
        if self._close_event is not None:
            self._deliver_close(stream, self._close_event)
        return stream, protocol

    def _send(self, stream: ForwardStream, data: Buffer, lent: bool = False) -> None:
        self._sent = True
        self.codec.send_data(stream.key, data)
        self._flush()

    def _send_go(self, stream: ForwardStream) -> None:
        if not self._sent:
            self._sent = True
            self.codec.send_empty(stream.key)
            self._flush()

    def _send_eof(self, stream: ForwardStream) -> None:
        # No per-port half-close: the close frame half-closes every port at once.
        if all(s._eof_sent or s._finished for s in self.streams.values()):
            self._goodbye()

    def _reset_stream(self, stream: ForwardStream) -> None:
        # No per-port reset either: the last open port's reset ends the WebSocket.
        if all(s is stream or s._finished for s in self.streams.values()):
            self._goodbye()
            if self.transport is not None:
                self.transport.close()

    def _goodbye(self) -> None:
        self.codec.close(ws.CLOSE_NORMAL)
        self._flush()

    def _flush(self, lent: bool = False) -> None:  # never lent: lent_fd stays -1
        self._write_raw(self.codec.take_output())

    @staticmethod
    def _deliver(stream: ForwardStream, event: ws.Event) -> None:
        match event:
            case ws.ChannelData():
                stream._data(event.data)
            case ws.PortPreface():
                if not event.error_channel:
                    stream._accepted()
            case ws.ChannelError():
                stream._error_data(event.text)
                stream._error_end()

    @staticmethod
    def _deliver_close(stream: ForwardStream, event: ws.Closed) -> None:
        if event.code == ws.CLOSE_NORMAL:
            stream._remote_eof()
        else:
            stream._remote_reset(f"WebSocket closed ({event.code} {event.reason})")

    def receive(self, data: bytes | memoryview, lent: bool = False) -> None:
        for event in self.codec.receive_data(data):
            match event:
                case ws.Closed():
                    self._close_event = event
                    self._flush()
                    for each in list(self.streams.values()):
                        self._deliver_close(each, event)
                    self._lost(f"the server closed the WebSocket ({event.code})")
                    if self.transport is not None:
                        self.transport.close()
                    return
                case (ws.ChannelData(index=index) | ws.PortPreface(index=index)
                      | ws.ChannelError(index=index)):
                    stream = self.streams.get(index)
                    if stream is not None:
                        self._deliver(stream, event)
                    elif index not in self._used and self._early_size < MAX_EARLY_BYTES:
                        self._early.setdefault(index, []).append(event)
                        if isinstance(event, ws.ChannelData):
                            self._early_size += len(event.data)
        self._flush()

    def transport_eof(self) -> None:
        self.receive(b"")


def _with_ports(path: str, ports: list[int]) -> str:
    """The request target with ?port= for each port, unless it names its ports already."""
    path, _, query = path.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if ports and not any(k in ("port", "ports") for k, _ in pairs):
        pairs += [("port", str(p)) for p in ports]
    return path + ("?" + urlencode(pairs) if pairs else "")


async def _websocket_upgrade(conn: UpgradeProtocol, target: Target, path: str,
                             subprotocols: list[str], timeout: float
                             ) -> tuple[UpgradeAnswer, str | None]:
    """The 101 and the subprotocol the server chose among those offered."""
    request, expected_accept = ws.client_handshake_request(
        target.netloc, path, subprotocols,
        extra_headers=target.request_headers())
    conn.transport.write(request)
    answer = await read_upgrade_answer(conn, target, timeout)
    try:
        response = ws.parse_handshake_response(answer.raw, expected_accept, subprotocols)
    except ws.HandshakeError as e:
        raise UpgradeRefused(101, f"bad WebSocket handshake answer: {e.reason}") from None
    return answer, response.subprotocol if response is not None else None


async def open_channels(conn: UpgradeProtocol, target: Target, ports: list[int],
                        timeout: float) -> ClientSession:
    """The channel protocol: the ports go in the URL, one connection each."""
    if not ports:
        raise ValueError("the websocket transport needs the ports at connect time")
    answer, _ = await _websocket_upgrade(conn, target, _with_ports(target.path, ports),
                                         [ws.CHANNEL_BINARY], timeout)
    session = ChannelClientSession(ports)
    session.dial = answer.header(HEADER_CRISHIM_DIAL.lower()).strip().lower()
    conn.attach(session, answer.rest)
    return session


async def open_spdy_tunnel(conn: UpgradeProtocol, target: Target, ports: list[int],
                           timeout: float) -> ClientSession:
    """SPDY/3.1 inside a WebSocket; ports go per connection as with plain SPDY. The
    stream protocol versions are offered as subprotocols SPDY/3.1+<version>, best first."""
    answer, subprotocol = await _websocket_upgrade(
        conn, target, target.path, [websocket_subprotocol(v) for v in target.versions],
        timeout)
    return SpdyClientSession.attached(
        conn, answer.rest, version_of_subprotocol(subprotocol or "") or PORTFORWARD_PROTOCOL,
        ws.ByteStreamTunnel(client=True))

"""Client sessions over the sans-IO codecs: one upgraded connection to a stream server URL,
carrying any number of forwarded connections (SPDY, SPDY over WebSocket, HTTP/2) or the
ports fixed at connect time (WebSocket channels).

Library API (used by `crishim port-forward`, `crishim check` and the benchmarks)::

    session = await open_session(url, "spdy")           # or "spdy-over-websocket",
                                                          # "websocket" (ports=[...]), "h2"
    stream, proto = await session.open_connection(9000, MyProtocol)   # asyncio-style
    reader, writer = await session.open_stream(9000)                 # asyncio streams
    rtt = await session.ping()                           # SPDY/h2 keepalive round trip
    session.close(); await session.wait_closed()

`open_connection` works like `loop.create_connection`: the protocol gets
`connection_made(stream)`, `data_received`, `eof_received` (the server's half-close),
`connection_lost(exc)` and `pause_writing`/`resume_writing` (the session's transport is
congested). `stream` is an asyncio.Transport: `write`, `write_eof` (half-close; on the
channel WebSocket it closes the WebSocket, which the protocol defines as the half-close of
every port), `close` (half-close then reset), `abort` (reset), `pause_reading`,
`resume_reading`. `connection_lost(exc)` gets None for a clean end or a `ForwardError`
whose `fatal` says the server wrote error text that, per client-go, ends the session.

Everything runs on callbacks: no queue per chunk, one copy from the session transport's
read into the codec's frames and one join on the way out.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

from crishim.protocols import spdy
from crishim.protocols import websocket as ws
from crishim.protocols.constants import (
    HEADER_PORT,
    HEADER_PROTOCOL,
    HEADER_REQUEST_ID,
    HEADER_STREAM_TYPE,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
    STREAM_TYPE_DATA,
    STREAM_TYPE_ERROR,
)
from crishim.protocols.negotiation import (
    TCP,
    UDP,
    carries_udp,
    client_offer,
    version_of_subprotocol,
    websocket_subprotocol,
)

TRANSPORTS = ("spdy", "websocket", "spdy-over-websocket", "h2")
# After a forwarded connection's data stream ends, how long to wait for its error stream.
ERROR_STREAM_WAIT = 2.0
SESSION_WRITE_HIGH_WATER = 1024 * 1024
MAX_HEAD = 64 * 1024
MAX_EARLY_BYTES = 1024 * 1024  # kept for WebSocket channel ports not opened yet


class SessionError(Exception):
    """The session could not be set up (connect, TLS, upgrade refused)."""


class UpgradeRefused(SessionError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SessionClosed(SessionError):
    """The session ended; no new connections."""


class UdpNotSupported(SessionError):
    """The server did not negotiate crishim's port-forward extension: no UDP flows."""

    def __init__(self, version: str | None, transport: str) -> None:
        if transport == "websocket":
            why = ("the WebSocket channel protocol cannot carry UDP; use --transport spdy, "
                   "spdy-over-websocket or h2")
        else:
            why = (f"its stream server negotiated {version or PORTFORWARD_PROTOCOL}; UDP needs "
                   f"{PORTFORWARD_CRISHIM_V1}, which crishim's stream server speaks")
        super().__init__(f"the container runtime does not support UDP port-forward ({why})")


class ForwardError(Exception):
    """One forwarded connection failed. `fatal`: the server wrote error text, which ends the
    whole session for client-go (kubectl, crictl) and so for `crishim port-forward`."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def ssl_context_for(url: str, insecure: bool = False, ca_file: str | None = None,
                    alpn: list[str] | None = None) -> ssl.SSLContext | None:
    if urlsplit(url).scheme != "https":
        return None
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# --------------------------------------------------------------------------- one stream


class ForwardStream(asyncio.Transport):
    """One forwarded connection as seen by the client: an asyncio.Transport to the pod."""

    def __init__(self, session: ClientSession, port: int, key: object) -> None:
        super().__init__({"peername": ("pod", port)})
        self.session = session
        self.port = port
        self.key = key  # the transport's handle (SPDY data stream id, channel index, ...)
        self.error_id: int | None = None  # its error stream, where that is a stream of its own
        self.protocol: asyncio.BaseProtocol | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.perf_counter()
        self.accepted_at: float | None = None
        self.first_byte_at: float | None = None
        self.error_text = ""
        self.failure = ""
        self._eof_sent = False
        self._remote_done = False
        self._reset = False
        self._error_done = not session.has_error_stream
        self._closing = False
        self._finished = False
        self._timer: asyncio.TimerHandle | None = None
        self._write_blocks: set[str] = set()
        self.done: asyncio.Future[ForwardError | None] = \
            asyncio.get_running_loop().create_future()

    # --- asyncio.Transport towards the pod ----------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._finished or self._eof_sent or self._reset or not data:
            return
        self.bytes_up += len(data)
        self.session._send(self, data)

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if self._eof_sent or self._finished or self._reset:
            return
        self._eof_sent = True
        self.session._send_eof(self)
        self._maybe_finish()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._finished or self._closing:
            return
        self._closing = True
        if not self._reset and not (self._eof_sent and self._remote_done):
            if not self._eof_sent:
                self._eof_sent = True
                self.session._send_eof(self)
            if not self._remote_done:
                self.session._reset_stream(self)
        self._finish()

    def abort(self) -> None:
        if self._finished:
            return
        self._closing = True
        if not self._reset:
            self.session._reset_stream(self)
        self._finish()

    def is_closing(self) -> bool:
        return self._closing or self._finished

    def pause_reading(self) -> None:
        self.session._pause_input(self)

    def resume_reading(self) -> None:
        self.session._resume_input(self)

    def is_reading(self) -> bool:
        return self not in self.session._congested

    def get_write_buffer_size(self) -> int:
        t = self.session.transport
        return t.get_write_buffer_size() if t is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    # --- from the session ---------------------------------------------------------------
    def _block_writing(self, why: str) -> None:
        """The protocol's pause_writing, once however many reasons (session transport
        congested, stream out of flow-control window) hold at the same time."""
        if not self._write_blocks:
            self._write_blocks.add(why)
            if self.protocol is not None and not self._finished:
                self.protocol.pause_writing()
        else:
            self._write_blocks.add(why)

    def _unblock_writing(self, why: str) -> None:
        if why in self._write_blocks:
            self._write_blocks.discard(why)
            if not self._write_blocks and self.protocol is not None and not self._finished:
                self.protocol.resume_writing()

    def _accepted(self) -> None:
        if self.accepted_at is None:
            self.accepted_at = time.perf_counter()

    def _data(self, data: bytes | memoryview) -> None:
        if self._finished or self._closing:
            return
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        self.bytes_down += len(data)
        self.protocol.data_received(data)

    def _remote_eof(self) -> None:
        if self._remote_done or self._finished:
            return
        self._remote_done = True
        if not self._closing:
            keep_open = self.protocol.eof_received()
            if not keep_open and not self._eof_sent:
                self.write_eof()
        self._maybe_finish()

    def _remote_reset(self, reason: str) -> None:
        if self._finished or self._reset:
            return
        self._reset = True
        self._remote_done = True
        self.failure = self.failure or reason
        self._maybe_finish()

    def _error_data(self, text: str) -> None:
        self.error_text += text

    def _error_end(self) -> None:
        self._error_done = True
        if self.error_text and not self.session.error_text_is_fatal:
            self._reset = True  # the channel protocol's error text ends just that port
        self._maybe_finish()

    def _lost(self, reason: str) -> None:
        if not self._finished:
            self._error_done = True
            if not self._remote_done and not self._reset:
                self.failure = self.failure or reason
            self._finish()

    def _maybe_finish(self) -> None:
        if self._finished:
            return
        data_done = self._reset or (self._eof_sent and self._remote_done)
        if not data_done:
            return
        if self._error_done:
            self._finish()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ERROR_STREAM_WAIT, self._finish)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        exc: ForwardError | None = None
        if self.error_text:
            exc = ForwardError(self.error_text.strip(), fatal=self.session.error_text_is_fatal)
        elif self.failure and not self._closing:
            exc = ForwardError(self.failure)
        self.session._stream_done(self)
        if not self.done.done():
            self.done.set_result(exc)
        if self.protocol is not None:
            self.protocol.connection_lost(exc)


# --------------------------------------------------------------------------- sessions


class ClientSession:
    """What every transport's client session shares: streams, back-pressure, closing."""

    transport_name = "?"
    has_error_stream = True
    error_text_is_fatal = True

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.streams: dict[object, ForwardStream] = {}
        self._error_streams: dict[int, ForwardStream] = {}  # by error_id (SPDY, h2)
        self._congested: set[object] = set()
        self.writing_paused = False
        self.closed: asyncio.Future[str] = loop.create_future()
        self.connected_at = time.perf_counter()
        self._ping_task: asyncio.Task | None = None
        # the stream protocol version the server picked (None: HTTP/2 before it answered)
        self.stream_version: str | None = PORTFORWARD_PROTOCOL

    # --- public -------------------------------------------------------------------------
    @property
    def supports_udp(self) -> bool:
        """Whether the server negotiated crishim's extension (UDP flows)."""
        return carries_udp(self.stream_version)

    async def negotiate(self, timeout: float = 10.0) -> str | None:
        """The stream protocol version, asking the server first where the upgrade did not
        say (HTTP/2)."""
        return self.stream_version

    async def open_connection(self, port: int, protocol_factory: Callable[[], asyncio.Protocol],
                              ip_protocol: str = TCP) -> tuple[ForwardStream, asyncio.Protocol]:
        return self.open_connection_nowait(port, protocol_factory, ip_protocol)

    def open_connection_nowait(self, port: int,
                               protocol_factory: Callable[[], asyncio.Protocol],
                               ip_protocol: str = TCP) -> tuple[ForwardStream, asyncio.Protocol]:
        """open_connection without a loop round trip: the streams' opening frames are
        written at once (first-byte latency). ip_protocol "udp" opens a UDP flow (datagrams
        length-prefixed, crishim/protocols/datagram.py), or raises UdpNotSupported."""
        if self.closed.done():
            raise SessionClosed(f"session closed: {self.closed.result()}")
        if ip_protocol == UDP:
            if self.stream_version is None:
                raise SessionError("the server has not said yet which stream protocol it "
                                   "speaks: await negotiate() before opening a UDP flow")
            if not self.supports_udp:
                raise UdpNotSupported(self.stream_version, self.transport_name)
        elif ip_protocol != TCP:
            raise ValueError(f"ip_protocol {ip_protocol!r}: expected tcp or udp")
        stream = self._new_stream(port, ip_protocol)
        protocol = protocol_factory()
        stream.protocol = protocol
        protocol.connection_made(stream)
        if self.writing_paused:
            stream._block_writing("session")
        self._flush()
        return stream, protocol

    async def open_stream(self, port: int, limit: int = 1 << 20
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader(limit=limit)
        protocol = asyncio.StreamReaderProtocol(reader)
        stream, _ = await self.open_connection(port, lambda: protocol)
        return reader, asyncio.StreamWriter(stream, protocol, reader, self.loop)

    async def ping(self, timeout: float = 10.0) -> float:
        raise NotImplementedError(f"{self.transport_name} has no session ping")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._goodbye()
            self.transport.close()
        self._lost("closed by the client")

    async def wait_closed(self) -> str:
        return await self.closed

    # --- for subclasses -----------------------------------------------------------------
    def _new_stream(self, port: int, ip_protocol: str = TCP) -> ForwardStream:
        raise NotImplementedError

    def _send(self, stream: ForwardStream, data) -> None:
        raise NotImplementedError

    def _send_eof(self, stream: ForwardStream) -> None:
        raise NotImplementedError

    def _reset_stream(self, stream: ForwardStream) -> None:
        raise NotImplementedError

    def _goodbye(self) -> None:
        """Bytes to send before closing the transport (GOAWAY, close frame)."""

    def _flush(self) -> None:
        raise NotImplementedError

    def receive(self, data: bytes) -> None:
        raise NotImplementedError

    def _stream_done(self, stream: ForwardStream) -> None:
        self.streams.pop(stream.key, None)
        self._error_streams.pop(stream.error_id, None)
        self._resume_input(stream)

    def _write_raw(self, out: list) -> None:
        """Hand the codec's output buffers to the transport as they are (no join copy)."""
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.writelines(out)

    def start_keepalive(self, interval: float) -> None:
        if interval > 0:
            self._ping_task = self.loop.create_task(self._keepalive(interval))

    async def _keepalive(self, interval: float) -> None:
        while not self.closed.done():
            await asyncio.sleep(interval)
            if self.closed.done():
                return
            self._send_ping()

    def _send_ping(self) -> None:
        return None

    # --- transport events ---------------------------------------------------------------
    def _lost(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        if self._ping_task is not None:
            self._ping_task.cancel()
        for stream in list(self.streams.values()):
            stream._lost(reason)

    def transport_eof(self) -> None:
        self._lost("the server closed the connection")

    def transport_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "the server closed the connection")

    def _pause_input(self, key: object) -> None:
        if not self._congested and self.transport is not None:
            self.transport.pause_reading()
        self._congested.add(key)

    def _resume_input(self, key: object) -> None:
        if key in self._congested:
            self._congested.discard(key)
            if not self._congested and self.transport is not None \
                    and not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in list(self.streams.values()):
            stream._block_writing("session")

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            stream._unblock_writing("session")


class SpdyClientSession(ClientSession):
    """client-go's port-forward over SPDY/3.1: per connection an error stream (closed for
    writing at once), then a data stream, both with streamtype/port/requestid headers.
    Stream creation is pipelined: no wait for SYN_REPLY (client-go waits; the server does
    not care)."""

    transport_name = "spdy"

    def __init__(self, tunnel: ws.ByteStreamTunnel | None = None) -> None:
        super().__init__()
        self.codec = spdy.SpdyConnection(spdy.SpdyConfig(client=True, max_send_frame=256 * 1024,
                                                      zero_copy=True))
        self.tunnel = tunnel
        if tunnel is not None:
            self.transport_name = "spdy-over-websocket"
        self._next_request_id = 0
        self._pings: dict[int, tuple[float, asyncio.Future[float]]] = {}
        self.goaway = False

    def _new_stream(self, port: int, ip_protocol: str = TCP) -> ForwardStream:
        if self.goaway:
            raise SessionClosed("the server sent GOAWAY: no new connections on this session")
        request_id = str(self._next_request_id)
        self._next_request_id += 1
        headers = {HEADER_STREAM_TYPE: STREAM_TYPE_ERROR, HEADER_PORT: str(port),
                   HEADER_REQUEST_ID: request_id}
        if ip_protocol == UDP:
            headers[HEADER_PROTOCOL] = UDP
        try:
            error_id = self.codec.open_stream(headers)
            self.codec.end_stream(error_id)
            headers[HEADER_STREAM_TYPE] = STREAM_TYPE_DATA
            data_id = self.codec.open_stream(headers)
        except spdy.SessionClosedError as e:
            raise SessionClosed(str(e)) from None
        stream = ForwardStream(self, port, data_id)
        stream.error_id = error_id
        self.streams[data_id] = stream
        self._error_streams[error_id] = stream
        return stream

    def _send(self, stream: ForwardStream, data) -> None:
        try:
            self.codec.send_data(stream.key, data)
        except spdy.StreamClosedError:
            return
        self._flush()

    def _send_eof(self, stream: ForwardStream) -> None:
        try:
            self.codec.end_stream(stream.key)
        except spdy.StreamClosedError:
            return
        self._flush()

    def _reset_stream(self, stream: ForwardStream) -> None:
        self.codec.reset_stream(stream.key, spdy.CANCEL)
        self._flush()

    def _goodbye(self) -> None:
        self.codec.goaway(spdy.GOAWAY_OK)
        self._flush()
        if self.tunnel is not None:
            self.tunnel.close(ws.CLOSE_NORMAL)
            self._write_raw(self.tunnel.take_output())

    def _flush(self) -> None:
        chunks = self.codec.take_output()  # straight to writelines: no join copy
        if chunks and self.tunnel is not None:
            self.tunnel.send_buffers(chunks)
            chunks = self.tunnel.take_output()
        self._write_raw(chunks)

    def _send_ping(self) -> None:
        if not self.closed.done():
            self.codec.ping()
            self._flush()

    async def ping(self, timeout: float = 10.0) -> float:
        if self.closed.done():
            raise SessionClosed(f"session closed: {self.closed.result()}")
        fut: asyncio.Future[float] = self.loop.create_future()
        ping_id = self.codec.ping()
        self._pings[ping_id] = (time.perf_counter(), fut)
        self._flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(ping_id, None)

    # --- input --------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        if self.tunnel is not None:
            for event in self.tunnel.receive_data(data):
                match event:
                    case ws.TunnelData():
                        self._receive_spdy(event.data)
                    case ws.Closed():
                        self._write_raw(self.tunnel.take_output())
                        self._lost(f"the server closed the WebSocket ({event.code} "
                                   f"{event.reason})".strip())
                        return
            self._write_raw(self.tunnel.take_output())  # pongs
            return
        self._receive_spdy(data)

    def _receive_spdy(self, data: bytes) -> None:
        streams = self.streams
        for event in self.codec.receive_data(data):
            match event:
                case spdy.DataReceived():
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        if event.data:
                            stream._data(event.data)
                        if event.fin:
                            stream._remote_eof()
                        continue
                    stream = self._error_streams.get(event.stream_id)
                    if stream is not None:
                        if event.data:
                            stream._error_data(bytes(event.data).decode("utf-8", "replace"))
                        if event.fin:
                            stream._error_end()
                case spdy.StreamReplied():
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream._accepted()
                case spdy.StreamReset() | spdy.StreamError():
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        why = getattr(event, "reason", "") or f"RST_STREAM status {event.status}"
                        stream._remote_reset(f"the server reset the connection ({why})")
                        continue
                    stream = self._error_streams.get(event.stream_id)
                    if stream is not None:
                        stream._error_end()
                case spdy.PingAcknowledged():
                    entry = self._pings.get(event.ping_id)
                    if entry is not None and not entry[1].done():
                        entry[1].set_result(time.perf_counter() - entry[0])
                case spdy.GoAwayReceived():
                    self.goaway = True
                    self._flush()
                    self._lost(f"the server sent GOAWAY (status {event.status})")
                    return
                case spdy.SessionTerminated():
                    self._flush()
                    self._lost(f"SPDY protocol error: {event.reason}")
                    if self.transport is not None:
                        self.transport.close()
                    return
        self._flush()


class ChannelClientSession(ClientSession):
    """The Kubernetes WebSocket channel protocol: ports fixed at connect time, one
    forwarded connection per port for the life of the WebSocket. The error channel's text
    ends only that port; the client's close frame is the half-close of every port."""

    transport_name = "websocket"
    error_text_is_fatal = False

    def __init__(self, ports: list[int], base64_mode: bool = False) -> None:
        super().__init__()
        self.codec = ws.ChannelCodec(list(ports), base64_mode, client=True)
        self._used: set[int] = set()
        # What arrived for a port before the caller opened it: a refused port's error text
        # and the close can come in the same read as the 101. Replayed when it is opened.
        self._early: dict[int, list] = {}
        self._early_size = 0
        self._close_event: ws.Closed | None = None

    def _free_index(self, port: int) -> int | None:
        for index, p in enumerate(self.codec.ports):
            if p == port and index not in self._used:
                return index
        return None

    def _new_stream(self, port: int, ip_protocol: str = TCP) -> ForwardStream:
        index = self._free_index(port)
        if index is None:
            raise SessionClosed(f"port {port} is not (or no longer) available on this "
                                f"WebSocket: its ports are {self.codec.ports}, one connection "
                                "each")
        self._used.add(index)
        stream = ForwardStream(self, port, index)
        self.streams[index] = stream
        return stream

    def open_connection_nowait(self, port: int,
                               protocol_factory: Callable[[], asyncio.Protocol],
                               ip_protocol: str = TCP) -> tuple[ForwardStream, asyncio.Protocol]:
        if ip_protocol != TCP:
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

    def _send(self, stream: ForwardStream, data) -> None:
        self.codec.send_data(stream.key, data)
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

    def _flush(self) -> None:
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

    def receive(self, data: bytes) -> None:
        for event in self.codec.receive_data(data):
            match event:
                case ws.Closed():
                    self._close_event = event
                    self._flush()
                    for stream in list(self.streams.values()):
                        self._deliver_close(stream, event)
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
                        self._early_size += len(getattr(event, "data", b"") or b"")
        self._flush()

    def transport_eof(self) -> None:
        self.receive(b"")


# --------------------------------------------------------------------------- connecting


class _ConnectionProtocol(asyncio.Protocol):
    """The session's TCP/TLS connection: the HTTP response head first, then the session."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.body_done: asyncio.Future[None] = loop.create_future()
        self.session: ClientSession | None = None
        self.on_data: Callable[[bytes], None] | None = None  # h2 before the session exists

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.receive(data)
            return
        self.buffer += data
        if not self.head.done():
            if self.buffer.find(b"\r\n\r\n") >= 0 or len(self.buffer) > MAX_HEAD:
                self.transport.pause_reading()
                self.head.set_result(bytes(self.buffer))

    def eof_received(self) -> bool:
        if self.session is not None:
            self.session.transport_eof()
        else:
            self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.transport_lost(exc)
            return
        self._end(exc)

    def _end(self, exc: Exception | None = None) -> None:
        if not self.head.done():
            self.head.set_exception(SessionError(
                f"the server closed the connection before answering"
                f"{': ' + str(exc) if exc else ''}"))
        if not self.body_done.done():
            self.body_done.set_result(None)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()

    def attach(self, session: ClientSession, leftover: bytes) -> None:
        self.session = session
        session.transport = self.transport
        self.buffer = bytearray()
        if leftover:
            session.receive(leftover)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    async def read_body(self, timeout: float) -> bytes:
        """After a non-101 answer: the rest of the response (it ends with the connection)."""
        self.transport.resume_reading()
        try:
            await asyncio.wait_for(asyncio.shield(self.body_done), timeout)
        except TimeoutError:
            pass
        return bytes(self.buffer)


def _parse_head(raw: bytes) -> tuple[int, dict[str, list[str]], bytes, bytes]:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise SessionError("the server's response head is too large or malformed")
    head, rest = raw[:end], raw[end + 4:]
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise SessionError(f"the server did not answer with HTTP: {lines[0][:80]!r}")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode("latin-1"), []).append(
            value.strip().decode("latin-1"))
    return int(parts[1]), headers, head, rest


def _refusal(status: int, headers: dict[str, list[str]], body: bytes) -> UpgradeRefused:
    length = headers.get("content-length", [""])[0]
    if length.isdigit():
        body = body[:int(length)]
    text = body.decode("utf-8", "replace").strip() or "no reason given"
    return UpgradeRefused(status, f"unable to upgrade connection: {status}: {text}")


def _with_ports(target: str, ports: list[int]) -> str:
    path, _, query = target.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if ports and not any(k in ("port", "ports") for k, _ in pairs):
        pairs += [("port", str(p)) for p in ports]
    return path + ("?" + urlencode(pairs) if pairs else "")


async def open_session(url: str, transport: str = "spdy", ports: list[int] | tuple = (), *,
                       insecure: bool = False, ca_file: str | None = None,
                       ssl_context: ssl.SSLContext | None = None, ping_interval: float = 5.0,
                       timeout: float = 10.0, headers: Sequence[tuple[str, str]] = (),
                       offer_udp: bool = True) -> ClientSession:
    """Connect to a stream server URL and upgrade to `transport`.

    `headers` are added to the upgrade request (e.g. Authorization for an API server's
    pods/portforward); not supported by h2.

    `ports` is needed by the channel WebSocket (added as ?port= unless the URL has some);
    the other transports take ports per connection. `offer_udp`: offer crishim's stream
    protocol version (UDP flows) before portforward.k8s.io; the session's `stream_version`
    says what the server picked. SPDY and h2 sessions ping every
    `ping_interval` seconds (0: never). Raises SessionError / UpgradeRefused."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose from {', '.join(TRANSPORTS)}")
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SessionError(f"cannot use stream URL {url!r}: need http(s)://HOST:PORT/...")
    if ssl_context is None:
        ssl_context = ssl_context_for(url, insecure, ca_file,
                                      ["h2"] if transport == "h2" else ["http/1.1"])
    host = u.hostname
    port = u.port or (443 if u.scheme == "https" else 80)
    target = u.path or "/"
    if u.query:
        target += "?" + u.query
    loop = asyncio.get_running_loop()
    conn = _ConnectionProtocol(loop)
    try:
        tr, _ = await asyncio.wait_for(loop.create_connection(
            lambda: conn, host, port, ssl=ssl_context,
            server_hostname=host if ssl_context is not None else None), timeout)
    except TimeoutError:
        raise SessionError(f"connecting to {u.netloc} timed out after {timeout:g}s") from None
    except ssl.SSLCertVerificationError as e:
        raise SessionError(f"TLS certificate of {u.netloc} not trusted: {e.verify_message}; "
                           "give --certificate-authority FILE or --insecure-skip-tls-verify"
                           ) from None
    except OSError as e:
        raise SessionError(f"cannot connect to the stream server {u.netloc}: "
                           f"{e.strerror or e}") from None
    tr.set_write_buffer_limits(high=SESSION_WRITE_HIGH_WATER)
    try:
        if transport == "h2":
            if headers:
                raise ValueError("extra headers are not supported by the h2 transport")
            from crishim.client import h2client

            session = await h2client.start(conn, tr, u, target, timeout, offer_udp)
        else:
            session = await _upgrade_http1(conn, tr, u, target, transport, list(ports), timeout,
                                           headers, offer_udp)
    except BaseException:
        tr.abort()
        raise
    session.start_keepalive(ping_interval)
    return session


async def _upgrade_http1(conn: _ConnectionProtocol, tr: asyncio.Transport, u, target: str,
                         transport: str, ports: list[int], timeout: float,
                         headers: Sequence[tuple[str, str]] = (),
                         offer_udp: bool = True) -> ClientSession:
    expected_accept = None
    offered: list[str] = []
    versions = client_offer(udp=offer_udp)
    extra = [(b"User-Agent", b"crishim-port-forward")]
    extra += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if transport == "spdy":
        # one header line per version, best first, as client-go writes them
        offer = "".join(f"X-Stream-Protocol-Version: {v}\r\n" for v in versions)
        tr.write(f"POST {target} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\n"
                 f"Upgrade: SPDY/3.1\r\n{offer}"
                 f"Content-Length: 0\r\n".encode()
                 + b"".join(k + b": " + v + b"\r\n" for k, v in extra) + b"\r\n")
    else:
        offered = ([websocket_subprotocol(v) for v in versions]
                   if transport == "spdy-over-websocket" else [ws.CHANNEL_BINARY])
        if transport == "websocket":
            if not ports:
                raise ValueError("the websocket transport needs the ports at connect time")
            target = _with_ports(target, ports)
        request, expected_accept = ws.client_handshake_request(
            u.netloc, target, offered, extra_headers=extra)
        tr.write(request)
    try:
        raw = await asyncio.wait_for(asyncio.shield(conn.head), timeout)
    except TimeoutError:
        raise SessionError(f"no answer to the upgrade from {u.netloc} in {timeout:g}s") from None
    status, headers, _, rest = _parse_head(raw)
    if status != 101:
        full = await conn.read_body(min(timeout, 2.0))
        raise _refusal(status, headers, _parse_head(full)[3])
    upgrade = ",".join(headers.get("upgrade", [])).lower()
    if transport == "spdy":
        if upgrade != "spdy/3.1":
            raise UpgradeRefused(101, f"the server upgraded to {upgrade!r}, not SPDY/3.1")
        chosen = ",".join(headers.get("x-stream-protocol-version", [])) or PORTFORWARD_PROTOCOL
        if chosen not in versions:
            raise UpgradeRefused(101, f"the server chose stream protocol {chosen!r}")
        session: ClientSession = SpdyClientSession()
        session.stream_version = chosen
    else:
        try:
            answer = ws.parse_handshake_response(raw, expected_accept, offered)
        except ws.HandshakeError as e:
            raise UpgradeRefused(101, f"bad WebSocket handshake answer: {e.reason}") from None
        if transport == "spdy-over-websocket":
            session = SpdyClientSession(ws.ByteStreamTunnel(client=True))
            subprotocol = answer.subprotocol if answer is not None else None
            session.stream_version = version_of_subprotocol(subprotocol or "") \
                or PORTFORWARD_PROTOCOL
        else:
            session = ChannelClientSession(ports)
    conn.attach(session, rest)
    return session

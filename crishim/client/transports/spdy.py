"""client-go's port-forward over SPDY/3.1, straight on the upgraded HTTP/1.1 connection or
inside a WebSocket (the SPDY-over-WebSocket tunnel, see websocket.py)."""

from __future__ import annotations

from typing import cast

from crishim.client.transports.base import (
    Buffer,
    ClientSession,
    ForwardStream,
    SessionClosed,
    StreamPairSession,
    Target,
    UpgradeProtocol,
    UpgradeRefused,
    read_upgrade_answer,
    reset_by_server,
)
from crishim.protocols import spdy
from crishim.protocols import websocket as ws
from crishim.protocols.buffers import Outbound, immutable
from crishim.protocols.constants import (
    DIAL_ON_DATA,
    FLOW_CONTROL_WINDOWS,
    H2_CONNECTION_WINDOW,
    H2_STREAM_WINDOW,
    HEADER_DIAL,
    HEADER_FLOW_CONTROL,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
)
from crishim.protocols.negotiation import TCP

# window taken before it is given back (per stream, and for the session): a sixteenth of
# a stream's, so a stream that is read never waits for its window
ACK_EVERY = H2_STREAM_WINDOW // 16


# SPDY/3.1's RST_STREAM status codes by number, for what a reset stream's reason says
RST_STREAM_NAMES = {getattr(spdy, name): name for name in (
    "PROTOCOL_ERROR", "INVALID_STREAM", "REFUSED_STREAM", "UNSUPPORTED_VERSION", "CANCEL",
    "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "STREAM_IN_USE", "STREAM_ALREADY_CLOSED",
    "INVALID_CREDENTIALS", "FRAME_TOO_LARGE")}


class SpdyClientSession(StreamPairSession):
    """Per forwarded connection an error stream (closed for writing at once), then a data
    stream, both with streamtype/port/requestid headers. Stream creation is pipelined: no
    wait for SYN_REPLY (client-go waits; the server does not care).

    On portforward.crishim.dev/v1 the session asks for SPDY/3.1's flow control
    (docs/protocol.md 8.6): a server that honours it says so in its replies, and then a
    local connection that stops reading holds back only its stream's window, as over
    HTTP/2; elsewhere the whole session's reading pauses, as kubectl's does."""

    transport_name = "spdy"
    opens_ahead = True
    has_ping = True
    codec: spdy.SpdyConnection
    stream_gone = (spdy.StreamClosedError,)
    cancel_code = spdy.CANCEL

    def __init__(self, tunnel: ws.ByteStreamTunnel | None = None) -> None:
        super().__init__()
        self.codec = spdy.SpdyConnection(spdy.SpdyConfig(
            client=True, max_send_frame=256 * 1024, zero_copy=True))
        self.tunnel = tunnel
        # read in place (reads_lent), but not through a tunnel: its messages are copied
        self.reads_lent = tunnel is None
        if tunnel is not None:
            self.transport_name = "spdy-over-websocket"
        self._windows = False  # the server honours our windows (its replies said so)
        self._withheld: dict[int, int] = {}  # paused stream -> bytes not acknowledged
        self._unacked: dict[int, int] = {}  # stream (0: the session) -> bytes taken, not
        # acknowledged yet: given back ACK_EVERY at a time (see _taken)

    @classmethod
    def attached(cls, conn: UpgradeProtocol, leftover: bytes, stream_version: str,
                 tunnel: ws.ByteStreamTunnel | None = None) -> SpdyClientSession:
        """The session on `conn` once upgraded to `stream_version` (asking for windows
        where it has them), given what came after the 101."""
        session = cls(tunnel)
        session.stream_version = stream_version
        if stream_version == PORTFORWARD_CRISHIM_V1:
            session.ask_for_windows()
        conn.attach(session, leftover)
        session._flush()
        return session

    def ask_for_windows(self) -> None:
        """Before any stream: our stream windows (16 MiB each) and the session's (256 MiB),
        as HTTP/2's; sent once the session is attached (_flush)."""
        self.codec.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW})
        # counted here too, so that DATA the codec drops (a stream reset here meanwhile)
        # gives its session window back by itself: without, each connection reset while
        # its download came kept a little of it, and ~270 of them stalled the session
        self.codec.enforce_receive_windows(H2_STREAM_WINDOW)
        self.codec.send_window_update(0, H2_CONNECTION_WINDOW - spdy.INITIAL_SESSION_WINDOW)
        # the server's windows, SPDY's 64 KiB until its SETTINGS and WINDOW_UPDATE (sent
        # before any reply) raise them; a reply without flow-control: windows (a server
        # that has none) lifts them (see StreamReplied in _receive_spdy)
        self.codec.enforce_send_windows(spdy.INITIAL_WINDOW)

    def _new_stream(self, port: int, ip_protocol: str = TCP, on_data: bool = False
                    ) -> ForwardStream:
        error_headers, data_headers = self._pair_headers(port, ip_protocol, on_data)
        try:
            error_id = self.codec.open_stream(dict(error_headers))
            self.codec.end_stream(error_id)
            data_id = self.codec.open_stream(dict(data_headers))
        except spdy.SessionClosedError as e:
            raise SessionClosed(str(e)) from None
        return self._register(ForwardStream(self, port, data_id), error_id)

    def _send(self, stream: ForwardStream, data: Buffer, lent: bool = False) -> None:
        sid = stream.key
        q = self._queues.get(sid)
        if q is None and len(data) <= self.codec.send_window(sid):  # the common case
            try:
                self.codec.send_data(sid, data, lent=lent)
            except spdy.StreamClosedError:
                return
            self._flush(lent)  # lent: views of the read buffer (write_view), out now or copied
            return
        if q is None:
            q = self._queues[sid] = Outbound()
        q.append(data if immutable(data) else bytes(data))  # kept past the caller's buffer
        self._drain(sid, q)
        self._flush()

    def _send_eof(self, stream: ForwardStream) -> None:
        q = self._queues.get(stream.key)
        if q is not None:
            q.eof = True
            self._drain(stream.key, q)
        else:
            try:
                self.codec.end_stream(stream.key)
            except spdy.StreamClosedError:
                return
        self._flush()

    def _drain_all(self) -> None:
        for sid in list(self._queues):
            q = self._queues.get(sid)
            if q is not None:
                self._drain(sid, q)

    def _goodbye(self) -> None:
        self.codec.goaway(spdy.GOAWAY_OK)
        self._flush()
        if self.tunnel is not None:
            self.tunnel.close(ws.CLOSE_NORMAL)
            self._write_raw(self.tunnel.take_output())

    def _flush(self, lent: bool = False) -> None:
        chunks = self.codec.take_output()  # straight to writelines: no join copy
        tunnel = self.tunnel
        if tunnel is None:
            self._write_raw(chunks, lent)
        elif chunks:
            tunnel.send_buffers(cast(list[Buffer], chunks))  # only read, never stored into
            self._write_raw(tunnel.take_output())

    def _send_ping_frame(self) -> int:
        return self.codec.ping()

    # --- input --------------------------------------------------------------------------
    def receive(self, data: bytes | memoryview, lent: bool = False) -> None:
        if self.tunnel is not None:
            for event in self.tunnel.receive_data(data):
                match event:
                    case ws.TunnelData():
                        self._receive_spdy(event.data)
                    case ws.Closed():
                        self._write_raw(self.tunnel.take_output())
                        said = f"{event.code} {event.reason}".strip()
                        self._lost(f"the server closed the WebSocket ({said})")
                        return
            self._write_raw(self.tunnel.take_output())  # pongs
            return
        self._receive_spdy(data, lent)

    def _receive_spdy(self, data: bytes | memoryview, lent: bool = False) -> None:
        streams = self.streams
        for event in self.codec.receive_data(data, lent=lent):
            match event:
                case spdy.DataReceived():
                    if self._windows and event.data:
                        sid = event.stream_id
                        if sid in self._withheld:
                            self._withheld[sid] += len(event.data)
                        else:
                            self._taken(sid, len(event.data))
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
                    if event.headers.get(HEADER_FLOW_CONTROL) == FLOW_CONTROL_WINDOWS:
                        self._windows = True
                    elif self.codec.send_windows_enforced:  # only where we asked
                        # a server without windows: none either way
                        self.codec.stop_send_windows()
                        self.codec.stop_receive_windows()
                        self._drain_all()
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream._accepted()
                        if stream.opened_ahead:
                            self._answered_ahead(
                                stream, event.headers.get(HEADER_DIAL) == DIAL_ON_DATA)
                case spdy.StreamReset() | spdy.StreamError():
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        why = getattr(event, "reason", "")
                        stream._remote_reset(
                            f"the server reset the connection ({why})" if why
                            else reset_by_server(event.status,
                                                 RST_STREAM_NAMES.get(event.status)))
                        continue
                    stream = self._error_streams.get(event.stream_id)
                    if stream is not None:
                        stream._error_end()
                case spdy.WindowUpdateReceived():
                    if self._queues:
                        if event.stream_id == 0:
                            self._drain_all()
                        else:
                            q = self._queues.get(event.stream_id)
                            if q is not None:
                                self._drain(event.stream_id, q)
                case spdy.SettingsReceived():
                    if self._queues:  # the codec moved every stream's window
                        self._drain_all()
                case spdy.PingAcknowledged():
                    self._ping_answered(event.ping_id)
                case spdy.GoAwayReceived():
                    reason = f"the server sent GOAWAY (status {event.status})"
                    for stream in list(streams.values()):
                        if stream.key > event.last_good_stream_id:  # never taken
                            stream._lost(f"{reason} before it took the connection")
                    self._go_away(reason)
                case spdy.SessionTerminated():
                    self._flush()
                    self._lost(f"SPDY protocol error: {event.reason}")
                    if self.transport is not None:
                        self.transport.close()
                    return
        self._flush()

    def _taken(self, sid: int, n: int) -> None:
        """n bytes of stream sid were taken: their windows (the stream's, the session's)
        go back once ACK_EVERY is taken. Not per read: a 1 MiB DATA frame comes in many
        reads, and the server charges more than two WINDOW_UPDATEs per frame it sent to
        its control budget."""
        self._give_back(sid, n)
        self._give_back(0, n)

    def _give_back(self, key: int, n: int) -> None:
        total = self._unacked.get(key, 0) + n
        if total >= ACK_EVERY:
            self.codec.send_window_update(key, total)  # a stream gone: nothing is sent
            self._unacked.pop(key, None)
        else:
            self._unacked[key] = total

    # --- per-stream flow control, where the server honours it ------------------------------
    def pause_stream(self, stream: ForwardStream) -> None:
        if not self._windows:
            super().pause_stream(stream)
        elif stream.key in self.streams:  # not for one already done: nothing would release it
            self._withheld.setdefault(stream.key, 0)

    def resume_stream(self, stream: ForwardStream) -> None:
        if stream.key in self._withheld:
            n = self._withheld.pop(stream.key)
            if n and not self.codec.terminated:
                self._taken(stream.key, n)
                self._flush()
        else:
            super().resume_stream(stream)

    def stream_reading(self, stream: ForwardStream) -> bool:
        return stream.key not in self._withheld and super().stream_reading(stream)

    def _stream_done(self, stream: ForwardStream) -> None:
        self._unacked.pop(stream.key, None)
        self._queues.pop(stream.key, None)
        n = self._withheld.pop(stream.key, 0)
        if n and not self.codec.terminated:  # the session's share of what it held
            self._give_back(0, n)
            self._flush()
        super()._stream_done(stream)


async def open_spdy(conn: UpgradeProtocol, target: Target, ports: list[int],
                    timeout: float) -> ClientSession:
    """POST with Upgrade: SPDY/3.1, as client-go does; ports go per connection. The
    stream protocol versions are offered one header line each, best first, as client-go
    writes its list."""
    offer = "".join(f"X-Stream-Protocol-Version: {v}\r\n" for v in target.versions)
    conn.transport.write(
        f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\nConnection: Upgrade\r\n"
        f"Upgrade: SPDY/3.1\r\n{offer}"
        f"Content-Length: 0\r\n".encode()
        + b"".join(name + b": " + value + b"\r\n" for name, value in target.request_headers())
        + b"\r\n")
    answer = await read_upgrade_answer(conn, target, timeout)
    upgrade = answer.header("upgrade").lower()
    if upgrade != "spdy/3.1":
        raise UpgradeRefused(101, f"the server upgraded to {upgrade!r}, not SPDY/3.1")
    chosen = answer.header("x-stream-protocol-version") or PORTFORWARD_PROTOCOL
    if chosen not in target.versions:
        raise UpgradeRefused(101, f"the server chose stream protocol {chosen!r}")
    return SpdyClientSession.attached(conn, answer.rest, chosen)

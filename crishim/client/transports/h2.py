"""The HTTP/2 client session (crishim's transport, crishim/stream/portforward_h2.py): per
forwarded connection an error stream (HEADERS with END_STREAM) then a data stream, both
`POST :path /portforward/<token>` with streamtype/port/requestid headers. Real flow
control: big windows advertised, the server's windows respected with a bounded queue per
stream that pauses the local reader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from crishim.client.transports.base import (
    REFUSAL_BODY_KEPT,
    Buffer,
    ClientSession,
    ForwardStream,
    SessionClosed,
    SessionError,
    StreamPairSession,
    Target,
    UpgradeProtocol,
    UpgradeRefused,
    reset_by_server,
)
from crishim.protocols.buffers import Outbound
from crishim.protocols.constants import (
    DIAL_ON_DATA,
    H2_CONNECTION_WINDOW,
    H2_STREAM_WINDOW,
    HEADER_DIAL,
    HEADER_PORT,
    HEADER_REQUEST_ID,
    HEADER_STREAM_TYPE,
    PORTFORWARD_PROTOCOL,
    STREAM_TYPE_ERROR,
)
from crishim.protocols.h2 import H2Codec, LiteralHeaderEncoder
from crishim.protocols.negotiation import TCP, VERSION_HEADER

MAX_FRAME_SIZE = 1024 * 1024


class H2ClientSession(StreamPairSession):
    transport_name = "h2"
    opens_ahead = True
    has_ping = True
    codec: H2Codec
    stream_gone = (h2.exceptions.ProtocolError,)
    cancel_code = ErrorCodes.CANCEL
    reads_lent = True

    def __init__(self, authority: str, path: str, scheme: str,
                 versions: Sequence[str] = (PORTFORWARD_PROTOCOL,)) -> None:
        super().__init__()
        # HTTP/2's X-Stream-Protocol-Version: offered on every stream, answered in every
        # response; unknown until the first response arrives
        self.offer = ", ".join(versions)
        self.pair_offer = ((VERSION_HEADER, self.offer),)
        self.stream_version = None
        self.version_known: asyncio.Future[None] = self.loop.create_future()
        # the HTTP status of the connection's first answer: the token's verdict (HTTP/2
        # spends it on the first stream; a used or unknown one is answered 404)
        self.first_status: int | None = None
        self._probe_id = 0
        # our own header lists, built here: h2's outbound checks cost ~20 us per connection
        self.codec = H2Codec(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.codec.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.codec.max_inbound_frame_size = MAX_FRAME_SIZE
        self.codec.encoder = LiteralHeaderEncoder()
        self.base_headers = [(":method", "POST"), (":scheme", scheme),
                             (":authority", authority), (":path", path)]
        self._refusal: dict[int, str] = {}
        self.settings_received: asyncio.Future[None] = self.loop.create_future()
        # streams whose local connection does not take what comes: their data is not
        # acknowledged until it does, so the server stops at the stream's window (16 MiB)
        # while the session's other connections go on (the whole session paused before);
        # the connection window (256 MiB) bounds what 16 such streams hold together
        self._withheld: dict[int, int] = {}

    def begin(self) -> None:
        self.codec.initiate_connection()
        self.codec.increment_flow_control_window(H2_CONNECTION_WINDOW - 65535)
        self._flush()

    # --- streams ------------------------------------------------------------------------
    async def negotiate(self, timeout: float | None = None) -> str | None:
        """The session's stream protocol version; before any stream has been answered,
        asks with a probe: an error stream that never gets its data stream, reset once
        answered (so no server, old or new, dials anything for it)."""
        if timeout is None:
            timeout = self.answer_timeout
        if self.stream_version is None:
            if not self._probe_id:
                self._probe_id = self.codec.get_next_available_stream_id()
                self.codec.send_headers(self._probe_id, self.base_headers + [
                    (HEADER_STREAM_TYPE, STREAM_TYPE_ERROR), (HEADER_PORT, "1"),
                    (HEADER_REQUEST_ID, "version-probe"),
                    (VERSION_HEADER, self.offer)], end_stream=True)
                self._flush()
            done, _ = await asyncio.wait((self.version_known, self.closed), timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if self.stream_version is None:
                why = self.closed.result() if self.closed.done() else f"no answer in {timeout:g}s"
                raise SessionClosed(f"cannot learn the server's stream protocol version: {why}")
        return self.stream_version

    def _version_answered(self, sid: int, version: str | None) -> None:
        if self.stream_version is None:
            self.stream_version = version or PORTFORWARD_PROTOCOL
            if not self.version_known.done():
                self.version_known.set_result(None)
        if sid == self._probe_id:
            try:
                self.codec.reset_stream(sid, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass  # the server already ended it

    def _new_stream(self, port: int, ip_protocol: str = TCP, on_data: bool = False
                    ) -> ForwardStream:
        codec = self.codec
        error_headers, data_headers = self._pair_headers(port, ip_protocol, on_data)
        try:
            error_id = codec.get_next_available_stream_id()
            codec.send_headers(error_id, self.base_headers + error_headers, end_stream=True)
            data_id = codec.get_next_available_stream_id()
            codec.send_headers(data_id, self.base_headers + data_headers)
        except h2.exceptions.ProtocolError as e:
            raise SessionClosed(f"cannot open an HTTP/2 stream: {e}") from None
        return self._register(ForwardStream(self, port, data_id), error_id)

    def _queue(self, stream: ForwardStream) -> Outbound:
        q = self._queues.get(stream.key)
        if q is None:
            q = self._queues[stream.key] = Outbound()
        return q

    def _send(self, stream: ForwardStream, data: Buffer, lent: bool = False) -> None:
        q = self._queue(stream)
        q.append(data if not isinstance(data, bytearray) else bytes(data))
        self._drain(stream.key, q)
        if lent and q.chunks:  # views of the read buffer (write_view): what waits is copied
            q.chunks = [bytes(chunk) for chunk in q.chunks]
        self._flush(lent)

    def _send_eof(self, stream: ForwardStream) -> None:
        q = self._queue(stream)
        q.eof = True
        self._drain(stream.key, q)
        self._flush()

    def _stream_done(self, stream: ForwardStream) -> None:
        self._release(stream.key)  # the connection window, whatever the stream held
        super()._stream_done(stream)
        self._queues.pop(stream.key, None)

    def _goodbye(self) -> None:
        try:
            self.codec.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def _flush(self, lent: bool = False) -> None:
        self._write_raw(self.codec.take_output(), lent)  # DATA payloads as they are

    def _send_ping_frame(self) -> bytes:
        payload = time.monotonic_ns().to_bytes(8, "big")
        try:
            self.codec.ping(payload)
        except h2.exceptions.ProtocolError as e:  # the connection is closing
            raise SessionClosed(f"cannot send a PING: {e}") from None
        return payload

    # --- input --------------------------------------------------------------------------
    def receive(self, data: bytes | memoryview, lent: bool = False) -> None:
        try:
            events = self.codec.receive_data(data, lent=lent)
        except h2.exceptions.ProtocolError as e:
            self._flush()
            self._lost(f"HTTP/2 protocol error: {e}")
            if self.transport is not None:
                self.transport.close()
            return
        acks: dict[int, int] = {}  # acknowledged once per stream for the whole read
        if self._receive_events(events, acks):
            self._acknowledge(acks)
            self._flush()

    def _acknowledge(self, acks: dict[int, int]) -> None:
        for sid, n in acks.items():
            self.codec.acknowledge_received_data(n, sid)
        acks.clear()

    def _receive_events(self, events: list[h2.events.Event], acks: dict[int, int]) -> bool:
        """Act on one read's events; False once the server's GOAWAY ended the session."""
        for ev in events:
            match ev:
                case h2.events.DataReceived():  # the hot one: tested first
                    self._on_data(ev, acks)
                case h2.events.ResponseReceived():
                    status = _response_header(ev.headers, ":status") or "0"
                    if self.first_status is None:
                        self.first_status = (int(status) if status.isascii()
                                             and status.isdigit() else 0)
                    self._version_answered(ev.stream_id,
                                           _response_header(ev.headers, VERSION_HEADER))
                    stream = (self.streams.get(ev.stream_id)
                              or self._error_streams.get(ev.stream_id))
                    if status == "200":
                        if stream is not None and ev.stream_id == stream.key:
                            stream._accepted()
                            if stream.opened_ahead:
                                self._answered_ahead(stream, _response_header(
                                    ev.headers, HEADER_DIAL) == DIAL_ON_DATA)
                    else:
                        self._refusal[ev.stream_id] = f"HTTP {status}: "
                case h2.events.StreamEnded():
                    self._stream_ended(ev.stream_id, False, None)
                case h2.events.StreamReset():
                    self._stream_ended(ev.stream_id, True, ev.error_code)
                case h2.events.WindowUpdated():
                    ids = list(self._queues) if ev.stream_id == 0 else [ev.stream_id]
                    for sid in ids:
                        q = self._queues.get(sid)
                        if q is not None:
                            self._drain(sid, q)
                case h2.events.RemoteSettingsChanged():
                    if not self.settings_received.done():
                        self.settings_received.set_result(None)
                case h2.events.PingAckReceived():
                    self._ping_answered(ev.ping_data)
                case h2.events.ConnectionTerminated():
                    self._acknowledge(acks)
                    self._flush()
                    extra = ev.additional_data.decode("utf-8", "replace") \
                        if ev.additional_data else ""
                    code = ev.error_code  # as SPDY's: "status N", and the code's name
                    name = getattr(code, "name", "") if code else ""
                    self._lost(f"the server sent GOAWAY (status {int(code or 0)}"
                               f"{' ' + name if name else ''}{': ' + extra if extra else ''})")
                    return False
        return True

    def _on_data(self, ev: h2.events.DataReceived, acks: dict[int, int]) -> None:
        sid = ev.stream_id
        if ev.flow_controlled_length:
            if sid in self._withheld:
                self._withheld[sid] += ev.flow_controlled_length
            else:
                acks[sid] = acks.get(sid, 0) + ev.flow_controlled_length
        stream = self.streams.get(sid)
        if sid in self._refusal:
            kept = self._refusal[sid]
            if len(kept) < REFUSAL_BODY_KEPT:  # the rest of a refusal's body is not kept
                self._refusal[sid] = kept + bytes(ev.data[:REFUSAL_BODY_KEPT - len(kept)]
                                                  ).decode("utf-8", "replace")
        elif stream is not None:
            stream._data(ev.data)
        else:
            stream = self._error_streams.get(sid)
            if stream is not None:
                stream._error_data(bytes(ev.data).decode("utf-8", "replace"))

    # --- per-stream flow control towards the server -----------------------------------------
    def pause_stream(self, stream: ForwardStream) -> None:
        if stream.key in self.streams:  # not for one already done: nothing would release it
            self._withheld.setdefault(stream.key, 0)

    def resume_stream(self, stream: ForwardStream) -> None:
        self._release(stream.key)

    def stream_reading(self, stream: ForwardStream) -> bool:
        return stream.key not in self._withheld

    def _release(self, sid: int) -> None:
        n = self._withheld.pop(sid, 0)
        if n and self.codec.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self.codec.acknowledge_received_data(n, sid)  # the connection's share too
            self._flush()

    def _stream_ended(self, sid: int, reset: bool, code: ErrorCodes | int | None) -> None:
        refusal = self._refusal.pop(sid, None)
        stream = self.streams.get(sid)
        if stream is not None:
            if refusal is not None:
                stream._remote_reset(f"the server refused the stream ({refusal.strip()})")
            elif reset:
                number = int(code or 0)
                stream._remote_reset(reset_by_server(
                    number, code.name if isinstance(code, ErrorCodes) else None))
            else:
                stream._remote_eof()
            return
        stream = self._error_streams.get(sid)
        if stream is not None:
            if refusal is not None:
                stream.failure = f"the server refused the stream ({refusal.strip()})"
                stream._remote_reset(stream.failure)
            stream._error_end()

    def transport_lost(self, exc: Exception | None) -> None:
        if not self.settings_received.done():
            self.settings_received.set_exception(SessionError(
                "the server closed the connection before its HTTP/2 SETTINGS"))
            # open_h2 may have given up waiting (timeout, Ctrl-C): then nobody awaits it,
            # and asyncio would print the error as "never retrieved"
            self.settings_received.exception()
        super().transport_lost(exc)

    def transport_eof(self) -> None:
        self.transport_lost(None)


def _response_header(headers: Iterable[tuple[bytes | str, bytes | str]] | None,
                     name: str) -> str | None:
    """A response header's value (str with the header_encoding we configure; typed as
    bytes), or None."""
    for key, value in headers or ():
        if key in (name, name.encode("latin-1")):
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


async def open_h2(conn: UpgradeProtocol, target: Target, ports: list[int],
                  timeout: float) -> ClientSession:
    """HTTP/2 with prior knowledge (h2c) or TLS ALPN h2; done once the server's SETTINGS
    arrive (the token is redeemed by the first stream). Ports go per connection."""
    if target.headers:
        raise ValueError("extra headers are not supported by the h2 transport")
    ssl_object = conn.transport.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        raise UpgradeRefused(0, f"the server at {target.netloc} did not negotiate h2 by ALPN "
                                f"(got {ssl_object.selected_alpn_protocol()!r})")
    session = H2ClientSession(target.netloc, target.path, target.scheme, target.versions)
    # the preface first: a server's SETTINGS that came with the connect (any server that
    # writes its own at accept, as h2 and Go's do) would be acknowledged ahead of it
    session.transport = conn.transport
    session.begin()
    conn.attach(session, bytes(conn.buffer))
    try:
        async with asyncio.timeout(timeout):  # (not wait_for: see read_upgrade_answer)
            await asyncio.shield(session.settings_received)
    except TimeoutError:
        raise SessionError(f"no HTTP/2 SETTINGS from {target.netloc} in {timeout:g}s") from None
    return session

"""Port-forward over HTTP/2 (docs/protocol.md §5), with the `h2` library as the codec.

Getting onto HTTP/2 (all three end in the same session):
- prior knowledge: the connection starts with the HTTP/2 preface (h2c, or TLS without
  ALPN); the FIRST request stream's `:path /portforward/<token>` redeems the token;
- `Upgrade: h2c` (with `HTTP2-Settings`): the upgrade request's path redeemed the token;
  the server answers `101`, and stream 1 (the upgrade request itself) is answered
  `:status 200` with an empty body and carries no forward;
- TLS with ALPN `h2`: as prior knowledge.
The token then holds for that connection only: every later stream must carry the same
`:path`; the token cannot be redeemed again elsewhere.
Until its token is redeemed a prior-knowledge connection is a pending request, like an
HTTP/1.1 request head: it must get there within stream_request_timeout, its frames other
than DATA may not exceed 16 KiB (CONTINUATION included; else GOAWAY ENHANCE_YOUR_CALM),
its connection window stays at the 64 KiB default, and it is not a session (it does not
count against max_sessions; it counts against max_unadmitted).

The mapping: each SPDY stream of docs/protocol.md §2.3 becomes one HTTP/2 request stream, so one
forwarded TCP connection is a PAIR of streams sharing a `requestid`, exactly as on SPDY:

    :method POST   :path /portforward/<token>   streamtype: error|data   port: N
    requestid: <any string>   (absent: error stream's id is its stream id, the data
                               stream's is its stream id minus 2, as on SPDY)

- The client opens the error stream first (HEADERS with END_STREAM: it only reads it),
  then the data stream. Data sent on a data stream before its error stream arrives is
  held (not acknowledged), not dropped.
- Each accepted stream is answered `:status 200` at once. A refused stream gets a
  complete response with a plain-text reason and END_STREAM (then RST_STREAM NO_ERROR if
  the client was still sending): `400` bad or missing `streamtype`/`port`, a second
  stream of one type for a request id (pending or live), or a different port; `404`
  another path/token on this connection, or (first stream only) an unknown, used or
  expired token or sandbox; `405` a method other than POST; `410` sandbox gone; `429`
  too many sessions; `503` draining (first stream). Once the server drains (SIGTERM), new
  streams get RST_STREAM REFUSED_STREAM while live ones go on; GOAWAY NO_ERROR comes with
  the close at the drain deadline (an h2-library peer that gets a GOAWAY refuses all
  later frames). A refused FIRST stream (bad token) is followed by GOAWAY and the
  connection closes: without a token it has no business.
- Data stream: DATA flows both ways. The client's END_STREAM is a TCP half-close
  (shutdown write) towards the pod; the pod's EOF is END_STREAM to the client. A failed
  connection (refused, reset or broken pipe from the pod) is RST_STREAM CANCEL on the data
  stream; the client's RST_STREAM on it ends the pod connection.
- Error stream: closed with END_STREAM at the pod's EOF or when the forwarded connection
  ends, whichever is first (crishim/forward.py). Its body is empty unless the failure is
  fatal (sandbox gone, or error_policy=verbose): then the body is the reason as UTF-8
  text, just as SPDY's error stream.
- A pair not complete within stream_creation_timeout: the reason on the error stream, the
  data stream reset CANCEL.
- The client's RST_STREAM on the error stream is ignored.

Flow control is real and per stream: the server advertises a quarter of
session_buffer_size per stream and session_buffer_size for the connection (taken from the
server's buffer_budget), and acknowledges received DATA only for bytes the pod socket took:
a pod dialling or with bytes left in its write buffer gets its acknowledgements when it
drains, so one slow pod stalls only its own stream and crishim holds at most the
connection window towards the pods. Control frames and stream opens are budgeted (GOAWAY
ENHANCE_YOUR_CALM past the budget, see ServerSession.within_control_budget). Sending,
it respects the client's windows: a stream out of window keeps a bounded queue and stops
reading its pod socket until WINDOW_UPDATE. Malformed HTTP/2 gets GOAWAY with h2's error
code (COMPRESSION_ERROR for a header block that cannot be decoded) and the connection is
closed; other connections are untouched. What RFC 9113 makes a stream error where h2
ends the connection (a stream depending on itself, a body other than its content-length,
a second HEADERS that does not end the stream) is RST_STREAM PROTOCOL_ERROR on that stream
alone, handled as the client's reset (protocols/h2.py H2Codec._stream_error_reason).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar, cast

import h2.config
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

from crishim.flow import plain_socket_fd
from crishim.forward import ForwardedConnection
from crishim.forward_udp import ForwardedFlow
from crishim.protocols.buffers import Outbound
from crishim.protocols.constants import DIAL_ON_DATA, HEADER_DIAL, PORTFORWARD_PROTOCOL
from crishim.protocols.h2 import (
    MAX_SETTINGS_ENTRIES,
    H2Codec,
    LiteralHeaderEncoder,
    Overloaded,
    StreamError,
)
from crishim.protocols.negotiation import VERSION_HEADER, choose_version, server_versions
from crishim.runtime import Sandbox
from crishim.stream.admission import MAX_REQUEST_HEAD, Admit, Refused, h2_refusal, redact
from crishim.stream.pairing import PendingPair
from crishim.stream.session import (
    PairChannel,
    PairedStreamSession,
    SessionProtocol,
    SessionSettings,
    Upgrade,
    WriteBuffers,
    close_client,
    stream_window,
)

log = logging.getLogger("crishim.h2")

MAX_FRAME_SIZE = 256 * 1024  # measured: better than 64 KiB or 1 MiB frames here
STREAMS_PER_CONNECTION = 2  # an error and a data stream per forwarded connection
SPARE_STREAMS = 8  # the version probe and streams whose pair has not arrived yet
MAX_HEADER_LIST_SIZE = 16 * 1024
DEFAULT_WINDOW = 65535  # what every connection and stream may send before SETTINGS


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def settings_header(value: str) -> bytes:
    """HTTP2-Settings is a SETTINGS payload in base64url without padding (RFC 7540
    3.2.1); returned padded, as h2 decodes it. ValueError if it is not one."""
    text = value.strip()
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("HTTP2-Settings is not base64url")
    text += "=" * (-len(text) % 4)
    payload = base64.urlsafe_b64decode(text)
    if len(payload) % 6:
        raise ValueError(f"HTTP2-Settings decodes to {len(payload)} bytes, not a whole "
                         "number of 6-byte settings")
    if len(payload) > 6 * MAX_SETTINGS_ENTRIES:  # as a SETTINGS frame may carry
        raise ValueError(f"HTTP2-Settings carries {len(payload) // 6} settings (at most "
                         f"{MAX_SETTINGS_ENTRIES})")
    return text.encode("ascii")


def _check_method(headers: dict[str, str]) -> None:
    if headers.get(":method") != "POST":
        raise Refused(405, f"method {headers.get(':method')} not allowed; port-forward "
                           "streams are POST", [("allow", "POST")])


_E = TypeVar("_E", bound=h2.events.Event)


class H2PortForwardSession(PairedStreamSession):
    """Drives one H2Connection: admits streams, pairs them, pumps bytes with flow control.

    By prior knowledge, `sandbox` and `path` are None until `admit` redeems the first
    stream's token; until then the connection is a pending request: its frames other
    than DATA may not exceed MAX_REQUEST_HEAD (CONTINUATION included), the connection
    window stays at its 64 KiB default and no idle timer runs (the server's request
    timeout bounds it). `on_admitted` is called once the token is redeemed."""

    transport_name = "h2"
    protocol_log = log
    cancel_code = ErrorCodes.CANCEL
    base_window = DEFAULT_WINDOW
    borrows_reads = True  # DATA pieces are views of the read, written before it returns

    def __init__(self, settings: SessionSettings, writelines: WriteBuffers,
                 close: Callable[[], None], *, admit: Admit | None = None,
                 sandbox: Sandbox | None = None, path: str | None = None,
                 upgraded: bool = False) -> None:
        super().__init__(settings.ctx, sandbox, settings.idle_timeout,
                         settings.creation_timeout, close)
        self.path = path
        self.admit = admit
        self.on_admitted: Callable[[], None] | None = None
        self.refusal_log = settings.refusal_log
        self._upgraded = upgraded
        self._writelines = writelines
        # the client's headers are checked; our own responses are built here
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                           validate_inbound_headers=True,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.codec = H2Codec(config=config)
        self.codec.local_settings = h2.settings.Settings(client=False, initial_values={
            # as many forwarded connections as any other session may hold
            # (max_connections_per_session, or half the descriptors): the codec's stream
            # count does not grow with them (protocols/h2.py)
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                STREAMS_PER_CONNECTION * settings.ctx.max_per_session + SPARE_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE:
                stream_window(settings.ctx.flood.session_buffer_size, DEFAULT_WINDOW),
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.codec.max_inbound_frame_size = MAX_FRAME_SIZE
        # the advertised list size from the first header block on, not once the client
        # acknowledged it: hpack took 64 KiB lists (its default) until then
        self.codec.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.codec.charge_frame = self._charge_frame
        self.codec.encoder = LiteralHeaderEncoder()  # responses: the same fields each time
        self._settings_acknowledged = False  # start()'s SETTINGS, by the client
        self._lower_windows_to: int | None = None  # stream windows once it is
        self._live_requests: dict[str, ForwardedConnection | ForwardedFlow] = {}  # request id
        self._version_chosen = False  # at the first forwarding stream, for the session
        self._held_acks: dict[int, int] = {}  # data stream id -> bytes not yet acknowledged
        self._read_acks: dict[int, int] | None = None  # DATA of the read being processed
        self._admitting: list[h2.events.Event] | None = None  # events queued while redeeming
        self._head_bytes = 0  # bytes of frames other than DATA before admission
        self._goaway_sent = False
        self._draining = False

    @property
    def admitted(self) -> bool:
        return self.path is not None

    @property
    def admitting(self) -> bool:
        """The first stream's admission is under way (its token may be redeemed)."""
        return self._admitting is not None

    # --- start -------------------------------------------------------------------------
    def start(self) -> None:
        if self._upgraded:
            # initiate_upgrade_connection ran before the 101; stream 1 is the upgrade
            # request itself: answer it, it carries no forward
            self.codec.send_headers(1, [(":status", "200")], end_stream=True)
        else:
            self.codec.initiate_connection()
        if self.admitted:
            self._open_connection_window()
        self.flush()

    def _open_connection_window(self) -> None:
        """The connection's receive window is what it may hold towards pods (the pods'
        sockets took everything acknowledged): up to session_buffer_size, taken from the
        budget as the client fills it (_window_filled), from HTTP/2's 64 KiB. Taken whole
        at admission, 32 sessions that never sent a byte spent the default budget, and
        other clients' channel sessions were closed 1013. The stream windows are set by
        what the budget could give now."""
        room = self.ctx.window_room()
        self._window_limit = self.ctx.flood.session_buffer_size - DEFAULT_WINDOW
        window = stream_window(room, DEFAULT_WINDOW)
        if window < stream_window(self.ctx.flood.session_buffer_size, DEFAULT_WINDOW):
            # less granted than start() announced for: smaller stream windows, in a
            # SETTINGS of their own once the client acknowledged start()'s (h2 takes an
            # acknowledgement for the oldest change pending, and start()'s values were
            # never pending: a client that sent on the larger windows before
            # acknowledging them was past the smaller)
            self._lower_windows_to = window
            if self._settings_acknowledged:
                self._lower_windows()
        self.arm_idle_timer()

    def _window_grown(self, more: int) -> None:
        self.codec.increment_flow_control_window(more)
        # h2's manager takes the window for what is left of it now (less what is
        # outstanding): the whole of it, or h2 gives back less than was granted
        self.codec.inbound_window_max(DEFAULT_WINDOW + self._window_granted)

    def _lower_windows(self) -> None:
        window, self._lower_windows_to = self._lower_windows_to, None
        if window is not None:
            self.codec.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})

    # --- output ------------------------------------------------------------------------
    def flush(self) -> None:
        if self.output_held:
            return  # release_output() flushes
        out = self.codec.take_output()
        if out and not self._closed:
            if self.lending:  # DATA is a view of a pod read: out now, or copied
                self.write_lent(out)
            else:
                self._writelines(out)  # DATA payloads go out as they are: no join

    def queue_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Send what the window allows, queue the rest; False when the stream is blocked."""
        codec = self.codec
        if stream_id not in self._outbound and len(data) <= min(
                codec.max_outbound_frame_size, codec.local_flow_control_window(stream_id)):
            try:  # the common case: nothing queued, the window has room
                codec.send_data(stream_id, data)
            except h2.exceptions.ProtocolError:
                pass  # stream reset or closed by the client meanwhile
            return True
        return self._queue_more(stream_id, data)

    def queue_eof(self, stream_id: int) -> None:
        self._queue_end(stream_id)

    def _session_send_window(self) -> int:
        return self.codec.outbound_flow_control_window

    def _stream_send_window(self, stream_id: int) -> int:
        try:
            return self.codec.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:  # gone: what it reads is dropped
            return 1 << 40

    def _stream_send_window_alone(self, stream_id: int) -> int:
        stream = self.codec.streams.get(stream_id)
        return 1 << 40 if stream is None else stream.outbound_flow_control_window

    def _send_queued(self, stream_id: int, out: Outbound) -> bool:
        try:
            return self.codec.send_queued(stream_id, out)
        except h2.exceptions.ProtocolError:
            return True  # stream reset or closed by the client meanwhile: nothing to send

    def reset(self, stream_id: int, code: int) -> None:
        self._forget_outbound(stream_id)
        try:
            self.codec.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed: nothing to reset

    def _refuse_stream(self, stream_id: int, refused: Refused, client_done: bool) -> None:
        headers, body = h2_refusal(refused)
        if self._version_chosen:
            headers = [*headers, (VERSION_HEADER, self.stream_version)]
        try:
            self.codec.send_headers(stream_id, headers)
        except h2.exceptions.ProtocolError:
            return
        self.queue_data(stream_id, body)
        self.queue_eof(stream_id)
        if not client_done:
            self.reset(stream_id, ErrorCodes.NO_ERROR)

    # --- input -------------------------------------------------------------------------
    def receive(self, data: bytes | memoryview) -> None:
        if self._closed:
            return
        self.last_activity = time.monotonic()
        lent = type(data) is not bytes
        self.borrowing = lent
        try:
            self._receive(data, lent)
        finally:
            self.borrowing = False

    def _receive(self, data: bytes | memoryview, lent: bool) -> None:
        # the window still growing: what the client may send before this read
        window_before = (self.codec.inbound_flow_control_window
                         if self._window_granted < self._window_limit else None)
        try:
            events = self.codec.receive_data(data, lent=lent)
        except Overloaded as e:
            self.flush()  # h2 queued GOAWAY ENHANCE_YOUR_CALM
            self._goaway_sent = True
            self.violated(str(e))
            return
        except h2.exceptions.ProtocolError as e:
            code = getattr(e, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
            self.refusal_log.log(
                logging.INFO, "h2 sandbox=%s: malformed HTTP/2 (%s), GOAWAY %s: %s",
                self.sandbox_id, type(e).__name__, getattr(code, "name", code), e)
            self.flush()  # h2 queued the GOAWAY
            self._goaway_sent = True
            self.close(f"HTTP/2 protocol error: {e}")
            return
        if not self.admitted:
            # before a token, header frames are bounded like an HTTP/1.1 request head
            self._head_bytes += len(data) - sum(
                e.flow_controlled_length or 0 for e in events
                if isinstance(e, h2.events.DataReceived))
            if self._head_bytes > MAX_REQUEST_HEAD:
                self.refusal_log.log(
                    logging.INFO, "h2: more than %d bytes of frames before a token was "
                    "redeemed, GOAWAY ENHANCE_YOUR_CALM", MAX_REQUEST_HEAD)
                self._send_goaway(ErrorCodes.ENHANCE_YOUR_CALM)
                self.close("request head too large")
                return
        # one pod write per forwarded connection and one acknowledgement per stream for
        # the whole read, not one per DATA frame
        self._read_acks = acks = dict[int, int]()
        self.begin_batch()
        try:
            self._dispatch(events)
        finally:
            self._read_acks = None
            self.end_batch()
        if window_before is not None:
            self._window_filled(window_before - self.codec.inbound_flow_control_window)
        for sid, n in acks.items():
            # after the pod writes: a pod socket that just became congested holds its acks
            self._ack_unless_congested(sid, n)
        if not self._closed:
            self._send_raised()
        self.flush()

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if self._closed:
                break
            if self._admitting is not None and isinstance(event, _QUEUED_WHILE_ADMITTING):
                self._queue_while_admitting(self._admitting, event)
                continue
            try:
                self._handle(event)
            except Exception as e:  # a bug on one stream must not end the session
                self._event_failed(event, e)

    def _queue_while_admitting(self, queued: list[h2.events.Event],
                               event: h2.events.Event) -> None:
        """Keep an event until the first stream's token is redeemed: consecutive DATA of
        one stream joined into one event (1-byte frames cost a byte each, not an event)."""
        last = queued[-1] if queued else None
        if isinstance(event, h2.events.DataReceived) and \
                isinstance(last, h2.events.DataReceived) and \
                last.stream_id == event.stream_id and event.data:
            data = cast("bytes | bytearray", last.data)
            if type(data) is not bytearray:
                data = bytearray(data or b"")
                last.data = cast("bytes", data)  # what _on_data reads as it reads bytes
            data += event.data
            last.flow_controlled_length = (last.flow_controlled_length or 0) + \
                (event.flow_controlled_length or 0)
            return
        queued.append(self._kept(event))

    def _handle(self, event: h2.events.Event) -> None:
        match event:
            case h2.events.DataReceived():  # the hot one: tested first
                self._on_data(event)
            case h2.events.RequestReceived():
                self._on_request(event)
            case h2.events.StreamEnded():
                self._on_stream_ended(event)
            case h2.events.StreamReset():
                self._on_reset(event)
            case h2.events.WindowUpdated():
                self._on_window_updated(event)
            case h2.events.RemoteSettingsChanged():
                self._on_settings_changed(event)
            case h2.events.SettingsAcknowledged():
                self._on_settings_acknowledged(event)
            case h2.events.ConnectionTerminated():
                self._on_terminated(event)

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        client_done = ev.stream_ended is not None
        # header_encoding="utf-8": h2 hands over str
        headers = cast("dict[str, str]", dict(ev.headers or ()))
        sid = ev.stream_id
        if not self.admitted:
            self._admitting = []
            asyncio.get_running_loop().create_task(self._admit(ev, headers))
            return
        if self._goaway_sent or self._draining:
            self.protocol_error("h2 sandbox=%s: refusing stream %d: shutting down",
                                self.sandbox_id, sid, logger=log)
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            if headers.get(":path") != self.path:
                raise Refused(404, "this HTTP/2 connection serves only the path whose token "
                                   "it redeemed")
            _check_method(headers)
            self._pair(sid, headers)
        except Refused as e:
            self.protocol_error("h2 sandbox=%s: refusing stream %d: %d %s", self.sandbox_id,
                                sid, e.status, e, logger=log)
            self._refuse_stream(sid, e, client_done)
            # a refusal is answered with a whole response: charged, as a frame in error
            self.charge_control("refused streams")

    async def _admit(self, ev: h2.events.RequestReceived, headers: dict[str, str]) -> None:
        """Prior knowledge: the first stream's path redeems the connection's token."""
        sid = ev.stream_id
        path = headers.get(":path", "")
        client_done = ev.stream_ended is not None
        assert self.admit is not None, "a connection without a token needs an admission"
        try:
            admitted = await self.admit(headers.get(":method", ""), path, ("POST",))
        except Refused as e:
            if self._closed:
                return
            self.refusal_log.log(
                logging.INFO, "h2 stream request %s %s refused: %d %s",
                headers.get(":method"), redact(path), e.status, e)
            self._refuse_stream(sid, e, client_done)
            self.close(f"first stream refused: {e}")  # without a token it has no business
            return
        except Exception as e:  # a plugin bug ends this connection, not the server
            self.refusal_log.log(logging.ERROR, "h2: admitting the first stream failed: %s: %s",
                                 type(e).__name__, e, traceback_of=e)
            if not self._closed:
                self._refuse_stream(sid, Refused(500, f"internal error: {e}"), client_done)
                self._send_goaway(ErrorCodes.INTERNAL_ERROR)
                self.close("internal error")
            return
        if self._closed:
            return
        self.sandbox = admitted.sandbox
        self.path = path
        self._open_connection_window()
        queued, self._admitting = self._admitting or [], None
        log.debug("h2 session admitted: sandbox=%s", self.sandbox_id)
        if self.on_admitted is not None:
            self.on_admitted()
        self._on_request(ev)
        self._dispatch(queued)
        self.flush()

    def _choose_version(self, headers: dict[str, str]) -> None:
        """The session's stream protocol version, from its first forwarding stream's offer
        (HTTP/2's form of X-Stream-Protocol-Version: a request header, answered in every
        response)."""
        if not self._version_chosen:
            self._version_chosen = True
            offered = headers.get(VERSION_HEADER, "").split(",")
            self.stream_version = (choose_version(offered, server_versions(self.ctx.udp))
                                   or PORTFORWARD_PROTOCOL)

    def _pair(self, sid: int, headers: dict[str, str]) -> None:
        self._choose_version(headers)
        pair = self._pairs.add(sid, headers, live=self._live_requests,
                               version=self.stream_version)
        response = [(":status", "200"), (VERSION_HEADER, self.stream_version)]
        if pair.on_data and sid == pair.data_id:
            response.append((HEADER_DIAL, DIAL_ON_DATA))
        try:
            self.codec.send_headers(sid, response)
        except h2.exceptions.ProtocolError:
            pass  # the client already reset it: its StreamReset event cleans up
        if not pair.complete:
            return
        channel = PairChannel(self, pair.data_id, pair.error_id, pair.request_id)
        conn = self.open_forward(pair.port, channel, pair.protocol, pair.on_data)
        channel.conn = conn
        if conn.done:
            return
        self._by_stream[pair.data_id] = conn
        self._live_requests[pair.request_id] = conn
        if pair.held is not None:  # what came before the pair, in one piece
            held, pair.held = pair.held, None
            self._forward_data(pair.data_id, conn, memoryview(held), pair.held_length)
        if pair.held_end and not conn.done:
            conn.client_eof()

    def _cancel_pending_data(self, pair: PendingPair) -> None:
        self._ack(pair.data_id, pair.held_length)  # while the stream is open to take it
        self.reset(pair.data_id, ErrorCodes.CANCEL)

    def _reset_failed_stream(self, stream_id: int) -> None:
        self.reset(stream_id, ErrorCodes.INTERNAL_ERROR)

    def _ack(self, stream_id: int, n: int) -> None:
        if n > 0:
            try:
                self.codec.acknowledge_received_data(n, stream_id)
            except h2.exceptions.ProtocolError:
                pass  # connection already closing

    def _ack_unless_congested(self, stream_id: int, n: int) -> None:
        """Acknowledged now, or held while the stream's window is withheld."""
        conn = self._by_stream.get(stream_id)
        if conn is not None and self._withheld(conn):
            self._held_acks[stream_id] = self._held_acks.get(stream_id, 0) + n
        else:
            self._ack(stream_id, n)

    def _give_back_withheld(self, stream_id: int) -> None:
        self._ack(stream_id, self._held_acks.pop(stream_id, 0))

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        sid = ev.stream_id
        conn = self._by_stream.get(sid)
        if conn is None:
            pair = self._pairs.by_stream.get(sid)
            if pair is not None and sid == pair.data_id:
                # kept until the pair completes, acknowledged once it flows: appended to one
                # buffer (copied out of a lent read), never an object per frame, so 1-byte
                # frames cost a byte each and the pair's completion forwards them at once
                self._pairs.hold(pair, ev.data)
                pair.held_length += ev.flow_controlled_length
                return
            self._ack(sid, ev.flow_controlled_length)  # error stream or ended: discard
            return
        self._forward_data(sid, conn, ev.data, ev.flow_controlled_length)

    def _forward_data(self, sid: int, conn: ForwardedConnection | ForwardedFlow,
                      data: bytes | memoryview, flow_controlled: int) -> None:
        conn.client_data(data)  # an empty frame dials a pair opened ahead
        acks = self._read_acks
        if acks is not None:
            acks[sid] = acks.get(sid, 0) + flow_controlled
        else:
            self._ack_unless_congested(sid, flow_controlled)

    def _kept(self, event: _E) -> _E:
        """An event kept past the read it came in: its data copied out of a lent read."""
        if self.borrowing and isinstance(event, h2.events.DataReceived) and event.data:
            event.data = bytes(event.data)
        return event

    def _on_stream_ended(self, ev: h2.events.StreamEnded) -> None:
        conn = self._by_stream.get(ev.stream_id)
        if conn is not None:
            conn.client_eof()
            return
        pair = self._pairs.by_stream.get(ev.stream_id)
        if pair is not None and ev.stream_id == pair.data_id:
            pair.held_end = True

    def _on_reset(self, ev: h2.events.StreamReset) -> None:
        sid = ev.stream_id
        if isinstance(ev, StreamError):  # the codec reset it: as though the client had
            self.protocol_error("h2 sandbox=%s: stream %d reset PROTOCOL_ERROR: %s",
                                self.sandbox_id, sid, ev.reason, logger=log)
        self._forget_outbound(sid)
        conn = self._by_stream.get(sid)
        if conn is not None:
            channel = conn.channel
            if isinstance(channel, PairChannel):
                channel.data_closed = True
            conn.client_reset()
            return
        pair = self._pairs.by_stream.get(sid)
        if pair is not None:
            self._pairs.forget(pair)
            if sid == pair.data_id:  # what it held goes: the connection's window comes back
                self._ack(sid, pair.held_length)
            other = pair.error_id if sid == pair.data_id else pair.data_id
            if other == pair.error_id and other:
                self.queue_eof(other)
            elif other:
                self.reset(other, ErrorCodes.CANCEL)

    def _on_window_updated(self, ev: h2.events.WindowUpdated) -> None:
        if not self._outbound:
            return
        if ev.stream_id:
            self._window_opened(ev.stream_id)
        else:
            self._session_window_opened()

    def _on_settings_changed(self, ev: h2.events.RemoteSettingsChanged) -> None:
        change = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
        if self._outbound and change is not None and \
                change.new_value > (change.original_value or 0):
            self._initial_windows_raised()

    def _on_settings_acknowledged(self, ev: h2.events.SettingsAcknowledged) -> None:
        """The client acknowledged start()'s SETTINGS: smaller stream windows waiting for
        that (_open_connection_window) are sent now. It acknowledged those: they are in
        force, and as h2 gives a stream window back only as bytes are acknowledged, and a
        stream that had reached its new, smaller window sends none, what was acknowledged
        before is reconsidered here once (held windows stay held)."""
        if not self._settings_acknowledged:  # start()'s
            self._settings_acknowledged = True
            self._lower_windows()
            self.flush()
            return
        change = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
        if change is None or change.new_value >= (change.original_value or 0):
            return
        for sid in list(self.codec.streams):
            try:
                self.codec.acknowledge_received_data(0, sid)
            except h2.exceptions.ProtocolError:
                return  # connection already closing
        self.flush()

    def _on_terminated(self, ev: h2.events.ConnectionTerminated) -> None:
        log.debug("h2 sandbox=%s: client sent GOAWAY (%s)", self.sandbox_id, ev.error_code)
        self._goaway_sent = True  # h2 sends nothing more after a GOAWAY either way
        self.close("client sent GOAWAY")

    # --- per-stream backpressure -------------------------------------------------------
    def pause_client_reading(self, key: object) -> None:
        """A congested pod withholds its stream's window, it does not stop the connection
        (a client that does not read what is written does: pause_writing)."""
        self._withhold(key)

    def resume_client_reading(self, key: object) -> None:
        self._release_withheld(key)

    def connection_finished(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        super().connection_finished(conn)
        self._forget_withheld(conn)
        channel = conn.channel
        if isinstance(channel, PairChannel):
            self._by_stream.pop(channel.data_id, None)
            self._live_requests.pop(channel.request_id, None)
            self._give_back_withheld(channel.data_id)

    # --- budgets ----------------------------------------------------------------------
    def _charge_frame(self, frame: Frame, opens_stream: bool) -> None:
        """The codec's hook: stream opens and control frames against the session's
        budgets; Overloaded (GOAWAY ENHANCE_YOUR_CALM) past them."""
        if opens_stream:
            if not self.within_stream_budget():
                raise Overloaded(self.stream_overrun())
            return
        if isinstance(frame, RstStreamFrame) and frame.stream_id in self._by_stream:
            return  # how a client ends a live connection: free
        if not self.within_control_budget():
            raise Overloaded(self.control_overrun(type(frame).__name__))

    # --- goodbye, draining -------------------------------------------------------------
    def _send_goaway(self, code: ErrorCodes) -> None:
        """GOAWAY written beside h2, whose state machine would refuse every later frame
        on live streams once it sent one itself."""
        if self._goaway_sent or self._closed:
            return
        self._goaway_sent = True
        self.flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.codec.highest_inbound_stream_id
        frame.error_code = code
        self._writelines([frame.serialize()])

    def goodbye(self, reason: str, violation: bool) -> None:
        self._send_goaway(ErrorCodes.ENHANCE_YOUR_CALM if violation else ErrorCodes.NO_ERROR)

    def drain(self) -> None:
        """Server shutting down: new streams are refused, live ones may finish. No GOAWAY
        yet: an h2-library peer that receives one refuses every later frame, even DATA on
        live streams; the GOAWAY goes with the close at the drain deadline. Pairs opened
        ahead are reset: they would be new connections."""
        self._draining = True
        if not self._closed:
            self.drop_unused_ahead("crishim is shutting down")
            self.flush()


_QUEUED_WHILE_ADMITTING = (h2.events.RequestReceived, h2.events.DataReceived,
                           h2.events.StreamEnded, h2.events.StreamReset)



def start_upgrade(upgrade: Upgrade) -> None:
    """`Upgrade: h2c`: the request's path already redeemed the token."""
    transport, request = upgrade.transport, upgrade.request
    values = request.header_values("http2-settings")
    if len(values) != 1:
        raise Refused(400, "Upgrade: h2c needs exactly one HTTP2-Settings header")
    try:
        settings = settings_header(values[0])
    except (binascii.Error, ValueError) as e:
        raise Refused(400, str(e)) from None
    session = H2PortForwardSession(upgrade.settings, transport.writelines,
                                   lambda: close_client(transport, session.violated_budget),
                                   sandbox=upgrade.admitted.sandbox, path=request.target,
                                   upgraded=True)
    session.lent_fd = plain_socket_fd(transport)  # pod reads written from the read buffer
    try:
        session.codec.initiate_upgrade_connection(settings)
    except (h2.exceptions.ProtocolError, HyperframeError, ValueError) as e:
        raise Refused(400, f"HTTP2-Settings: {e}") from None
    transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: h2c\r\n\r\n")
    upgrade.adopt(session, SessionProtocol(session, transport))

"""Port-forward over SPDY/3.1 (and over a WebSocket carrying SPDY): stream pairs by
request id, handed to the forwarding core."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from crishim.flow import plain_socket_fd
from crishim.forward import ForwardContext, ForwardedConnection
from crishim.forward_udp import ForwardedFlow
from crishim.protocols import spdy
from crishim.protocols.buffers import Outbound
from crishim.protocols.constants import (
    DIAL_ON_DATA,
    FLOW_CONTROL_WINDOWS,
    HEADER_DIAL,
    HEADER_FLOW_CONTROL,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
)
from crishim.protocols.negotiation import choose_version, server_versions
from crishim.runtime import Sandbox
from crishim.stream.admission import Refused
from crishim.stream.pairing import PendingPair, shown_request_id
from crishim.stream.session import (
    PairChannel,
    PairedStreamSession,
    SessionProtocol,
    Upgrade,
    WriteBuffers,
    close_client,
    stream_window,
)

log = logging.getLogger("crishim.spdy")


def start(upgrade: Upgrade) -> None:
    """`Upgrade: SPDY/3.1`: agree on the stream protocol, answer 101, start the session."""
    request, transport, settings = upgrade.request, upgrade.transport, upgrade.settings
    offered = request.header_values("x-stream-protocol-version")
    if not offered:
        raise Refused(400, "missing X-Stream-Protocol-Version: this server speaks "
                           f"{PORTFORWARD_PROTOCOL}")
    # portforward.crishim.dev/v1 (UDP flows) when offered, UDP is on and the plugin can
    # dial it; upstream clients offer only portforward.k8s.io and get it as ever
    version = choose_version(offered, server_versions(settings.ctx.udp))
    if version is None:  # named as before: crishim's own client offers the upstream too
        raise Refused(403, f"none of the offered stream protocols {offered} is supported; "
                           f"this server speaks {PORTFORWARD_PROTOCOL}",
                      [("X-Accepted-Stream-Protocol-Versions", PORTFORWARD_PROTOCOL)])
    transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: "
                    + version.encode() + b"\r\n\r\n")
    session = SpdyPortForwardSession(
        settings.ctx, upgrade.admitted.sandbox, settings.creation_timeout,
        settings.idle_timeout, transport.writelines,
        lambda: close_client(transport, session.violated_budget))
    session.stream_version = version
    session.lent_fd = plain_socket_fd(transport)  # pod reads written from the read buffer
    upgrade.adopt(session, SessionProtocol(session, transport))


# Largest DATA frame sent to the client. client-go reads a frame per call and allocates
# for each: kubectl 1.27 downloads took 1.31-1.52 ms of kubectl's CPU per MiB with 256 KiB
# frames and 1.06-1.26 with 1 MiB ones, 660-683 -> 729-811 MB/s (benchmarks.probe
# --only kubectl-1.27, three alternated rounds); a pod read rarely gives more at once.
SEND_FRAME = 1024 * 1024
# What one client read may cost before its session yields (the rest waits, copied, for
# the next turn of the loop; reading pauses meanwhile): 4096 frames, 1 MiB of header
# blocks inflated (a 290-byte block may inflate to the 256 KiB limit, and one read's
# events are all held at once)
FRAMES_PER_RECEIVE = 4096
INFLATED_PER_RECEIVE = 1024 * 1024
# the key the session's read gate is held with while a read's backlog waits
_BACKLOG = "backlog"


def _tolerated(window: int) -> int:
    """What a stream may send before it is reset FLOW_CONTROL_ERROR: our window, but not
    less than SPDY's 64 KiB, which the client may use until our SETTINGS reach it (SPDY
    has no SETTINGS acknowledgement; 16 KiB windows, with the budget spent, reset streams
    that had sent their 64 KiB meanwhile). A client that has our SETTINGS keeps to the
    window announced."""
    return max(window, spdy.INITIAL_WINDOW)


class SpdyPortForwardSession(PairedStreamSession):
    """Drives one SpdyConnection: pairs streams, opens forwarded connections, pumps bytes.

    `write_buffers` sends a list of buffers to the client (a TCP transport's writelines,
    or the WebSocket tunnel's): frames are never joined into one copy on the way out."""

    transport_name = "spdy"
    protocol_log = log
    cancel_code = spdy.CANCEL
    base_window = spdy.INITIAL_SESSION_WINDOW
    borrows_reads = True  # DATA pieces are views of the read, written before it returns

    def __init__(self, ctx: ForwardContext, sandbox: Sandbox, creation_timeout: float,
                 idle_timeout: float, write_buffers: WriteBuffers,
                 close: Callable[[], None]) -> None:
        super().__init__(ctx, sandbox, idle_timeout, creation_timeout, close)
        self.codec = spdy.SpdyConnection(spdy.SpdyConfig(
            client=False, zero_copy=True, max_send_frame=SEND_FRAME,
            max_frames_per_receive=FRAMES_PER_RECEIVE,
            max_inflated_per_receive=INFLATED_PER_RECEIVE))
        self._write_buffers = write_buffers
        self._goaway_seen = False
        # windows, where the client asked for them (docs/protocol.md 8.6; what waits for
        # the client's, and the connections whose window is withheld: PairedStreamSession):
        # ours: bytes received per stream that no pod took yet, window owed (taken, not
        # given back: it goes back a quarter of a window at a time, not in two
        # WINDOW_UPDATEs per read), the data streams of this read
        self._client_window = spdy.INITIAL_WINDOW  # its SETTINGS_INITIAL_WINDOW_SIZE
        self._unacked: dict[int, int] = {}
        self._stream_owed: dict[int, int] = {}
        self._session_owed = 0
        self._stream_every = self._session_every = 1
        self._read_streams: set[int] = set()
        self._announced = False

    def start(self) -> None:
        if self.stream_version == PORTFORWARD_CRISHIM_V1:  # kubectl's never: spdystream
            # sends no WINDOW_UPDATE; ours as _announce_windows will give them, if the
            # budget lasts (it lowers them where it does not)
            self.codec.offer_send_windows(receive_window=_tolerated(stream_window(
                self.ctx.flood.session_buffer_size, spdy.INITIAL_SESSION_WINDOW)))
        self.arm_idle_timer()

    @property
    def windowed(self) -> bool:
        """The client asked for windows (a SETTINGS before its first stream, on
        portforward.crishim.dev/v1): they are honoured."""
        return self.codec.send_windows_enforced

    # --- output ------------------------------------------------------------------------
    def flush(self) -> None:
        if self.output_held:
            return  # release_output() flushes
        chunks = self.codec.take_output()
        if chunks and not self._closed:
            if self.lending:  # DATA is a view of a pod read: out now, or copied
                self.write_lent(chunks)
            else:
                self._write_buffers(chunks)

    # --- the client's windows, where it asked for them -----------------------------------
    def queue_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Send data on a stream, within the client's windows if it asked for them (the
        rest waits); False when the stream is blocked on a window."""
        codec = self.codec  # without windows send_window is 2^31-1: sent at once
        if stream_id not in self._outbound and len(data) <= codec.send_window(stream_id):
            codec.send_data(stream_id, data, lent=self.lending)  # the common case
            return True
        return self._queue_more(stream_id, data)

    def queue_eof(self, stream_id: int) -> None:
        """End a stream once what waits for its window has gone."""
        if stream_id in self._outbound:
            self._queue_end(stream_id)
        else:
            self.codec.end_stream(stream_id)

    def reset(self, stream_id: int, status: int) -> None:
        self._forget_outbound(stream_id)
        self.codec.reset_stream(stream_id, status)

    def _send_queued(self, stream_id: int, out: Outbound) -> bool:
        return self.codec.send_queued(stream_id, out)

    def _session_send_window(self) -> int:
        return self.codec.session_send_window

    def _stream_send_window(self, stream_id: int) -> int:
        return self.codec.send_window(stream_id)  # 2^31-1 without windows

    def _stream_send_window_alone(self, stream_id: int) -> int:
        return self.codec.stream_send_window(stream_id)

    def _announce_windows(self) -> None:
        """Ours, before any reply: the streams' (the codec counts from now on; set by
        what the buffer budget could give the session now), and the session's, which
        grows from SPDY's 64 KiB towards session_buffer_size as the client fills it
        (_window_filled), each step from the budget: taken whole here, sessions that never
        sent a byte spent the budget."""
        self._announced = True
        window = stream_window(self.ctx.window_room(), spdy.INITIAL_SESSION_WINDOW)
        self.codec.enforce_receive_windows(_tolerated(window))
        self.codec.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: window})
        self._window_limit = self.ctx.flood.session_buffer_size - spdy.INITIAL_SESSION_WINDOW
        self._stream_every = window // 4
        self._session_every = spdy.INITIAL_SESSION_WINDOW // 4

    def _window_grown(self, more: int) -> None:
        self.codec.send_window_update(0, more)
        self._session_every = (spdy.INITIAL_SESSION_WINDOW + self._window_granted) // 4

    def _taken(self, stream_id: int, n: int) -> None:
        """n bytes of the client's DATA on stream_id: their window goes back once the pod
        took them (_give_back_unless_congested at the end of the read)."""
        self._unacked[stream_id] = self._unacked.get(stream_id, 0) + n
        self._read_streams.add(stream_id)

    def _give_back(self, stream_id: int, ended: bool = False, at_once: bool = False) -> None:
        """The stream's bytes no pod took yet are taken now (or dropped): their window is
        owed, and goes back once a quarter of a window is owed (at once: bytes dropped on
        a stream that carries nothing). Owed below that is no stall: the other three
        quarters are the client's. `ended`: the stream's own share is not owed any more,
        the session's still is."""
        n = self._unacked.pop(stream_id, 0)
        if self.codec.terminated:
            return
        owed = self._stream_owed.pop(stream_id, 0) + n
        if owed and not ended:
            if at_once or owed >= self._stream_every:
                self.codec.send_window_update(stream_id, owed)  # nothing for a stream gone
            else:
                self._stream_owed[stream_id] = owed
        if n:
            self._session_owed += n
            if at_once or self._session_owed >= self._session_every:
                self.codec.send_window_update(0, self._session_owed)
                self._session_owed = 0

    def _give_back_unless_congested(self, stream_id: int) -> None:
        """Not while the connection is dialling or its pod's socket holds any (its
        resume_client_reading gives it back), nor for a pair still pending."""
        conn = self._by_stream.get(stream_id)
        if conn is None:
            if stream_id in self._pairs.by_stream:
                return  # held for its pair: given back once the connection takes it
            self._give_back(stream_id, at_once=True)  # dropped: an error stream's, a late
            return
        if not self._withheld(conn):
            self._give_back(stream_id)

    def _give_back_withheld(self, stream_id: int) -> None:
        self._give_back(stream_id)

    def pause_client_reading(self, key: object) -> None:
        """With windows, a congested pod withholds its stream's window; it does not stop
        the session's reading (the other streams go on), as over HTTP/2."""
        if self.windowed:
            self._withhold(key)
        else:
            super().pause_client_reading(key)

    def resume_client_reading(self, key: object) -> None:
        if self.windowed:
            self._release_withheld(key)
        else:
            super().resume_client_reading(key)

    # --- input -------------------------------------------------------------------------
    def receive(self, data: bytes | memoryview) -> None:
        """One read from the client: bytes, or a view of the loop's read buffer that is
        reused once this returns (the codec's DATA pieces are views of it; a forwarded
        connection copies what its pod's socket does not take at once)."""
        if self._closed:
            return
        self.last_activity = time.monotonic()
        lent = type(data) is not bytes
        self.borrowing = lent
        self.begin_batch()
        read_streams = self._read_streams
        read_streams.clear()
        # windows (crishim's client) still growing: what the client may send before the read
        window_before = (self.codec.session_receive_window
                         if self._window_granted < self._window_limit else None)
        try:
            for event in self.codec.receive_data(data, lent=lent):
                try:
                    if not self._handle(event):
                        break  # a budget ended the session
                except Exception as e:  # a bug on one stream must not end the session
                    self._event_failed(event, e)
        finally:
            self.end_batch()
            self.borrowing = False
        if window_before is not None:
            self._window_filled(window_before - self.codec.session_receive_window)
        if read_streams and not self._closed:
            # after the pod writes: a pod socket that just became congested holds them
            for sid in list(read_streams):
                self._give_back_unless_congested(sid)
            read_streams.clear()
        if not self._closed:
            self._send_raised()
        self.flush()
        if self.codec.backlogged and not self._closed:
            # the read's share of work is done and whole frames are left: the other
            # sessions have the loop first, then the rest (reading paused meanwhile)
            self.after_turn(_BACKLOG, lambda: self.receive(b""))

    def _handle(self, event: spdy.Event) -> bool:
        """Act on one event; False once a budget ended the session."""
        match event:
            case spdy.DataReceived():  # the hot one: tested first, handled inline
                conn = self._by_stream.get(event.stream_id)
                if event.data and self.codec.receive_windows_enforced:
                    self._taken(event.stream_id, len(event.data))  # whoever takes them
                if conn is not None:
                    if not event.data and not event.fin and not (
                            isinstance(conn, ForwardedConnection) and conn.on_data):
                        if not self.charge_control("an empty DATA frame"):
                            return False
                    conn.client_data(event.data)  # an empty frame dials a pair opened ahead
                    if event.fin:
                        conn.client_eof()
                else:
                    pair = self._pairs.by_stream.get(event.stream_id)
                    if pair is not None and pair.data_id == event.stream_id:
                        # a data stream opened before its error stream: what it carries
                        # and its end are kept for the pair, as on HTTP/2 (the bytes were
                        # dropped: the pod got the stream with a hole in it)
                        if event.data:
                            if not self._hold(pair, event.data):
                                return self.charge_control(
                                    "data past buffer_size before its pair completed")
                        elif not event.fin:
                            return self.charge_control("an empty DATA frame")
                        if event.fin:
                            pair.held_end = True
                    # data on an error stream is ignored: clients only read it, and end it
                    # (client-go: an empty DATA frame with FIN); data read with the
                    # SYN_STREAM of a connection refused since (a limit) is expected:
                    # charged, it ended sessions at the limit
                    elif not event.fin and not self.codec.reset_here(event.stream_id):
                        return self.charge_control("DATA on a stream carrying no connection")
            case spdy.WindowUpdateReceived():
                if self.windowed and self._outbound:
                    if event.stream_id:
                        self._window_opened(event.stream_id)
                    else:
                        self._session_window_opened()
            case spdy.StreamOpened():
                if not self.charge_stream_open():
                    return False
                return self._on_stream_opened(event)
            case spdy.StreamReset():
                return self._on_reset(event)
            case spdy.StreamError():
                return self._on_stream_error(event)
            case spdy.PingReceived():
                return self.charge_control("PING")
            case spdy.SettingsReceived():
                if not self.charge_control("SETTINGS"):
                    return False
                if self.windowed and not self._announced:
                    self._announce_windows()
                window = event.settings.get(spdy.SETTINGS_INITIAL_WINDOW_SIZE)
                if window is not None:
                    if self._outbound and window > self._client_window:
                        self._initial_windows_raised()  # the codec moved every stream's
                    self._client_window = window
            case spdy.HeadersReceived():
                if event.fin:  # a half-close sent as HEADERS with FIN
                    conn = self._by_stream.get(event.stream_id)
                    if conn is not None:
                        conn.client_eof()
                    else:
                        self._held_end(event.stream_id)
                return self.charge_control("HEADERS")
            case spdy.FrameIgnored():
                return self.charge_control(f"an ignored control frame (type {event.frame_type})")
            case spdy.GoAwayReceived():
                if self._goaway_seen:
                    return self.charge_control("a second GOAWAY")
                self._goaway_seen = True
                log.debug("%s sandbox=%s: client sent GOAWAY", self.transport_name, self.sandbox.id)
            case spdy.SessionTerminated():
                self._on_terminated(event)
                return False
        return True

    def _on_stream_opened(self, ev: spdy.StreamOpened) -> bool:
        try:
            if ev.unidirectional:  # a stream crishim could not answer on carries nothing
                raise Refused(400, "it is unidirectional")
            pair = self._pairs.add(ev.stream_id, ev.headers, version=self.stream_version)
        except Refused as e:
            self.protocol_error("%s sandbox=%s: refusing stream %d: %s", self.transport_name,
                                self.sandbox.id, ev.stream_id, e, logger=log)
            self.codec.reset_stream(ev.stream_id, spdy.PROTOCOL_ERROR)
            return self.charge_control("a refused stream")
        on_data = pair.on_data and ev.stream_id == pair.data_id
        if ev.fin and ev.stream_id == pair.data_id:
            pair.held_end = True  # a data stream opened already ended
        reply = {HEADER_DIAL: DIAL_ON_DATA} if on_data else {}
        if self.windowed:
            reply[HEADER_FLOW_CONTROL] = FLOW_CONTROL_WINDOWS
        self.codec.reply(ev.stream_id, reply)
        if pair.complete:
            channel = PairChannel(self, pair.data_id, pair.error_id, pair.request_id)
            conn = self.open_forward(pair.port, channel, pair.protocol, pair.on_data)
            channel.conn = conn
            if not conn.done:
                self._by_stream[pair.data_id] = conn
            if pair.held is not None and not conn.done:  # what came before the pair
                held, pair.held = pair.held, None
                conn.client_data(memoryview(held))
            if pair.data_id in self._unacked:  # its window goes back as the pod takes it
                self._read_streams.add(pair.data_id)
            # the client half-closed the data stream before the pair completed; an end
            # read after this SYN_STREAM comes as its own event, after the data before it
            # (the codec's state, already past the whole read, lost that data for UDP)
            if not conn.done and pair.held_end:
                conn.client_eof()
        return True

    def _hold(self, pair: PendingPair, data: bytes | memoryview) -> bool:
        """Keep data for a pair that has not completed; False past buffer_size held by the
        session's pending pairs together, then the pair is refused alone."""
        limit = self.ctx.buffer_size
        if self._pairs.held_bytes + len(data) > limit:
            self.protocol_error("%s sandbox=%s: request %s: more than %d bytes held "
                                "before pairs completed; refused", self.transport_name,
                                self.sandbox.id, shown_request_id(pair.request_id), limit,
                                logger=log)
            self._pairs.forget(pair)
            self.reset(pair.data_id, spdy.CANCEL)
            self._give_back(pair.data_id, ended=True)
            return False
        self._pairs.hold(pair, data)
        return True

    def _held_end(self, stream_id: int) -> None:
        """The client ended a data stream whose pair has not completed: kept for it."""
        pair = self._pairs.by_stream.get(stream_id)
        if pair is not None and pair.data_id == stream_id:
            pair.held_end = True

    def _cancel_pending_data(self, pair: PendingPair) -> None:
        self.reset(pair.data_id, spdy.CANCEL)
        self._give_back(pair.data_id, ended=True)

    def _reset_failed_stream(self, stream_id: int) -> None:
        self.codec.reset_stream(stream_id, spdy.INTERNAL_ERROR)

    def _on_reset(self, ev: spdy.StreamReset) -> bool:
        self._forget_outbound(ev.stream_id)
        conn = self._by_stream.get(ev.stream_id)
        if conn is not None:
            conn.client_reset()  # how a client ends a connection: free
            return True
        pair = self._pairs.by_stream.get(ev.stream_id)
        if pair is not None:
            self._pairs.forget(pair)
            self._give_back(pair.data_id, ended=True)
        return self.charge_control("RST_STREAM")

    def _on_terminated(self, ev: spdy.SessionTerminated) -> None:
        log.warning("%s sandbox=%s: protocol error, ending session: %s", self.transport_name,
                    self.sandbox.id, ev.reason)
        self.protocol_failed = True  # over WebSocket: the close says so (1002)
        self.flush()
        self.close("protocol error: " + ev.reason)

    def _on_stream_error(self, ev: spdy.StreamError) -> bool:
        self.protocol_error("%s sandbox=%s: stream %d refused: %s", self.transport_name,
                            self.sandbox.id, ev.stream_id, ev.reason, logger=log)
        conn = self._by_stream.get(ev.stream_id)
        if conn is not None:
            conn.close(ev.reason)
        return self.charge_control("a refused frame")

    def connection_finished(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        super().connection_finished(conn)
        self._forget_withheld(conn)
        channel = conn.channel
        if isinstance(channel, PairChannel):
            self._by_stream.pop(channel.data_id, None)
            self._give_back(channel.data_id, ended=True)  # the session's share it held

    # --- goodbye, draining ----------------------------------------------------------------
    def goodbye(self, reason: str, violation: bool) -> None:
        self.codec.goaway(spdy.GOAWAY_PROTOCOL_ERROR if violation else spdy.GOAWAY_OK)

    def drain(self) -> None:
        """Server shutting down: tell the client no new streams will be accepted."""
        if not self._closed:
            self.codec.goaway(spdy.GOAWAY_OK)
            self.drop_unused_ahead("crishim is shutting down")
            self.flush()


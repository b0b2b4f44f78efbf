"""The server session contract: what every transport session (SPDY, SPDY over
WebSocket, WebSocket channels, HTTP/2) offers the stream server, and its teardown,
written once."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from crishim.budget import CappedLines, LogBudget
from crishim.flow import READ_SIZE, read_buffer
from crishim.forward import ForwardContext, ForwardedConnection, SessionBase
from crishim.forward_udp import ForwardedFlow
from crishim.logs import traceback_once
from crishim.protocols.buffers import Outbound, immutable
from crishim.runtime import Sandbox
from crishim.stream.admission import Admitted, Request
from crishim.stream.pairing import PendingPair, StreamPairs

log = logging.getLogger("crishim.stream")

# sends a list of buffers to the client without joining them (transport.writelines)
WriteBuffers = Callable[[Sequence[bytes | bytearray | memoryview]], None]

# a client still sending when its session ends for a budget keeps its connection this
# long, half-closed and not read, so that the goodbye reaches it before the reset
LINGER_SECONDS = 1.0


def close_client(transport: asyncio.Transport, linger: bool) -> None:
    """Close the client's connection once what is written has gone. `linger`: the client
    may still be sending (a flood): closing a socket with unread input resets it at once
    and throws away the goodbye still on its way, so half-close, stop reading (the flood
    waits in the kernel, costing nothing) and close a moment later."""
    if not linger or transport.is_closing() or not transport.can_write_eof():
        transport.close()
        return
    transport.pause_reading()
    transport.write_eof()
    transport.set_protocol(_Lingering(transport))


class _Lingering(asyncio.Protocol):
    """A closed session's connection for LINGER_SECONDS, or until the client ends it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class ServerSession(SessionBase, ABC):
    """One upgraded client connection carrying forwarded connections into one sandbox.

    Life cycle: `start` once the connection is adopted; `receive` for every read;
    `drain` when the server shuts down; `close` to end it from the server's side (the
    transport's `goodbye` is its last word); `connection_lost` when the client's
    transport is gone. `on_closed` is called once, whichever way it ends."""

    def __init__(self, ctx: ForwardContext, sandbox: Sandbox | None,
                 idle_timeout: float) -> None:
        # HTTP/2 by prior knowledge learns its sandbox from its first stream
        super().__init__(ctx, sandbox)  # type: ignore[arg-type]
        self.idle_timeout = idle_timeout
        self.on_closed: Callable[[], None] | None = None
        self.closing = False  # close() began: connections end without error text
        self.violated_budget = False  # ended because the client overran a budget
        self.protocol_failed = False  # ended by the client's malformed protocol
        self._closed = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._timers: list[asyncio.TimerHandle] = []
        flood = ctx.flood
        self._control_budget = flood.control_budget()
        self._stream_budget = flood.stream_open_budget()
        self._error_lines = CappedLines(flood.protocol_error_log_lines)
        self._output_granted = 0  # taken from the output budget (ctx.take_output)

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.id if self.sandbox is not None else "?"

    # --- what each transport provides ------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """The connection is adopted: send what the transport sends first."""

    @abstractmethod
    def receive(self, data: bytes | memoryview) -> None:
        """Bytes from the client: a memoryview of the loop's read buffer only if the
        session `borrows_reads`."""

    @abstractmethod
    def flush(self) -> None:
        """Write what the codec has queued."""

    @abstractmethod
    def goodbye(self, reason: str, violation: bool) -> None:
        """Queue the transport's last word before it closes (GOAWAY, close frame);
        `violation`: the client overran a budget (HTTP/2 ENHANCE_YOUR_CALM, WebSocket
        1008, SPDY PROTOCOL_ERROR)."""

    @abstractmethod
    def close_transport(self) -> None:
        """Close the client's connection once the goodbye is written."""

    def drain(self) -> None:
        """The server is shutting down: say so if the transport can; live forwarded
        connections carry on until the drain deadline."""

    def forget_pending(self) -> None:
        """Drop streams still waiting for their pair (transports that pair streams)."""

    # --- budgets and protocol errors, the same for every transport -----------------------
    def within_control_budget(self) -> bool:
        """Spend one from the budget of frames that cost crishim work or an answer without
        forwarding a byte (PING, SETTINGS, a reset, a refused or erroneous frame)."""
        return self._control_budget.take()

    def control_overrun(self, what: str) -> str:
        flood = self.ctx.flood
        return (f"more than {flood.control_frame_burst} control frames at once or "
                f"{flood.control_frames_per_second:g} a second ({what}; "
                "control_frames_per_second, control_frame_burst)")

    def within_stream_budget(self) -> bool:
        """Spend one from the budget of streams the client opens."""
        return self._stream_budget.take()

    def stream_overrun(self) -> str:
        flood = self.ctx.flood
        return (f"more than {flood.stream_open_burst} streams opened at once or "
                f"{flood.stream_opens_per_second:g} a second (stream_opens_per_second, "
                "stream_open_burst)")

    def charge_control(self, what: str) -> bool:
        """One control frame; False, with the session ended, past the budget."""
        if self.within_control_budget():
            return True
        self.violated(self.control_overrun(what))
        return False

    def charge_stream_open(self) -> bool:
        """One stream opened; False, with the session ended, past the budget."""
        if self.within_stream_budget():
            return True
        self.violated(self.stream_overrun())
        return False

    def violated(self, reason: str) -> None:
        """The client overran a budget: end the session with the transport's
        'calm down' goodbye."""
        if self._closed:
            return
        log.warning("%s sandbox=%s: ending session: %s", self.transport_name,
                    self.sandbox_id, reason)
        self.close(reason, violation=True)

    def protocol_error(self, message: str, *args: object, level: int = logging.INFO,
                       logger: logging.Logger | None = None) -> None:
        """Log one protocol error of this session: the first protocol_error_log_lines,
        then only a count, written when the session ends."""
        if self._error_lines.take():
            (logger or log).log(level, message, *args)

    def _log_suppressed(self) -> None:
        suppressed = self._error_lines.take_suppressed()
        if suppressed:
            log.info("%s sandbox=%s: %d more protocol errors suppressed", self.transport_name,
                     self.sandbox_id, suppressed)

    # --- teardown, the same for every transport ----------------------------------------
    def close(self, reason: str, violation: bool = False) -> None:
        """End from the server's side: reset what is live, say goodbye, close."""
        if self._closed:
            return
        self.closing = True
        self.violated_budget = violation
        self.close_connections(reason)
        self.forget_pending()
        self.goodbye(reason, violation)
        self.output_held = 0  # closing inside hold_output(): the goodbye goes out now
        self.flush()
        self.end(close_transport=True)

    def connection_lost(self) -> None:
        """The client's transport is gone: end every forwarded connection, write nothing."""
        if self._closed:
            return
        self._closed = self.closing = True
        self.close_connections("client connection lost")
        self.forget_pending()
        self.end(close_transport=False)

    # --- what waits for the client to read ------------------------------------------------
    def limit_output(self, transport: asyncio.Transport, high: int) -> None:
        """The client's output holds at most `high` bytes, and pod reads are cut to it."""
        self.output_high = high
        self.output_sized = True
        transport.set_write_buffer_limits(high=high)

    def grant_output(self, full: int) -> None:
        """Admitted: the client's output may hold `full` bytes (4 x buffer_size) and a
        whole pod read past them while the server's output budget (take_output) lasts,
        else stays as limit_output left it. What waits for a client that does not read
        is memory of the server's: a session held its 1 MiB high-water mark and a pod
        read more, and 600 sessions whose clients never read held +1 GiB with no bound
        but max_sessions."""
        if self._output_granted or self.transport is None:
            return
        charge = full + READ_SIZE
        if self.ctx.take_output(charge):
            self._granted(charge, full)
        else:  # granted as sessions before it end
            self.ctx.wait_for_output(self, charge, lambda: self._granted(charge, full, True))

    def _granted(self, charge: int, full: int, waited: bool = False) -> None:
        if waited:
            log.debug("%s sandbox=%s: output allowance granted after waiting for the buffer "
                      "budget", self.transport_name, self.sandbox_id)
        self._output_granted = charge
        if self.transport is not None:
            self.limit_output(self.transport, full)
        self.output_sized = False  # the charge covers a whole pod read past the mark

    def end(self, close_transport: bool) -> None:
        """Leave the server's registry; forwarded connections still open (a WebSocket's
        grace after the client's close) keep the timers until they finish."""
        self._closed = True
        self.ctx.forget_output_wait(self)
        if self._output_granted:
            self.ctx.return_output(self._output_granted)
            self._output_granted = 0
        self._log_suppressed()
        self.flush_connection_log()
        if close_transport:
            self.close_transport()
        if not self.connections:
            self.cancel_timers()
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()

    def connection_finished(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        super().connection_finished(conn)
        if self._closed and not self.connections:
            self.cancel_timers()
            self.flush_connection_log()  # the lines of those that ended after the session

    def after_turn(self, key: str, then: Callable[[], object] | None = None) -> None:
        """Let every other session have the loop once: reading from the client stays
        paused (the read gate held with `key`) until the loop has gone round, then `then`
        runs. Nothing if that is already under way, or the session is ending."""
        transport = self.transport
        if self.closing or transport is None or transport.is_closing() \
                or self.read_gate.holds(key):
            return
        self.read_gate.pause(key, transport)

        def turn_over() -> None:
            self.read_gate.resume(key, self.transport)
            if then is not None and not self.closing:
                then()

        asyncio.get_running_loop().call_soon(turn_over)

    # --- timers ------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], object]) -> None:
        """A timer cancelled with the session."""
        self._timers.append(asyncio.get_running_loop().call_later(delay, callback))

    def cancel_timers(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def arm_idle_timer(self, delay: float | None = None) -> None:
        if self.idle_timeout > 0 and not self._closed:
            self._idle_timer = asyncio.get_running_loop().call_later(
                self.idle_timeout if delay is None else delay, self._check_idle)

    def _check_idle(self) -> None:
        if self._closed:
            return
        idle_for = time.monotonic() - self.last_activity
        if idle_for < self.idle_timeout:
            self.arm_idle_timer(self.idle_timeout - idle_for)
            return
        log.info("%s sandbox=%s: idle for %.0fs, closing session", self.transport_name,
                 self.sandbox_id, idle_for)
        self.close("idle timeout")


def stream_window(session_window: int, least: int) -> int:
    """Our receive window per stream: a quarter of the session's (taken as at least
    `least`, the protocol's default), so three pods that stop reading hold back only
    their own streams (a fourth takes what the others had); with the budget spent (the
    64 KiB default) a stream's window as large as its session's let one stalled pod hold
    back every stream."""
    return max(session_window, least) // 4


class PairChannel:
    """A forwarded connection's data and error streams on a PairedStreamSession (SPDY,
    HTTP/2): the forwarding core's Channel. A data stream given up is reset with the
    session's `cancel_code`."""

    __slots__ = ("session", "data_id", "error_id", "request_id", "conn", "data_closed")

    def __init__(self, session: PairedStreamSession, data_id: int, error_id: int,
                 request_id: str) -> None:
        self.session = session
        self.data_id = data_id
        self.error_id = error_id
        self.request_id = request_id
        self.conn: ForwardedConnection | ForwardedFlow | None = None
        self.data_closed = False  # ended, reset by us, or reset by the client

    def send(self, data: bytes | memoryview) -> None:
        s = self.session
        s.last_activity = time.monotonic()
        # within the client's windows (SPDY: where it asked for them, docs/protocol.md 8.6)
        if not s.queue_data(self.data_id, data) and self.conn is not None:
            self.conn.pause_pod_reading()
        s.flush()

    def send_eof(self) -> None:
        if not self.data_closed:
            self.data_closed = True
            self.session.queue_eof(self.data_id)
            self.session.flush()

    def abort(self) -> None:
        if not self.data_closed:
            self.data_closed = True
            self.session.reset(self.data_id, self.session.cancel_code)
            self.session.flush()

    def finish(self, error: str | None) -> None:
        s = self.session
        if error:
            s.queue_data(self.error_id, error.encode("utf-8", "replace"))
        s.queue_eof(self.error_id)
        s.flush()


class WindowedSends:
    """What waits for the client's flow-control windows, per stream, for a ServerSession
    whose codec sends a queue within them (`_send_queued`): HTTP/2's, and SPDY's where the
    client asked for windows. A stream that waits stops reading its pod socket (the
    caller's business) until its window or the session's opens (`_window_opened`,
    `_session_window_opened`, `_initial_windows_raised`) and what waited is sent."""

    _by_stream: dict[int, ForwardedConnection | ForwardedFlow]
    writing_paused: bool
    lending: bool  # SessionBase's: what is sent is a view of a pod read
    connections: set[ForwardedConnection | ForwardedFlow]
    output_room: Callable[[], int]  # SessionBase's

    def _init_outbound(self) -> None:
        self._outbound: dict[int, Outbound] = {}
        # streams whose last send stopped at the session's window (the only ones a session
        # WINDOW_UPDATE can move), in the order they stopped
        self._session_blocked: dict[int, None] = {}
        self._windows_raised = False  # by SETTINGS in the read being handled

    def _send_queued(self, stream_id: int, out: Outbound) -> bool:
        """The codec's: send what the windows allow; True once `out` is empty."""
        raise NotImplementedError

    def _session_send_window(self) -> int:
        """The codec's: what all streams together may send now."""
        raise NotImplementedError

    def _stream_send_window(self, stream_id: int) -> int:
        """The codec's: what the stream may send now (within the session's window too)."""
        raise NotImplementedError

    def _stream_send_window_alone(self, stream_id: int) -> int:
        """The codec's: the stream's own window, the session's aside."""
        raise NotImplementedError

    def pod_read_room(self, conn: ForwardedConnection) -> int:
        """A pod read no larger than its stream's window takes (at least MIN_POD_READ):
        what the window does not take waits in the stream's queue, outside every budget;
        reads of a full buffer held ~1 MiB per stream whose client gave no window back
        (400 streams: 460 MiB)."""
        room = self.output_room()
        channel = conn.channel
        if not isinstance(channel, PairChannel):
            return room
        return min(room, self._stream_send_window(channel.data_id))

    def _queue_more(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Queue data behind what waits (or what the window does not take now) and send
        what the window allows; False when the stream is left waiting. A view of a pod
        read (`lending`) is copied where it waits."""
        out = self._outbound.get(stream_id)
        if out is None:
            out = self._outbound[stream_id] = Outbound()
        out.append(data)
        sent = self._drain_stream(stream_id, out)
        if self.lending and out.chunks:
            out.chunks = [chunk if immutable(chunk) else bytes(chunk) for chunk in out.chunks]
        return sent

    def _queue_end(self, stream_id: int) -> None:
        """End the stream once what waits for its window has gone."""
        out = self._outbound.get(stream_id)
        if out is None:
            out = self._outbound[stream_id] = Outbound()
        out.eof = True
        self._drain_stream(stream_id, out)

    def _drain_stream(self, stream_id: int, out: Outbound) -> bool:
        if not self._send_queued(stream_id, out):
            if self._session_send_window() <= 0:
                self._session_blocked[stream_id] = None  # behind the others that wait
            else:  # its own window: its WINDOW_UPDATE (or new initial windows) moves it
                self._session_blocked.pop(stream_id, None)
            return False
        self._forget_outbound(stream_id)
        return True

    def _forget_outbound(self, stream_id: int) -> None:
        """Nothing waits on the stream any more (sent, or the stream is gone)."""
        self._outbound.pop(stream_id, None)
        self._session_blocked.pop(stream_id, None)

    def _window_opened(self, stream_id: int) -> None:
        """The stream's WINDOW_UPDATE: send what waited on it."""
        out = self._outbound.get(stream_id)
        if out is not None:
            self._send_waiting(stream_id, out)

    def _session_window_opened(self) -> None:
        """The session's WINDOW_UPDATE: the streams that stopped at the session's window
        send in turn while it has room. Not a walk of every waiting stream: a client
        opening the session's window a byte at a time, each update earning its credit
        back with the byte it let out, held the event loop for ~1 ms per update with
        1,000 streams waiting."""
        waiting = self._session_blocked
        for _ in range(len(waiting)):  # each stream once: one that stops again is last
            if not waiting or self._session_send_window() <= 0:
                return
            stream_id = next(iter(waiting))
            del waiting[stream_id]
            out = self._outbound.get(stream_id)
            if out is not None:
                self._send_waiting(stream_id, out)

    def _initial_windows_raised(self) -> None:
        """New, larger initial windows (SETTINGS) moved every stream's window: every
        waiting stream tries once the read is handled (_send_raised), not at each frame (a
        read of 200 SETTINGS raising and lowering them walked 4,000 waiting streams 100
        times; SETTINGS are charged to the control budget besides)."""
        self._windows_raised = True

    def _send_raised(self) -> None:
        """At the end of a read: what waits is sent where SETTINGS raised the windows."""
        if not self._windows_raised:
            return
        self._windows_raised = False
        for stream_id in list(self._outbound):
            out = self._outbound.get(stream_id)
            if out is not None:
                self._send_waiting(stream_id, out)

    def _send_waiting(self, stream_id: int, out: Outbound) -> None:
        """Send what waited on a stream; once it is all sent, its pod is read again."""
        if self._drain_stream(stream_id, out):
            conn = self._by_stream.get(stream_id)
            if conn is not None and not self.writing_paused:
                conn.resume_pod_reading()

    def resume_pods(self) -> None:
        """The client takes bytes again: its pods may be read, but for streams waiting
        for the client's window."""
        for conn in list(self.connections):
            channel = conn.channel
            if not (isinstance(channel, PairChannel) and channel.data_id in self._outbound):
                conn.resume_pod_reading()


class WithheldWindows:
    """Our receive windows, for a ServerSession that grants them (HTTP/2's, SPDY's where
    the client asked for windows): a stream's window goes back only for bytes its pod's
    socket took, not while its connection dials nor while the socket's buffer holds any
    (a UDP flow sends or drops each datagram at once). A congested pod withholds its own
    stream's window; the session goes on reading its other streams. The protocol gives
    back what was withheld (`_give_back_withheld`)."""

    _closed: bool
    flush: Callable[[], None]  # ServerSession's

    def _init_withheld(self) -> None:
        self._congested: set[object] = set()  # connections whose window is withheld

    def _give_back_withheld(self, stream_id: int) -> None:
        """The protocol's: give back the stream's window withheld so far."""
        raise NotImplementedError

    def _withheld(self, conn: ForwardedConnection | ForwardedFlow) -> bool:
        """True where conn's stream may not have its window back now; conn is then held
        until _release_withheld."""
        if conn in self._congested or (isinstance(conn, ForwardedConnection)
                                       and not conn.dialled):
            self._congested.add(conn)
            return True
        return False

    def _withhold(self, key: object) -> None:
        """A congested pod (pause_client_reading): its stream's window is withheld."""
        self._congested.add(key)

    def _release_withheld(self, key: object) -> None:
        """Its pod took everything (resume_client_reading): the window goes back."""
        if key not in self._congested:
            return
        self._congested.discard(key)
        channel = getattr(key, "channel", None)  # a key need not be a connection
        if isinstance(channel, PairChannel):
            self._give_back_withheld(channel.data_id)
            if not self._closed:
                self.flush()

    def _forget_withheld(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        self._congested.discard(conn)


class PairedStreamSession(WindowedSends, WithheldWindows, ServerSession):
    """A session whose forwarded connections are (error, data) stream pairs with
    flow-control windows both ways: SPDY's and HTTP/2's. What the two do alike is here;
    what differs is a hook: how a pending pair's data stream is given up
    (`_cancel_pending_data`), how a stream a bug broke is reset (`_reset_failed_stream`)."""

    protocol_log: ClassVar[logging.Logger]  # the transport's logger
    cancel_code: ClassVar[int]  # resets a data stream whose connection failed
    base_window: ClassVar[int]  # the protocol's session window before any WINDOW_UPDATE

    def __init__(self, ctx: ForwardContext, sandbox: Sandbox | None, idle_timeout: float,
                 creation_timeout: float, close: Callable[[], None]) -> None:
        super().__init__(ctx, sandbox, idle_timeout)
        self._close_transport = close
        self._pairs = StreamPairs(creation_timeout, self._pair_timed_out,
                                  ctx.max_per_session)
        self._by_stream: dict[int, ForwardedConnection | ForwardedFlow] = {}  # data stream id
        self._init_outbound()  # what waits for the client's windows
        self._init_withheld()  # the connections whose window of ours is withheld
        self._window_granted = 0  # our session window, from the buffer budget
        self._window_limit = 0  # what _window_granted may grow to (HTTP/2: as it is used)
        self._filled = 0  # bytes the client sent since the window last grew
        # lines about streams a bug failed (_event_failed): as many as the client's own
        self._failure_lines = CappedLines(ctx.flood.protocol_error_log_lines)

    # --- our receive window, grown as it is used ------------------------------------------
    def _window_filled(self, sent: int) -> None:
        """`sent` more bytes of the client's on our session window (one read's): once it
        sent half the window since it last grew, it has more to send, and the window
        doubles, up to _window_limit, as far as the buffer budget lasts (what it granted
        comes back when the session ends). Counted since the last step, not on what one
        read left: a window given back by quarters never fell below half."""
        if self._window_granted >= self._window_limit or self._closed:
            return
        self._filled += sent
        window = self.base_window + self._window_granted
        if self._filled * 2 < window:
            return
        self._filled = 0
        more = self.ctx.take_window(min(window, self._window_limit - self._window_granted))
        if more:
            self._window_granted += more
            self._window_grown(more)

    # --- what each protocol provides -----------------------------------------------------
    def _window_grown(self, more: int) -> None:
        """The session window granted `more`: tell the client."""
        raise NotImplementedError

    @abstractmethod
    def queue_data(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Send data on a stream within the client's windows (the rest waits); False when
        the stream is left waiting for a window. A view of a pod read only while
        `lending`: what the window takes goes to the codec as it is, flushed before
        the read returns."""

    @abstractmethod
    def queue_eof(self, stream_id: int) -> None:
        """End a stream once what waits for its window has gone."""

    @abstractmethod
    def reset(self, stream_id: int, code: int) -> None:
        """Reset a stream with the protocol's code; nothing of it waits any more."""

    @abstractmethod
    def _cancel_pending_data(self, pair: PendingPair) -> None:
        """A pending pair is given up: its data stream is reset and what it held goes back
        into the window."""

    @abstractmethod
    def _reset_failed_stream(self, stream_id: int) -> None:
        """Reset a stream whose event handling failed (INTERNAL_ERROR)."""

    # --- alike ---------------------------------------------------------------------------
    def _pair_timed_out(self, pair: PendingPair) -> None:
        if self._closed:
            return
        message = self._pairs.timeout_message(pair)
        # a client's pairs that never complete: counted past protocol_error_log_lines
        # (a line each was 180,000 lines for 20 sessions within their budgets)
        self.protocol_error("%s sandbox=%s: %s", self.transport_name, self.sandbox_id,
                            message, logger=self.protocol_log)
        if pair.error_id:
            text = message.encode()
            if self._stream_send_window_alone(pair.error_id) < len(text):
                # a client that gives no window for it would keep the stream and its text
                # for the session's life (8,000 such streams a session, +7 MiB): reset
                self.reset(pair.error_id, self.cancel_code)
            else:
                self.queue_data(pair.error_id, text)
                self.queue_eof(pair.error_id)
        if pair.data_id:
            self._cancel_pending_data(pair)
        self.flush()

    def _event_failed(self, event: object, error: Exception) -> None:
        """A bug while handling one of the client's events: its stream is reset, the
        session and its other streams go on. A line each, ours not the client's (not
        charged to its protocol errors), but as many as protocol_error_log_lines a session
        (a client that finds such a bug may trigger it on every frame), the rest counted
        in one line as the session ends; the traceback once per type (traceback_once)."""
        sid = getattr(event, "stream_id", 0) or 0
        if self._failure_lines.take():
            self.protocol_log.error("%s sandbox=%s: stream %d failed, resetting it: %s: %s",
                                    self.transport_name, self.sandbox_id, sid,
                                    type(error).__name__, error,
                                    exc_info=traceback_once(error))
        if sid:
            self._reset_failed_stream(sid)

    def end(self, close_transport: bool) -> None:
        self.ctx.return_window(self._window_granted)
        self._window_granted = 0
        unlogged = self._failure_lines.take_suppressed()
        if unlogged:
            self.protocol_log.error("%s sandbox=%s: %d more failed streams not logged "
                                    "(protocol_error_log_lines)", self.transport_name,
                                    self.sandbox_id, unlogged)
        super().end(close_transport)

    def close_transport(self) -> None:
        self._close_transport()

    def forget_pending(self) -> None:
        self._pairs.clear()


@dataclass(frozen=True)
class SessionSettings:
    """What the server gives every session it starts."""

    ctx: ForwardContext
    creation_timeout: float
    idle_timeout: float
    # lines about requests refused and connections failed before (or as) a token is
    # redeemed: one budget for the whole server, since they need no token to cause
    refusal_log: LogBudget


@dataclass(frozen=True)
class Upgrade:
    """An admitted HTTP/1.1 upgrade request, handed to its transport's starter."""

    transport: asyncio.Transport
    request: Request
    admitted: Admitted
    settings: SessionSettings
    # registers the session with the server, sets the protocol, starts, feeds the bytes
    # the client sent after the request head
    adopt: Callable[[ServerSession, SessionProtocol], None]


# the key a session's turn holds its read gate with while other sessions have theirs
_TURN = "turn"
# a session's first reads, and the least it reads: a read's size follows what the session
# spends on it (SessionProtocol.buffer_updated)
FIRST_READ = 64 * 1024
LEAST_READ = 4 * 1024


class SessionProtocol(asyncio.BufferedProtocol):
    """asyncio glue for a session on a TCP (or TLS) transport: bytes to session.receive,
    the transport's end and its write-side flow control to the session. Reads go through
    the loop thread's 1 MiB read buffer (flow.read_buffer).

    Fair turns: one event loop serves every session, and the loop reads a connection
    again and again while its socket has data, so a client sending what is dear to decode
    (tiny frames, header blocks) would hold every other session up. Each read's cost is
    measured: once a session has spent `read_turn` since its last turn, its reading is
    paused until the loop has gone round once (the others' reads and callbacks run); a
    read that alone cost more than a turn makes the next reads smaller, and cheap full
    reads (bulk data) grow them back to the whole buffer."""

    def __init__(self, session: ServerSession, transport: asyncio.Transport) -> None:
        self.session = session
        self.transport = transport
        session.transport = transport
        # a session that copies what it keeps of a read gets the read buffer itself
        self.lend_reads = session.borrows_reads
        self.turn = session.ctx.flood.read_turn
        self.read_size = FIRST_READ
        self._spent = 0.0  # CPU seconds of reads since the last turn

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = read_buffer()
        return buf if self.read_size >= len(buf) else buf[:self.read_size]

    def buffer_updated(self, nbytes: int) -> None:
        view = read_buffer()[:nbytes]
        started = time.perf_counter()
        self.data_received(view if self.lend_reads else view.tobytes())
        self.spent(time.perf_counter() - started, nbytes)

    def spent(self, seconds: float, nbytes: int) -> None:
        """A read of nbytes took seconds to handle: size the next read, and give the
        other sessions their turn once this one has had its own."""
        turn = self.turn
        if seconds > turn:
            self.read_size = max(LEAST_READ, int(nbytes * turn / seconds))
        elif nbytes >= self.read_size and seconds < turn / 4 and self.read_size < READ_SIZE:
            self.read_size = min(READ_SIZE, self.read_size * 2)
        self._spent += seconds
        if self._spent < turn:
            return
        self._spent = 0.0
        self.session.after_turn(_TURN)

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            self.received(data)
        except Exception as e:  # one client's input ends its own session, never the server
            session = self.session
            log.error("%s sandbox=%s: ending the session after an unexpected error: %s: %s",
                      session.transport_name, session.sandbox_id, type(e).__name__, e,
                      exc_info=traceback_once(e))
            session.close(f"internal error: {type(e).__name__}")

    def received(self, data: bytes | memoryview) -> None:
        """What the client sent: the session's (a tunnel unwraps it first). A memoryview
        only when the session borrows reads: the loop reuses it once this returns."""
        self.session.receive(data)

    def eof_received(self) -> bool:
        self.session.close("client closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost()

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()

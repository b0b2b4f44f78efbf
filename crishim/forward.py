"""The one forwarding core: every transport hands it a port, a data channel and an
error channel; dialling, copying, half-close, backpressure and error reporting live here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from crishim.budget import FloodLimits, LogBudget
from crishim.flow import ReadGate, read_buffer, unsent, write_lent
from crishim.forward_base import Forwarded
from crishim.forward_udp import ForwardedFlow
from crishim.protocols.buffers import gather
from crishim.protocols.constants import PORTFORWARD_PROTOCOL
from crishim.protocols.negotiation import TCP
from crishim.runtime import RuntimePlugin, Sandbox

log = logging.getLogger("crishim.forward")


class Channel(Protocol):
    """One forwarded connection as its transport carries it (SPDY stream pair, WebSocket
    channel pair, HTTP/2 stream)."""

    def send(self, data: bytes | memoryview) -> None:
        """Pod -> client bytes on the data stream: a memoryview of the loop's read buffer
        only while the session is `lending` (written out, or copied, before this returns)."""

    def send_eof(self) -> None:
        """The pod closed its side: half-close the data stream."""

    def abort(self) -> None:
        """Reset the data stream (the connection failed)."""

    def finish(self, error: str | None) -> None:
        """Close the error stream, with error text if any (text ends the client's session)."""


class ForwardMetrics(Protocol):
    """What the forwarding core and the stream server count (crishim.metrics.Metrics)."""

    def session_started(self, transport: str) -> None: ...
    def session_ended(self, transport: str) -> None: ...
    def connection_started(self, transport: str) -> None: ...
    def connection_ended(self, transport: str, up: int, down: int) -> None: ...
    def failure(self, kind: str) -> None: ...
    def dial_seconds(self, seconds: float) -> None: ...


class ForwardContext:
    """Shared by all sessions of a server: plugin, policy, limits, counters."""

    def __init__(self, plugin: RuntimePlugin, error_policy: str = "quiet",
                 buffer_size: int = 256 * 1024, metrics: ForwardMetrics | None = None,
                 max_per_session: int = 4096, max_connections: int = 65536,
                 fd_budget: int = 1 << 30, flood: FloodLimits | None = None,
                 udp: bool = True, udp_idle_timeout: float = 60.0,
                 dial_timeout: float = 20.0) -> None:
        self.plugin = plugin
        # a dial not connected by then fails its connection (SYNs dropped in the pod)
        self.dial_timeout = dial_timeout
        self.verbose_errors = error_policy == "verbose"
        self.buffer_size = buffer_size
        self.metrics = metrics
        # UDP flows (portforward.crishim.dev/v1): on by setting, and the plugin can dial them
        self.udp = udp and plugin.supports_udp
        self.udp_idle_timeout = udp_idle_timeout
        self.max_per_session = max_per_session
        self.max_connections = max_connections
        # descriptors sessions and forwarded connections may hold together (RLIMIT_NOFILE
        # less reserved_fds): the rest stay free to accept and refuse clients cleanly
        self.fd_budget = fd_budget
        self.live_connections = 0  # admitted and not yet finished, in every session
        # dials in progress: each holds the sandbox's netns fd besides its socket until the
        # connect ends (a pod that never accepts: ~2 min of SYN retries), so counted twice
        self.dialling = 0
        self.live_sessions = 0  # kept by the stream server
        self.flood = flood or FloodLimits()
        # HTTP/2 receive windows granted beyond the 64 KiB every connection has, in all
        # sessions, and the bytes WebSocket channel sessions hold beyond their free
        # allowance: together at most flood.buffer_budget (see take_window, take_bytes)
        self.windows_granted = 0
        self.bytes_held = 0
        self.output_granted = 0  # what sessions' output towards clients may hold
        # sessions admitted while that was spent, oldest first: key -> (bytes, granted)
        self._output_waiting: dict[object, tuple[int, Callable[[], None]]] = {}

    def _budget_left(self) -> int:
        """What the buffer budget towards pods has left (windows and bytes held)."""
        return self.flood.buffer_budget - self.windows_granted - self.bytes_held

    def take_window(self, most: int | None = None) -> int:
        """Bytes towards pods a session may hold (`most`, by default session_buffer_size)
        while the buffer budget lasts, less (down to nothing) once it is spent."""
        most = self.flood.session_buffer_size if most is None else most
        grant = max(0, min(most, self._budget_left()))
        self.windows_granted += grant
        return grant

    def window_room(self) -> int:
        """What take_window() would grant now, taking nothing."""
        return max(0, min(self.flood.session_buffer_size, self._budget_left()))

    def return_window(self, grant: int) -> None:
        self.windows_granted -= grant

    def take_bytes(self, n: int) -> bool:
        """n more bytes held by a session from the buffer budget; False (nothing taken)
        when the budget has not that many left."""
        if n > self._budget_left():
            return False
        self.bytes_held += n
        return True

    def return_bytes(self, n: int) -> None:
        self.bytes_held -= n

    def take_output(self, n: int) -> bool:
        """n more bytes a session's output towards its client may hold, from a pool of
        buffer_budget of its own (a session takes it at admission, idle or not: from the
        pool towards pods, 256 idle sessions left WebSocket sessions closed 1013 and HTTP/2
        windows at 64 KiB); False (nothing taken) when it has not that many left."""
        if self.output_granted + n > self.flood.buffer_budget:
            return False
        self.output_granted += n
        return True

    def wait_for_output(self, key: object, n: int, granted: Callable[[], None]) -> None:
        """take_output(n) failed: granted() once n is returned to the pool, in the order
        sessions came (a session admitted during a burst kept the 64 KiB mark for its
        whole life, hours of slow downloads after the burst had gone)."""
        self._output_waiting[key] = (n, granted)

    def forget_output_wait(self, key: object) -> None:
        self._output_waiting.pop(key, None)

    def return_output(self, n: int) -> None:
        self.output_granted -= n
        waiting = self._output_waiting
        while waiting:
            key = next(iter(waiting))
            need, granted = waiting[key]
            if self.output_granted + need > self.flood.buffer_budget:
                return
            del waiting[key]
            self.output_granted += need
            granted()

    @property
    def out_of_descriptors(self) -> bool:
        return (self.live_connections + self.live_sessions + self.dialling
                >= self.fd_budget)

    def refusal(self, session: SessionBase, counted: bool = False) -> str | None:
        """Why session may not open another forwarded connection now, or None (`counted`:
        the connection is among the session's already, a pair opened ahead)."""
        if len(session.connections) - counted >= self.max_per_session:
            return (f"too many forwarded connections in this session "
                    f"({self.max_per_session}, max_connections_per_session)")
        if self.live_connections >= self.max_connections:
            return (f"too many forwarded connections on this node ({self.max_connections}, "
                    "max_connections)")
        if self.out_of_descriptors:
            return (f"out of file descriptors for forwarded connections ({self.fd_budget}: "
                    "RLIMIT_NOFILE less reserved_fds)")
        return None


# the smallest pod read, however little room the client's output has
MIN_POD_READ = 16 * 1024


class _PodProtocol(asyncio.BufferedProtocol):
    """The socket inside the sandbox: hands bytes to the forwarded connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: ForwardedConnection) -> None:
        self.conn = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        # no more than the client's output has room for, nor than the client's window
        # takes (at least a small read): a read landing past the session's high-water
        # mark, or waiting for a window, is memory no budget counts
        buffer = read_buffer()
        room = self.conn.session.pod_read_room(self.conn)
        return buffer if room >= len(buffer) else buffer[:max(MIN_POD_READ, room)]

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        session = conn.session
        if session.lent_fd < 0 or session.output_held:  # output that waits keeps it
            conn.pod_data(read_buffer()[:nbytes].tobytes())
            return
        session.lending = True  # sent from the read buffer: see SessionBase.lending
        try:
            conn.pod_data(read_buffer()[:nbytes])
        finally:
            session.lending = False

    def eof_received(self) -> bool:
        self.conn.pod_eof()
        return True  # keep our write side open: the client may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.pod_lost(exc)

    def pause_writing(self) -> None:
        self.conn.session.pause_client_reading(self.conn)

    def resume_writing(self) -> None:
        self.conn.session.resume_client_reading(self.conn)


class ForwardedConnection(Forwarded):
    """One TCP connection into the sandbox, paired with one transport channel."""

    def __init__(self, ctx: ForwardContext, session: SessionBase, sandbox: Sandbox, port: int,
                 channel: Channel, transport_name: str = "?") -> None:
        super().__init__(ctx, session, sandbox, port, channel, transport_name)
        self.pod: asyncio.Transport | None = None
        self._pod_fd = -1
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_size = 0
        self._client_eof = False
        self._pod_eof = False
        self._error_closed = False
        self._batch: list[bytes | memoryview] | None = None
        # dial: on-data (docs/protocol.md 8.5): a pair opened ahead of its connection;
        # admitted, counted and dialled when the client's first data or end comes
        self.on_data = False
        self._counted = False

    # --- life cycle ---------------------------------------------------------------------
    def drop(self, reason: str) -> None:
        """A pair opened ahead that will not be a connection: its data stream reset, its
        error stream ended, the pod never dialled."""
        self.on_data = False
        self.reason = reason
        self._finish(abort=True)

    def _go(self) -> None:
        """The client's first data (or end) on a pair opened ahead: now it is a connection."""
        self.on_data = False
        self.session.admit_connection(self, armed=True)

    async def _plugin_dial(self) -> socket.socket:
        return await self.ctx.plugin.dial(self.sandbox, self.port)

    async def _connected(self, sock: socket.socket) -> None:
        if self._pending:
            self._send_pending_now(sock)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: _PodProtocol(self), sock=sock)
        except OSError as e:
            sock.close()
            self._fail(f"connection to port {self.port}: {e.strerror or e}", "dial_refused")
            return
        if self._done:
            transport.abort()
            return
        # any byte the pod's socket did not take pauses the client (or withholds its
        # window): what crishim holds towards a pod is at most one read, not a buffer each
        transport.set_write_buffer_limits(high=0)
        self._pod_fd = sock.fileno()  # the transport owns the socket; open while it is
        self.pod = transport
        if self._pending:
            self._forget_pending()
            transport.writelines(self._pending)
            self._pending.clear()
            if not transport.get_write_buffer_size():
                # the socket took it all; if not, pause_writing paused the client and
                # resume_writing will let it go on
                self.session.resume_client_reading(self)
        else:
            # nothing waits for the pod (sent before the transport existed, or nothing
            # came: a pair opened ahead dialled by an empty frame): what was withheld from
            # the client while dialling goes back
            self.session.resume_client_reading(self)
        if self._client_eof:
            self._write_eof_to_pod()
        if self.session.writing_paused:
            transport.pause_reading()

    def _send_pending_now(self, sock: socket.socket) -> None:
        """Send what the client sent during the dial straight away, before the pod's
        transport exists (creating it takes a loop iteration): the pod finds the first
        bytes beside the connection when it accepts, in one wake-up rather than two
        (benchmarks.probe --first-byte). Whatever the socket does not take, and any error,
        is left to the transport as before."""
        pending = self._pending
        if len(pending) > _EARLY_SEND_PIECES:
            return
        try:
            sent = sock.sendmsg(pending, (), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            return  # the transport meets it again and ends the connection
        self._pending_size -= sent
        self.session.pending_up -= sent
        self._pending = unsent(pending, sent)

    def _finish(self, error: str | None = None, abort: bool = False,
                level: int = logging.INFO) -> None:
        if self._done:
            return
        self._done = True
        if self.admitted:
            self.ctx.live_connections -= 1
        self._forget_pending()
        self._pending.clear()
        if self.pod is not None:
            if abort:
                self.pod.abort()
            else:
                self.pod.close()
        task = self._task
        if task is not None and self.pod is None and not task.done() \
                and task is not asyncio.current_task():
            task.cancel()
        self.session.resume_client_reading(self)
        if abort:
            self.channel.abort()
        self._close_error_stream(error)
        if not self._counted:  # a pair opened ahead that never carried a connection
            log.debug("forward sandbox=%s port=%d transport=%s: a pair opened ahead ended "
                      "unused: %s", self.sandbox.id, self.port, self.transport_name,
                      self.reason or "closed")
            self.session.connection_finished(self)
            return
        self._report_end(level)
        self.session.connection_finished(self)

    def _close_error_stream(self, error: str | None) -> None:
        if not self._error_closed:
            self._error_closed = True
            self.channel.finish(error)
        elif error:
            self.session.connection_log.log(
                logging.INFO, "forward sandbox=%s port=%d: error after the error stream "
                "closed: %s", self.sandbox.id, self.port, error)

    # --- from the client (transport) -----------------------------------------------------
    def client_data(self, data: bytes | memoryview) -> None:
        if self.on_data:
            self._go()
        if self._done or not data:
            return
        self.bytes_up += len(data)
        pod = self.pod
        if pod is not None:
            batch = self._batch
            if batch is not None:
                batch.append(data)
            elif self.session.batching:  # one writelines per transport read, not per frame
                self._batch = [data]
                self.session.batched.append(self)
            else:
                self._write_to_pod(pod, [data])
            return
        # small pieces (a flood of 1-byte frames) into one buffer, not an object each
        if not gather(self._pending, data):
            self._pending.append(bytes(data))  # kept past a lent read: copied
        self._pending_size += len(data)
        self.session.pending_up += len(data)
        # bounded per session, not per connection: many slow dials hold one buffer
        if self.session.pending_up > self.ctx.buffer_size:
            self.session.pause_client_reading(self)

    def _forget_pending(self) -> None:
        self.session.pending_up -= self._pending_size
        self._pending_size = 0

    @property
    def dialled(self) -> bool:
        return self.pod is not None

    def flush_batch(self) -> None:
        """Write what client_data gathered during one transport read."""
        batch, self._batch = self._batch, None
        pod = self.pod
        if batch and pod is not None and not self._done:
            self._write_to_pod(pod, batch)

    def _write_to_pod(self, pod: asyncio.Transport, pieces: list[bytes | memoryview]) -> None:
        if self.session.borrowing:  # views of the loop's read buffer: see flow.write_lent
            write_lent(pod, self._pod_fd, pieces)
        else:
            pod.writelines(pieces)

    def client_eof(self) -> None:
        """The client half-closed the data stream: shut down writing towards the pod."""
        if self.on_data:
            self._go()
        if self._done or self._client_eof:
            return
        self.flush_batch()
        self._client_eof = True
        if self.pod is not None:
            self._write_eof_to_pod()

    def _write_eof_to_pod(self) -> None:
        assert self.pod is not None
        if self.pod.can_write_eof():
            self.pod.write_eof()
        if self._pod_eof:
            self._finish()

    # --- from the pod ----------------------------------------------------------------------
    def pod_data(self, data: bytes | memoryview) -> None:
        if self._done:
            return
        self.bytes_down += len(data)
        self.channel.send(data)

    def pod_eof(self) -> None:
        if self._done:
            return
        self._pod_eof = True
        session = self.session
        session.hold_output()  # the data stream's end and the error stream's: one write
        try:
            self.channel.send_eof()
            # client-go waits for the error stream's end before it finishes a connection
            # whose remote side ended: close it now, while the client may still send
            self._close_error_stream(None)
        finally:
            session.release_output()
        if self._client_eof:
            self._finish()

    def pod_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        if exc is not None:
            self._fail(f"connection to port {self.port} in sandbox lost: "
                       f"{getattr(exc, 'strerror', None) or exc}", "pod_reset")
            return
        if not self._pod_eof:
            self.pod_eof()
        if not self._done:
            self._finish()

    # --- backpressure from the transport's write side ------------------------------------
    def pause_pod_reading(self) -> None:
        if self.pod is not None and not self._done:
            self.pod.pause_reading()

    def resume_pod_reading(self) -> None:
        if self.pod is not None and not self._done:
            self.pod.resume_reading()


_EARLY_SEND_PIECES = 64  # sent with one sendmsg(2) before the pod's transport exists
_CLIENT_OUTPUT = "client output"  # the read gate's key while the client's output backs up


class SessionBase:
    """Bookkeeping every transport session shares: its forwarded connections and the
    back-pressure between them and the one client transport."""

    transport_name = "?"
    #: receive() takes a view of the loop's read buffer (flow.read_buffer) and copies
    #: only what it keeps past the read; otherwise the protocol copies every read first
    borrows_reads = False

    def __init__(self, ctx: ForwardContext, sandbox: Sandbox) -> None:
        self.ctx = ctx
        self.sandbox = sandbox
        # client data handed to connections are views of a read buffer the loop reuses
        # (set by a borrowing receive() while it runs)
        self.borrowing = False
        # the client's socket, where a pod read may go straight from the read buffer (a
        # session on plain TCP whose flush writes it with flow.write_lent); -1: pod reads
        # are copied first
        self.lent_fd = -1
        # what the channels send is a view of the loop's read buffer, which the next read
        # overwrites (set by the pod's protocol while it hands one over, never while
        # output is held): the session writes it out at once (write_lent) and copies
        # what waits for a window
        self.lending = False
        # while a transport read is being decoded, client data is gathered per connection
        # and written once at the end (see begin_batch / end_batch)
        self.batching = False
        self.batched: list[ForwardedConnection] = []
        self._batch_depth = 0
        self.connections: set[ForwardedConnection | ForwardedFlow] = set()
        # the stream protocol version the upgrade negotiated: udp flows need the crishim one
        self.stream_version = PORTFORWARD_PROTOCOL
        self.writing_paused = False
        # the client transport, paused for congested pods and for its own unwritten output
        self.read_gate = ReadGate()
        self.pending_up = 0  # client bytes held for connections still dialling
        self.output_held = 0  # hold_output() calls not yet released: flush() waits
        self.transport: asyncio.Transport | None = None
        # the client transport's write high-water mark (the stream server sets it), and
        # whether pod reads are cut to the room below it (a session whose output the
        # output budget covers, a pod read past the mark included, reads whole)
        self.output_high = 1 << 40
        self.output_sized = False
        self.last_activity = time.monotonic()
        self._connection_log: LogBudget | None = None

    @property
    def connection_log(self) -> LogBudget:
        """The session's per-connection lines (and its flows'), within
        log_lines_per_second; made with the first, once the sandbox is known."""
        if self._connection_log is None:
            sandbox = (self.sandbox.id if self.sandbox else "?").replace("%", "%%")
            self._connection_log = LogBudget(
                log, self.ctx.flood.log_lines_per_second,
                f"forward sandbox={sandbox} transport={self.transport_name}: %d more "
                "connection lines not logged")
        return self._connection_log

    def flush_connection_log(self) -> None:
        if self._connection_log is not None:
            self._connection_log.flush()

    def output_room(self) -> int:
        """Bytes a pod read may bring for the client: what its transport may still take
        before the high-water mark, or, where the budget covers a read past it, any."""
        transport = self.transport
        if transport is None or not self.output_sized:
            return 1 << 40
        return self.output_high - transport.get_write_buffer_size()

    def pod_read_room(self, conn: ForwardedConnection) -> int:
        """Bytes conn's next pod read may bring: output_room, and, on a session that
        sends within the client's windows, no more than conn's stream may send now."""
        return self.output_room()

    def open_connection(self, port: int, channel: Channel, on_data: bool = False
                        ) -> ForwardedConnection:
        """A forwarded connection, dialled now, or (`on_data`, a pair opened ahead) when
        the client's first data or end comes: admitted and counted then, and until then
        holding no pod socket, only its place among the session's connections."""
        conn = ForwardedConnection(self.ctx, self, self.sandbox, port, channel,
                                   self.transport_name)
        if on_data and self.ctx.refusal(self) is None:
            self.connections.add(conn)
            conn.on_data = True
            return conn
        self.admit_connection(conn)
        return conn

    def admit_connection(self, conn: ForwardedConnection, armed: bool = False) -> None:
        """Count conn and dial it, or refuse it where a limit is reached (`armed`: it has
        its place in the session already)."""
        conn._counted = True
        self._admit_forward(conn, armed)

    def open_flow(self, port: int, channel: Channel) -> ForwardedFlow:
        """A UDP flow for a pair with protocol udp (only on a session whose version allows
        it: pairing refused the streams otherwise)."""
        flow = ForwardedFlow(self.ctx, self, self.sandbox, port, channel, self.transport_name)
        self._admit_forward(flow)
        return flow

    def _admit_forward(self, forward: ForwardedConnection | ForwardedFlow,
                       armed: bool = False) -> None:
        """Count a connection or flow among the session's and start it, or refuse it where
        a limit is reached (`armed`: it has its place in the session already)."""
        refusal = self.ctx.refusal(self, counted=armed)
        self.connections.add(forward)
        if self.ctx.metrics is not None:
            self.ctx.metrics.connection_started(self.transport_name)
        if refusal is None:
            forward.start()
        else:
            forward.refuse(refusal)

    def open_forward(self, port: int, channel: Channel, protocol: str = TCP,
                     on_data: bool = False) -> ForwardedConnection | ForwardedFlow:
        """The connection (tcp) or flow (udp) a complete stream pair asks for; `on_data`:
        the pair asked for dial: on-data (tcp only)."""
        if protocol == TCP:
            return self.open_connection(port, channel, on_data)
        return self.open_flow(port, channel)

    def hold_output(self) -> None:
        """Until release_output, what the channels queue for the client is written at once
        at the end: one write (one wake-up of the client) rather than one per call."""
        self.output_held += 1

    def release_output(self) -> None:
        self.output_held = max(0, self.output_held - 1)  # close() may have let go already
        if not self.output_held:
            self.flush()

    def flush(self) -> None:
        """Write what the transport queued for the client (each transport's session)."""

    def write_lent(self, out: list[bytes | memoryview]) -> None:
        """Write output that holds views of a pod read (while `lending`): to the client's
        socket at once, what it does not take copied (flow.write_lent)."""
        if self.transport is not None:
            write_lent(self.transport, self.lent_fd, out)

    def begin_batch(self) -> None:
        self._batch_depth += 1
        self.batching = True

    def end_batch(self) -> None:
        """Nested batches (a WebSocket read carrying several SPDY pieces) write once, at
        the outermost end."""
        self._batch_depth -= 1
        if self._batch_depth > 0:
            return
        self.batching = False
        if self.batched:
            batched, self.batched = self.batched, []
            for conn in batched:
                conn.flush_batch()

    def connection_finished(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        self.connections.discard(conn)
        self.read_gate.forget(conn)

    def pause_client_reading(self, key: object) -> None:
        self.read_gate.pause(key, self.transport)

    def resume_client_reading(self, key: object) -> None:
        self.read_gate.resume(key, self.transport)

    # asyncio.Protocol write-side flow control of the client transport: while the client
    # does not take what is written, nothing more is read from it (no answers pile up)
    # and nothing more from its pods
    def pause_writing(self) -> None:
        self.writing_paused = True
        self.read_gate.pause(_CLIENT_OUTPUT, self.transport)
        for conn in self.connections:
            conn.pause_pod_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.read_gate.resume(_CLIENT_OUTPUT, self.transport)
        self.resume_pods()

    def resume_pods(self) -> None:
        """The client takes bytes again: its pods may be read."""
        for conn in list(self.connections):
            conn.resume_pod_reading()

    def close_connections(self, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(reason)

    def drop_unused_ahead(self, reason: str) -> None:
        """Reset the pairs opened ahead that no connection took yet (a drain: they would
        be new connections)."""
        for conn in list(self.connections):
            if isinstance(conn, ForwardedConnection) and conn.on_data:
                conn.drop(reason)


"""A forwarded UDP flow: one connected UDP socket inside the sandbox, paired with one
transport channel (the same error + data stream pair as a TCP connection, negotiated with
`portforward.crishim.dev/v1` and asked for with `protocol: udp`).

Datagrams travel length-prefixed on the data stream (crishim/protocols/datagram.py), so
their boundaries survive the byte stream. The flow ends when either side closes its data
stream, when no datagram has passed either way for `udp_flow_idle_timeout`, or when the
pod answers with ICMP port unreachable (ECONNREFUSED on the connected socket), which is
reported like a refused TCP dial: a reset data stream, and text on the error stream only
under error_policy=verbose.

The dial is made as a TCP connection's (Forwarded, crishim/forward_base.py): bounded by
dial_timeout, counted among the dials in progress, timed in the dial metrics.

UDP has no backpressure: a datagram the pod socket cannot take (its send buffer is full)
is dropped and counted, as the network would. Datagrams that arrive while the socket is
dialled, or beyond what one turn sends, wait in the flow's queue (the session's reading of
its client paused meanwhile); past MAX_QUEUED datagrams or MAX_QUEUED_BYTES they are
dropped and counted too. While the client's transport is congested the socket is not
read, and the kernel drops what overflows its receive buffer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from crishim.flow import READ_SIZE
from crishim.forward_base import Forwarded
from crishim.protocols.datagram import MAX_UDP_PAYLOAD, DatagramDecoder

if TYPE_CHECKING:
    from crishim.forward import Channel, ForwardContext, SessionBase
    from crishim.runtime import Sandbox


# datagrams read from the pod socket per wakeup, joined into channel writes of about
# DELIVER_BYTES: after each write the flow stops if its channel paused it (an HTTP/2 stream
# out of window, a congested client), so what it holds is a write, not a batch (64
# datagrams of 64 KiB: 4 MiB a flow, measured +1.2 GiB for 300 flows whose client gave no
# window)
READ_BATCH = 64
DELIVER_BYTES = 64 * 1024
# datagrams sent to the pod per turn of the event loop: a client frame of tiny datagrams
# (32,768 empty ones in 64 KiB) made as many send() calls in one callback, up to 184 ms
# in which no other session ran; the rest wait in the flow's queue for the next turn, and
# the session's reading of its client pauses until the queue is sent (as a TCP connection
# whose pod does not keep up pauses it), so the queue holds what one read brought
SENDS_PER_TURN = 256
# what a queue may hold (past it datagrams are dropped and counted): more than one client
# read (1 MiB) brings; empty datagrams cost no bytes but an object each
MAX_QUEUED = 16384
MAX_QUEUED_BYTES = 2 * READ_SIZE
# the pod socket's receive buffer: room for a burst while the client's transport is busy
# (the kernel counts twice this against the host's udp_mem)
SOCKET_BUFFER = 256 * 1024
_LENGTH = struct.Struct(">H")
# one recv_into target per thread for every flow (a datagram is copied out before the
# next read), not one per flow (64 KiB each: 3,000 idle flows held +200 MiB); not
# flow.read_buffer(), which a client read may be being decoded from while a flow reads
_received = threading.local()


def _receive_buffer() -> bytearray:
    buffer: bytearray | None = getattr(_received, "buffer", None)
    if buffer is None:
        buffer = _received.buffer = bytearray(MAX_UDP_PAYLOAD + 1)
    return buffer


class ForwardedFlow(Forwarded):
    """One UDP flow into the sandbox. Its methods mirror ForwardedConnection's, so a
    transport drives both alike (client_data, client_eof, client_reset, close, ...); bytes
    are datagrams' payload bytes."""

    port_suffix = "/udp"
    protocol_fields = {"protocol": "udp"}

    def __init__(self, ctx: ForwardContext, session: SessionBase, sandbox: Sandbox, port: int,
                 channel: Channel, transport_name: str = "?") -> None:
        super().__init__(ctx, session, sandbox, port, channel, transport_name)
        self.decoder = DatagramDecoder(MAX_UDP_PAYLOAD)
        self.sock: socket.socket | None = None
        self.datagrams_up = 0
        self.datagrams_down = 0
        # datagrams not forwarded: the client's the pod socket or the queue could not
        # take, the pod's larger than MAX_UDP_PAYLOAD
        self.dropped = 0
        self.last_activity = time.monotonic()
        # datagrams waiting for the socket (dialling) or for the next turn, and their bytes
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._drain_handle: asyncio.Handle | None = None
        self._eof_pending = False  # the client ended the flow: finish once the queue is sent
        self._holding_client = False  # the session's reading paused while the queue waits
        self._sent_since_read = 0  # datagrams sent since the pod socket was last read
        self._reading = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        self._arm_idle_timer(self.ctx.udp_idle_timeout)

    async def _plugin_dial(self) -> socket.socket:
        return await self.ctx.plugin.dial_udp(self.sandbox, self.port)

    def _dial_what(self) -> str:
        return f"udp port {self.port}"

    async def _connected(self, sock: socket.socket) -> None:
        try:  # capped by net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        except OSError:
            pass
        self.sock = sock
        if not self.session.writing_paused:
            self._start_reading()
        self._drain_queue()

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_timer = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        if self._done:
            return
        idle_for = time.monotonic() - self.last_activity
        timeout = self.ctx.udp_idle_timeout
        if idle_for < timeout:
            self._arm_idle_timer(timeout - idle_for)
            return
        self.reason = f"idle for {timeout:g}s"
        self._finish(eof=True)

    def _finish(self, error: str | None = None, abort: bool = False,
                level: int = logging.INFO, eof: bool = False) -> None:
        """End the flow (`abort`: its data stream reset, as a failed TCP connection's)."""
        if self._done:
            return
        if abort:
            self.channel.abort()
        self._done = True
        if self.admitted:
            self.ctx.live_connections -= 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        self.dropped += len(self._queue)  # never sent: the flow ended first
        self._queue.clear()
        self._release_client()
        self._close_socket()
        if eof:
            self.channel.send_eof()
        self.channel.finish(error)
        self._report_end(level)
        self.session.connection_finished(self)

    def _end_counts(self) -> dict[str, int]:
        return {"datagrams_up": self.datagrams_up, "datagrams_down": self.datagrams_down,
                "dropped": self.dropped}

    def _close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            if self._reading:
                self._loop.remove_reader(sock.fileno())
                self._reading = False
            sock.close()

    # --- from the client (transport) ----------------------------------------------------
    def client_data(self, data: bytes | memoryview) -> None:
        if self._done or not data:
            return
        self.last_activity = time.monotonic()
        datagrams = self.decoder.receive_data(data)
        self.datagrams_up += len(datagrams)
        sent = 0
        if self.sock is not None and not self._queue:  # the usual case: straight out
            sent = min(len(datagrams), SENDS_PER_TURN)
            if not self._send_all(datagrams[:sent] if sent < len(datagrams) else datagrams):
                return
        if sent < len(datagrams):
            self._enqueue(datagrams[sent:] if sent else datagrams)
        if self.decoder.error is not None:
            self._fail(f"udp flow to port {self.port}: {self.decoder.error}", "protocol")

    def _send_all(self, datagrams: list[bytes]) -> bool:
        """Send datagrams to the pod; False if the flow ended."""
        for datagram in datagrams:
            self.bytes_up += len(datagram)
            if not self._send_to_pod(datagram):
                return False
            # a burst from the client would otherwise fill the socket's receive buffer
            # with answers before the loop reads it: read between sends, every READ_BATCH
            # sent whatever the calls they came in (counted per call, a client's frames of
            # fewer never read: twice the loss in unpaced bursts)
            self._sent_since_read += 1
            if self._sent_since_read >= READ_BATCH:
                self._sent_since_read = 0
                if self._reading:
                    self._readable()
                    if self._done:
                        return False
        return True

    def _enqueue(self, datagrams: list[bytes]) -> None:
        """Hold datagrams for the socket or the next turn, pausing the session's reading
        meanwhile; past MAX_QUEUED datagrams or MAX_QUEUED_BYTES they are dropped and
        counted, as a full link would."""
        queue = self._queue
        for datagram in datagrams:
            if len(queue) >= MAX_QUEUED or \
                    self._queued_bytes + len(datagram) > MAX_QUEUED_BYTES:
                self.dropped += 1
                continue
            queue.append(datagram)
            self._queued_bytes += len(datagram)
        if queue and not self._holding_client:
            self._holding_client = True
            self.session.pause_client_reading(self)
        if self.sock is not None and self._drain_handle is None and queue:
            self._drain_handle = self._loop.call_soon(self._drain_queue)

    def _release_client(self) -> None:
        if self._holding_client:
            self._holding_client = False
            self.session.resume_client_reading(self)

    def _drain_queue(self) -> None:
        """Send up to SENDS_PER_TURN queued datagrams; the rest next turn. Ends the flow
        once the queue is empty if the client has ended it."""
        self._drain_handle = None
        if self._done or self.sock is None:
            return
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), SENDS_PER_TURN))]
        self._queued_bytes -= sum(map(len, batch))
        if not self._send_all(batch):
            return
        if queue:
            self._drain_handle = self._loop.call_soon(self._drain_queue)
            return
        self._release_client()
        if self._eof_pending:
            self._finish(eof=True)

    def flush_batch(self) -> None:
        """Nothing is batched: each datagram is one send."""

    def client_eof(self) -> None:
        """The client closed its data stream: the flow is over."""
        if self._done:
            return
        truncated = self.decoder.truncated()
        if truncated is not None:
            self.session.connection_log.log(
                logging.INFO, "forward sandbox=%s port=%d/udp: %s (dropped)", self.sandbox.id,
                self.port, truncated)
        self.reason = self.reason or "closed by client"
        if self._queue or (self.sock is None and self.admitted):
            # datagrams sent before the end wait for the socket (still dialling: they were
            # dropped, 18 of 20 on HTTP/2) or for their turn: they go first
            self._eof_pending = True
            return
        self._finish(eof=True)

    # --- the pod socket -----------------------------------------------------------------
    def _send_to_pod(self, datagram: bytes) -> bool:
        """False if the flow ended (the pod refused)."""
        assert self.sock is not None
        try:
            self.sock.send(datagram)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # the socket's send buffer is full: as a congested link would
        except OSError as e:
            return self._pod_error(e)
        return True

    def _readable(self) -> None:
        sock = self.sock
        if sock is None or self._done:
            return
        buffer = _receive_buffer()
        view = memoryview(buffer)
        out = bytearray()
        for _ in range(READ_BATCH):
            try:
                n = sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if out:
                    self._deliver(out)
                self._pod_error(e)
                return
            if n > MAX_UDP_PAYLOAD:
                # past what a flow forwards (IPv6 allows 65,527 bytes): the buffer's one
                # byte more shows it, cut; dropped and counted, never sent cut
                self.dropped += 1
                continue
            out += _LENGTH.pack(n)
            out += view[:n]
            self.datagrams_down += 1
            self.bytes_down += n
            if len(out) >= DELIVER_BYTES:
                self._deliver(out)
                out = bytearray()
                if not self._reading or self._done:
                    return  # the channel paused the flow (or it ended): the rest waits
        if out:
            self._deliver(out)

    def _deliver(self, framed: bytearray) -> None:
        self.last_activity = time.monotonic()
        self.channel.send(bytes(framed))

    def _pod_error(self, exc: OSError) -> bool:
        if exc.errno == errno.ECONNREFUSED:  # ICMP port unreachable from the pod side
            self._fail(f"udp port {self.port} in sandbox: {os.strerror(errno.ECONNREFUSED)} "
                       "(ICMP port unreachable)", "dial_refused")
        else:
            self._fail(f"udp flow to port {self.port} in sandbox: {exc.strerror or exc}",
                       "pod_reset")
        return False

    def _start_reading(self) -> None:
        if self.sock is not None and not self._reading and not self._done:
            self._loop.add_reader(self.sock.fileno(), self._readable)
            self._reading = True

    # --- backpressure from the transport's write side -----------------------------------
    def pause_pod_reading(self) -> None:
        if self._reading and self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def resume_pod_reading(self) -> None:
        self._start_reading()

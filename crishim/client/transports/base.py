"""What every client transport shares: the errors, one forwarded connection as an
asyncio.Transport (`ForwardStream`), the session's bookkeeping (`ClientSession`; for SPDY
and HTTP/2, whose connections are stream pairs, `StreamPairSession`) and the HTTP
connection the session upgrades from (`UpgradeProtocol`, `read_upgrade_answer`).

Everything runs on callbacks: no queue per chunk, one copy from the session transport's
read into the codec's frames and none on the way out (codec buffers go to writelines)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import ssl
import sys
import termios
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

from crishim.flow import ReadGate, plain_socket_fd, read_buffer, write_lent
from crishim.protocols.buffers import Outbound
from crishim.protocols.constants import (
    DIAL_ON_DATA,
    HEADER_DIAL,
    HEADER_PORT,
    HEADER_PROTOCOL,
    HEADER_REQUEST_ID,
    HEADER_STREAM_TYPE,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
    STREAM_TYPE_DATA,
    STREAM_TYPE_ERROR,
)
from crishim.protocols.negotiation import TCP, UDP, carries_udp, client_offer

USER_AGENT = "crishim-port-forward"
# After a forwarded connection's data stream ends, how long to wait for its error stream.
ERROR_STREAM_WAIT = 2.0
SESSION_WRITE_HIGH_WATER = 1024 * 1024
# Of a connection's error-stream text, what is kept and shown; past it the error stream is
# reset and the connection ends (a server sending endless error text grew crishim
# port-forward from 59 to 159 MiB for 43 MiB of it, and it printed all of it).
ERROR_TEXT_KEPT = 4096
MAX_HEAD = 64 * 1024
# Of a refused upgrade's body, what the error message shows; the rest is not read (a
# server streaming one took crishim port-forward to 6 GiB and a 1.2 GB error line).
REFUSAL_BODY_KEPT = 4096
# bytes a stream may queue for the server's flow-control window (HTTP/2, SPDY where the
# server has windows) before its local connection is no longer read
QUEUE_HIGH_WATER = 1024 * 1024
# A port's next pair is opened ahead (dial: on-data) OPEN_AHEAD_AFTER_REPLY after the
# connection before it has its first bytes back or has ended, or OPEN_AHEAD_DELAY after it
# opened, whichever is first (seconds).
OPEN_AHEAD_DELAY = 0.1
OPEN_AHEAD_AFTER_REPLY = 0.001
# keepalive PINGs in a row that time out on a server that took all we sent: stalled
STALL_STRIKES = 2
SIOCOUTQNSD = 0x894B  # linux/sockios.h: a TCP socket's send queue not yet sent

Buffer = bytes | bytearray | memoryview


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
                   f"{PORTFORWARD_CRISHIM_V1}, which crishim serve offers where UDP is "
                   "enabled and its runtime plugin can dial UDP")
        super().__init__(f"the container runtime does not support UDP port-forward ({why})")


class ForwardError(Exception):
    """One forwarded connection failed. `fatal`: the server wrote error text, which ends the
    whole session for client-go (kubectl, crictl) and so for `crishim port-forward`."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def reset_by_server(code: int, name: str | None) -> str:
    """A stream the server reset, the same words on SPDY and HTTP/2: the RST_STREAM
    code's name where it has one (`RST_STREAM CANCEL`), else its number."""
    return f"the server reset the connection (RST_STREAM {name or f'status {code}'})"


def ca_bundle_problem(path: str) -> str:
    """Why the CA bundle at `path` cannot be used (missing, a directory, not PEM), or ""
    if it can: said before the first https URL needs it, not as a traceback then."""
    try:
        ssl.create_default_context(cafile=path)
    except OSError as e:
        return _why_not_loaded(e)
    return ""


def _why_not_loaded(e: OSError) -> str:
    if isinstance(e, ssl.SSLError):  # read, but no certificate in it or a broken one
        return f"not a PEM CA bundle ({(e.reason or str(e)).lower().replace('_', ' ')})"
    return e.strerror or str(e)


def ssl_context_for(url: str, insecure: bool = False, ca_file: str | None = None,
                    alpn: list[str] | None = None) -> ssl.SSLContext | None:
    if urlsplit(url).scheme != "https":
        return None
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except OSError as e:
        raise SessionError(f"CA bundle {ca_file}: {_why_not_loaded(e)}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# --------------------------------------------------------------------------- one stream


# what may wait for the server to read before the session is ended (see _write_raw)
MAX_UNSENT = 64 << 20


class ForwardStream(asyncio.Transport):
    """One forwarded connection as seen by the client: an asyncio.Transport to the pod."""

    def __init__(self, session: ClientSession, port: int, key: int) -> None:
        super().__init__({"peername": ("pod", port)})
        self.session = session
        self.port = port
        self.key = key  # the transport's handle (SPDY data stream id, channel index, ...)
        self.error_id: int | None = None  # its error stream, where that is a stream of its own
        self.protocol: asyncio.Protocol | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.perf_counter()
        self.accepted_at: float | None = None
        self.first_byte_at: float | None = None
        self.error_text = ""
        self.error_cut = False  # the server sent more than ERROR_TEXT_KEPT of error text
        self.failure = ""
        # opened ahead of its connection (dial: on-data); `ahead` until a connection takes it
        self.opened_ahead = self.ahead = False
        self.opens_next = False  # its first reply opens its port's next pair ahead
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
    def write(self, data: Buffer) -> None:
        self._write(data, False)

    def write_view(self, view: memoryview) -> None:
        """write(), given a view of the loop's read buffer (flow.read_buffer), which the
        next read overwrites: a session that writes its socket itself (`lent_fd`) sends it
        out at once and copies only what waits (a window, a full socket); others get a
        copy."""
        if self.session.lent_fd < 0:
            self._write(view.tobytes(), False)
        else:
            self._write(view, True)

    def _write(self, data: Buffer, lent: bool) -> None:
        if self._closing or self._finished or self._eof_sent or self._reset or not data:
            return
        self.bytes_up += len(data)
        self.session._send(self, data, lent)

    def writelines(self, list_of_data: Iterable[Buffer]) -> None:
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
        self.session.pause_stream(self)

    def resume_reading(self) -> None:
        self.session.resume_stream(self)

    def is_reading(self) -> bool:
        return self.session.stream_reading(self)

    def get_write_buffer_size(self) -> int:
        t = self.session.transport
        return t.get_write_buffer_size() if t is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        # a streaming protocol (data_received, eof_received), whatever its base classes
        self.protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        if self.protocol is None:
            raise RuntimeError("the forwarded connection has no protocol yet")
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
        protocol = self.protocol
        if self._finished or self._closing or protocol is None:
            return
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
            self.session.reply_came(self)
        self.bytes_down += len(data)
        if self.session.lending and not getattr(protocol, "takes_views", False):
            data = bytes(data)  # a view of the read buffer, to a protocol that may keep it
        # zero copy: a view into the received frame; asyncio's protocols take bytes-likes
        protocol.data_received(data)  # type: ignore[arg-type]

    def _remote_eof(self) -> None:
        if self._remote_done or self._finished:
            return
        self._remote_done = True
        if not self._closing and self.protocol is not None:
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
        if self.error_cut:
            return
        room = ERROR_TEXT_KEPT - len(self.error_text)
        if len(text) <= room:
            self.error_text += text
            return
        self.error_text += text[:room]
        self.error_cut = True
        self.session._stop_error_stream(self)
        self.abort()  # the error is known: the rest of it, and of the connection, is not read

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
            text = self.error_text.strip()
            if self.error_cut:
                text += f"… (the first {ERROR_TEXT_KEPT} characters of the error stream)"
            exc = ForwardError(text, fatal=self.session.error_text_is_fatal)
        elif self.failure and not self._closing:
            exc = ForwardError(self.failure)
        self.session._stream_done(self)
        self.session.reply_came(self)
        if not self.done.done():
            self.done.set_result(exc)
        if self.protocol is not None:
            self.protocol.connection_lost(exc)


# --------------------------------------------------------------------------- sessions


class ClientSession:
    """What every transport's client session shares: streams, back-pressure, closing.

    A transport subclasses it with `_new_stream`, `_send`, `_send_eof`, `_reset_stream`,
    `_goodbye`, `_flush` and `receive` (the session transport's bytes).

    Pairs opened ahead (transports with stream headers, to a server that negotiated
    portforward.crishim.dev/v1; docs/protocol.md 8.5): once a TCP connection to a port has
    its first bytes back (or has ended, or OPEN_AHEAD_DELAY after it opened), the session
    opens that port's next stream pair with `dial: on-data`; the server answers it and
    dials nothing. The port's next connection takes it: its first DATA frame (an empty
    one if the local side sent nothing yet) has the server dial, so a new connection costs
    one frame each way rather than a pair's opening and answer on its first byte's way.
    A server whose reply lacks the acknowledgement dialled at once: the pair is reset and
    the session opens no more ahead."""

    transport_name = "?"
    has_ping = False  # a session-level PING (SPDY, HTTP/2): ping(), keepalive
    has_error_stream = True
    error_text_is_fatal = True
    opens_ahead = False  # the transport's streams carry headers (SPDY, HTTP/2)
    #: receive() may be handed a view of the loop's read buffer (flow.read_buffer) with
    #: lent=True, which the next read overwrites: what it decodes is acted on before it
    #: returns, and stream data reaches a protocol as such a view only if the protocol says
    #: it writes it out or copies it at once (`takes_views`; ForwardStream._data)
    reads_lent = False

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, ForwardStream] = {}
        self._error_streams: dict[int, ForwardStream] = {}  # by error_id (SPDY, h2)
        # streams waiting for the server's flow-control window (HTTP/2, SPDY with windows)
        self._queues: dict[int, Outbound] = {}
        self.read_gate = ReadGate()  # the session transport, paused for congested streams
        self.writing_paused = False
        self.closed: asyncio.Future[str] = loop.create_future()
        # done when a stream's first bytes come back or a stream or the session ends
        self.replied: asyncio.Future[None] = loop.create_future()
        self.connected_at = time.perf_counter()
        # open_session's timeout: how long the server may take to answer (negotiate()'s
        # default, a keepalive PING)
        self.answer_timeout = 10.0
        self.reads = 0  # reads from the server so far (a stalled server makes none)
        self.lending = False  # within a lent receive(): see reads_lent
        # the session's socket, where a stream's write_view may go straight (a plain TCP
        # connection of a session that reads in place); -1: none, views are copied
        self.lent_fd = -1
        self._ping_task: asyncio.Task[None] | None = None
        self._pings: dict[object, tuple[float, asyncio.Future[float]]] = {}  # by ping key
        # the stream protocol version the server picked (None: HTTP/2 before it answered)
        self.stream_version: str | None = PORTFORWARD_PROTOCOL
        self.open_ahead = self.opens_ahead  # off once a server did not acknowledge
        # how the server says the session dials (the channel WebSocket's Crishim-Dial in its
        # 101): on-data (opened ahead: its ports wait for a first message), at-once, or ""
        # (a server that does not say: not crishim serve)
        self.dial = ""
        # why the server takes no new streams (SPDY GOAWAY), "" while it does: live
        # connections go on, new ones are refused, the session ends with the last one
        self.going_away = ""
        self._ahead: dict[int, ForwardStream] = {}  # by port: a pair opened ahead, unused
        self._opening_ahead: dict[int, asyncio.TimerHandle] = {}  # by port: due to open

    # --- public -------------------------------------------------------------------------
    @property
    def supports_udp(self) -> bool:
        """Whether the server negotiated crishim's extension (UDP flows)."""
        return carries_udp(self.stream_version)

    async def negotiate(self, timeout: float | None = None) -> str | None:
        """The stream protocol version, asking the server first where the upgrade did not
        say (HTTP/2), for at most `timeout` seconds (default: the session's
        answer_timeout, open_session's `timeout`)."""
        return self.stream_version

    async def open_connection(self, port: int, protocol_factory: Callable[[], asyncio.Protocol],
                              ip_protocol: str = TCP) -> tuple[ForwardStream, asyncio.Protocol]:
        return self.open_connection_nowait(port, protocol_factory, ip_protocol)

    def open_connection_nowait(self, port: int,
                               protocol_factory: Callable[[], asyncio.Protocol],
                               ip_protocol: str = TCP) -> tuple[ForwardStream, asyncio.Protocol]:
        """open_connection without a loop round trip: the streams' opening frames are
        written at once (first-byte latency). ip_protocol "udp" opens a UDP flow
        (datagrams length-prefixed, crishim/protocols/datagram.py), or raises
        UdpNotSupported."""
        if self.closed.done():
            raise SessionClosed(f"session closed: {self.closed.result()}")
        if self.going_away:
            raise SessionClosed(f"{self.going_away}: it takes no new connections on this "
                                "session")
        if ip_protocol == UDP:
            if self.stream_version is None:
                raise SessionError("the server has not said yet which stream protocol it "
                                   "speaks: await negotiate() before opening a UDP flow")
            if not self.supports_udp:
                raise UdpNotSupported(self.stream_version, self.transport_name)
        elif ip_protocol != TCP:
            raise ValueError(f"ip_protocol {ip_protocol!r}: expected tcp or udp")
        stream = self._ahead.pop(port, None) if ip_protocol == TCP else None
        if stream is None:
            stream = self._new_stream(port, ip_protocol)
        protocol = protocol_factory()
        stream.protocol = protocol
        protocol.connection_made(stream)
        if stream.ahead:
            stream.ahead = False
            if stream._write_blocks:  # blocked while it had no protocol to tell
                protocol.pause_writing()
            if not (stream.bytes_up or stream._eof_sent or stream.is_closing()):
                self._send_go(stream)  # nothing to send yet: an empty DATA frame dials
        if self.writing_paused:
            stream._block_writing("session")
        if ip_protocol == TCP:
            self._open_ahead_after(stream)
        self._flush()
        return stream, protocol

    async def open_stream(self, port: int, limit: int = 1 << 20
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader(limit=limit)
        protocol = asyncio.StreamReaderProtocol(reader)
        stream, _ = await self.open_connection(port, lambda: protocol)
        return reader, asyncio.StreamWriter(stream, protocol, reader, self.loop)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip of one session-level ping, in seconds."""
        if self.closed.done():
            raise SessionClosed(f"session closed: {self.closed.result()}")
        fut: asyncio.Future[float] = self.loop.create_future()
        key = self._send_ping_frame()
        self._pings[key] = (time.perf_counter(), fut)
        self._flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(key, None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._goodbye()
            self.transport.close()
        self._lost("closed by the client")

    async def wait_closed(self) -> str:
        return await self.closed

    # --- for subclasses -----------------------------------------------------------------
    def _send_ping_frame(self) -> object:
        """Queue a ping; return the key its answer will carry (see _ping_answered)."""
        raise NotImplementedError(f"{self.transport_name} has no session ping")

    def _ping_answered(self, key: object) -> None:
        entry = self._pings.get(key)
        if entry is not None and not entry[1].done():
            entry[1].set_result(time.perf_counter() - entry[0])

    def _new_stream(self, port: int, ip_protocol: str = TCP, on_data: bool = False
                    ) -> ForwardStream:
        """Open a connection's streams (`on_data`: with dial: on-data, ahead of it)."""
        raise NotImplementedError

    def _send(self, stream: ForwardStream, data: Buffer, lent: bool = False) -> None:
        raise NotImplementedError

    def _send_eof(self, stream: ForwardStream) -> None:
        raise NotImplementedError

    def _reset_stream(self, stream: ForwardStream) -> None:
        raise NotImplementedError

    def _stop_error_stream(self, stream: ForwardStream) -> None:
        """Reset a connection's error stream, where it is a stream of its own (SPDY,
        HTTP/2): the server sent more error text than is kept."""

    def _goodbye(self) -> None:
        """The transport's polite end (GOAWAY, close frame), before the transport closes."""

    def _flush(self, lent: bool = False) -> None:
        """Write what the codec has queued (`lent`: some of it views of the read buffer,
        see _write_raw; only where `lent_fd` is a socket)."""
        raise NotImplementedError

    def receive(self, data: bytes | memoryview, lent: bool = False) -> None:
        raise NotImplementedError

    # --- a local connection that does not take what the pod sends -----------------------
    def pause_stream(self, stream: ForwardStream) -> None:
        """Stop what comes for stream. Here, with no flow control per stream (WebSocket;
        SPDY where the server ignores its windows), the whole session's reading pauses: its
        other connections wait too, as with kubectl. HTTP/2, and SPDY where crishim serve
        honours windows (docs/protocol.md 8.6), hold back only that stream's window."""
        self.read_gate.pause(stream, self.transport)

    def resume_stream(self, stream: ForwardStream) -> None:
        self.read_gate.resume(stream, self.transport)

    def stream_reading(self, stream: ForwardStream) -> bool:
        return not self.read_gate.holds(stream)

    def _queue_sent(self, sid: int, q: Outbound, done: bool) -> None:
        """After sending from a stream's queue what the window took: an empty queue is
        forgotten, and a stream with more than QUEUE_HIGH_WATER waiting no longer reads
        its local connection (until it is under it again)."""
        if done:
            self._queues.pop(sid, None)
        stream = self.streams.get(sid)
        if stream is not None:
            if q.size > QUEUE_HIGH_WATER:
                stream._block_writing("window")
            else:
                stream._unblock_writing("window")

    def _stream_done(self, stream: ForwardStream) -> None:
        self.streams.pop(stream.key, None)
        if stream.ahead and self._ahead.get(stream.port) is stream:
            del self._ahead[stream.port]  # ended unused (the session ends, a limit)
        if stream.error_id is not None:
            self._error_streams.pop(stream.error_id, None)
        self.read_gate.resume(stream, self.transport)
        if self.going_away and not self.streams:
            # after the stream has told its protocol (an E line before the session's end)
            self.loop.call_soon(self._end_when_idle)

    def _write_raw(self, out: list[bytes | memoryview] | list[Buffer], lent: bool = False
                   ) -> None:
        """Hand the codec's output buffers to the transport as they are (no join copy);
        `lent`: some are views of the loop's read buffer (write_view), written to `lent_fd`
        at once or copied (flow.write_lent).
        Past MAX_UNSENT waiting for the server to read, the session ends: forwarded data
        stops at the transport's high-water mark, so what piles up beyond it are answers
        (PING, SETTINGS acknowledgements) to a server that sends and never reads (100 MiB
        of PINGs grew the client by 100-140 MiB)."""
        t = self.transport
        if out and t is not None and not t.is_closing():
            if lent:
                write_lent(t, self.lent_fd, cast(list[bytes | memoryview], out))
            else:
                t.writelines(out)
            unsent = t.get_write_buffer_size()
            if unsent > MAX_UNSENT:
                self._lost(f"the server does not read what this session sends "
                           f"({unsent >> 20} MiB unsent)")
                t.abort()

    def start_keepalive(self, interval: float) -> None:
        if interval > 0 and self.has_ping:
            self._ping_task = self.loop.create_task(self._keepalive(interval))

    async def _keepalive(self, interval: float) -> None:
        """A PING every `interval`. A server that answers two PINGs in a row with nothing
        at all for answer_timeout each, while it has taken everything the session sent,
        is stalled (stopped, or gone without a FIN or RST): the session ends as lost
        instead of new connections hanging on it. Not stalled: bytes from the server
        unread here (a slow local reader paused the session's reading), or bytes of
        ours it has not taken (on SPDY a pod that does not read pauses the server's
        reading of the whole session: the PING waits behind an upload); and a server
        that resumes as one PING times out answers the next."""
        strikes = 0
        while not self.closed.done():
            await asyncio.sleep(interval)
            reads = self.reads
            try:
                await self.ping(self.answer_timeout)
                strikes = 0
            except SessionClosed:
                return
            except TimeoutError:
                transport = self.transport
                if self.closed.done() or self.reads != reads or _unread_bytes(transport) \
                        or _unsent_bytes(transport):
                    strikes = 0
                    continue
                strikes += 1
                if strikes == STALL_STRIKES:
                    self._lost(f"the server answered no PING in {self.answer_timeout:g}s")
                    if transport is not None:
                        transport.abort()
                    return

    def reply_came(self, stream: ForwardStream | None = None) -> None:
        """A stream's first bytes came back, or it ended."""
        if not self.replied.done():
            self.replied.set_result(None)
        if stream is not None and stream.opens_next:
            stream.opens_next = False
            # not at once: the local client woken by these bytes shares the CPU (a wake-up
            # lands the woken on the waker's core) and would wait for the opening
            timer = self._opening_ahead.get(stream.port)
            if timer is not None:
                timer.cancel()
                self._opening_ahead[stream.port] = self.loop.call_later(
                    OPEN_AHEAD_AFTER_REPLY, self._open_ahead, stream.port)

    # --- pairs opened ahead -------------------------------------------------------------
    def _may_open_ahead(self) -> bool:
        return (self.open_ahead and self.stream_version == PORTFORWARD_CRISHIM_V1
                and not self.closed.done() and not self.going_away)

    def _open_ahead_after(self, stream: ForwardStream) -> None:
        """After `stream` (a TCP connection) has its first reply: its port's next pair."""
        port = stream.port
        if (not self.open_ahead or self.stream_version not in (None, PORTFORWARD_CRISHIM_V1)
                or port in self._ahead or port in self._opening_ahead):
            return  # (HTTP/2 learns its version from the first reply: _open_ahead checks)
        stream.opens_next = True
        self._opening_ahead[port] = self.loop.call_later(OPEN_AHEAD_DELAY, self._open_ahead,
                                                         port)

    def _open_ahead(self, port: int) -> None:
        timer = self._opening_ahead.pop(port, None)
        if timer is None:
            return  # opened already
        timer.cancel()
        if not self._may_open_ahead() or port in self._ahead:
            return
        try:
            stream = self._new_stream(port, TCP, on_data=True)
        except SessionError:
            return  # the session is ending: its next connection hears why
        stream.opened_ahead = stream.ahead = True
        self._ahead[port] = stream
        if self.writing_paused:
            stream._block_writing("session")  # told once a connection takes it
        self._flush()

    def _answered_ahead(self, stream: ForwardStream, acknowledged: bool) -> None:
        """The server's reply to a data stream opened ahead: without the acknowledgement it
        dialled at once (a server before dial: on-data), so an unused pair is reset, not
        left with a pod connection nobody reads, and no more are opened ahead."""
        if acknowledged:
            return
        self.open_ahead = False
        if stream.ahead:
            self._ahead.pop(stream.port, None)
            stream.abort()

    def _send_go(self, stream: ForwardStream) -> None:
        """An empty DATA frame on a pair opened ahead: the server dials."""
        raise NotImplementedError

    # --- transport events ---------------------------------------------------------------
    def _go_away(self, reason: str) -> None:
        """The server takes no new streams (SPDY GOAWAY). As spdystream (kubectl) does,
        live connections go on until they end or the server closes; pairs opened ahead
        are reset, new connections refused, and the session ends with its last one."""
        if self.going_away or self.closed.done():
            return
        self.going_away = reason
        for timer in self._opening_ahead.values():
            timer.cancel()
        self._opening_ahead.clear()
        for stream in list(self._ahead.values()):
            stream.abort()  # unused: no connection of the session's will take it
        self._end_when_idle()

    def _end_when_idle(self) -> None:
        if self.going_away and not self.streams and not self.closed.done():
            self._lost(self.going_away)
            self.close()

    def _lost(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        self.reply_came()
        if self._ping_task is not None:
            self._ping_task.cancel()
        for timer in self._opening_ahead.values():
            timer.cancel()
        self._opening_ahead.clear()
        for stream in list(self.streams.values()):
            stream._lost(reason)

    def transport_eof(self) -> None:
        self._lost("the server closed the connection")

    def transport_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "the server closed the connection")

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in list(self.streams.values()):
            stream._block_writing("session")

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            stream._unblock_writing("session")


class PairCodec(Protocol):
    """What StreamPairSession asks of its codec (SpdyConnection, H2Codec)."""

    def send_data(self, stream_id: int, data: bytes, /) -> None: ...

    def send_queued(self, stream_id: int, out: Outbound, /) -> bool: ...

    def reset_stream(self, stream_id: int, code: int, /) -> None: ...


class StreamPairSession(ClientSession):
    """What SPDY and HTTP/2 share: each connection an error stream then a data stream,
    paired by a requestid of the session's own."""

    codec: PairCodec
    # what the codec raises for a stream that is gone (reset meanwhile), and the reset
    # code for a stream the client gives up
    stream_gone: tuple[type[Exception], ...] = ()
    cancel_code = 0
    # headers every stream of a pair carries after its requestid (HTTP/2: the versions
    # offered, as no upgrade carried them)
    pair_offer: tuple[tuple[str, str], ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._next_request_id = 0

    def _pair_headers(self, port: int, ip_protocol: str, on_data: bool
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """A new pair's error and data stream headers, under the next request id."""
        request_id = str(self._next_request_id)
        self._next_request_id += 1
        shared = [(HEADER_PORT, str(port)), (HEADER_REQUEST_ID, request_id), *self.pair_offer]
        if ip_protocol == UDP:
            shared.append((HEADER_PROTOCOL, UDP))
        data = [(HEADER_STREAM_TYPE, STREAM_TYPE_DATA), *shared]
        if on_data:
            data.append((HEADER_DIAL, DIAL_ON_DATA))
        return [(HEADER_STREAM_TYPE, STREAM_TYPE_ERROR), *shared], data

    def _register(self, stream: ForwardStream, error_id: int) -> ForwardStream:
        """Track a new pair: its data stream by stream.key, its error stream by error_id."""
        stream.error_id = error_id
        self.streams[stream.key] = stream
        self._error_streams[error_id] = stream
        return stream

    def _send_go(self, stream: ForwardStream) -> None:
        try:
            self.codec.send_data(stream.key, b"")  # no window needed
        except self.stream_gone:
            pass  # reset meanwhile: its reset event ends it
        self._flush()

    def _drain(self, sid: int, q: Outbound) -> None:
        try:
            done = self.codec.send_queued(sid, q)
        except self.stream_gone:  # ended meanwhile: nothing more goes out
            done = True
            q.size = 0
        self._queue_sent(sid, q, done)

    def _reset_stream(self, stream: ForwardStream) -> None:
        self._queues.pop(stream.key, None)
        try:
            self.codec.reset_stream(stream.key, self.cancel_code)
        except self.stream_gone:
            pass  # ended meanwhile
        self._flush()

    def _stop_error_stream(self, stream: ForwardStream) -> None:
        if stream.error_id is not None:
            try:
                self.codec.reset_stream(stream.error_id, self.cancel_code)
            except self.stream_gone:
                pass  # ended meanwhile
            self._flush()


def _unread_bytes(transport: asyncio.BaseTransport | None) -> int:
    """Bytes waiting in the connection's socket that its transport has not read."""
    return _socket_queue(transport, termios.FIONREAD)


def _unsent_bytes(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to the connection that the server's end has no room for: in the
    transport's buffer, or in the socket's send queue not yet sent (SIOCOUTQNSD: a
    receive window closed by a server that reads no more; bytes sent and not
    acknowledged, a host gone, do not count)."""
    if transport is None:
        return 0
    buffered = cast(asyncio.WriteTransport, transport).get_write_buffer_size()
    return buffered + _socket_queue(transport, SIOCOUTQNSD)


def _socket_queue(transport: asyncio.BaseTransport | None, request: int) -> int:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), request, bytes(4)), sys.byteorder)
    except (OSError, ValueError):  # closed meanwhile
        return 0


# --------------------------------------------------------------------------- upgrading


@dataclass(frozen=True)
class Target:
    """Where a session goes: the stream URL's authority, scheme and request target, and
    the headers its upgrade request adds (e.g. Authorization for an API server)."""

    netloc: str  # host:port as in the URL, for Host / :authority
    scheme: str  # http or https
    path: str  # the request target: path and query
    headers: tuple[tuple[str, str], ...] = ()
    # stream protocol versions to offer, best first (portforward.crishim.dev/v1: UDP)
    versions: tuple[str, ...] = tuple(client_offer())

    def request_headers(self) -> list[tuple[bytes, bytes]]:
        """User-Agent and the extra headers, for an HTTP/1.1 upgrade request."""
        return [(b"User-Agent", USER_AGENT.encode())] + [
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]


class UpgradeProtocol(asyncio.BufferedProtocol):
    """The session's TCP/TLS connection, first as an HTTP client, then as the session's pipe.

    Until `attach`, incoming bytes collect in `buffer`; once a whole response head is there
    (or MAX_HEAD bytes), reading pauses and `head` resolves with what arrived, which may
    already hold the session's first frames. A transport checks the answer, builds its
    session and calls `attach(session, leftover)`: from then on every read, the end of the
    connection and its write-side flow control go straight to the session. After a refusal,
    `read_body` gathers the rest of the response for the error message, at most
    REFUSAL_BODY_KEPT bytes of body. HTTP/2 uses no head: it attaches at once with whatever
    arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_at = 0  # where the body starts in `buffer`, once the head is whole
        self.refused = False  # read_body was called: what comes is a refusal's body
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.body_done: asyncio.Future[None] = loop.create_future()
        self.session: ClientSession | None = None

    @property
    def transport(self) -> asyncio.Transport:
        if self._transport is None:
            raise SessionError("the connection to the stream server is not made yet")
        return self._transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream connection's transport; uvloop's does not subclass asyncio.Transport
        self._transport = cast(asyncio.Transport, transport)
        # here, not once connected: a server that hangs up at once may have had it closed
        # by then, and uvloop's transport raises RuntimeError for a closed one
        self._transport.set_write_buffer_limits(high=SESSION_WRITE_HIGH_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        session = self.session
        if session is not None and session.reads_lent:  # read in place: no copy of the read
            session.reads += 1
            session.lending = True
            try:
                session.receive(read_buffer()[:nbytes], lent=True)
            finally:
                session.lending = False
            return
        self.data_received(read_buffer()[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.reads += 1
            session.receive(data)
            return
        self.buffer += data
        if not self.head.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0 or len(self.buffer) > MAX_HEAD:
                self.transport.pause_reading()
                self.body_at = end + 4 if end >= 0 else len(self.buffer)
                self.head.set_result(bytes(self.buffer))
        elif self.refused:
            self._body_kept()

    def _body_kept(self) -> bool:
        """Whether a refusal's body has all the message shows: then reading stops and the
        connection is closed (the rest is not read)."""
        end = self.body_at + REFUSAL_BODY_KEPT
        if len(self.buffer) <= end:
            return False
        del self.buffer[end + 1:]  # one byte past what is shown: the message says it is cut
        self.transport.abort()
        if not self.body_done.done():
            self.body_done.set_result(None)
        return True

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
            # whoever awaits the answer still gets the error; an opening given up (one
            # made ahead, at exit) has nobody to tell, and asyncio would log it as lost
            self.head.exception()
        if not self.body_done.done():
            self.body_done.set_result(None)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()

    def attach(self, session: ClientSession, leftover: bytes) -> None:
        """Hand the connection to `session`, with the bytes that came after the head."""
        transport = self.transport
        self.session = session
        session.transport = transport
        if session.reads_lent:  # not through TLS
            session.lent_fd = plain_socket_fd(transport)
        self.buffer = bytearray()
        if leftover:
            session.receive(leftover)
        if not transport.is_closing():
            transport.resume_reading()

    async def read_body(self, timeout: float) -> bytes:
        """After a non-101 answer: the rest of the response (it ends with the connection),
        cut one byte past REFUSAL_BODY_KEPT of body."""
        self.refused = True
        if not self._body_kept():  # the head's read may have brought enough
            self.transport.resume_reading()
            try:
                async with asyncio.timeout(timeout):  # (not wait_for: see read_upgrade_answer)
                    await asyncio.shield(self.body_done)
            except TimeoutError:
                pass
        return bytes(self.buffer)


@dataclass(frozen=True)
class UpgradeAnswer:
    """A 101 response: its headers (lower-case names), the raw head and what followed it."""

    headers: dict[str, list[str]]
    raw: bytes
    rest: bytes

    def header(self, name: str) -> str:
        return ",".join(self.headers.get(name, []))


def parse_response_head(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Status, headers (lower-case names) and the bytes after the head of an HTTP/1.x
    response."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise SessionError("the server's response head is too large or malformed")
    head, rest = raw[:end], raw[end + 4:]
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit():  # bytes: ASCII digits only
        raise SessionError(f"the server did not answer with HTTP: {lines[0][:80]!r}")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode("latin-1"), []).append(
            value.strip().decode("latin-1"))
    return int(parts[1]), headers, rest


def _refusal(status: int, headers: dict[str, list[str]], body: bytes) -> UpgradeRefused:
    length = headers.get("content-length", [""])[0]
    if length.isascii() and length.isdigit() and len(length) <= 18:  # '²' passes isdigit()
        body = body[:int(length)]
    cut = len(body) > REFUSAL_BODY_KEPT
    text = body[:REFUSAL_BODY_KEPT].decode("utf-8", "replace").strip() or "no reason given"
    message = None if cut else _status_message(text)
    if message is not None:  # client-go's words: a Status is shown as its message alone
        return UpgradeRefused(status, f"error upgrading connection: {message}")
    if cut:
        text += f"… (the body's first {REFUSAL_BODY_KEPT} bytes)"
    return UpgradeRefused(status, "error upgrading connection: unable to upgrade "
                                  f"connection: {status}: {text}")


def _status_message(text: str) -> str | None:
    """The message of a Kubernetes Status body (an API server's refusal: client-go shows
    it, not the JSON), or None for any other body."""
    if not text.startswith("{"):
        return None
    try:
        status = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        return None
    message = status.get("message")
    return message.strip() or None if isinstance(message, str) else None


async def read_upgrade_answer(conn: UpgradeProtocol, target: Target,
                              timeout: float) -> UpgradeAnswer:
    """Wait for the answer to an HTTP/1.1 upgrade request already written on `conn`:
    a 101, or UpgradeRefused carrying the server's status and body text."""
    try:
        # not wait_for: Python 3.11's drops a cancellation (Ctrl-C) that comes as the answer
        # does, and the command would go on
        async with asyncio.timeout(timeout):
            raw = await asyncio.shield(conn.head)
    except TimeoutError:
        raise SessionError(f"no answer to the upgrade from {target.netloc} in "
                           f"{timeout:g}s") from None
    status, headers, rest = parse_response_head(raw)
    if status != 101:
        full = await conn.read_body(min(timeout, 2.0))
        raise _refusal(status, headers, parse_response_head(full)[2])
    return UpgradeAnswer(headers, raw, rest)

"""The stream server: one HTTP/1.1 request (or one HTTP/2 connection's first stream) per
connection, admitted by crishim.stream.admission, then the connection handed to the
transport the request asked for."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

import h11

from crishim.budget import LogBudget
from crishim.flow import plain_socket_fd
from crishim.forward import ForwardContext
from crishim.memory import MemoryReleaser
from crishim.stream import portforward_h2, portforward_spdy, portforward_ws
from crishim.stream.admission import (
    MAX_REQUEST_HEAD,
    Admission,
    Refused,
    Request,
    http1_refusal,
    redact,
    redact_text,
)
from crishim.stream.session import (
    ServerSession,
    SessionProtocol,
    SessionSettings,
    Upgrade,
    close_client,
)
from crishim.sysutil import read_now, wait_io
from crishim.tokens import TokenStore

log = logging.getLogger("crishim.stream")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEAD_END = re.compile(rb"\r?\n\r?\n")
LISTEN_QUEUE = 1024
ACCEPTS_PER_TURN = 64  # TLS listener: connections accepted per wake-up, then the loop goes on
ACCEPT_RETRY = 1.0  # seconds without accepting after running out of descriptors (as asyncio)
# a session's client output high-water mark until (or unless) the buffer budget grants it
# 4 x buffer_size: before admission, and once the budget is spent
OUTPUT_UNGRANTED = 64 * 1024
DROPPED_LOG_INTERVAL = 1.0  # seconds between lines about connections dropped (max_unadmitted)
# read at accept: a request head, and whatever the client sent after it
EARLY_READ = 64 * 1024

# Upgrade header (lower case) -> the transport's starter
UPGRADES: dict[str, Callable[[Upgrade], None]] = {
    "spdy/3.1": portforward_spdy.start,
    "websocket": portforward_ws.start,
    "h2c": portforward_h2.start_upgrade,
}

# Called to drop a connection that has not presented a token yet, with what it is told.
Evict = Callable[[Refused], None]


class StreamServer:
    """Listens, admits requests, dispatches upgrades; tracks live sessions for draining
    and connections that have not presented a token yet (at most `max_unadmitted`: past
    it the one that waited longest is dropped)."""

    def __init__(self, tokens: TokenStore, ctx: ForwardContext, host: str = "127.0.0.1",
                 port: int = 0, url_host: str = "", creation_timeout: float = 30.0,
                 idle_timeout: float = 4 * 3600.0, max_sessions: int = 10000,
                 ssl_context: ssl.SSLContext | None = None,
                 request_timeout: float = 10.0, max_unadmitted: int = 256,
                 memory: MemoryReleaser | None = None) -> None:
        self.tokens = tokens
        self.ctx = ctx
        self.host = host
        self.port = port
        self.url_host = url_host
        self.max_sessions = max_sessions
        self.ssl_context = ssl_context
        self.request_timeout = request_timeout
        self.max_unadmitted = max_unadmitted
        self.refusal_log = LogBudget(log, ctx.flood.log_lines_per_second,
                                     "%d more lines about refused stream requests not logged")
        self.session_settings = SessionSettings(ctx, creation_timeout, idle_timeout,
                                                self.refusal_log)
        self.admission = Admission(tokens, ctx, max_sessions,
                                   lambda: len(self.sessions), lambda: self.draining)
        self.sessions: set[ServerSession] = set()
        self.memory = memory or MemoryReleaser()
        self.draining = False
        self.drain_cut = False  # another signal while draining: close live sessions now
        self._server: asyncio.base_events.Server | None = None
        self._tls: _TlsListener | None = None
        self._transports: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unadmitted: dict[object, Evict] = {}  # oldest first
        self._dropped = 0  # dropped past max_unadmitted since the last line saying so
        self._dropped_logged = -DROPPED_LOG_INTERVAL

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.ssl_context is not None:
            self._tls = _TlsListener(self, loop, self.ssl_context)
            self.port = self._tls.port
            return
        self._server = await loop.create_server(
            lambda: _RequestProtocol(self), self.host, self.port, backlog=LISTEN_QUEUE)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def base_url(self) -> str:
        host = self.url_host or self.host
        # a wildcard is no address to dial: the node's own loopback of the same family
        # (the IPv6 wildcard listens IPv6 only, as create_server makes it, so 127.0.0.1
        # was refused for every URL); no address at all listens on both
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "::1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        # an IPv6 zone (fe80::1%eth0) is written %25 in a URL (RFC 6874): Go's url.Parse,
        # the kubelet's, refuses a bare % there
        host = host.replace("%", "%25")
        return f"{self.scheme}://{host}:{self.port}"

    def url_for(self, token: str, kind: str = "portforward") -> str:
        return f"{self.base_url}/{kind}/{token}"

    # --- connections without a token -------------------------------------------------
    def await_token(self, key: object, evict: Evict) -> None:
        """A connection that has not presented a token yet; past max_unadmitted the one
        that waited longest is dropped (a slow client cannot hold a descriptor each)."""
        while len(self._unadmitted) >= self.max_unadmitted:
            oldest = next(iter(self._unadmitted))
            drop = self._unadmitted.pop(oldest)
            self._dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged >= DROPPED_LOG_INTERVAL:
                # one line a second at most: a flood of connections is not a flood of lines
                log.info("dropping the oldest of %d connections without a token "
                         "(max_unadmitted): %d dropped since the last such line",
                         self.max_unadmitted + 1, self._dropped)
                self._dropped, self._dropped_logged = 0, now
            drop(Refused(503, f"too many connections without a token ({self.max_unadmitted});"
                              " this one waited longest", [("Retry-After", "1")]))
        self._unadmitted[key] = evict
        self._held_changed()

    def token_presented(self, key: object) -> None:
        if self._unadmitted.pop(key, None) is not None:
            self._held_changed()

    def _held_changed(self) -> None:
        """Sessions and connections without a token, for the memory releaser: a TLS
        connection that never finished its handshake ended no session, and 4,800 of them
        (256 at a time, max_unadmitted) left RSS +63 MiB for good, the freed OpenSSL state
        kept by glibc until 64 sessions came and went."""
        self.memory.sessions_changed(len(self.sessions) + len(self._unadmitted))

    @property
    def unadmitted(self) -> int:
        return len(self._unadmitted)

    # --- session registry ---------------------------------------------------------------
    def add_session(self, session: ServerSession) -> Callable[[], None]:
        """Register a live session; returns the callback its end must call (once)."""
        self.sessions.add(session)
        self.ctx.live_sessions = len(self.sessions)
        self._held_changed()
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.session_started(session.transport_name)

        def ended() -> None:
            if session in self.sessions:
                self.sessions.discard(session)
                self.ctx.live_sessions = len(self.sessions)
                self._held_changed()
                if metrics is not None:
                    metrics.session_ended(session.transport_name)

        return ended

    async def drain(self, deadline: float) -> None:
        """Refuse new upgrades, tell live sessions, wait up to deadline (or until
        drain_cut is set), then close them."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._tls is not None:
            self._tls.close()
        # connections without a token could only be refused: told now (503, GOAWAY, or
        # closed mid-handshake), not held through the live sessions' drain
        self._refuse_unadmitted()
        for session in list(self.sessions):
            session.drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while self.sessions and loop.time() < end and not self.drain_cut:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close("server shutting down")
        self._refuse_unadmitted()
        for transport in list(self._transports):
            transport.abort()
        self.memory.close()
        self.refusal_log.flush()  # the count of lines not logged, before the process ends

    def _refuse_unadmitted(self) -> None:
        for evict in list(self._unadmitted.values()):
            evict(Refused(503, "crishim is shutting down"))
        self._unadmitted.clear()

    async def close(self) -> None:
        await self.drain(0)

    # --- request handling ---------------------------------------------------------------
    async def dispatch(self, transport: asyncio.Transport, request: Request,
                       rest: bytes) -> None:
        try:
            admitted = await self.admission(request.method, request.target)
            starter = UPGRADES.get(request.header("upgrade").lower())
            if starter is None:
                raise Refused(400, "expected Upgrade: SPDY/3.1, websocket or h2c for "
                                   "port-forward")
            starter(Upgrade(transport, request, admitted, self.session_settings,
                            lambda session, protocol: self.adopt(transport, session,
                                                                 protocol, rest)))
        except Refused as e:
            self.refusal_log.log(logging.INFO, "stream request %s %s refused: %d %s",
                                 request.method, redact(request.target), e.status, e)
            transport.write(http1_refusal(e))
            transport.close()
        except Exception as e:  # a bug: a line within the refusal budget, a traceback once
            self.refusal_log.log(logging.ERROR, "stream request %s %s failed: %s: %s",
                                 request.method, redact(request.target), type(e).__name__, e,
                                 traceback_of=e)
            transport.write(http1_refusal(Refused(500, "internal error")))
            transport.close()

    def adopt(self, transport: asyncio.Transport, session: ServerSession,
              protocol: SessionProtocol, rest: bytes, register: bool = True) -> None:
        """Hand an upgraded connection to its transport session."""
        if register:
            session.on_closed = self.add_session(session)
        session.limit_output(transport, OUTPUT_UNGRANTED)
        if register:
            session.grant_output(4 * self.ctx.buffer_size)
        transport.set_protocol(protocol)
        session.start()
        if rest:
            protocol.data_received(bytes(rest))
        if not transport.is_closing() and not session.read_gate.paused:
            transport.resume_reading()  # it arrived paused; nothing holds it now
        log.debug("session started: transport=%s", session.transport_name)

    def start_prior_knowledge(self, transport: asyncio.Transport, data: bytes) -> None:
        """The connection began with the HTTP/2 preface (h2c, or TLS with ALPN h2): a
        pending request until its first stream's token is redeemed, bound by the request
        timeout and not a session yet."""
        session = portforward_h2.H2PortForwardSession(
            self.session_settings, transport.writelines,
            lambda: close_client(transport, session.violated_budget), admit=self.admission)
        session.lent_fd = plain_socket_fd(transport)  # h2c (not TLS): pod reads in place
        timeout = self.request_timeout

        def timed_out() -> None:
            self.refusal_log.log(logging.INFO, "h2: no token redeemed within %gs, closing",
                                 timeout)
            session.close(f"no token redeemed within {timeout:g}s")

        timer = asyncio.get_running_loop().call_later(timeout, timed_out)

        def left() -> None:
            timer.cancel()
            self.token_presented(session)

        def admitted() -> None:
            left()
            session.on_closed = self.add_session(session)
            session.grant_output(4 * self.ctx.buffer_size)

        def drop(refused: Refused) -> None:
            if self.draining and session.admitting:
                # past admission's draining check, its token redeemed while its sandbox is
                # resolved: it becomes a session and is drained as one (an HTTP/1.1 request
                # in that state has left the connections without a token already)
                return
            session.close(refused.reason)

        session.on_closed = left
        session.on_admitted = admitted
        self.await_token(session, drop)
        self.adopt(transport, session, SessionProtocol(session, transport), data,
                   register=False)


class _TlsListener:
    """The TLS stream port. crishim accepts here itself, so that a connection counts among
    those without a token (max_unadmitted: past it the one that waited longest is dropped)
    from accept, through its handshake, as a plain connection does. A listener made with
    create_server(ssl=...) shows a connection only once its handshake is done, and each
    holds ~50 KiB of TLS state until then: 3,000 silent connections held +160 MiB and a
    descriptor each, for the request timeout. The handshake is bounded by the request
    timeout; a failed one is a debug line."""

    def __init__(self, server: StreamServer, loop: asyncio.AbstractEventLoop,
                 context: ssl.SSLContext) -> None:
        self.server = server
        self.loop = loop
        self.context = context
        self.sockets = _listen(server.host, server.port)
        self.port = self.sockets[0].getsockname()[1]
        self._retry: asyncio.TimerHandle | None = None
        self._serve()

    def _serve(self) -> None:
        self._retry = None
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of descriptors or memory: stop accepting a while
                log.warning("stream server: accept failed (%s); accepting again in %gs",
                            e, ACCEPT_RETRY)
                for sock in self.sockets:
                    self.loop.remove_reader(sock.fileno())
                self._retry = self.loop.call_later(ACCEPT_RETRY, self._serve)
                return
            conn.setblocking(False)
            _TlsHandshake(self, conn)


class _TlsHandshake:
    """One accepted TLS connection until its request is read: counted among the
    connections without a token until _RequestProtocol takes its place."""

    def __init__(self, listener: _TlsListener, conn: socket.socket) -> None:
        self.listener = listener
        self.conn = conn
        self.started = False
        server = listener.server
        self.task = listener.loop.create_task(self._run())
        server._tasks.add(self.task)
        self.task.add_done_callback(server._tasks.discard)
        server.await_token(self, self._drop)

    def _drop(self, _refused: Refused) -> None:
        """Past max_unadmitted, or draining: the TLS transport closes the socket, or this
        does if the task has not run yet (a task cancelled then never enters _run)."""
        if not self.started:
            self.conn.close()
        self.task.cancel()

    async def _run(self) -> None:
        self.started = True
        server, conn, loop = self.listener.server, self.conn, self.listener.loop
        try:
            until = loop.time() + server.request_timeout
            async with asyncio.timeout_at(until):
                first = await self._first_byte()
            if not first or first.isupper():
                if first:  # a request line: plain HTTP to the TLS port (a wrong scheme)
                    _answer_plain_http(conn)
                log.debug("stream server: %s on the TLS port",
                          "plain HTTP" if first else "closed before its handshake")
                conn.close()
                return
            # the ClientHello has waited in the kernel: the socket is read only by the
            # TLS transport made here
            await loop.connect_accepted_socket(
                lambda: _RequestProtocol(server, replaces=self), conn,
                ssl=self.listener.context,
                ssl_handshake_timeout=max(until - loop.time(), 0.001))
        # conn.close() below closes the descriptor only if no transport took it: one that
        # did holds a reference (socket._io_refs) and detaches it as it closes itself
        except asyncio.CancelledError:
            conn.close()  # dropped during its handshake
        except OSError as e:  # ssl.SSLError, the handshake timeout, resets
            # a peer's failed handshake is its own business: one line, no traceback
            log.debug("stream server: TLS handshake failed: %s", e or type(e).__name__)
            conn.close()
        finally:
            server.token_presented(self)

    async def _first_byte(self) -> bytes:
        """The connection's first byte once it comes (b'' at its end), left in the kernel
        for the TLS transport."""
        await wait_io(self.conn)
        return self.conn.recv(1, socket.MSG_PEEK)


# Go's HTTPS server answers a plain request alike: a client with the wrong scheme is told
_PLAIN_HTTP_BODY = b"crishim: this stream server speaks TLS: use https\n"
_PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))


def _answer_plain_http(conn: socket.socket) -> None:
    """400 to a plain HTTP request on the TLS port, best effort and without waiting: what
    of the request has come is read first (closing over unread bytes resets the
    connection, which may discard the answer before the client reads it)."""
    try:
        conn.recv(EARLY_READ)
        conn.send(_PLAIN_HTTP_ANSWER)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address host names, as create_server makes them."""
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _name, addr in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(LISTEN_QUEUE)
            sock.setblocking(False)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise OSError(e.errno, f"error while attempting to bind on address "
                               f"{(host, port)!r}: {e.strerror}") from None
    return socks


class _RequestProtocol(asyncio.Protocol):
    """Reads one request head, then pauses and hands the connection over."""

    def __init__(self, server: StreamServer, replaces: object = None) -> None:
        self.server = server
        self.replaces = replaces  # TLS: the handshake counted until now
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        server = self.server
        server._transports.add(transport)
        # a client that connects and never finishes its request head is dropped
        self._head_timer = asyncio.get_running_loop().call_later(
            server.request_timeout, self._head_timed_out)
        if self.replaces is not None:
            server.token_presented(self.replaces)
        server.await_token(self, self._refuse)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            early = read_now(transport, EARLY_READ)  # the request, sent before the accept
            if early:
                self.data_received(early)
        elif ssl_object.selected_alpn_protocol() == "h2":
            self._handover()  # TLS chose HTTP/2: no HTTP/1.1 request will come
            server.start_prior_knowledge(transport, b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server._transports.discard(self.transport)
        self.server.token_presented(self)
        if self._head_timer is not None:
            self._head_timer.cancel()

    def _head_timed_out(self) -> None:
        if not self.done:
            self._refuse(Refused(408, "no complete request within "
                                      f"{self.server.request_timeout:g}s"))

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        buf = self.buffer
        buf += data
        transport = self.transport
        assert transport is not None
        if buf.startswith(H2_PREFACE[: len(buf)]):
            if len(buf) >= len(H2_PREFACE):
                self._handover()
                self.server.start_prior_knowledge(transport, bytes(buf))
            return
        # the blank line ending the head; bare LF line ends are taken, as h11 and Go's
        # server take them; only the bytes not searched before are (a head trickled in
        # byte by byte is not searched again and again)
        found = HEAD_END.search(buf, max(0, len(buf) - len(data) - 3))
        # too long with or without its end in this read: a 145 KB head of 12,000 headers
        # sent in two writes was parsed (h11 limits only a head still incomplete)
        if (len(buf) if found is None else found.end()) > MAX_REQUEST_HEAD:
            self._refuse(Refused(431, f"request head larger than {MAX_REQUEST_HEAD} bytes"))
            return
        if found is None:
            return
        end = found.end()
        head, rest = bytes(buf[:end]), bytes(buf[end:])
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            # h11 quotes the request line, the token in it: cut like a logged path
            self._refuse(Refused(400, f"malformed HTTP request: {redact_text(str(e))}"))
            return
        if not isinstance(event, h11.Request):
            self._refuse(Refused(400, "malformed HTTP request"))
            return
        request = Request(event.method.decode("latin-1"), event.target.decode("latin-1"),
                          list(event.headers))
        self._handover()
        task = asyncio.get_running_loop().create_task(
            self.server.dispatch(transport, request, rest))
        self.server._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self.server._tasks.discard)

    def _handover(self) -> None:
        self.done = True
        if self._head_timer is not None:
            self._head_timer.cancel()
        self.server.token_presented(self)
        assert self.transport is not None
        self.transport.pause_reading()
        self.server._transports.discard(self.transport)

    def _refuse(self, refused: Refused) -> None:
        if self.done:
            return
        self.done = True
        self.server.token_presented(self)
        self.server.refusal_log.log(logging.INFO, "stream request refused: %d %s",
                                    refused.status, refused)
        if self.transport is not None:
            self.transport.write(http1_refusal(refused))
            self.transport.close()
        self.buffer.clear()

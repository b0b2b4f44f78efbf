"""The stream server: one HTTP/1.1 request per connection, the token redeemed, then the
connection handed to the transport the request asked for."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import h11

from crishim.forward import ForwardContext, SessionProtocol
from crishim.memory import MemoryReleaser
from crishim.protocols.constants import PORTFORWARD_PROTOCOL
from crishim.protocols.negotiation import choose_version, server_versions
from crishim.runtime import SandboxGone, SandboxNotFound
from crishim.tokens import StreamRequest, TokenStore

log = logging.getLogger("crishim.stream")

MAX_REQUEST_HEAD = 16 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REASONS = {101: "Switching Protocols", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 410: "Gone",
            429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


def http_response(status: int, body: str = "", headers: list[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    payload = (body + "\n").encode() if body else b""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(payload)}",
              "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + payload


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


class Request:
    """The parsed upgrade request."""

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.raw_headers = headers
        url = urlsplit(target)
        self.path = url.path
        self.query = parse_qs(url.query)

    def header_values(self, name: str) -> list[str]:
        """All values of a header, comma-separated lists split."""
        key = name.lower().encode()
        out = []
        for k, v in self.raw_headers:
            if k == key:
                out += [p.strip() for p in v.decode("latin-1").split(",") if p.strip()]
        return out

    def header(self, name: str) -> str:
        values = self.header_values(name)
        return values[0] if values else ""


class StreamServer:
    """Listens, redeems tokens, dispatches upgrades; tracks live sessions for draining."""

    def __init__(self, tokens: TokenStore, ctx: ForwardContext, host: str = "127.0.0.1",
                 port: int = 0, url_host: str = "", creation_timeout: float = 30.0,
                 idle_timeout: float = 4 * 3600.0, max_sessions: int = 10000,
                 ssl_context: ssl.SSLContext | None = None,
                 request_timeout: float = 10.0,
                 memory: MemoryReleaser | None = None) -> None:
        self.tokens = tokens
        self.ctx = ctx
        self.host = host
        self.port = port
        self.url_host = url_host
        self.creation_timeout = creation_timeout
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.ssl_context = ssl_context
        self.request_timeout = request_timeout
        self.sessions: set = set()
        self.memory = memory or MemoryReleaser()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _RequestProtocol(self), self.host, self.port, ssl=self.ssl_context,
            backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def base_url(self) -> str:
        host = self.url_host or self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def url_for(self, token: str, kind: str = "portforward") -> str:
        return f"{self.base_url}/{kind}/{token}"

    # --- session registry ---------------------------------------------------------------
    def add_session(self, session) -> Callable[[], None]:
        """Register a live session; returns the callback its end must call (once)."""
        self.sessions.add(session)
        self.ctx.live_sessions = len(self.sessions)
        self.memory.sessions_changed(len(self.sessions))
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.session_started(session.transport_name)

        def ended() -> None:
            if session in self.sessions:
                self.sessions.discard(session)
                self.ctx.live_sessions = len(self.sessions)
                self.memory.sessions_changed(len(self.sessions))
                if metrics is not None:
                    metrics.session_ended(session.transport_name)

        return ended

    async def drain(self, deadline: float) -> None:
        """Refuse new upgrades, tell live sessions, wait up to deadline, then close them."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while self.sessions and loop.time() < end:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close("server shutting down")
        for transport in list(self._transports):
            transport.abort()
        self.memory.close()

    async def close(self) -> None:
        await self.drain(0)

    # --- request handling ---------------------------------------------------------------
    async def dispatch(self, transport: asyncio.Transport, request: Request,
                       rest: bytes) -> None:
        try:
            token_request = self._redeem(request)
            sandbox = await self._resolve(token_request)
            upgrade = request.header("upgrade").lower()
            if upgrade == "spdy/3.1":
                self._start_spdy(transport, request, sandbox, rest)
            elif upgrade == "websocket":
                from crishim.stream import portforward_ws

                portforward_ws.start(self, transport, request, sandbox, token_request, rest)
            elif upgrade == "h2c":
                from crishim.stream import portforward_h2

                portforward_h2.start_upgrade(self, transport, request, sandbox, rest)
            else:
                raise HttpError(400, "expected Upgrade: SPDY/3.1, websocket or h2c for "
                                     "port-forward")
        except HttpError as e:
            log.info("stream request %s %s refused: %d %s", request.method,
                     _redact(request.path), e.status, e)
            transport.write(http_response(e.status, str(e), e.headers))
            transport.close()
        except Exception:
            log.exception("stream request failed")
            transport.write(http_response(500, "internal error"))
            transport.close()

    def _redeem(self, request: Request) -> StreamRequest:
        parts = request.path.split("/")
        if len(parts) != 3 or parts[0] != "" or parts[1] != "portforward" or not parts[2]:
            raise HttpError(404, f"no such path {_redact(request.path)!r}")
        if request.method not in ("GET", "POST"):
            raise HttpError(405, f"method {request.method} not allowed", [("Allow", "GET, POST")])
        if self.draining:
            raise HttpError(503, "crishim is shutting down")
        if len(self.sessions) >= self.max_sessions:
            raise HttpError(429, f"too many streaming sessions ({self.max_sessions})",
                            [("Retry-After", "1")])
        if self.ctx.out_of_descriptors:
            raise HttpError(503, f"out of file descriptors ({self.ctx.fd_budget} in use: "
                                 "RLIMIT_NOFILE less reserved_fds)", [("Retry-After", "1")])
        token_request = self.tokens.redeem(parts[2])
        if token_request is None:
            raise HttpError(404, "unknown, expired or already used stream token")
        return token_request

    async def _resolve(self, token_request: StreamRequest):
        try:
            return await self.ctx.plugin.resolve(token_request.sandbox_id)
        except SandboxNotFound as e:
            raise HttpError(404, str(e)) from None
        except SandboxGone as e:
            raise HttpError(410, str(e)) from None

    def _start_spdy(self, transport: asyncio.Transport, request: Request, sandbox,
                    rest: bytes) -> None:
        from crishim.stream.portforward_spdy import SpdyPortForwardSession

        offered = request.header_values("x-stream-protocol-version")
        supported = server_versions(self.ctx.udp)
        if not offered:
            raise HttpError(400, "missing X-Stream-Protocol-Version: this server speaks "
                                 f"{PORTFORWARD_PROTOCOL}")
        version = choose_version(offered, supported)
        if version is None:
            # named as before: crishim's own client always offers the upstream name too
            raise HttpError(403, f"none of the offered stream protocols {offered} is supported; "
                                 f"this server speaks {PORTFORWARD_PROTOCOL}",
                            [("X-Accepted-Stream-Protocol-Versions", PORTFORWARD_PROTOCOL)])
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                        b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: "
                        + version.encode() + b"\r\n\r\n")
        session = SpdyPortForwardSession(self.ctx, sandbox, self.creation_timeout,
                                         self.idle_timeout, transport.writelines,
                                         transport.close)
        session.stream_version = version
        self.adopt(transport, session, SessionProtocol(session, transport), rest)

    def adopt(self, transport: asyncio.Transport, session, protocol: asyncio.Protocol,
              rest: bytes, **start_kw) -> None:
        """Hand an upgraded connection to its transport session (start_kw: for its start)."""
        session.on_closed = self.add_session(session)
        transport.set_write_buffer_limits(high=4 * self.ctx.buffer_size)
        transport.set_protocol(protocol)
        session.start(**start_kw)
        if rest:
            protocol.data_received(bytes(rest))
        if not transport.is_closing():
            transport.resume_reading()
        log.debug("session started: transport=%s", session.transport_name)


def _redact(path: str) -> str:
    """Tokens are credentials: never log one whole."""
    parts = path.split("/")
    if len(parts) == 3 and len(parts[2]) > 6:
        parts[2] = parts[2][:4] + "…"
    return "/".join(parts)


class _RequestProtocol(asyncio.Protocol):
    """Reads one request head, then pauses and hands the connection over."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        server = self.server
        server._transports.add(transport)
        # a client that connects and never finishes its request head is dropped
        self._head_timer = asyncio.get_running_loop().call_later(
            server.request_timeout, self._head_timed_out)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._handover()  # TLS chose HTTP/2: no HTTP/1.1 request will come
            from crishim.stream import portforward_h2

            portforward_h2.start_prior_knowledge(self.server, transport, b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._transports.discard(self.transport)
        self._head_timer.cancel()

    def _head_timed_out(self) -> None:
        if not self.done:
            self._refuse(408, f"no complete request within {self.server.request_timeout:g}s")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        buf = self.buffer
        buf += data
        transport = self.transport
        if buf.startswith(H2_PREFACE[: len(buf)]):
            if len(buf) >= len(H2_PREFACE):
                self._handover()
                from crishim.stream import portforward_h2

                portforward_h2.start_prior_knowledge(self.server, transport, bytes(buf))
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_REQUEST_HEAD:
                self._refuse(431, f"request head larger than {MAX_REQUEST_HEAD} bytes")
            return
        head, rest = bytes(buf[: end + 4]), bytes(buf[end + 4:])
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            self._refuse(400, f"malformed HTTP request: {e}")
            return
        if not isinstance(event, h11.Request):
            self._refuse(400, "malformed HTTP request")
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
        self._head_timer.cancel()
        self.transport.pause_reading()
        self.server._transports.discard(self.transport)

    def _refuse(self, status: int, message: str) -> None:
        self.done = True
        log.info("stream request refused: %d %s", status, message)
        self.transport.write(http_response(status, message))
        self.transport.close()
        self.buffer.clear()
